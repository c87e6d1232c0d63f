//! Tensors on GPU contexts: their data is a buffer of the device's
//! (`pskv_gpu::device`), which host code never reads; copies in and out
//! are engine ops on the device's copy pool that queue the transfer on the
//! device's copy lane and complete when the device says it is done (no
//! engine worker waits for the device meanwhile).
//!
//! The engine discipline (T1 in `mod.rs`) covers device work too: an op's
//! device work is done before the op completes, so the next op on the
//! tensor's var finds the device buffer settled.

use std::sync::Arc;

use pskv_engine::{Context, OpSpec, Property};
use pskv_gpu::device::{self, Device, HostBytes, Lane};

use super::{Storage, Tensor};
use crate::error::{KvError, Result};

/// Pushes an op that queues device work (`work`, given device `n`) on
/// `lane` and completes once that work is done.
pub(crate) fn device_op(
    t: &Tensor,
    spec: OpSpec,
    n: u32,
    lane: Lane,
    work: impl FnOnce(&dyn Device) -> Result<()> + Send + 'static,
) -> Result<()> {
    let dev = device::open(n)?;
    t.engine().push_async(spec, move |_, completion| {
        if let Err(e) = work(&*dev) {
            return completion.fail(e);
        }
        dev.then(
            lane,
            Box::new(move |r| match r {
                Ok(()) => completion.complete(),
                Err(e) => completion.fail(KvError::from(e)),
            }),
        );
    })?;
    Ok(())
}

/// The spec of a transfer between `from` and `to`, one of them a GPU:
/// on that GPU's copy pool.
fn transfer_spec(name: &'static str, from: Context, to: Context) -> (OpSpec, u32) {
    match (from, to) {
        (_, Context::Gpu(n)) => (
            OpSpec::new(name)
                .context(Context::Gpu(n))
                .property(Property::CopyToDevice),
            n,
        ),
        (Context::Gpu(n), _) => (
            OpSpec::new(name)
                .context(Context::Gpu(n))
                .property(Property::CopyFromDevice),
            n,
        ),
        _ => unreachable!("a transfer involves a GPU"),
    }
}

/// Copies `src` into `dst` of the same storage, one of them (or both, on
/// one device) on a GPU: an engine op on the copy lane.
pub(crate) fn transfer(src: &Tensor, dst: &Tensor, priority: i32) -> Result<()> {
    let (spec, n) = transfer_spec("tensor_transfer", src.ctx(), dst.ctx());
    let spec = spec.priority(priority).read(src.var()).write(dst.var());
    let (s, d) = (src.clone(), dst.clone());
    device_op(src, spec, n, Lane::Copy, move |dev| {
        // SAFETY: the op reads `s` and writes `d`, two tensors (T1).
        let (sd, dd) = unsafe { (s.data(), d.data_mut()) };
        let row_sparse = s.storage() == Storage::RowSparse;
        if row_sparse {
            dd.rows = sd.rows.clone();
        }
        let missing = || KvError::invalid("a GPU tensor without device memory");
        match (gpu_of(s.ctx()), gpu_of(d.ctx())) {
            (None, Some(_)) => {
                let len = sd.buf.len();
                if dd.dev.as_ref().is_none_or(|m| m.len() != len) {
                    dd.dev = Some(dev.alloc(len)?);
                }
                let target = dd.dev.as_ref().ok_or_else(missing)?;
                let src_bytes: HostBytes = sd.buf.clone();
                dev.upload(Lane::Copy, src_bytes, target, 0)?;
            }
            (Some(_), None) => {
                let m = sd.dev.as_ref().ok_or_else(missing)?;
                let len = m.len();
                let out: &mut [u8] = if row_sparse || dd.buf.len() != len {
                    dd.buf = Arc::new(dd.buf.zeroed_like(len));
                    Arc::get_mut(&mut dd.buf).expect("fresh").bytes_mut()
                } else {
                    dd.overwrite()
                };
                // SAFETY: `out` is `d`'s buffer, which this op alone writes
                // until it completes (after the download, `then`).
                unsafe { dev.download(Lane::Copy, m, 0, out.as_mut_ptr(), len)? };
            }
            (Some(_), Some(_)) => {
                let m = sd.dev.as_ref().ok_or_else(missing)?;
                let len = m.len();
                if dd.dev.as_ref().is_none_or(|x| x.len() != len) {
                    dd.dev = Some(dev.alloc(len)?);
                }
                let target = dd.dev.as_ref().ok_or_else(missing)?;
                dev.copy(Lane::Copy, m, 0, target, 0, len)?;
            }
            (None, None) => return Err(KvError::invalid("a transfer between two host tensors")),
        }
        Ok(())
    })
}

/// Copies `src` into `dst` whatever their contexts and storages (the two
/// of one shape and dtype): on the host when neither is on a GPU; a
/// transfer when one is and the storages agree; through host temporaries
/// otherwise (a storage change, two GPUs).
pub(crate) fn copy_any(src: &Tensor, dst: &Tensor, priority: i32) -> Result<()> {
    let (sg, dg) = (gpu_of(src.ctx()), gpu_of(dst.ctx()));
    if sg.is_none() && dg.is_none() {
        return super::host_copy(src, dst, priority);
    }
    if src.storage() == dst.storage() {
        return match (sg, dg) {
            (Some(a), Some(b)) if a != b && src.storage() == Storage::Dense => {
                peer_copy(src, dst, priority)
            }
            (Some(a), Some(b)) if a != b => {
                // Row-sparse between two GPUs: through the host.
                let t = src.zeros_like(Context::Cpu)?;
                transfer(src, &t, priority)?;
                transfer(&t, dst, priority)
            }
            _ => transfer(src, dst, priority),
        };
    }
    // Source to the host (same storage), the host conversion, then to the
    // destination's device.
    let s_host = match sg {
        Some(_) => {
            let t = src.zeros_like(Context::Cpu)?;
            transfer(src, &t, priority)?;
            t
        }
        None => src.clone(),
    };
    match dg {
        Some(_) => {
            let d_host = dst.zeros_like(Context::Cpu)?;
            super::host_copy(&s_host, &d_host, priority)?;
            transfer(&d_host, dst, priority)
        }
        None => super::host_copy(&s_host, dst, priority),
    }
}

/// Copies dense `src` on one GPU into `dst` on another, device to device
/// (an op on the destination's copy lane).
pub(crate) fn peer_copy(src: &Tensor, dst: &Tensor, priority: i32) -> Result<()> {
    let n = gpu_of(dst.ctx()).ok_or_else(|| KvError::invalid("a peer copy to the host"))?;
    let spec = OpSpec::new("tensor_peer_copy")
        .context(Context::Gpu(n))
        .property(Property::CopyToDevice)
        .priority(priority)
        .read(src.var())
        .write(dst.var());
    let (s, d) = (src.clone(), dst.clone());
    device_op(dst, spec, n, Lane::Copy, move |dev| {
        // SAFETY: reads `s`, writes `d` (T1).
        let (sd, dd) = unsafe { (s.data(), d.data_mut()) };
        let missing = || KvError::invalid("a GPU tensor without device memory");
        let (sm, dm) = (
            sd.dev.as_ref().ok_or_else(missing)?,
            dd.dev.as_ref().ok_or_else(missing)?,
        );
        Ok(dev.copy_from_peer(Lane::Copy, sm, dm)?)
    })
}

/// The GPU of a context.
pub(crate) fn gpu_of(ctx: Context) -> Option<u32> {
    match ctx {
        Context::Gpu(n) => Some(n),
        _ => None,
    }
}
