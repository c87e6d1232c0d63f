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

use pskv_engine::{Context, OpSpec, Property, RunContext};
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
    work: impl FnOnce(&dyn Device, &RunContext<'_>) -> Result<()> + Send + 'static,
) -> Result<()> {
    let dev = device::open(n)?;
    t.engine().push_async(spec, move |rc, completion| {
        if let Err(e) = work(&*dev, &rc) {
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
    device_op(src, spec, n, Lane::Copy, move |dev, rc| {
        let (sd, mut dd) = (s.read(rc)?, d.write(rc)?);
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
    device_op(dst, spec, n, Lane::Copy, move |dev, rc| {
        let (sd, dd) = (s.read(rc)?, d.write(rc)?);
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

#[cfg(test)]
mod tests {
    //! On emulated devices of their own (ordinals no other test uses), so
    //! that a lane held here holds no other test.
    use std::sync::mpsc::{channel, Receiver};
    use std::sync::Mutex;
    use std::time::Duration;

    use pskv_engine::{Engine, Var};

    use super::*;
    use crate::dtype::DType;

    const T: Duration = Duration::from_secs(20);

    fn engine() -> Engine {
        Engine::builder()
            .cpu_threads(1)
            .gpu_threads(1)
            .gpu_copy_threads(1)
            .build()
            .unwrap()
    }

    /// Device work that holds `lane` until `release` says so.
    fn hold(dev: &dyn Device, lane: Lane, release: Receiver<()>) {
        dev.then(
            lane,
            Box::new(move |_| {
                release.recv_timeout(T).expect("released");
            }),
        );
    }

    #[test]
    fn a_busy_compute_lane_holds_no_copy_and_completion_comes_from_the_device() {
        let e = engine();
        let a = Tensor::zeros(&e, &[4], DType::F32, Context::Gpu(15)).unwrap();
        let (release, rx) = channel();
        let spec = OpSpec::new("hold_compute")
            .context(Context::Gpu(15))
            .write(a.var());
        device_op(&a, spec, 15, Lane::Compute, move |dev, _| {
            hold(dev, Lane::Compute, rx);
            Ok(())
        })
        .unwrap();
        // The compute lane is held (and the engine's one compute thread is
        // free: the op waits for the device, not on a thread): an upload and
        // a download on the copy lane go through.
        let b = Tensor::from_slice(&e, &[4], &[1.0f32, 2.0, 3.0, 4.0], Context::Gpu(15)).unwrap();
        assert_eq!(b.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        // The held op is not done until its device work is.
        assert!(e
            .wait_for_var_timeout(a.var(), Duration::from_millis(100))
            .is_err());
        release.send(()).unwrap();
        e.wait_for_var_timeout(a.var(), T).unwrap();
    }

    #[test]
    fn each_lane_runs_ready_ops_in_priority_order() {
        for (lane, prop) in [
            (Lane::Copy, Property::CopyToDevice),
            (Lane::Compute, Property::Normal),
        ] {
            let e = engine();
            let t = Tensor::zeros(&e, &[4], DType::F32, Context::Gpu(14)).unwrap();
            t.wait_to_read().unwrap();
            // Hold the pool's one thread, queue ops of mixed priorities,
            // then let them go.
            let (release, rx) = channel::<()>();
            let spec = OpSpec::new("hold_pool")
                .context(Context::Gpu(14))
                .property(prop)
                .write(&Var::new());
            e.push_sync(spec, move |_| {
                rx.recv_timeout(T).expect("released");
                Ok(())
            })
            .unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let order = std::sync::Arc::new(Mutex::new(Vec::new()));
            let vars: Vec<Var> = (0..5).map(|_| Var::new()).collect();
            for (p, v) in [1, 9, -3, 5, 0].into_iter().zip(&vars) {
                let spec = OpSpec::new("ordered")
                    .context(Context::Gpu(14))
                    .property(prop)
                    .priority(p)
                    .write(v);
                let o = order.clone();
                device_op(&t, spec, 14, lane, move |dev, _| {
                    o.lock().unwrap().push(p);
                    // Device work on the lane, so completion comes from it.
                    hold(dev, lane, {
                        let (tx, rx) = channel();
                        tx.send(()).unwrap();
                        rx
                    });
                    Ok(())
                })
                .unwrap();
            }
            release.send(()).unwrap();
            for v in &vars {
                e.wait_for_var_timeout(v, T).unwrap();
            }
            assert_eq!(*order.lock().unwrap(), vec![9, 5, 1, 0, -3], "{lane:?}");
        }
    }
}
