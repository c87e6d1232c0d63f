//! Host staging of device tensors for the wire (MXNet's `comm_buf_`),
//! pipelined per key part.
//!
//! The transport sends and receives host bytes. A key whose gradients or
//! outputs live on a GPU goes through host memory pinned for that GPU,
//! kept per key and per direction (send and receive are separate: a
//! push-pull reads one and writes the other in one op). Inside the one
//! engine op that sends a key:
//! - a dense push queues, per part, a device-to-host copy of the part into
//!   the send buffer, and sends the part as soon as the device reports that
//!   copy done, so part `i`'s copy overlaps the transfer of the parts before
//!   it ([`DistStore::send_staged`]);
//! - with gradient compression, per part, the part is quantized on the
//!   device with its residual, which stays there (MXNet keeps the residual
//!   beside the gradient), and only the codes come to the host
//!   ([`DistStore::send_quantized`]);
//! - answers land in the receive buffer, and each answered part is copied
//!   host-to-device into the output at once ([`DistStore::landing`]).
//!
//! The op completes only once the device lanes that carry its copies are
//! drained ([`settle`]), so the engine's rule holds: the next op on any of
//! the tensors finds no copy of this one still running. Row-sparse values
//! (their rows are host data) are staged whole, by ops of their own.
//!
//! Each device call is checked as it is queued; a failure fails that part
//! (the op fails with it), never the process.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use pskv_engine::{Completion, Context, RunContext};
use pskv_gpu::device::{self, Device, DeviceMem, Lane};
use pskv_gpu::KernelError;

use super::inflight::{Inflight, OutPtr};
use super::ops::answer_into;
use super::parts::{LandIn, OnAnswer, Round};
use super::{DistKey, DistStore, Segs};
use crate::compression::{Compression, HEADER};
use crate::error::{Fault, KvError, Result};
use crate::tensor::{gpu_of, Buf, Storage, Tensor};

/// Which way a staged tensor travels.
#[derive(Clone, Copy)]
pub(super) enum Way {
    /// To the servers (push values, init values).
    Send,
    /// From the servers (pulled values, pulled rows).
    Recv,
}

/// One key's staging buffers, made on first use.
#[derive(Default)]
pub(super) struct Staging {
    /// By direction and storage.
    slots: Mutex<[Option<Tensor>; 4]>,
    /// Compressed pushes from a GPU; touched only by ops that write the
    /// key's var.
    codes: Mutex<Option<DeviceCodes>>,
}

/// Where the answers of a pull or push-pull land: `host` (the output
/// itself, or the key's pinned receive buffer) and then, per part, the
/// output on a GPU.
pub(super) struct Landing {
    pub(super) host: Tensor,
    pub(super) device: Option<Tensor>,
}

impl Staging {
    /// The host tensor that carries `t` over the wire: `t` itself when it
    /// is on the host, else this key's pinned buffer of `t`'s shape and
    /// storage for that way.
    pub(super) fn host_for(&self, t: &Tensor, way: Way) -> Result<Tensor> {
        let Some(gpu) = gpu_of(t.ctx()) else {
            return Ok(t.clone());
        };
        let i =
            2 * matches!(way, Way::Recv) as usize + (t.storage() == Storage::RowSparse) as usize;
        let mut slots = self.slots.lock();
        if let Some(s) = slots[i]
            .as_ref()
            .filter(|s| s.ctx() == Context::CpuPinned(gpu))
        {
            return Ok(s.clone());
        }
        let s = t.zeros_like(Context::CpuPinned(gpu))?;
        slots[i] = Some(s.clone());
        Ok(s)
    }

    /// `t` on the host for sending, whole: `t` itself, or the send buffer
    /// after an op (of this priority) that copies `t` there.
    pub(super) fn send(&self, t: &Tensor, priority: i32) -> Result<Tensor> {
        let h = self.host_for(t, Way::Send)?;
        crate::comm::copy_prio(t, &h, priority)?;
        Ok(h)
    }

    /// Where answers for `out` (dense) land.
    pub(super) fn landing(&self, out: &Tensor) -> Result<Landing> {
        Ok(Landing {
            host: self.host_for(out, Way::Recv)?,
            device: gpu_of(out.ctx()).map(|_| out.clone()),
        })
    }
}

/// `t` on the host, for a one-off read (row ids, an init value): `t`
/// itself, or a new host tensor after an op that copies `t` there.
pub(super) fn host_once(t: &Tensor, priority: i32) -> Result<Tensor> {
    if gpu_of(t.ctx()).is_none() {
        return Ok(t.clone());
    }
    let h = t.zeros_like(Context::Cpu)?;
    crate::comm::copy_prio(t, &h, priority)?;
    Ok(h)
}

/// Device lanes to drain before an op completes.
pub(super) type Lanes = Vec<(Arc<dyn Device>, Lane)>;

/// Runs `then` once the work queued so far on each of `lanes` is done,
/// with the first error.
pub(super) fn settle(
    lanes: Lanes,
    then: impl FnOnce(std::result::Result<(), KernelError>) + Send + 'static,
) {
    // The host paths have no lanes: no box on their hot path.
    if lanes.is_empty() {
        return then(Ok(()));
    }
    settle_boxed(lanes, Box::new(then))
}

fn settle_boxed(mut lanes: Lanes, then: device::Done) {
    let Some((dev, lane)) = lanes.pop() else {
        return then(Ok(()));
    };
    dev.then(
        lane,
        Box::new(move |r| settle_boxed(lanes, Box::new(move |rest| then(r.and(rest))))),
    );
}

/// A pointer into host memory that an op owns for writing until it
/// completes (its staging buffer), moved into device callbacks.
#[derive(Clone, Copy)]
struct HostPtr(*mut u8);
// SAFETY: the memory is a staging buffer that one op writes (through this
// pointer only, disjoint ranges per part) until it completes.
unsafe impl Send for HostPtr {}
unsafe impl Sync for HostPtr {}

impl HostPtr {
    /// The pointer `at` bytes further.
    ///
    /// # Safety
    /// `at` is within the buffer.
    unsafe fn add(self, at: usize) -> *mut u8 {
        self.0.add(at)
    }
}

/// `len` bytes of a staging buffer from `ptr`, as an owner of the bytes
/// (a message's payload, an upload's source), keeping `keep` alive.
/// Subtle: a slice of the part alone, never of the whole buffer, whose
/// other parts the device or other answers may be writing meanwhile.
struct HostPart<K> {
    _keep: K,
    ptr: HostPtr,
    len: usize,
}

impl<K> AsRef<[u8]> for HostPart<K> {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` is within the kept buffer, whose bytes
        // there are written before this part is made and not again while
        // it lives (the op that writes the buffer next replaces a shared
        // buffer, T2, or starts after the upload reading it is done).
        unsafe { std::slice::from_raw_parts(self.ptr.0, self.len) }
    }
}

/// The device buffers of a tensor (on a GPU context), in an op (`rc`)
/// that names it; the handle is cloned, its memory reached by device work
/// only.
fn device_mem(t: &Tensor, rc: &RunContext<'_>) -> Result<DeviceMem> {
    t.read(rc)?
        .dev
        .clone()
        .ok_or_else(|| KvError::invalid("a GPU tensor without device memory"))
}

/// The device of `grad` (a tensor on a GPU) and its buffer.
fn on_device(grad: &Tensor, rc: &RunContext<'_>) -> Result<(Arc<dyn Device>, DeviceMem)> {
    let n = gpu_of(grad.ctx()).ok_or_else(|| KvError::invalid("a device send from the host"))?;
    Ok((device::open(n)?, device_mem(grad, rc)?))
}

/// A host buffer's bytes made writable (a shared one, or a detached push
/// buffer, is replaced, T2: by a copy with `keep`, else by zeroes) and its
/// address.
fn unique(buf: &mut Arc<Buf>, keep: bool) -> HostPtr {
    let fresh = |b: &Buf| {
        if keep {
            b.copy_of()
        } else {
            b.zeroed_like(b.len())
        }
    };
    HostPtr(Buf::make_writable(buf, fresh).bytes_mut().as_mut_ptr())
}

impl DistStore {
    /// The answers of an op into `land`: into its host tensor (as
    /// `answer_into`) and, for an output on a GPU, each part then copied
    /// there on the device's copy lane; with the lanes to drain before the
    /// op completes. Inside the op, which writes both tensors.
    pub(super) fn landing(
        &self,
        dk: &DistKey,
        (land, values): (&Landing, Option<&Tensor>),
        segs: Segs,
        rc: &RunContext<'_>,
    ) -> Result<(OnAnswer, Lanes, Option<LandIn>)> {
        // The op writes `land.host`; answers fill disjoint ranges of its
        // buffer until it completes. An in-place push-pull's values are
        // still to be read: a shared buffer is replaced by a copy.
        let in_place = values.is_some_and(|v| v.same(&land.host));
        let mut hd = land.host.write(rc)?;
        let base = unique(&mut hd.buf, in_place);
        let len = hd.buf.len();
        drop(hd);
        let ptr = OutPtr(base.0, len);
        let ub = dk.unit * dk.local.meta.dtype.size();
        // Not with replicas: a part sent again to the backup carries its
        // values, which may be a view of this same output (an in-place
        // push-pull), and a dying primary's answer could land over them
        // first.
        let land_in = (self.replicas == 1).then_some(LandIn {
            out: ptr,
            unit_bytes: ub,
        });
        let into_host = answer_into(dk, ptr, segs, self.po.num_workers());
        let Some(out) = &land.device else {
            return Ok((into_host, Vec::new(), land_in));
        };
        let gpu = gpu_of(out.ctx()).ok_or_else(|| KvError::invalid("a landing on the host"))?;
        let dev = device::open(gpu)?;
        let mut od = out.write(rc)?;
        if od.dev.as_ref().is_none_or(|m| m.len() != len) {
            od.dev = Some(dev.alloc(len)?);
        }
        let target = od.dev.clone().expect("allocated above");
        drop(od);
        let parts = dk.parts.clone();
        let (d, keep) = (dev.clone(), land.host.clone());
        let on_answer: OnAnswer = Arc::new(move |i, resp, landed| {
            into_host(i, resp, landed)?;
            let p = parts[i];
            let (at, n) = (p.start * ub, p.len * ub);
            let src = HostPart {
                _keep: keep.clone(),
                // SAFETY: within the buffer (`answer_into` checked the part
                // against it).
                ptr: HostPtr(unsafe { base.add(at) }),
                len: n,
            };
            d.upload(Lane::Copy, Arc::new(src), &target, at)
                .map_err(|e| Fault::Failed(format!("copying the answer to GPU {gpu}: {e}")))
        });
        Ok((on_answer, vec![(dev, Lane::Copy)], land_in))
    }

    /// Sends part `i` of an op once the device work queued for it on
    /// `lane` is done (`queued`: whether queuing it worked), with the
    /// values `payload` then builds; a failure fails the part.
    fn send_when_done(
        self: &Arc<Self>,
        dev: &dyn Device,
        lane: Lane,
        (dk, inf, round, i): (&Arc<DistKey>, &Arc<Inflight>, &Round, usize),
        queued: std::result::Result<(), Fault>,
        payload: impl FnOnce() -> std::result::Result<(Bytes, u16), Fault> + Send + 'static,
    ) {
        if let Err(e) = queued {
            return self.send_prepared(dk, inf, round, i, Err(e));
        }
        let (me, dk, inf, round) = (self.clone(), dk.clone(), inf.clone(), round.clone());
        dev.then(
            lane,
            Box::new(move |r| {
                let prepared = r.map_err(Fault::from).and_then(|()| payload());
                me.send_prepared(&dk, &inf, &round, i, prepared);
            }),
        );
    }

    /// Sends the dense gradient `grad`, on a GPU, through the pinned send
    /// buffer `h`: per part, a device-to-host copy, then the part's request
    /// once the device reports the copy done. Inside the op (it reads
    /// `grad`, writes `h`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send_staged(
        self: &Arc<Self>,
        dk: &Arc<DistKey>,
        grad: &Tensor,
        h: &Tensor,
        segs: Segs,
        mut round: Round,
        (completion, rc): (Completion, &RunContext<'_>),
        settle: Lanes,
    ) {
        let staged = on_device(grad, rc).and_then(|ds| Ok((ds, h.write(rc)?)));
        let ((dev, src), mut hd) = match staged {
            Ok(x) => x,
            Err(e) => return completion.fail(e),
        };
        let base = unique(&mut hd.buf, false);
        let buf = hd.buf.clone();
        drop(hd);
        let mut settle = settle;
        settle.push((dev.clone(), Lane::Copy));
        let n = dk.parts.len();
        let Some(inf) = self.inflight(dk, n, completion, &mut round, settle) else {
            return;
        };
        let ub = dk.unit * dk.local.meta.dtype.size();
        for (i, seg) in segs.into_iter().enumerate() {
            let p = dk.parts[i];
            let (at, len) = (p.start * ub, p.len * ub);
            // SAFETY: `at..at + len` is within `h` (the key's size), which
            // this op owns until its copy lane is drained (`settle`).
            let queued = unsafe { dev.download(Lane::Copy, &src, at, base.add(at), len) };
            let (me, buf) = (self.clone(), buf.clone());
            let part = (dk, &inf, &round, i);
            self.send_when_done(
                &*dev,
                Lane::Copy,
                part,
                queued.map_err(Fault::from),
                move || {
                    // SAFETY: within `h`, as above; the download that wrote
                    // these bytes is done.
                    let ptr = HostPtr(unsafe { base.add(at) });
                    // SAFETY: as `HostPart::as_ref` (`buf` is alive).
                    let bytes = unsafe { std::slice::from_raw_parts(ptr.0, len) };
                    me.dense_payload(seg.as_ref(), bytes, None, || {
                        Bytes::from_owner(HostPart {
                            _keep: buf.clone(),
                            ptr,
                            len,
                        })
                    })
                },
            );
        }
    }

    /// Sends the dense f32 gradient `grad`, on a GPU, compressed: per part,
    /// on the device's compute lane, a copy of the part, its quantize with
    /// the part's residual (kept on the device), and a copy of the codes to
    /// pinned memory behind the message header; the part's request once the
    /// device reports them done. Inside an op that reads `grad` and writes
    /// the key's var.
    pub(super) fn send_quantized(
        self: &Arc<Self>,
        dk: &Arc<DistKey>,
        grad: &Tensor,
        compression: Compression,
        mut round: Round,
        (completion, rc): (Completion, &RunContext<'_>),
        settle: Lanes,
    ) {
        let mut slot = dk.stage.codes.lock();
        let prepared = on_device(grad, rc).and_then(|(dev, src)| {
            DeviceCodes::ensure(&mut slot, &*dev, dk, compression)?;
            Ok((dev, src))
        });
        let (dev, src) = match prepared {
            Ok(x) => x,
            Err(e) => return completion.fail(e),
        };
        let dc = slot.as_mut().expect("ensured above");
        let base = unique(&mut dc.host, false);
        for (i, &(off, _)) in dc.msgs.iter().enumerate() {
            let p = dk.parts[i];
            let mut head = [0u8; HEADER];
            // At most u32::MAX elements (`ensure` checked).
            head[..4].copy_from_slice(&((p.len * dk.unit) as u32).to_le_bytes());
            head[4..].copy_from_slice(&compression.threshold().to_le_bytes());
            // SAFETY: `off..off + HEADER` is within `dc.host`, made unique
            // above and written by this op alone.
            unsafe { std::ptr::copy_nonoverlapping(head.as_ptr(), base.add(off), HEADER) };
        }
        let buf = dc.host.clone();
        let mut settle = settle;
        settle.push((dev.clone(), Lane::Compute));
        let n = dk.parts.len();
        let Some(inf) = self.inflight(dk, n, completion, &mut round, settle) else {
            return;
        };
        let unit = dk.unit * 4;
        for i in 0..n {
            let p = dk.parts[i];
            let (off, len) = dc.msgs[i];
            let queued = dev
                .copy(
                    Lane::Compute,
                    &src,
                    p.start * unit,
                    &dc.grad[i],
                    0,
                    p.len * unit,
                )
                .map_err(KvError::from)
                .and_then(|()| {
                    let (g, r, c) = (&dc.grad[i], &dc.residual[i], &dc.codes[i]);
                    compression.quantize_on(&*dev, Lane::Compute, g, r, c)
                })
                .and_then(|()| {
                    // SAFETY: the codes land behind the part's header,
                    // within `dc.host`, which this op owns until its
                    // compute lane is drained (`settle`).
                    let codes = unsafe { base.add(off + HEADER) };
                    // SAFETY: as above.
                    let queued = unsafe {
                        dev.download(Lane::Compute, &dc.codes[i], 0, codes, len - HEADER)
                    };
                    Ok(queued?)
                });
            let buf = buf.clone();
            let part = (dk, &inf, &round, i);
            self.send_when_done(
                &*dev,
                Lane::Compute,
                part,
                queued.map_err(Fault::from),
                move || {
                    let part = HostPart {
                        _keep: buf,
                        // SAFETY: the part's message within `dc.host`, written
                        // (header, then the download) by now.
                        ptr: HostPtr(unsafe { base.add(off) }),
                        len,
                    };
                    Ok((Bytes::from_owner(part), 0))
                },
            );
        }
    }
}

/// The device side of a key's compressed pushes from a GPU: per part, a
/// copy of the gradient's part, the part's residual (the error feedback,
/// kept across pushes) and its codes, on the device; and pinned host
/// memory where each part's message (header, then codes) is assembled.
struct DeviceCodes {
    gpu: u32,
    grad: Vec<DeviceMem>,
    residual: Vec<DeviceMem>,
    codes: Vec<DeviceMem>,
    host: Arc<Buf>,
    /// Per part: where its message starts in `host`, and its bytes.
    msgs: Vec<(usize, usize)>,
}

impl DeviceCodes {
    /// Makes `slot` hold the buffers for `compression` on `dev`: made on
    /// first use; the codes and messages again when the scheme's code size
    /// changes; all again (the residual from zero) when the gradient moves
    /// to another GPU.
    fn ensure(
        slot: &mut Option<DeviceCodes>,
        dev: &dyn Device,
        dk: &DistKey,
        compression: Compression,
    ) -> Result<()> {
        let elems: Vec<usize> = dk.parts.iter().map(|p| p.len * dk.unit).collect();
        if let Some(&n) = elems.iter().find(|&&n| n > u32::MAX as usize) {
            return Err(KvError::invalid(format!(
                "a compressed part holds at most {} elements, got {n}",
                u32::MAX
            )));
        }
        let mut msgs = Vec::with_capacity(elems.len());
        let mut at = 0;
        for &n in &elems {
            let len = HEADER + 4 * compression.words(n);
            msgs.push((at, len));
            // 8-byte aligned messages.
            at += len.next_multiple_of(8);
        }
        if slot.as_ref().is_some_and(|d| d.gpu != dev.ordinal()) {
            *slot = None;
        }
        let fresh = slot.is_none();
        if fresh {
            let mut grad = Vec::with_capacity(elems.len());
            let mut residual = Vec::with_capacity(elems.len());
            for &n in &elems {
                grad.push(dev.alloc(4 * n)?);
                residual.push(dev.alloc(4 * n)?);
            }
            *slot = Some(DeviceCodes {
                gpu: dev.ordinal(),
                grad,
                residual,
                codes: Vec::new(),
                host: Arc::new(Buf::zeroed(0)),
                msgs: Vec::new(),
            });
        }
        let dc = slot.as_mut().expect("made above");
        if dc.msgs != msgs {
            dc.codes = msgs
                .iter()
                .map(|&(_, len)| dev.alloc(len - HEADER))
                .collect::<std::result::Result<_, _>>()?;
            dc.host = Arc::new(Buf::pinned(dev.ordinal(), at)?);
            dc.msgs = msgs;
        }
        Ok(())
    }
}
