//! Reducing the values one key has on several devices, and broadcasting a
//! value back to them: MXNet's `comm.h` (CommCPU, CommDevice and
//! CommDeviceTree) as engine ops over pskv-gpu's kernels.
//!
//! Sums are always taken in a fixed order (the order of the inputs, or the
//! tree's order), so results are reproducible bit for bit.
//!
//! Where a reduction runs follows its output: a merge buffer on a GPU is
//! summed on that GPU (`device.rs`, from the inputs brought there by
//! device-to-device copies); one on the host is summed by the CPU kernels,
//! from host copies of inputs that live on GPUs (MXNet's CommCPU). The
//! kinds choose: `device` and `dist_sync_device` merge on the first
//! value's device, the others on the host.

mod device;
pub mod tree;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use half::f16;
use parking_lot::Mutex;
use pskv_engine::{Context, OpSpec};
use pskv_gpu::{cpu::CpuKernels, Kernels};
use smallvec::SmallVec;

use crate::compression::Compression;
use crate::dtype::DType;
use crate::error::{Fault, Result};
use crate::key::Key;
use crate::tensor::{copy_any, gpu_of, Buf, Data, Storage, Tensor};
use tree::Topology;

/// Where reductions run.
#[derive(Clone, Debug)]
pub(crate) enum CommMode {
    /// On the CPU (kvstore `local`, `dist_sync`, `dist_async`).
    Cpu,
    /// On the devices (kvstore `device`, `dist_sync_device`), along a tree
    /// when one is given.
    Device { tree: Option<Topology> },
}

/// What one key keeps between reductions: per-device partial sums (tree),
/// per-input compression residuals (host), host copies of inputs on GPUs,
/// and the device buffers of device reductions.
#[derive(Default)]
pub(crate) struct Scratch {
    partials: Mutex<HashMap<u32, Tensor>>,
    residuals: Arc<Mutex<Vec<Vec<f32>>>>,
    staged: Mutex<HashMap<usize, Tensor>>,
    device: device::DeviceScratch,
}

impl Scratch {
    /// `v` (from device `from`) copied to device `to` by a device-to-device
    /// copy, into a buffer kept for the pair.
    fn device_copy(&self, from: usize, to: usize, v: &Tensor, priority: i32) -> Result<Tensor> {
        let ctx = Context::Gpu(to as u32);
        if v.ctx() == ctx {
            return Ok(v.clone());
        }
        let b = self.device.buffer_for(from, v, ctx)?;
        copy_any(v, &b, priority)?;
        Ok(b)
    }

    /// A host copy of input `i` (pinned for its GPU), made by a copy op.
    fn staged(&self, i: usize, input: &Tensor, priority: i32) -> Result<Tensor> {
        let ctx = match input.ctx() {
            Context::Gpu(n) => Context::CpuPinned(n),
            c => c,
        };
        let t = {
            let mut m = self.staged.lock();
            match m
                .get(&i)
                .filter(|t| t.ctx() == ctx && t.storage() == input.storage())
            {
                Some(t) => t.clone(),
                None => {
                    let t = input.zeros_like(ctx)?;
                    m.insert(i, t.clone());
                    t
                }
            }
        };
        copy_any(input, &t, priority)?;
        Ok(t)
    }
}

/// The reducer and broadcaster of a store.
#[derive(Clone)]
pub(crate) struct Comm {
    pub(crate) kernels: Arc<CpuKernels>,
    mode: CommMode,
}

impl Comm {
    pub(crate) fn new(kernels: Arc<CpuKernels>, mode: CommMode) -> Comm {
        Comm { kernels, mode }
    }

    /// Pushes the op(s) that write the sum of `inputs` (in order) into
    /// `out`. With compression (device mode), each input is first
    /// quantized with its own residual and dequantized, as MXNet's
    /// CommDevice does.
    pub(crate) fn reduce(
        &self,
        key: &Key,
        inputs: &[Tensor],
        out: &Tensor,
        scratch: &Scratch,
        compression: Compression,
        priority: i32,
    ) -> Result<()> {
        let on_device = gpu_of(out.ctx()).is_some()
            && out.storage() == Storage::Dense
            && inputs.iter().all(|t| t.storage() == Storage::Dense)
            && device::sum_type(out.dtype()).is_some();
        if on_device {
            if let CommMode::Device { tree: Some(topo) } = &self.mode {
                if !compression.is_on() && inputs.len() > 2 {
                    if let Some(devs) = distinct_gpus(inputs) {
                        return self.reduce_tree(key, inputs, &devs, out, scratch, topo, priority);
                    }
                }
            }
            return device::reduce(inputs, out, &scratch.device, compression, priority);
        }
        if gpu_of(out.ctx()).is_some() {
            // A merge buffer on a GPU that its device cannot sum (row-sparse,
            // integers): summed on the host, then copied there.
            let h = out.zeros_like(Context::Cpu)?;
            self.reduce_host(key, inputs, &h, scratch, compression, priority)?;
            return copy_any(&h, out, priority);
        }
        self.reduce_host(key, inputs, out, scratch, compression, priority)
    }

    /// The reduction on the host, from host copies of the inputs on GPUs.
    fn reduce_host(
        &self,
        key: &Key,
        inputs: &[Tensor],
        out: &Tensor,
        scratch: &Scratch,
        compression: Compression,
        priority: i32,
    ) -> Result<()> {
        let inputs: Vec<Tensor> = inputs
            .iter()
            .enumerate()
            .map(|(i, t)| match t.ctx() {
                Context::Gpu(_) => scratch.staged(i, t, priority),
                _ => Ok(t.clone()),
            })
            .collect::<Result<_>>()?;
        let spec = OpSpec::new("kvstore_reduce")
            .context(Context::Cpu)
            .priority(priority)
            .reads(inputs.iter().map(Tensor::var))
            .write(out.var());
        let (ins, o, k) = (inputs, out.clone(), self.kernels.clone());
        let residuals = scratch.residuals.clone();
        let kname = key.to_string();
        out.engine().push_sync(spec, move |rc| {
            let guards = ins
                .iter()
                .map(|t| t.read(&rc))
                .collect::<Result<Vec<_>>>()?;
            let datas: Vec<&Data> = guards.iter().map(|g| &**g).collect();
            let mut od = o.write(&rc)?;
            if compression.is_on() {
                let mut res = residuals.lock();
                sum_compressed(&k, compression, &datas, &mut od, &mut res, o.len())
            } else {
                sum_into(
                    &k,
                    o.dtype(),
                    o.row_len(),
                    &ins,
                    &datas,
                    o.storage(),
                    &mut od,
                )
            }
            .map_err(|e| format!("reducing key {kname}: {e}").into())
        })?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn reduce_tree(
        &self,
        key: &Key,
        inputs: &[Tensor],
        devs: &[u32],
        out: &Tensor,
        scratch: &Scratch,
        topo: &Topology,
        priority: i32,
    ) -> Result<()> {
        let idx: Vec<usize> = devs.iter().map(|&d| d as usize).collect();
        let root = idx[(key.id() % idx.len() as u64) as usize];
        let tree = if topo.len() > *idx.iter().max().expect("inputs") {
            topo.tree(&idx, root)?
        } else {
            Topology::uniform(idx.iter().max().expect("inputs") + 1).tree(&idx, root)?
        };
        let input_of = |d: usize| &inputs[idx.iter().position(|&x| x == d).expect("a device")];
        let mut partials = scratch.partials.lock();
        for d in tree.post_order() {
            let children = tree.children(d);
            if children.is_empty() {
                continue;
            }
            // The root sums straight into `out` when `out` is on its device;
            // else into a partial there, copied to `out` after.
            let dest = if d == root && out.ctx() == Context::Gpu(d as u32) {
                out.clone()
            } else {
                match partials.get(&(d as u32)) {
                    Some(t) => t.clone(),
                    None => {
                        let t = out.zeros_like(Context::Gpu(d as u32))?;
                        partials.insert(d as u32, t.clone());
                        t
                    }
                }
            };
            // Own value first, then each child's partial (or value, for a
            // leaf), deepest level first; a child's copied to this device.
            let mut srcs = vec![input_of(d).clone()];
            for c in children {
                let child_has_children = !tree.children(c).is_empty();
                let v = if child_has_children {
                    partials[&(c as u32)].clone()
                } else {
                    input_of(c).clone()
                };
                let here = scratch.device_copy(c, d, &v, priority)?;
                srcs.push(here);
            }
            let ty = device::sum_type(out.dtype())
                .ok_or_else(|| crate::error::KvError::invalid("no device sum for this type"))?;
            device::sum(&srcs, &dest, d as u32, ty, priority)?;
        }
        if out.ctx() != Context::Gpu(root as u32) {
            let at_root = partials
                .get(&(root as u32))
                .cloned()
                .ok_or_else(|| crate::error::KvError::invalid("the tree's root has no sum"))?;
            copy_any(&at_root, out, priority)?;
        }
        Ok(())
    }

    /// Pushes the copies of `src` into every tensor of `outs`.
    pub(crate) fn broadcast(&self, src: &Tensor, outs: &[Tensor], priority: i32) -> Result<()> {
        // From the host to two or more GPUs: one host-to-device copy to the
        // first, then device-to-device copies from it (MXNet's CommDevice):
        // the host link is crossed once.
        let on_gpu = |t: &Tensor| gpu_of(t.ctx()).is_some() && t.storage() == Storage::Dense;
        let hub = outs.iter().find(|o| on_gpu(o) && !o.same(src));
        let fan_out = gpu_of(src.ctx()).is_none()
            && src.storage() == Storage::Dense
            && outs.iter().filter(|o| on_gpu(o) && !o.same(src)).count() >= 2;
        match hub {
            Some(hub) if fan_out => {
                copy_prio(src, hub, priority)?;
                for o in outs {
                    if o.same(hub) {
                        continue;
                    }
                    let from = if on_gpu(o) { hub } else { src };
                    copy_prio(from, o, priority)?;
                }
            }
            _ => {
                for o in outs {
                    copy_prio(src, o, priority)?;
                }
            }
        }
        Ok(())
    }
}

/// Copies `src` to `dst` as an op (or ops) of this priority, whatever
/// their contexts.
pub(crate) fn copy_prio(src: &Tensor, dst: &Tensor, priority: i32) -> Result<()> {
    if src.same(dst) {
        return Ok(());
    }
    crate::tensor::copy_any(src, dst, priority)
}

/// The GPU ids of the inputs, if they are all on distinct GPUs.
fn distinct_gpus(inputs: &[Tensor]) -> Option<Vec<u32>> {
    let mut ids = Vec::with_capacity(inputs.len());
    for t in inputs {
        match t.ctx() {
            Context::Gpu(n) if !ids.contains(&n) => ids.push(n),
            _ => return None,
        }
    }
    Some(ids)
}

/// Sums `inputs` (dense or row-sparse, in order) into `out`.
pub(crate) fn sum_into(
    k: &CpuKernels,
    dtype: DType,
    row_len: usize,
    tensors: &[Tensor],
    datas: &[&Data],
    out_storage: Storage,
    out: &mut Data,
) -> Result<(), Fault> {
    let all_dense = tensors.iter().all(|t| t.storage() == Storage::Dense);
    if all_dense && out_storage == Storage::Dense {
        let ins: Vec<&[u8]> = datas.iter().map(|d| d.bytes()).collect();
        return sum_dense(k, dtype, out.overwrite(), &ins);
    }
    // Row-sparse inputs: the union of rows, each summed in input order.
    let parts: Vec<(std::borrow::Cow<'_, [i64]>, &[u8])> = tensors
        .iter()
        .zip(datas)
        .map(|(t, d)| match t.storage() {
            Storage::RowSparse => (std::borrow::Cow::Borrowed(&d.rows[..]), d.bytes()),
            Storage::Dense => (
                std::borrow::Cow::Owned((0..t.shape()[0] as i64).collect()),
                d.bytes(),
            ),
        })
        .collect();
    let refs: Vec<(&[i64], &[u8])> = parts.iter().map(|(r, b)| (&r[..], *b)).collect();
    let (rows, buf) = sum_row_sparse(k, dtype, row_len, &refs)?;
    match out_storage {
        Storage::RowSparse => out.set(rows, buf),
        Storage::Dense => {
            let rb = row_len * dtype.size();
            let o = out.overwrite();
            o.fill(0);
            for (i, &r) in rows.iter().enumerate() {
                let r = r as usize;
                o[r * rb..(r + 1) * rb].copy_from_slice(&buf.bytes()[i * rb..(i + 1) * rb]);
            }
        }
    }
    Ok(())
}

/// `out = inputs[0] + inputs[1] + ...`, element by element, left to right
/// (f16 in f32, rounded once; integers wrap).
pub(crate) fn sum_dense(
    k: &CpuKernels,
    dtype: DType,
    out: &mut [u8],
    inputs: &[&[u8]],
) -> Result<(), Fault> {
    if let Some(bad) = inputs.iter().find(|i| i.len() != out.len()) {
        return Err(Fault::Mismatch(format!(
            "an input has {} bytes, the output {}",
            bad.len(),
            out.len()
        )));
    }
    if inputs.len() == 1 {
        out.copy_from_slice(inputs[0]);
        return Ok(());
    }
    // The inputs may be plain bytes of a message, not aligned to the type:
    // read in place where they are, copied where not.
    // Inline for up to 4 inputs: no allocation per round of a few workers.
    fn typed<'a, T: bytemuck::Pod>(ins: &[&'a [u8]]) -> SmallVec<[Cow<'a, [T]>; 4]> {
        ins.iter().map(|b| elems::<T>(b)).collect()
    }
    fn refs<'a, T>(v: &'a [Cow<'_, [T]>]) -> SmallVec<[&'a [T]; 4]>
    where
        [T]: ToOwned,
    {
        v.iter().map(|c| &c[..]).collect()
    }
    match dtype {
        DType::F32 => Ok(k.sum::<f32>(bytemuck::cast_slice_mut(out), &refs(&typed(inputs)))?),
        DType::F64 => Ok(k.sum::<f64>(bytemuck::cast_slice_mut(out), &refs(&typed(inputs)))?),
        DType::F16 => Ok(k.sum::<f16>(bytemuck::cast_slice_mut(out), &refs(&typed(inputs)))?),
        DType::I32 => {
            wrapping_sum(out, &refs(&typed(inputs)), i32::wrapping_add);
            Ok(())
        }
        DType::I64 => {
            wrapping_sum(out, &refs(&typed(inputs)), i64::wrapping_add);
            Ok(())
        }
    }
}

/// Little-endian elements of `b`, read in place when aligned, copied when
/// not (bytes of a message may start anywhere).
pub(crate) fn elems<T: bytemuck::Pod>(b: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(b) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(
            b.chunks_exact(std::mem::size_of::<T>())
                .map(bytemuck::pod_read_unaligned)
                .collect(),
        ),
    }
}

/// `out = ins[0] + ins[1] + ...` in input order, with `plus` (the integer
/// keys' wrapping addition).
fn wrapping_sum<T: bytemuck::Pod>(out: &mut [u8], ins: &[&[T]], plus: impl Fn(T, T) -> T) {
    let o: &mut [T] = bytemuck::cast_slice_mut(out);
    o.copy_from_slice(ins[0]);
    for i in &ins[1..] {
        for (a, b) in o.iter_mut().zip(i.iter()) {
            *a = plus(*a, *b);
        }
    }
}

/// Sums row-sparse inputs: the union of their rows (ascending), each row
/// the sum of the inputs that have it, in input order.
pub(crate) fn sum_row_sparse(
    k: &CpuKernels,
    dtype: DType,
    row_len: usize,
    inputs: &[(&[i64], &[u8])],
) -> Result<(Vec<i64>, Buf), Fault> {
    let rb = row_len * dtype.size();
    for (rows, bytes) in inputs {
        if bytes.len() != rows.len() * rb {
            return Err(Fault::Mismatch(format!(
                "{} rows of {rb} bytes need {} bytes, got {}",
                rows.len(),
                rows.len() * rb,
                bytes.len()
            )));
        }
    }
    let mut all: Vec<i64> = inputs.iter().flat_map(|(r, _)| r.iter().copied()).collect();
    all.sort_unstable();
    all.dedup();
    let mut buf = Buf::zeroed(all.len() * rb);
    let mut cursor = vec![0usize; inputs.len()];
    for (i, &row) in all.iter().enumerate() {
        let mut srcs: Vec<&[u8]> = Vec::new();
        for (j, (rows, bytes)) in inputs.iter().enumerate() {
            if rows.get(cursor[j]) == Some(&row) {
                srcs.push(&bytes[cursor[j] * rb..(cursor[j] + 1) * rb]);
                cursor[j] += 1;
            }
        }
        sum_dense(k, dtype, &mut buf.bytes_mut()[i * rb..(i + 1) * rb], &srcs)?;
    }
    Ok((all, buf))
}

/// Device-side compression before the sum: each input through quantize
/// and dequantize with its own residual, then summed in order (f32 only).
fn sum_compressed(
    k: &CpuKernels,
    c: Compression,
    datas: &[&Data],
    out: &mut Data,
    residuals: &mut Vec<Vec<f32>>,
    n: usize,
) -> Result<(), Fault> {
    residuals.resize_with(datas.len(), || vec![0.0; n]);
    let mut deq: Vec<Vec<f32>> = Vec::with_capacity(datas.len());
    for (d, r) in datas.iter().zip(residuals.iter_mut()) {
        let g: &[f32] = d.typed();
        let mut codes = vec![0u32; c.words(n)];
        c.quantize(k, g, r, &mut codes)?;
        let mut v = vec![0.0f32; n];
        c.dequantize(k, &codes, &mut v)?;
        deq.push(v);
    }
    let ins: Vec<&[u8]> = deq.iter().map(|v| bytemuck::cast_slice(&v[..])).collect();
    sum_dense(k, DType::F32, out.overwrite(), &ins)
}
