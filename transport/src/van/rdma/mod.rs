//! The RDMA van, written against the small verbs interface in [`verbs`].
//!
//! # Data path
//!
//! Each link has one reliable-connected queue pair, `RECV_SLOTS` receive
//! buffers and `SEND_SLOTS` send buffers (registered once, at link start).
//!
//! - **Eager**: a frame is cut into chunks of at most a slot, each sent
//!   into one of the peer's posted receives; the receiver reassembles it
//!   into one buffer.
//! - **Rendezvous** (BytePS's scheme, where the verbs offer RDMA write with
//!   immediate): the first time a frame with one key and a payload of at
//!   least `RENDEZVOUS_MIN` bytes goes to a peer, it travels eagerly and the
//!   sender asks for a buffer for that key (`WANT`). The receiver registers
//!   one and grants it (`GRANT`: address, key, size). From then on the
//!   payload is written with RDMA write-with-immediate straight into that
//!   buffer (from a registered staging buffer of the sender's, also kept per
//!   key), followed by the frame's head (`RDV_HEAD`); the queue pair's order
//!   puts the data before the head. The receiver copies the payload out and
//!   frees the buffer for the next write (`FREE`). Registration happens once
//!   per key and peer; both sides cache their buffers for the link's life.
//!
//! # Credits
//!
//! A send or a write-with-immediate consumes one of the peer's posted
//! receives; posting one where none is left is an error in real verbs. So the
//! sender holds credits, one per receive the peer has posted (starting at
//! `RECV_SLOTS`); the receiver re-posts each receive as soon as it has read
//! it and returns the credits in the header of its next chunk, or in a
//! credit-only chunk once half are owed. Data needs two credits, a
//! credit-only chunk one, so returning credits can never deadlock.
//!
//! # Threads
//!
//! A poller thread takes completions (receives: parse and deliver; sends:
//! free the slot; `recv.rs`); a sender thread drains the link's priority
//! queue (`send.rs`). Both
//! wake at least every 100 ms to notice a closed link; the TCP connection
//! the link was negotiated on stays open to notice the peer's death.

pub(crate) mod emulated;
#[cfg(feature = "rdma")]
pub(crate) mod ibv;
mod recv;
mod send;
pub(crate) mod verbs;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use self::verbs::{Device, QueuePair, Region, RemoteRegion, Span};
use super::{end, watch_peer, FrameSink, Half, Start, Van, VanError};
use crate::link::Link;
use crate::wire::{Limits, VanId};
use recv::poll_loop;
use send::send_loop;

/// Bytes per receive and send slot.
pub(crate) const SLOT: usize = 64 * 1024;
/// Receives each side keeps posted.
pub(crate) const RECV_SLOTS: usize = 32;
/// Send slots each side has.
const SEND_SLOTS: usize = 32;
/// Smallest payload sent by rendezvous.
pub(crate) const RENDEZVOUS_MIN: usize = 64 * 1024;
/// Most memory registered for one peer's rendezvous buffers.
const RENDEZVOUS_BUDGET: usize = 1 << 30;
/// Chunk header: kind, length, credits returned, reserved.
const CHUNK_HDR: usize = 16;

const WAIT: Duration = Duration::from_millis(100);

const K_DATA: u32 = 1;
const K_DATA_LAST: u32 = 2;
const K_CREDIT: u32 = 3;
const K_WANT: u32 = 4;
const K_GRANT: u32 = 5;
const K_FREE: u32 = 6;
const K_RDV_HEAD: u32 = 7;

/// Work request ids: the slot index, tagged by kind of operation.
const WR_RECV: u64 = 1 << 32;
const WR_SEND: u64 = 2 << 32;
const WR_WRITE: u64 = 3 << 32;

/// What a rendezvous buffer is for: frame kind and key.
type RdvKey = (u8, u64);

fn rdv_key_bytes(k: RdvKey) -> [u8; 9] {
    let mut b = [0u8; 9];
    b[0] = k.0;
    b[1..].copy_from_slice(&k.1.to_le_bytes());
    b
}

fn rdv_key_from(b: &[u8]) -> Option<RdvKey> {
    (b.len() >= 9).then(|| {
        (
            b[0],
            u64::from_le_bytes(b[1..9].try_into().expect("8 bytes")),
        )
    })
}

/// A control chunk waiting for the sender thread.
enum Ctl {
    Want {
        key: RdvKey,
        len: u64,
    },
    Grant {
        key: RdvKey,
        id: u32,
        region: RemoteRegion,
    },
    Free {
        key: RdvKey,
    },
}

/// A peer's buffer we may write into.
struct GrantOut {
    id: u32,
    region: RemoteRegion,
    busy: bool,
}

struct State {
    credits: u32,
    owed: u32,
    free_slots: Vec<usize>,
    outbox: VecDeque<Ctl>,
    grants_out: HashMap<RdvKey, GrantOut>,
    wanted: HashMap<RdvKey, u64>,
    staging: HashMap<RdvKey, Arc<dyn Region>>,
    grants_in: HashMap<u32, (RdvKey, Arc<dyn Region>)>,
    grant_of: HashMap<RdvKey, u32>,
    next_grant: u32,
    granted_bytes: usize,
    closed: bool,
}

struct Shared {
    /// Why the peer went away (set by the TCP watch; the poller drains the
    /// completions already there, then ends the link with it).
    gone: Mutex<Option<String>>,
    qp: Arc<dyn QueuePair>,
    dev: Arc<dyn Device>,
    recv: Arc<dyn Region>,
    send: Arc<dyn Region>,
    state: Mutex<State>,
    cv: Condvar,
    limits: Limits,
}

impl Shared {
    fn close(&self) {
        self.state.lock().closed = true;
        self.cv.notify_all();
    }
}

/// The local half of an RDMA link, prepared before the endpoints are
/// exchanged (receives already posted).
pub(crate) struct Prepared {
    shared: Arc<Shared>,
}

impl Prepared {
    /// Creates the queue pair and registers and posts the buffers.
    pub(crate) fn new(dev: Arc<dyn Device>, limits: Limits) -> Result<Prepared, VanError> {
        let qp = dev.queue_pair()?;
        let recv = dev.register(SLOT * RECV_SLOTS)?;
        let send = dev.register(SLOT * SEND_SLOTS)?;
        for i in 0..RECV_SLOTS {
            qp.post_recv(Span::new(&recv, i * SLOT, SLOT), WR_RECV | i as u64)?;
        }
        Ok(Prepared {
            shared: Arc::new(Shared {
                gone: Mutex::new(None),
                qp,
                dev,
                recv,
                send,
                state: Mutex::new(State {
                    credits: RECV_SLOTS as u32,
                    owed: 0,
                    free_slots: (0..SEND_SLOTS).rev().collect(),
                    outbox: VecDeque::new(),
                    grants_out: HashMap::new(),
                    wanted: HashMap::new(),
                    staging: HashMap::new(),
                    grants_in: HashMap::new(),
                    grant_of: HashMap::new(),
                    next_grant: 1,
                    granted_bytes: 0,
                    closed: false,
                }),
                cv: Condvar::new(),
                limits,
            }),
        })
    }

    /// This side's endpoint, for the peer.
    pub(crate) fn endpoint(&self) -> Vec<u8> {
        self.shared.qp.endpoint()
    }

    /// Connects to the peer's endpoint.
    pub(crate) fn connect(&self, remote: &[u8]) -> Result<(), VanError> {
        Ok(self.shared.qp.connect(remote)?)
    }
}

/// The RDMA van (or its emulation) on one device.
pub(crate) struct RdmaVan {
    /// `VanId::Rdma` or `VanId::RdmaEmulated`.
    pub(crate) id: VanId,
    pub(crate) dev: Arc<dyn Device>,
    pub(crate) limits: Limits,
}

impl Van for RdmaVan {
    fn id(&self) -> VanId {
        self.id
    }

    /// The offer is this side's queue-pair endpoint.
    fn offer(&self) -> Result<(Vec<u8>, Box<dyn Half>), VanError> {
        let p = Prepared::new(self.dev.clone(), self.limits)?;
        Ok((p.endpoint(), Box::new(p)))
    }

    /// Connects to the offered endpoint; the answer is this side's.
    fn accept(&self, offer: &[u8]) -> Result<(Vec<u8>, Box<dyn Half>), VanError> {
        let p = Prepared::new(self.dev.clone(), self.limits)?;
        p.connect(offer)?;
        Ok((p.endpoint(), Box::new(p)))
    }
}

impl Half for Prepared {
    fn finish(&mut self, answer: &[u8]) -> Result<(), VanError> {
        self.connect(answer)
    }

    fn start(self: Box<Self>, on: Start<'_>) -> Result<(), VanError> {
        let tcp = on.conn.into_stream()?;
        start(*self, tcp, on.link, on.sink, on.rt)
            .map_err(|e| VanError::system("starting the RDMA threads", e))
    }
}

/// Starts the van on a connected queue pair: the poller and sender threads,
/// and the task watching the TCP connection.
fn start(
    prepared: Prepared,
    tcp: tokio::net::TcpStream,
    link: Arc<Link>,
    sink: Arc<dyn FrameSink>,
    rt: &tokio::runtime::Handle,
) -> std::io::Result<()> {
    let shared = prepared.shared;
    let (sh, l, s) = (shared.clone(), link.clone(), sink.clone());
    std::thread::Builder::new()
        .name(format!("pskv-rdma-poll-{}", link.id))
        .spawn(move || {
            match poll_loop(&sh, &l, &s) {
                Err(e) => end(&l, &s, sh.gone.lock().take().unwrap_or(e.to_string())),
                Ok(()) => {
                    if let Some(why) = sh.gone.lock().take() {
                        end(&l, &s, why);
                    }
                }
            }
            sh.close();
        })?;
    let (sh, l, s) = (shared.clone(), link.clone(), sink.clone());
    std::thread::Builder::new()
        .name(format!("pskv-rdma-send-{}", link.id))
        .spawn(move || {
            if let Err(e) = send_loop(&sh, &l) {
                end(&l, &s, e.to_string());
            }
            sh.close();
        })?;
    let sh = shared.clone();
    let gone = move |why: String| {
        // The poller drains what already arrived, then ends the link
        // with this reason.
        *sh.gone.lock() = Some(why);
        sh.close();
    };
    watch_peer(tcp, link, "RDMA", WAIT, rt, gone, move || shared.close());
    Ok(())
}

/// The device RDMA links use: the first verbs device (feature `rdma`), or
/// the in-memory emulation.
pub(crate) fn device(emulated: bool) -> Result<Arc<dyn Device>, VanError> {
    if emulated {
        return Ok(Arc::new(emulated::EmuDevice));
    }
    #[cfg(feature = "rdma")]
    {
        ibv::open_first().map(|d| d as Arc<dyn Device>)
    }
    #[cfg(not(feature = "rdma"))]
    {
        Err(VanError::Unavailable(
            "this build has no RDMA support: rebuild with `--features rdma`".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Flags;
    use crate::wire::{Frame, Kind};
    use bytes::Bytes;

    /// A sink that collects frames.
    #[derive(Default)]
    struct Collect {
        frames: Mutex<Vec<Frame>>,
        cv: Condvar,
    }

    impl FrameSink for Collect {
        fn on_frame(&self, _: &Arc<Link>, frame: Frame) {
            self.frames.lock().push(frame);
            self.cv.notify_all();
        }
        fn on_closed(&self, _: &Arc<Link>, _: String) {}
    }

    fn frame(key: u64, n: usize, tag: u8) -> Frame {
        let mut f = Frame::new(Kind::Request);
        f.flags = Flags::PUSH;
        f.keys = vec![key];
        f.lens = vec![n as u32];
        f.payload = Bytes::from(
            (0..n)
                .map(|i| (i as u8).wrapping_add(tag))
                .collect::<Vec<u8>>(),
        );
        f
    }

    /// Both ends of a test link: each side's state and link, and the sink.
    struct Pair {
        a: Arc<Shared>,
        la: Arc<Link>,
        lb: Arc<Link>,
        sink: Arc<Collect>,
    }

    /// Two links joined by the emulated fabric, without the TCP watch.
    fn pair() -> Pair {
        let dev: Arc<dyn Device> = Arc::new(emulated::EmuDevice);
        let a = Prepared::new(dev.clone(), Limits::default()).unwrap();
        let b = Prepared::new(dev, Limits::default()).unwrap();
        a.connect(&b.endpoint()).unwrap();
        b.connect(&a.endpoint()).unwrap();
        let (la, lb) = (
            Arc::new(Link::new(1, 0, VanId::Rdma)),
            Arc::new(Link::new(2, 0, VanId::Rdma)),
        );
        let sink = Arc::new(Collect::default());
        let dyn_sink: Arc<dyn FrameSink> = sink.clone();
        for (p, l) in [(&a, &la), (&b, &lb)] {
            let (sh, l2, s) = (p.shared.clone(), l.clone(), dyn_sink.clone());
            std::thread::spawn(move || {
                if let Err(e) = poll_loop(&sh, &l2, &s) {
                    panic!("poll: {e}");
                }
            });
            let (sh, l2) = (p.shared.clone(), l.clone());
            std::thread::spawn(move || send_loop(&sh, &l2).unwrap());
        }
        Pair {
            a: a.shared,
            la,
            lb,
            sink,
        }
    }

    /// Small and large frames, repeated per key so the rendezvous path takes
    /// over, arrive whole and in order; credits never run out.
    #[test]
    fn eager_and_rendezvous_frames_arrive_whole_and_in_order() {
        let Pair { a, la, lb, sink } = pair();
        let sizes = [0usize, 10, 70_000, 300_000, 64 * 1024, 5, 1 << 20];
        let mut sent = Vec::new();
        for round in 0..12u8 {
            for (i, &n) in sizes.iter().enumerate() {
                let f = frame(i as u64, n, round);
                sent.push(f.clone());
                la.send(f).unwrap();
            }
        }
        let mut frames = sink.frames.lock();
        while frames.len() < sent.len() {
            assert!(
                !sink
                    .cv
                    .wait_for(&mut frames, Duration::from_secs(20))
                    .timed_out(),
                "stalled at {}",
                frames.len()
            );
        }
        assert_eq!(*frames, sent);
        drop(frames);
        // The large keys were granted buffers, and the sender used them.
        let st = a.state.lock();
        assert!(st.grants_out.len() >= 3, "grants: {}", st.grants_out.len());
        assert!(st.staging.len() >= 3);
        drop(st);
        la.close("done");
        lb.close("done");
    }
}
