//! Verbs over the `ibverbs` crate (feature `rdma`), for machines with an
//! RDMA device.
//!
//! What `ibverbs` 0.9 offers is two-sided: send and receive. It exposes no
//! RDMA write (nor the raw handles to post one), so this backend reports
//! `supports_write_imm() == false` and the van sends everything through its
//! eager path (registered slots, no kernel involvement). The rendezvous path
//! runs with the emulated verbs in tests.
//!
//! Lifetimes: `ibverbs` ties queue pairs and completion queues to the
//! context and protection domain by reference. The context and protection
//! domain are opened once per process and kept for its life; each queue
//! pair's completion queue is kept for the process's life too (one per link
//! ever made: a few hundred bytes of driver state each).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::verbs::{Completion, Device, QueuePair, Region, RemoteRegion, VerbsError};

struct Opened {
    name: String,
    ctx: &'static ibverbs::Context,
    pd: &'static ibverbs::ProtectionDomain<'static>,
}

/// The first RDMA device of this machine, opened once.
pub(crate) fn open_first() -> Result<Arc<IbvDevice>, String> {
    static OPENED: OnceLock<Result<Arc<IbvDevice>, String>> = OnceLock::new();
    OPENED
        .get_or_init(|| {
            // ENOSYS (no kernel support) and an empty list both mean: none.
            let list = ibverbs::devices().map_err(|e| format!("no RDMA devices ({e})"))?;
            let dev = list.get(0).ok_or("no RDMA devices on this machine")?;
            let name = dev
                .name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "rdma0".into());
            let ctx = dev.open().map_err(|e| format!("opening {name}: {e}"))?;
            let ctx: &'static ibverbs::Context = Box::leak(Box::new(ctx));
            let pd = ctx
                .alloc_pd()
                .map_err(|e| format!("allocating a protection domain on {name}: {e}"))?;
            let pd: &'static ibverbs::ProtectionDomain<'static> = Box::leak(Box::new(pd));
            Ok(Arc::new(IbvDevice {
                opened: Opened { name, ctx, pd },
            }))
        })
        .clone()
}

/// An opened device.
pub(crate) struct IbvDevice {
    opened: Opened,
}

struct IbvRegion {
    mr: Mutex<ibverbs::MemoryRegion<u8>>,
    addr: u64,
    rkey: u32,
    len: usize,
}

impl Region for IbvRegion {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn len(&self) -> usize {
        self.len
    }

    fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.addr,
            rkey: self.rkey,
            len: self.len as u64,
        }
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        self.mr.lock()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.mr.lock()[offset..offset + out.len()]);
    }
}

enum QpState {
    Prepared(ibverbs::PreparedQueuePair<'static>),
    Ready(ibverbs::QueuePair<'static>),
    Gone,
}

struct IbvQp {
    state: Mutex<QpState>,
    endpoint: Vec<u8>,
    cq: &'static ibverbs::CompletionQueue<'static>,
}

/// Send and receive queue depths (the van keeps at most 32 of each posted).
const QUEUE_DEPTH: u32 = 128;

impl Device for IbvDevice {
    fn name(&self) -> String {
        self.opened.name.clone()
    }

    fn register(&self, len: usize) -> Result<Arc<dyn Region>, VerbsError> {
        let mr = self
            .opened
            .pd
            .allocate::<u8>(len.max(1))
            .map_err(|e| VerbsError(format!("registering {len} bytes: {e}")))?;
        let addr = mr.as_ptr() as u64;
        let rkey = mr.rkey().key;
        Ok(Arc::new(IbvRegion {
            mr: Mutex::new(mr),
            addr,
            rkey,
            len,
        }))
    }

    fn queue_pair(&self) -> Result<Arc<dyn QueuePair>, VerbsError> {
        let cq = self
            .opened
            .ctx
            .create_cq(2 * QUEUE_DEPTH as i32, 0)
            .map_err(|e| VerbsError(format!("creating a completion queue: {e}")))?;
        let cq: &'static ibverbs::CompletionQueue<'static> = Box::leak(Box::new(cq));
        let prepared = self
            .opened
            .pd
            .create_qp(cq, cq, ibverbs::ibv_qp_type::IBV_QPT_RC)
            .allow_remote_rw()
            .set_max_send_wr(QUEUE_DEPTH)
            .set_max_recv_wr(QUEUE_DEPTH)
            .build()
            .map_err(|e| VerbsError(format!("creating a queue pair: {e}")))?;
        let endpoint = postcard::to_allocvec(&prepared.endpoint())
            .map_err(|e| VerbsError(format!("encoding the endpoint: {e}")))?;
        Ok(Arc::new(IbvQp {
            state: Mutex::new(QpState::Prepared(prepared)),
            endpoint,
            cq,
        }))
    }
}

impl IbvQp {
    fn with_qp<T>(
        &self,
        f: impl FnOnce(&mut ibverbs::QueuePair<'static>) -> Result<T, VerbsError>,
    ) -> Result<T, VerbsError> {
        match &mut *self.state.lock() {
            QpState::Ready(qp) => f(qp),
            _ => Err(VerbsError("the queue pair is not connected".into())),
        }
    }
}

fn region_of(r: &Arc<dyn Region>) -> Result<&IbvRegion, VerbsError> {
    r.as_any()
        .downcast_ref::<IbvRegion>()
        .ok_or_else(|| VerbsError("a region registered with another backend".into()))
}

impl QueuePair for IbvQp {
    fn endpoint(&self) -> Vec<u8> {
        self.endpoint.clone()
    }

    fn connect(&self, remote: &[u8]) -> Result<(), VerbsError> {
        let remote: ibverbs::QueuePairEndpoint = postcard::from_bytes(remote)
            .map_err(|e| VerbsError(format!("a malformed endpoint: {e}")))?;
        let mut st = self.state.lock();
        match std::mem::replace(&mut *st, QpState::Gone) {
            QpState::Prepared(p) => {
                let qp = p
                    .handshake(remote)
                    .map_err(|e| VerbsError(format!("connecting the queue pair: {e}")))?;
                *st = QpState::Ready(qp);
                Ok(())
            }
            other => {
                *st = other;
                Err(VerbsError("the queue pair is already connected".into()))
            }
        }
    }

    fn post_recv(
        &self,
        region: &Arc<dyn Region>,
        offset: usize,
        len: usize,
        wr_id: u64,
    ) -> Result<(), VerbsError> {
        let r = region_of(region)?;
        self.with_qp(|qp| {
            let mut mr = r.mr.lock();
            // SAFETY: the van does not touch this range until its receive
            // completes.
            unsafe { qp.post_receive(&mut mr, offset..offset + len, wr_id) }
                .map_err(|e| VerbsError(format!("post receive: {e}")))
        })
    }

    fn post_send(
        &self,
        region: &Arc<dyn Region>,
        offset: usize,
        len: usize,
        wr_id: u64,
    ) -> Result<(), VerbsError> {
        let r = region_of(region)?;
        self.with_qp(|qp| {
            let mut mr = r.mr.lock();
            // SAFETY: the van does not reuse this send slot until its send
            // completes.
            unsafe { qp.post_send(&mut mr, offset..offset + len, wr_id) }
                .map_err(|e| VerbsError(format!("post send: {e}")))
        })
    }

    fn post_write_imm(
        &self,
        _: &Arc<dyn Region>,
        _: usize,
        _: usize,
        _: RemoteRegion,
        _: u64,
        _: u32,
        _: u64,
    ) -> Result<(), VerbsError> {
        Err(VerbsError(
            "RDMA write is not available through the ibverbs crate".into(),
        ))
    }

    fn poll(&self, out: &mut Vec<Completion>, timeout: Duration) -> Result<(), VerbsError> {
        let deadline = Instant::now() + timeout;
        let mut wcs = [ibverbs::ibv_wc::default(); 32];
        loop {
            let done = self
                .cq
                .poll(&mut wcs)
                .map_err(|e| VerbsError(format!("polling completions: {e}")))?;
            for wc in done.iter() {
                let wr_id = wc.wr_id();
                if !wc.is_valid() {
                    out.push(Completion::Error {
                        wr_id,
                        message: format!("work completion status {:?}", wc.error()),
                    });
                } else if wr_id >> 32 == super::WR_RECV >> 32 {
                    out.push(Completion::Recv {
                        wr_id,
                        len: wc.len(),
                    });
                } else {
                    out.push(Completion::Send { wr_id });
                }
            }
            if !out.is_empty() || Instant::now() >= deadline {
                return Ok(());
            }
            // Busy polling with a short yield: completions arrive in
            // microseconds on a device.
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    fn supports_write_imm(&self) -> bool {
        false
    }
}
