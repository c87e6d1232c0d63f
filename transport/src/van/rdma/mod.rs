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
//! free the slot); a sender thread drains the link's priority queue. Both
//! wake at least every 100 ms to notice a closed link; the TCP connection
//! the link was negotiated on stays open to notice the peer's death.

pub(crate) mod emulated;
#[cfg(feature = "rdma")]
pub(crate) mod ibv;
pub(crate) mod verbs;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::{Condvar, Mutex};

use self::verbs::{Completion, Device, QueuePair, Region, RemoteRegion, RemoteWrite, Span};
use super::{end, watch_peer, FrameSink, Half, Start, Van, VanError};
use crate::link::Link;
use crate::wire::{decode_frame, decode_header, Frame, Kind, Limits, VanId, HEADER_LEN};

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

// ---- sending ---------------------------------------------------------

/// Waits for a free send slot and `need` credits; takes the slot, one
/// credit, and the credits owed to the peer (which the chunk carries back).
fn reserve(sh: &Shared, link: &Link, need: u32) -> Result<(usize, u32), VanError> {
    let mut st = sh.state.lock();
    loop {
        if st.closed || link.is_closed() {
            return Err(VanError::Closed("RDMA link"));
        }
        if st.credits >= need && !st.free_slots.is_empty() {
            st.credits -= 1;
            let slot = st.free_slots.pop().expect("checked non-empty");
            let owed = std::mem::take(&mut st.owed);
            return Ok((slot, owed));
        }
        sh.cv.wait_for(&mut st, WAIT);
    }
}

/// Waits for `need` credits and takes one (an RDMA write with immediate
/// uses a receive of the peer's but no send slot, and carries no credits).
fn take_credit(sh: &Shared, link: &Link, need: u32) -> Result<(), VanError> {
    let mut st = sh.state.lock();
    loop {
        if st.closed || link.is_closed() {
            return Err(VanError::Closed("RDMA link"));
        }
        if st.credits >= need {
            st.credits -= 1;
            return Ok(());
        }
        sh.cv.wait_for(&mut st, WAIT);
    }
}

/// Sends one chunk (`kind`, `body` parts) from a send slot.
fn send_chunk(
    sh: &Shared,
    link: &Link,
    kind: u32,
    parts: &[&[u8]],
    need: u32,
) -> Result<(), VanError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    debug_assert!(CHUNK_HDR + len <= SLOT);
    let (slot, owed) = reserve(sh, link, need)?;
    let base = slot * SLOT;
    let mut hdr = [0u8; CHUNK_HDR];
    hdr[0..4].copy_from_slice(&kind.to_le_bytes());
    hdr[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    hdr[8..12].copy_from_slice(&owed.to_le_bytes());
    sh.send.write(base, &hdr);
    let mut at = base + CHUNK_HDR;
    for p in parts {
        sh.send.write(at, p);
        at += p.len();
    }
    sh.qp
        .post_send(
            Span::new(&sh.send, base, CHUNK_HDR + len),
            WR_SEND | slot as u64,
        )
        .map_err(VanError::from)
}

/// Sends `pieces` (head, payload) eagerly, cut into slot-sized chunks.
fn send_eager(sh: &Shared, link: &Link, pieces: &[&[u8]]) -> Result<(), VanError> {
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let room = SLOT - CHUNK_HDR;
    let mut sent = 0;
    loop {
        let n = room.min(total - sent);
        let parts = super::slice_parts(pieces, sent, n);
        sent += n;
        let kind = if sent >= total { K_DATA_LAST } else { K_DATA };
        send_chunk(sh, link, kind, &parts, 2)?;
        if sent >= total {
            return Ok(());
        }
    }
}

fn send_ctl(sh: &Shared, link: &Link, ctl: Ctl) -> Result<(), VanError> {
    match ctl {
        Ctl::Want { key, len } => send_chunk(
            sh,
            link,
            K_WANT,
            &[&rdv_key_bytes(key), &len.to_le_bytes()],
            2,
        ),
        Ctl::Grant { key, id, region } => send_chunk(
            sh,
            link,
            K_GRANT,
            &[
                &rdv_key_bytes(key),
                &id.to_le_bytes(),
                &region.addr.to_le_bytes(),
                &region.rkey.to_le_bytes(),
                &region.len.to_le_bytes(),
            ],
            2,
        ),
        Ctl::Free { key } => send_chunk(sh, link, K_FREE, &[&rdv_key_bytes(key)], 2),
    }
}

/// The rendezvous key of a frame that may use one.
fn rendezvous_key(f: &Frame) -> Option<RdvKey> {
    (matches!(f.kind, Kind::Request | Kind::Response)
        && f.keys.len() == 1
        && f.payload.len() >= RENDEZVOUS_MIN)
        .then(|| (f.kind as u8, f.keys[0]))
}

fn send_frame(sh: &Shared, link: &Link, f: &Frame) -> Result<(), VanError> {
    let head = f.encode_head();
    if let (Some(key), true) = (rendezvous_key(f), sh.qp.supports_write_imm()) {
        let len = f.payload.len() as u64;
        // A granted, idle buffer large enough: write there.
        let grant = {
            let mut guard = sh.state.lock();
            let st = &mut *guard;
            // Ok: write into this grant. Err(ask): go eager, and ask for a
            // buffer (none yet, or too small) unless one is in flight.
            let decision = match st.grants_out.get_mut(&key) {
                Some(g) if !g.busy && g.region.len >= len => {
                    g.busy = true;
                    Ok((g.id, g.region))
                }
                Some(g) if g.busy => Err(false),
                _ => Err(true),
            };
            match decision {
                Ok(g) => Some(g),
                Err(ask) => {
                    if ask && st.wanted.insert(key, len).is_none() {
                        st.outbox.push_back(Ctl::Want { key, len });
                    }
                    None
                }
            }
        };
        if let Some((id, region)) = grant {
            let staging = staging_for(sh, key, f.payload.len())?;
            staging.write(0, &f.payload);
            take_credit(sh, link, 2)?;
            sh.qp
                .post_write_imm(
                    Span::new(&staging, 0, f.payload.len()),
                    RemoteWrite {
                        to: region,
                        offset: 0,
                        imm: id,
                    },
                    WR_WRITE,
                )
                .map_err(VanError::from)?;
            return send_chunk(sh, link, K_RDV_HEAD, &[&id.to_le_bytes(), &head], 2);
        }
    }
    send_eager(sh, link, &[&head, &f.payload])
}

/// The registered staging buffer for `key`, at least `len` bytes (kept).
fn staging_for(sh: &Shared, key: RdvKey, len: usize) -> Result<Arc<dyn Region>, VanError> {
    if let Some(r) = sh.state.lock().staging.get(&key) {
        if r.len() >= len {
            return Ok(r.clone());
        }
    }
    let r = sh.dev.register(len).map_err(VanError::from)?;
    sh.state.lock().staging.insert(key, r.clone());
    Ok(r)
}

fn send_loop(sh: &Shared, link: &Link) -> Result<(), VanError> {
    loop {
        // Control chunks first, then credits owed, then frames.
        loop {
            let next = sh.state.lock().outbox.pop_front();
            match next {
                Some(c) => send_ctl(sh, link, c)?,
                None => break,
            }
        }
        let owed = sh.state.lock().owed;
        if owed as usize >= RECV_SLOTS / 2 {
            send_chunk(sh, link, K_CREDIT, &[], 1)?;
        }
        match link.next_batch_blocking(1 << 20, Duration::from_millis(5)) {
            None => return Ok(()),
            Some(batch) => {
                for f in &batch {
                    send_frame(sh, link, f)?;
                }
            }
        }
        if sh.state.lock().closed {
            return Ok(());
        }
    }
}

// ---- receiving -------------------------------------------------------

fn poll_loop(sh: &Shared, link: &Arc<Link>, sink: &Arc<dyn FrameSink>) -> Result<(), VanError> {
    let mut done = Vec::new();
    let mut partial: Option<BytesMut> = None;
    loop {
        let closing = sh.state.lock().closed || link.is_closed();
        done.clear();
        // Closing: one last look, without waiting, at what already arrived.
        let wait = if closing { Duration::ZERO } else { WAIT };
        sh.qp.poll(&mut done, wait).map_err(VanError::from)?;
        if closing && done.is_empty() {
            return Ok(());
        }
        for c in done.drain(..) {
            match c {
                Completion::Send { wr_id } => {
                    let mut st = sh.state.lock();
                    st.free_slots.push((wr_id & 0xffff_ffff) as usize);
                    drop(st);
                    sh.cv.notify_all();
                }
                Completion::Write { .. } => {}
                Completion::RecvImm { wr_id, .. } => {
                    // The payload landed in a granted buffer; its head follows.
                    repost(sh, wr_id)?;
                }
                Completion::Recv { wr_id, len } => {
                    let slot = (wr_id & 0xffff_ffff) as usize;
                    let mut chunk = vec![0u8; len];
                    sh.recv.read(slot * SLOT, &mut chunk);
                    repost(sh, wr_id)?;
                    if let Some(frame) = on_chunk(sh, &chunk, &mut partial)? {
                        sink.on_frame(link, frame);
                    }
                }
                Completion::Error { message, .. } => {
                    return Err(VanError::system("an RDMA operation", message))
                }
            }
        }
    }
}

/// Re-posts a receive and counts the credit owed to the peer.
fn repost(sh: &Shared, wr_id: u64) -> Result<(), VanError> {
    let slot = (wr_id & 0xffff_ffff) as usize;
    sh.qp
        .post_recv(
            Span::new(&sh.recv, slot * SLOT, SLOT),
            WR_RECV | slot as u64,
        )
        .map_err(VanError::from)?;
    sh.state.lock().owed += 1;
    sh.cv.notify_all();
    Ok(())
}

/// Handles one received chunk; a whole frame when one is complete.
fn on_chunk(
    sh: &Shared,
    chunk: &[u8],
    partial: &mut Option<BytesMut>,
) -> Result<Option<Frame>, VanError> {
    if chunk.len() < CHUNK_HDR {
        return Err(VanError::protocol("a chunk shorter than its header"));
    }
    let kind = u32::from_le_bytes(chunk[0..4].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(chunk[4..8].try_into().expect("4 bytes")) as usize;
    let credits = u32::from_le_bytes(chunk[8..12].try_into().expect("4 bytes"));
    if len != chunk.len() - CHUNK_HDR || credits as usize > RECV_SLOTS {
        return Err(VanError::protocol("a malformed chunk header"));
    }
    if credits > 0 {
        sh.state.lock().credits += credits;
        sh.cv.notify_all();
    }
    let body = &chunk[CHUNK_HDR..];
    let max_frame = sh.limits.max_payload
        + sh.limits.max_meta as u64
        + sh.limits.max_keys as u64 * 12
        + HEADER_LEN as u64;
    match kind {
        K_CREDIT => Ok(None),
        K_DATA | K_DATA_LAST => {
            let buf = partial.get_or_insert_with(BytesMut::new);
            if (buf.len() + body.len()) as u64 > max_frame {
                return Err(VanError::protocol("a frame larger than the message limit"));
            }
            buf.extend_from_slice(body);
            if kind == K_DATA_LAST {
                let bytes = partial.take().expect("present").freeze();
                return decode_frame(bytes, &sh.limits)
                    .map_err(VanError::from)
                    .map(Some);
            }
            Ok(None)
        }
        K_WANT => {
            let key = rdv_key_from(body).ok_or(VanError::protocol("a malformed WANT"))?;
            let want = u64::from_le_bytes(
                body.get(9..17)
                    .ok_or(VanError::protocol("a malformed WANT"))?
                    .try_into()
                    .expect("8 bytes"),
            );
            grant(sh, key, want);
            Ok(None)
        }
        K_GRANT => {
            if body.len() < 9 + 4 + 8 + 4 + 8 {
                return Err(VanError::protocol("a malformed GRANT"));
            }
            let key = rdv_key_from(body).ok_or(VanError::protocol("a malformed GRANT"))?;
            let id = u32::from_le_bytes(body[9..13].try_into().expect("4 bytes"));
            let region = RemoteRegion {
                addr: u64::from_le_bytes(body[13..21].try_into().expect("8 bytes")),
                rkey: u32::from_le_bytes(body[21..25].try_into().expect("4 bytes")),
                len: u64::from_le_bytes(body[25..33].try_into().expect("8 bytes")),
            };
            let mut st = sh.state.lock();
            st.wanted.remove(&key);
            st.grants_out.insert(
                key,
                GrantOut {
                    id,
                    region,
                    busy: false,
                },
            );
            Ok(None)
        }
        K_FREE => {
            let key = rdv_key_from(body).ok_or(VanError::protocol("a malformed FREE"))?;
            if let Some(g) = sh.state.lock().grants_out.get_mut(&key) {
                g.busy = false;
            }
            Ok(None)
        }
        K_RDV_HEAD => {
            if body.len() < 4 + HEADER_LEN {
                return Err(VanError::protocol("a malformed rendezvous head"));
            }
            let id = u32::from_le_bytes(body[0..4].try_into().expect("4 bytes"));
            let head = &body[4..];
            let h = decode_header(&head[..HEADER_LEN], &sh.limits).map_err(VanError::from)?;
            let payload_len = h.payload_len as usize;
            if head.len() as u64 + h.payload_len != HEADER_LEN as u64 + h.body_len() {
                return Err(VanError::protocol(
                    "a rendezvous head that does not match its header",
                ));
            }
            let (key, region) = sh.state.lock().grants_in.get(&id).cloned().ok_or_else(|| {
                VanError::Protocol(format!("a rendezvous head for unknown buffer {id}"))
            })?;
            if payload_len > region.len() {
                return Err(VanError::protocol(
                    "a rendezvous payload larger than its buffer",
                ));
            }
            let mut bytes = BytesMut::with_capacity(head.len() + payload_len);
            bytes.extend_from_slice(head);
            bytes.resize(head.len() + payload_len, 0);
            region.read(0, &mut bytes[head.len()..]);
            // The buffer is free again for the sender's next write.
            sh.state.lock().outbox.push_back(Ctl::Free { key });
            sh.cv.notify_all();
            decode_frame(bytes.freeze(), &sh.limits)
                .map_err(VanError::from)
                .map(Some)
        }
        k => Err(VanError::Protocol(format!("unknown chunk kind {k}"))),
    }
}

/// Registers (or re-registers, larger) the buffer for `key` and queues the
/// grant; within the link's budget, otherwise the sender stays eager.
fn grant(sh: &Shared, key: RdvKey, want: u64) {
    if want > sh.limits.max_payload || want as usize > RENDEZVOUS_BUDGET {
        return;
    }
    let st = sh.state.lock();
    let old = st.grant_of.get(&key).copied();
    let freed = old
        .and_then(|id| st.grants_in.get(&id))
        .map_or(0, |(_, r)| r.len());
    if st.granted_bytes - freed + want as usize > RENDEZVOUS_BUDGET {
        return;
    }
    drop(st);
    let Ok(region) = sh.dev.register(want as usize) else {
        return;
    };
    let mut st = sh.state.lock();
    if let Some(id) = old {
        st.grants_in.remove(&id);
    }
    st.granted_bytes = st.granted_bytes - freed + region.len();
    let id = st.next_grant;
    st.next_grant += 1;
    let remote = region.remote();
    st.grants_in.insert(id, (key, region));
    st.grant_of.insert(key, id);
    st.outbox.push_back(Ctl::Grant {
        key,
        id,
        region: remote,
    });
    drop(st);
    sh.cv.notify_all();
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
