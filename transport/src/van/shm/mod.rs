//! The shared-memory van, for peers on the same host: one file in
//! `/dev/shm` per direction, holding a ring of records and a heap. Frames
//! skip the kernel and its socket copies.
//!
//! - Small frames (under 64 KiB) are copied into the ring and out of it into
//!   one receive buffer, and their space is released at once. A frame the
//!   heap cannot take (too large, heap full or off) goes the same way; one
//!   larger than a record (a quarter of the ring, at most 1 MiB) travels in
//!   chunks of about 256 KiB (less on small rings), so the two copies
//!   overlap.
//! - Large frames are copied once, into free heap blocks; a 16-byte record
//!   names them, and the receiver reads them in place through a lease that
//!   frees the blocks when dropped ([`heap`]). A full heap sends the frame
//!   through the ring instead: the link never waits for a receiver to drop
//!   what it keeps.
//!
//! [`ring`] has the file layout, the ring's invariants and the futex waits.
//! The connector creates both files: its `PSKV_SHM_BYTES` sizes the rings
//! and its `PSKV_SHM_HEAP_BYTES` the heaps.
//!
//! The TCP connection the link was negotiated on stays open: its end is how
//! a peer's death is noticed.

#[doc(hidden)]
pub mod bench;
mod futex;
mod group;
mod heap;
mod reader;
pub(crate) mod region;
mod ring;
pub(crate) mod span;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{end, watch_peer, FrameSink, Half, Start, Van, VanError};
use crate::link::{Link, Work};
use crate::wire::{Frame, Limits, VanId, HEADER_LEN};
pub(crate) use group::Readers;
pub(crate) use reader::Poll;
use ring::{Consumer, Producer, RING_CLOSED, WAIT_SLICE};
pub(crate) use ring::{Ring, MAX_HEAP};

/// The direct path: the caller copies its frame into the ring (or the heap)
/// if it fits now (the writer thread may hold the producer: then the frame
/// is queued).
struct ShmDirect {
    producer: Arc<parking_lot::Mutex<Producer>>,
}

impl crate::link::DirectSend for ShmDirect {
    fn try_send(&self, frame: &Frame) -> Result<crate::link::Direct, VanError> {
        use crate::link::Direct;
        let sent = self
            .producer
            .try_lock()
            .is_some_and(|mut p| p.try_frame(frame));
        Ok(if sent { Direct::Sent } else { Direct::NotSent })
    }
}

/// Names of a fresh pair of ring files.
pub(crate) fn ring_paths() -> (PathBuf, PathBuf) {
    let n = crate::security::nonce();
    let tag: String = n[..12].iter().map(|b| format!("{b:02x}")).collect();
    let dir = Path::new("/dev/shm");
    (
        dir.join(format!("pskv-{tag}-a")),
        dir.join(format!("pskv-{tag}-c")),
    )
}

/// Both rings of a link, seen from one side.
pub(crate) struct Rings {
    /// Where this side writes.
    pub(crate) tx: Ring,
    /// Where this side reads.
    pub(crate) rx: Ring,
}

/// The shared-memory van. The connector creates both files, sized by its
/// settings; the acceptor maps them.
pub(crate) struct ShmVan {
    /// Bytes of each ring this side creates (`PSKV_SHM_BYTES`).
    pub(crate) ring_bytes: usize,
    /// Bytes of each heap this side creates (`PSKV_SHM_HEAP_BYTES`).
    pub(crate) heap_bytes: usize,
    /// The frame limits of received frames.
    pub(crate) limits: Limits,
    /// The node's reader of all its links, unless each link gets a thread
    /// (`PSKV_SHM_READERS=link`).
    pub(crate) readers: Option<Arc<Readers>>,
}

/// The connector's offer: where the two rings are.
#[derive(serde::Serialize, serde::Deserialize)]
struct Offer {
    /// The ring the connector writes.
    to_acceptor: String,
    /// The ring the acceptor writes.
    to_connector: String,
    /// Bytes of each ring.
    ring_bytes: u64,
}

impl Van for ShmVan {
    fn id(&self) -> VanId {
        VanId::Shm
    }

    fn offer(&self) -> Result<(Vec<u8>, Box<dyn Half>), VanError> {
        let (pa, pc) = ring_paths();
        // Built first, so that a failure below unlinks what was created.
        let mut half = Box::new(ShmHalf {
            rings: None,
            names: vec![pa.clone(), pc.clone()],
            limits: self.limits,
            readers: self.readers.clone(),
        });
        let create = |p: &Path| {
            Ring::create(p, self.ring_bytes, self.heap_bytes)
                .map_err(|e| VanError::system(format!("creating {}", p.display()), e))
        };
        let (a, c) = (create(&pa)?, create(&pc)?);
        half.rings = Some(Rings { tx: a, rx: c });
        let offer = Offer {
            to_acceptor: pa.display().to_string(),
            to_connector: pc.display().to_string(),
            ring_bytes: self.ring_bytes as u64,
        };
        let bytes = postcard::to_allocvec(&offer)
            .map_err(|e| VanError::system("encoding the shared-memory offer", e))?;
        Ok((bytes, half))
    }

    fn accept(&self, offer: &[u8]) -> Result<(Vec<u8>, Box<dyn Half>), VanError> {
        let bad = || VanError::protocol("malformed shared-memory offer");
        let o: Offer = postcard::from_bytes(offer).map_err(|_| bad())?;
        let cap = o.ring_bytes as usize;
        let ok_path =
            |p: &str| p.starts_with("/dev/shm/pskv-") && !p.contains("..") && !p[9..].contains('/');
        if !(ok_path(&o.to_acceptor)
            && ok_path(&o.to_connector)
            && (1 << 16..=1 << 34).contains(&cap))
        {
            return Err(bad());
        }
        let open = |p: &str| {
            Ring::open(Path::new(p), cap).map_err(|e| VanError::system(format!("mapping {p}"), e))
        };
        let tx = open(&o.to_connector)?;
        let rx = open(&o.to_acceptor)?;
        let half = ShmHalf {
            rings: Some(Rings { tx, rx }),
            names: Vec::new(),
            limits: self.limits,
            readers: self.readers.clone(),
        };
        Ok((Vec::new(), Box::new(half)))
    }
}

/// One side of a shared-memory link: its mapped rings, and (the
/// connector's side) the files' names, unlinked once the acceptor has
/// mapped them or the handshake failed.
struct ShmHalf {
    rings: Option<Rings>,
    names: Vec<PathBuf>,
    limits: Limits,
    readers: Option<Arc<Readers>>,
}

impl ShmHalf {
    fn unlink(&mut self) {
        for p in self.names.drain(..) {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for ShmHalf {
    fn drop(&mut self) {
        self.unlink();
    }
}

impl Half for ShmHalf {
    fn finish(&mut self, _answer: &[u8]) -> Result<(), VanError> {
        // Mapped by both sides now: the names can go.
        self.unlink();
        Ok(())
    }

    fn start(mut self: Box<Self>, on: Start<'_>) -> Result<(), VanError> {
        let rings = self
            .rings
            .take()
            .ok_or(VanError::Unavailable("the rings were not created".into()))?;
        let tcp = on.conn.into_stream()?;
        let readers = self.readers.take();
        start(rings, tcp, on.link, on.sink, self.limits, readers, on.rt)
            .map_err(|e| VanError::system("starting the shared-memory threads", e))
    }
}

/// Starts the van: a writer thread, the link's reading (on its node's
/// reader thread of all its links, or a thread of its own: `group.rs`),
/// and a task watching the TCP connection for the peer's end.
fn start(
    rings: Rings,
    tcp: tokio::net::TcpStream,
    link: Arc<Link>,
    sink: Arc<dyn FrameSink>,
    limits: Limits,
    readers: Option<Arc<Readers>>,
    rt: &tokio::runtime::Handle,
) -> io::Result<()> {
    let tx = Arc::new(rings.tx);
    let rx = Arc::new(rings.rx);
    let producer = Arc::new(parking_lot::Mutex::new(Producer::new(tx.clone())));
    link.set_direct(Arc::new(ShmDirect {
        producer: producer.clone(),
    }));
    let consumer = Consumer::new(
        rx.clone(),
        limits
            .max_payload
            .saturating_add(limits.max_keys as u64 * 12)
            .saturating_add(limits.max_meta as u64 + HEADER_LEN as u64),
    );
    let gone: Arc<parking_lot::Mutex<Option<String>>> = Arc::new(parking_lot::Mutex::new(None));
    let gone_w = gone.clone();
    let (l, s, txr) = (link.clone(), sink.clone(), tx.clone());
    std::thread::Builder::new()
        .name(format!("pskv-shm-tx-{}", link.id))
        .spawn(move || {
            while let Some(work) = l.next_work_blocking(1 << 20, WAIT_SLICE) {
                // The direct path never leaves a partial frame on this van.
                let frames = match work {
                    Work::Frames(f) => f,
                    Work::Rest(_) => Vec::new(),
                };
                let r = {
                    let mut p = producer.lock();
                    frames
                        .iter()
                        .try_for_each(|f| p.frame(f, &|| l.is_closed()))
                };
                l.done_writing();
                if let Err(e) = r {
                    // If the peer is gone, the reader ends the link once it
                    // has drained what the peer sent.
                    if gone_w.lock().is_none() {
                        end(&l, &s, format!("shared-memory send failed: {e}"));
                    }
                    txr.close();
                    return;
                }
            }
            txr.close();
        })?;
    // Subtle: when the peer goes away, frames it wrote just before (the
    // answer to our last request, say) may still sit in the ring. The TCP
    // watch only records why and closes the rings; the reader drains what
    // was published, then ends the link with that reason.
    let reader = Arc::new(reader::Reader::new(
        consumer,
        rx.clone(),
        link.clone(),
        sink.clone(),
        limits,
    ));
    // Ends the link once its reading ends, on whichever thread read it.
    let (l, s, rxr, g) = (link.clone(), sink.clone(), rx.clone(), gone.clone());
    let finish = move |e: VanError| {
        let reason = match g.lock().take() {
            Some(why) => why,
            None => {
                // A ring closed while this side's link is open: the peer's
                // link ended (at its orderly end, or for a reason its own
                // log gives; a peer that dies leaves its ring open and the
                // TCP watch names it, above). Anything else ends the link
                // from this side.
                let peer_ended = matches!(e, VanError::Closed(what) if what == RING_CLOSED);
                if l.is_closed() {
                    // This side closed it: nothing to say.
                } else if peer_ended {
                    tracing::debug!(link = l.id, "the peer ended the shared-memory link");
                } else {
                    tracing::warn!(link = l.id, "closing the shared-memory link: {e}");
                }
                e.to_string()
            }
        };
        end(&l, &s, reason);
        rxr.close();
        s.remove_poller(l.id);
    };
    match readers.filter(|_| Readers::grouped()) {
        Some(readers) => readers.add(reader.clone(), Box::new(finish))?,
        None => {
            let (l, s, r) = (link.clone(), sink.clone(), reader.clone());
            let rx_thread = std::thread::Builder::new()
                .name(format!("pskv-shm-rx-{}", link.id))
                .spawn(move || {
                    // Subtle: however this thread ends (a frame's callback
                    // may panic), the link ends and its poller goes (it
                    // holds the sink).
                    struct Cleanup(Arc<Link>, Arc<dyn FrameSink>);
                    impl Drop for Cleanup {
                        fn drop(&mut self) {
                            if std::thread::panicking() {
                                // The grouped reader's end warns too
                                // (`finish`, through its thread's guard).
                                tracing::warn!(
                                    link = self.0.id,
                                    "closing the shared-memory link: its reader thread panicked"
                                );
                            }
                            end(&self.0, &self.1, "the shared-memory reader stopped".into());
                            self.1.remove_poller(self.0.id);
                        }
                    }
                    let _cleanup = Cleanup(l, s);
                    finish(r.run());
                })?;
            reader.set_wake(reader::Wake::Thread(rx_thread.thread().clone()));
        }
    }
    // Waiting callers may read the link too (`reader.rs`).
    sink.add_poller(&link, reader);
    drop(sink);
    let (tx2, rx2) = (tx.clone(), rx.clone());
    let gone = move |why: String| {
        // The reader drains the ring, then ends the link.
        *gone.lock() = Some(why);
        tx.close();
        rx.close();
    };
    let closed = move || {
        tx2.close();
        rx2.close();
    };
    watch_peer(tcp, link, "shared-memory", WAIT_SLICE, rt, gone, closed);
    Ok(())
}

#[cfg(test)]
mod tests;
