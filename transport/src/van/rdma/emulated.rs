//! Verbs in memory: a process-wide fabric where queue pairs connect by
//! endpoint, registered regions are found by key, and every operation
//! behaves as on an RC queue pair (see `verbs`). Receives must be posted
//! before a peer's send or write-with-immediate arrives: an operation that
//! finds none fails with a receiver-not-ready error, as real hardware
//! eventually does, so the van's credit logic is tested, not masked.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::verbs::{
    Completion, Device, QueuePair, Region, RemoteRegion, RemoteWrite, Span, VerbsError, VerbsResult,
};

struct Fabric {
    regions: Mutex<HashMap<u32, Weak<EmuRegion>>>,
    qps: Mutex<HashMap<u64, Weak<EmuQp>>>,
    next_key: AtomicU32,
    next_qp: AtomicU64,
}

fn fabric() -> &'static Fabric {
    static F: OnceLock<Fabric> = OnceLock::new();
    F.get_or_init(|| Fabric {
        regions: Mutex::new(HashMap::new()),
        qps: Mutex::new(HashMap::new()),
        next_key: AtomicU32::new(1),
        next_qp: AtomicU64::new(1),
    })
}

/// The emulated device.
pub(crate) struct EmuDevice;

pub(crate) struct EmuRegion {
    key: u32,
    /// Base "address" of the region in the fabric's address space.
    addr: u64,
    mem: Mutex<Vec<u8>>,
}

impl Region for EmuRegion {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn len(&self) -> usize {
        self.mem.lock().len()
    }

    fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.addr,
            rkey: self.key,
            len: self.len() as u64,
        }
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        self.mem.lock()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.mem.lock()[offset..offset + out.len()]);
    }
}

struct PostedRecv {
    region: Arc<dyn Region>,
    offset: usize,
    len: usize,
    wr_id: u64,
}

#[derive(Default)]
struct QpState {
    peer: Option<Weak<EmuQp>>,
    recvs: VecDeque<PostedRecv>,
    cq: VecDeque<Completion>,
    broken: Option<String>,
}

pub(crate) struct EmuQp {
    id: u64,
    state: Mutex<QpState>,
    cv: Condvar,
}

impl EmuQp {
    fn push_completion(&self, c: Completion) {
        self.state.lock().cq.push_back(c);
        self.cv.notify_all();
    }

    fn peer(&self) -> Result<Arc<EmuQp>, VerbsError> {
        let st = self.state.lock();
        if let Some(b) = &st.broken {
            return Err(VerbsError(b.clone()));
        }
        st.peer.as_ref().and_then(Weak::upgrade).ok_or_else(|| {
            VerbsError("the queue pair is not connected (or its peer is gone)".into())
        })
    }

    /// Takes one posted receive of this queue pair, or fails the operation.
    fn take_recv(&self) -> Result<PostedRecv, String> {
        self.state
            .lock()
            .recvs
            .pop_front()
            .ok_or_else(|| "receiver not ready: no receive posted".to_string())
    }

    fn fail(&self, wr_id: u64, message: String) {
        let mut st = self.state.lock();
        st.broken = Some(message.clone());
        st.cq.push_back(Completion::Error { wr_id, message });
        drop(st);
        self.cv.notify_all();
    }
}

impl Drop for EmuQp {
    fn drop(&mut self) {
        fabric().qps.lock().remove(&self.id);
    }
}

impl Drop for EmuRegion {
    fn drop(&mut self) {
        fabric().regions.lock().remove(&self.key);
    }
}

impl Device for EmuDevice {
    fn name(&self) -> String {
        "emulated".into()
    }

    fn register(&self, len: usize) -> Result<Arc<dyn Region>, VerbsError> {
        let f = fabric();
        let key = f.next_key.fetch_add(1, Ordering::Relaxed);
        let r = Arc::new(EmuRegion {
            key,
            addr: (key as u64) << 40,
            mem: Mutex::new(vec![0; len]),
        });
        f.regions.lock().insert(key, Arc::downgrade(&r));
        Ok(r)
    }

    fn queue_pair(&self) -> Result<Arc<dyn QueuePair>, VerbsError> {
        let f = fabric();
        let id = f.next_qp.fetch_add(1, Ordering::Relaxed);
        let qp = Arc::new(EmuQp {
            id,
            state: Mutex::new(QpState::default()),
            cv: Condvar::new(),
        });
        f.qps.lock().insert(id, Arc::downgrade(&qp));
        Ok(qp)
    }
}

impl QueuePair for EmuQp {
    fn endpoint(&self) -> Vec<u8> {
        self.id.to_le_bytes().to_vec()
    }

    fn connect(&self, remote: &[u8]) -> VerbsResult {
        let id = u64::from_le_bytes(
            remote
                .try_into()
                .map_err(|_| VerbsError("a malformed endpoint".into()))?,
        );
        let peer = fabric()
            .qps
            .lock()
            .get(&id)
            .and_then(Weak::upgrade)
            .ok_or_else(|| VerbsError(format!("no queue pair {id} on the fabric")))?;
        self.state.lock().peer = Some(Arc::downgrade(&peer));
        Ok(())
    }

    fn post_recv(&self, into: Span<'_>, wr_id: u64) -> VerbsResult {
        let Span {
            region,
            offset,
            len,
        } = into;
        if offset + len > region.len() {
            return Err(VerbsError("receive outside its region".into()));
        }
        self.state.lock().recvs.push_back(PostedRecv {
            region: region.clone(),
            offset,
            len,
            wr_id,
        });
        Ok(())
    }

    fn post_send(&self, from: Span<'_>, wr_id: u64) -> VerbsResult {
        let peer = self.peer()?;
        let len = from.len;
        let bytes = read_span(from);
        match peer.take_recv() {
            Ok(r) if r.len >= len => {
                r.region.write(r.offset, &bytes);
                peer.push_completion(Completion::Recv {
                    wr_id: r.wr_id,
                    len,
                });
                self.push_completion(Completion::Send { wr_id });
            }
            Ok(r) => {
                let m = format!("a {len}-byte send into a {}-byte receive", r.len);
                peer.fail(r.wr_id, m.clone());
                self.fail(wr_id, m);
            }
            Err(m) => self.fail(wr_id, m),
        }
        Ok(())
    }

    fn post_write_imm(&self, from: Span<'_>, to: RemoteWrite, wr_id: u64) -> VerbsResult {
        let peer = self.peer()?;
        let (len, remote, imm) = (from.len, to.to, to.imm);
        let target = fabric()
            .regions
            .lock()
            .get(&remote.rkey)
            .and_then(Weak::upgrade);
        let Some(target) = target else {
            self.fail(
                wr_id,
                format!("remote access error: no region with key {}", remote.rkey),
            );
            return Ok(());
        };
        let start = remote.addr.wrapping_sub(target.addr) + to.offset;
        if remote.addr < target.addr || start + len as u64 > target.len() as u64 {
            self.fail(
                wr_id,
                "remote access error: write outside the region".into(),
            );
            return Ok(());
        }
        target.write(start as usize, &read_span(from));
        match peer.take_recv() {
            Ok(r) => {
                peer.push_completion(Completion::RecvImm {
                    wr_id: r.wr_id,
                    imm,
                    len,
                });
                self.push_completion(Completion::Write { wr_id });
            }
            Err(m) => self.fail(wr_id, m),
        }
        Ok(())
    }

    fn poll(&self, out: &mut Vec<Completion>, timeout: Duration) -> VerbsResult {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        while st.cq.is_empty() {
            if self.cv.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
        out.extend(st.cq.drain(..));
        Ok(())
    }

    fn supports_write_imm(&self) -> bool {
        true
    }
}

/// A copy of the bytes a span names.
fn read_span(s: Span<'_>) -> Vec<u8> {
    let mut bytes = vec![0u8; s.len];
    s.region.read(s.offset, &mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_semantics() {
        let dev = EmuDevice;
        let (a, b) = (dev.queue_pair().unwrap(), dev.queue_pair().unwrap());
        a.connect(&b.endpoint()).unwrap();
        b.connect(&a.endpoint()).unwrap();
        let ra = dev.register(64).unwrap();
        let rb = dev.register(64).unwrap();
        ra.write(0, b"hello");
        // A send with no receive posted: receiver not ready, queue pair broken.
        let c = dev.queue_pair().unwrap();
        let d = dev.queue_pair().unwrap();
        c.connect(&d.endpoint()).unwrap();
        c.post_send(Span::new(&ra, 0, 5), 1).unwrap();
        let mut out = Vec::new();
        c.poll(&mut out, Duration::from_millis(10)).unwrap();
        assert!(
            matches!(&out[0], Completion::Error { message, .. } if message.contains("not ready"))
        );
        // Send into a posted receive.
        b.post_recv(Span::new(&rb, 8, 16), 7).unwrap();
        a.post_send(Span::new(&ra, 0, 5), 1).unwrap();
        let mut out = Vec::new();
        b.poll(&mut out, Duration::from_millis(10)).unwrap();
        assert_eq!(out, vec![Completion::Recv { wr_id: 7, len: 5 }]);
        let mut got = [0u8; 5];
        rb.read(8, &mut got);
        assert_eq!(&got, b"hello");
        // Write with immediate: bytes land at the address, a receive is used.
        b.post_recv(Span::new(&rb, 0, 0), 8).unwrap();
        let to = |offset, imm| RemoteWrite {
            to: rb.remote(),
            offset,
            imm,
        };
        a.post_write_imm(Span::new(&ra, 0, 5), to(40, 99), 2)
            .unwrap();
        let mut out = Vec::new();
        b.poll(&mut out, Duration::from_millis(10)).unwrap();
        assert_eq!(
            out,
            vec![Completion::RecvImm {
                wr_id: 8,
                imm: 99,
                len: 5
            }]
        );
        rb.read(40, &mut got);
        assert_eq!(&got, b"hello");
        let mut out = Vec::new();
        a.poll(&mut out, Duration::from_millis(10)).unwrap();
        assert_eq!(
            out,
            vec![
                Completion::Send { wr_id: 1 },
                Completion::Write { wr_id: 2 }
            ]
        );
        // A write outside the region is a remote access error.
        b.post_recv(Span::new(&rb, 0, 0), 9).unwrap();
        a.post_write_imm(Span::new(&ra, 0, 5), to(62, 1), 3)
            .unwrap();
        let mut out = Vec::new();
        a.poll(&mut out, Duration::from_millis(10)).unwrap();
        assert!(
            matches!(&out[0], Completion::Error { message, .. } if message.contains("remote access"))
        );
    }
}
