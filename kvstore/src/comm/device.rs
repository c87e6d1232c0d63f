//! Reductions on a GPU (MXNet's CommDevice): the values of one key from
//! several devices are brought to the merge buffer's device by
//! device-to-device copies and summed there by the device's sum kernel, in
//! input order, so the result is the host path's to the bit. With
//! compression, each value is quantized on its own device with its own
//! residual (kept there), and the codes travel to the merge device to be
//! dequantized and summed (what crosses between devices is the codes).

use std::collections::HashMap;

use parking_lot::Mutex;
use pskv_engine::{Context, OpSpec};
use pskv_gpu::device::{Lane, SumType};

use crate::compression::Compression;
use crate::dtype::DType;
use crate::error::{KvError, Result};
use crate::tensor::{copy_any, device_op, gpu_of, Tensor};

/// What a key keeps on devices between reductions: per input, a buffer on
/// the merge device; with compression, per input, the residual, codes (on
/// the input's device and on the merge device) and the dequantized value.
#[derive(Default)]
pub(crate) struct DeviceScratch {
    bufs: Mutex<HashMap<(&'static str, usize, Context), Tensor>>,
}

impl DeviceScratch {
    /// A zeroed f32 (or `like`'s type) buffer of `n` elements on `ctx`, kept
    /// under `(what, i)`.
    fn buffer(
        &self,
        what: &'static str,
        i: usize,
        like: &Tensor,
        shape: &[usize],
        dtype: DType,
        ctx: Context,
    ) -> Result<Tensor> {
        let mut m = self.bufs.lock();
        if let Some(t) = m.get(&(what, i, ctx)) {
            return Ok(t.clone());
        }
        let t = Tensor::zeros(like.engine(), shape, dtype, ctx)?;
        m.insert((what, i, ctx), t.clone());
        Ok(t)
    }
}

impl DeviceScratch {
    /// A buffer like `v` on `ctx`, kept for input (or tree node) `i`.
    pub(crate) fn buffer_for(&self, i: usize, v: &Tensor, ctx: Context) -> Result<Tensor> {
        self.buffer("tree", i, v, v.shape(), v.dtype(), ctx)
    }
}

/// The device sum type of a dtype (None: the device has no sum for it).
pub(crate) fn sum_type(d: DType) -> Option<SumType> {
    match d {
        DType::F32 => Some(SumType::F32),
        DType::F64 => Some(SumType::F64),
        DType::F16 => Some(SumType::F16),
        DType::I32 | DType::I64 => None,
    }
}

/// Pushes the ops that write `sum(inputs)` (dense, in order) into `out`,
/// a dense tensor on a GPU, on that GPU.
pub(crate) fn reduce(
    inputs: &[Tensor],
    out: &Tensor,
    scratch: &DeviceScratch,
    compression: Compression,
    priority: i32,
) -> Result<()> {
    let m = gpu_of(out.ctx()).ok_or_else(|| KvError::invalid("a device reduce to the host"))?;
    let ty = sum_type(out.dtype())
        .ok_or_else(|| KvError::invalid(format!("no device sum for {}", out.dtype())))?;
    let mut srcs = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let src = if compression.is_on() {
            compressed(i, input, out, scratch, compression, priority)?
        } else if input.ctx() == out.ctx() {
            input.clone()
        } else {
            let b = scratch.buffer("in", i, out, out.shape(), out.dtype(), out.ctx())?;
            copy_any(input, &b, priority)?;
            b
        };
        srcs.push(src);
    }
    sum(&srcs, out, m, ty, priority)
}

/// Pushes the op that writes `sum(srcs)` into `out`, all on GPU `m`.
pub(crate) fn sum(srcs: &[Tensor], out: &Tensor, m: u32, ty: SumType, priority: i32) -> Result<()> {
    if srcs.len() == 1 {
        return copy_any(&srcs[0], out, priority);
    }
    let spec = OpSpec::new("kvstore_reduce_device")
        .context(Context::Gpu(m))
        .priority(priority)
        .reads(srcs.iter().map(Tensor::var))
        .write(out.var());
    let (ins, o) = (srcs.to_vec(), out.clone());
    device_op(out, spec, m, Lane::Compute, move |dev, rc| {
        let mems = ins
            .iter()
            .map(|t| Ok(t.read(rc)?.dev.clone()))
            .collect::<Result<Option<Vec<_>>>>()?
            .ok_or_else(|| KvError::invalid("a device sum of a host tensor"))?;
        let od = o.write(rc)?;
        let om = od
            .dev
            .as_ref()
            .ok_or_else(|| KvError::invalid("a device sum into a host tensor"))?;
        Ok(dev.sum(Lane::Compute, ty, om, &mems)?)
    })
}

/// Input `i` through quantize (on its own device, with its residual there)
/// and dequantize (on the merge device): the tensor to sum.
fn compressed(
    i: usize,
    input: &Tensor,
    out: &Tensor,
    scratch: &DeviceScratch,
    c: Compression,
    priority: i32,
) -> Result<Tensor> {
    let n = input.len();
    let home = match input.ctx() {
        g @ Context::Gpu(_) => g,
        // A host value: quantized on the merge device.
        _ => out.ctx(),
    };
    let g = if input.ctx() == home {
        input.clone()
    } else {
        let b = scratch.buffer("in", i, out, &[n], DType::F32, home)?;
        copy_any(input, &b, priority)?;
        b
    };
    let words = c.words(n);
    let residual = scratch.buffer("residual", i, out, &[n], DType::F32, home)?;
    let codes = scratch.buffer("codes", i, out, &[words], DType::I32, home)?;
    quantize(&g, &residual, &codes, c, priority)?;
    let codes_here = if home == out.ctx() {
        codes
    } else {
        let b = scratch.buffer("codes_merge", i, out, &[words], DType::I32, out.ctx())?;
        copy_any(&codes, &b, priority)?;
        b
    };
    let deq = scratch.buffer("dequantized", i, out, &[n], DType::F32, out.ctx())?;
    dequantize(&codes_here, &deq, c, priority)?;
    Ok(deq)
}

/// Pushes the op that quantizes `grad` into `codes` with `residual`, on
/// their GPU.
pub(crate) fn quantize(
    grad: &Tensor,
    residual: &Tensor,
    codes: &Tensor,
    c: Compression,
    priority: i32,
) -> Result<()> {
    let m = gpu_of(grad.ctx()).ok_or_else(|| KvError::invalid("a device quantize on the host"))?;
    let spec = OpSpec::new("kvstore_quantize_device")
        .context(Context::Gpu(m))
        .priority(priority)
        .read(grad.var())
        .write(residual.var())
        .write(codes.var());
    let (g, r, k) = (grad.clone(), residual.clone(), codes.clone());
    device_op(grad, spec, m, Lane::Compute, move |dev, rc| {
        let (gm, rm, km) = (
            g.read(rc)?.dev.clone(),
            r.write(rc)?.dev.clone(),
            k.write(rc)?.dev.clone(),
        );
        let missing = || KvError::invalid("a device quantize of a host tensor");
        let (gm, rm, km) = (
            gm.ok_or_else(missing)?,
            rm.ok_or_else(missing)?,
            km.ok_or_else(missing)?,
        );
        c.quantize_on(dev, Lane::Compute, &gm, &rm, &km)
    })
}

/// Pushes the op that dequantizes `codes` into `out`, on their GPU.
pub(crate) fn dequantize(
    codes: &Tensor,
    out: &Tensor,
    c: Compression,
    priority: i32,
) -> Result<()> {
    let m = gpu_of(out.ctx()).ok_or_else(|| KvError::invalid("a device dequantize on the host"))?;
    let spec = OpSpec::new("kvstore_dequantize_device")
        .context(Context::Gpu(m))
        .priority(priority)
        .read(codes.var())
        .write(out.var());
    let (k, o) = (codes.clone(), out.clone());
    device_op(out, spec, m, Lane::Compute, move |dev, rc| {
        let (km, om) = (k.read(rc)?.dev.clone(), o.write(rc)?.dev.clone());
        let missing = || KvError::invalid("a device dequantize of a host tensor");
        let (km, om) = (km.ok_or_else(missing)?, om.ok_or_else(missing)?);
        c.dequantize_on(dev, Lane::Compute, &km, &om)
    })
}
