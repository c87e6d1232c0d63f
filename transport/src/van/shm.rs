//! The shared-memory van: two single-producer, single-consumer rings in
//! `/dev/shm`, one per direction, for peers on the same host. Frames skip
//! the kernel and its socket copies: the sender copies a frame into the ring,
//! the receiver copies it out into one buffer of the frame's size and
//! releases the space at once. Large frames travel in chunks of a quarter
//! ring, so the two copies overlap. (Reading payloads in place would save
//! the second copy, but a receiver holding such a payload would pin the
//! ring: the stall is not worth it.)
//!
//! # A ring
//!
//! ```text
//!   0     magic "PSKVRING", capacity
//!   64    head   (u64)  bytes published by the producer, ever increasing
//!   128   tail   (u64)  bytes released by the consumer, ever increasing
//!   192   data_seq (u32), consumer_waiting (u32)    futex: "data arrived"
//!   256   space_seq (u32), producer_waiting (u32)   futex: "space freed"
//!   320   closed (u32)
//!   4096  data: records [u64 word | bytes], 64-byte aligned, never wrapping
//!         word: bits 0..48 length; bit 62 CONTINUED (a chunk of a frame
//!         larger than a quarter of the ring); bit 63 WRAP (skip to the start)
//! ```
//!
//! Invariants: `tail <= head <= tail + capacity` (checked on every read: the
//! peer's memory is not trusted, and a violation closes the link); the
//! producer writes only `[head, tail + capacity)`; the consumer releases each
//! record, in order, as soon as it has copied it.
//!
//! Waking without lost wake-ups: the waiter publishes its "waiting" flag,
//! then re-checks the index, then sleeps on the sequence word with the value
//! it read before; the other side publishes the index, bumps the sequence,
//! then reads the flag (all SeqCst). Either the waiter sees the new index,
//! or the other side sees the flag and wakes it; a bump between the read and
//! the sleep makes the futex return at once. Sleeps last at most 100 ms, so
//! both threads notice a closed link. Before sleeping, a waiter spins for
//! `PSKV_SPIN_US` (a wake-up costs more than that on a VM).
//!
//! The TCP connection the link was negotiated on stays open: its end is how
//! a peer's death is noticed.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use memmap2::MmapMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{end, FrameSink};
use crate::link::{Link, Work};
use crate::wire::{decode_body, decode_header, Frame, Limits, HEADER_LEN};

const MAGIC: u64 = u64::from_le_bytes(*b"PSKVRING");
const HDR: usize = 4096;
const HEAD: usize = 64;
const TAIL: usize = 128;
const DATA_SEQ: usize = 192;
const CONS_WAIT: usize = 196;
const SPACE_SEQ: usize = 256;
const PROD_WAIT: usize = 260;
const CLOSED: usize = 320;

const LEN_MASK: u64 = (1 << 48) - 1;
const CONT: u64 = 1 << 62;
const WRAP: u64 = 1 << 63;

/// Frames above a record's size travel in chunks of about this size
/// (pipelined copies).
const CHUNK_BYTES: usize = 256 * 1024;

/// Sleep slices of the futex waits.
const WAIT_SLICE: Duration = Duration::from_millis(100);

fn align64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

/// One mapped ring.
pub(crate) struct Ring {
    map: MmapMut,
    cap: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics (the
// header) and through the record protocol (data), which gives each byte of
// data to one side at a time.
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Ring {
    /// Creates the ring file (fails if it exists) and maps it.
    pub(crate) fn create(path: &Path, cap: usize) -> io::Result<Ring> {
        let cap = align64(cap.max(1 << 16));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.set_len((HDR + cap) as u64)?;
        // SAFETY: a fresh file of ours, mapped shared; see the type's docs.
        let mut map = unsafe { MmapMut::map_mut(&file)? };
        map[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        map[8..16].copy_from_slice(&(cap as u64).to_le_bytes());
        Ok(Ring { map, cap })
    }

    /// Maps an existing ring file and checks its header.
    pub(crate) fn open(path: &Path, cap: usize) -> io::Result<Ring> {
        let cap = align64(cap.max(1 << 16));
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        if file.metadata()?.len() != (HDR + cap) as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "ring file has the wrong size",
            ));
        }
        // SAFETY: as in `create`; the size was checked.
        let map = unsafe { MmapMut::map_mut(&file)? };
        let magic = u64::from_le_bytes(map[0..8].try_into().expect("8 bytes"));
        let got_cap = u64::from_le_bytes(map[8..16].try_into().expect("8 bytes"));
        if magic != MAGIC || got_cap != cap as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a pskv ring of the agreed size",
            ));
        }
        Ok(Ring { map, cap })
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is a header offset, 8-aligned within the page-aligned
        // mapping, which lives as long as `self`.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        // SAFETY: as in `u64_at`, 4-aligned.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU32) }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: HDR is within the mapping.
        unsafe { (self.map.as_ptr() as *mut u8).add(HDR) }
    }

    fn close(&self) {
        self.u32_at(CLOSED).store(1, Ordering::SeqCst);
        self.u32_at(DATA_SEQ).fetch_add(1, Ordering::SeqCst);
        self.u32_at(SPACE_SEQ).fetch_add(1, Ordering::SeqCst);
        futex_wake(self.u32_at(DATA_SEQ));
        futex_wake(self.u32_at(SPACE_SEQ));
    }

    fn is_closed(&self) -> bool {
        self.u32_at(CLOSED).load(Ordering::SeqCst) != 0
    }
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a futex wait on a word of a live mapping; the kernel compares
    // and sleeps atomically, and returns on any error (EAGAIN, EINTR, ...).
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: a futex wake on a word of a live mapping.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// Waits until `ready()` or the ring closes; `seq`/`flag` are the futex word
/// and the waiting flag of this direction of waiting.
fn wait_until(
    ring: &Ring,
    seq: usize,
    flag: usize,
    ready: &dyn Fn() -> bool,
    closed: &dyn Fn() -> bool,
) -> Result<(), String> {
    let mut spun = false;
    loop {
        if ready() {
            return Ok(());
        }
        if ring.is_closed() || closed() {
            return Err("the shared-memory ring was closed".into());
        }
        if !spun {
            // A futex wake costs tens of microseconds on a VM: watch the
            // index a moment first (PSKV_SPIN_US).
            spun = true;
            if crate::slot::spin_until(ready, crate::slot::spin_budget()) {
                return Ok(());
            }
            continue;
        }
        let seen = ring.u32_at(seq).load(Ordering::SeqCst);
        ring.u32_at(flag).store(1, Ordering::SeqCst);
        if !ready() && !ring.is_closed() {
            futex_wait(ring.u32_at(seq), seen, WAIT_SLICE);
        }
        ring.u32_at(flag).store(0, Ordering::SeqCst);
    }
}

/// The producer side of a ring.
struct Producer {
    ring: Arc<Ring>,
    head: u64,
}

impl Producer {
    /// The largest record: larger frames go in chunks, so the receiver
    /// copies one chunk out while the sender copies the next one in.
    fn max_record(&self) -> usize {
        (self.ring.cap / 4).min(1 << 20)
    }

    /// The chunk size for a frame of `total` bytes that needs chunks: equal
    /// chunks of about `CHUNK_BYTES`, each fitting a record.
    fn chunk_len(&self, total: usize) -> usize {
        let room = self.max_record() - 64;
        let target = CHUNK_BYTES.min(room);
        let n = total.div_ceil(target);
        total.div_ceil(n).next_multiple_of(64).min(room)
    }

    /// Appends one record (`CONT` in `flags` for a non-final chunk).
    fn record(
        &mut self,
        parts: &[&[u8]],
        flags: u64,
        closed: &dyn Fn() -> bool,
    ) -> Result<(), String> {
        let cap = self.ring.cap as u64;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let rec = align64(8 + len) as u64;
        let pos = self.head % cap;
        let wrap = if cap - pos < rec { cap - pos } else { 0 };
        let need = wrap + rec;
        let tail = self.ring.u64_at(TAIL);
        let head = self.head;
        wait_until(
            &self.ring,
            SPACE_SEQ,
            PROD_WAIT,
            &|| head + need - tail.load(Ordering::Acquire) <= cap,
            closed,
        )?;
        self.publish(parts, flags, wrap, rec);
        Ok(())
    }

    /// Writes a frame now if the ring has room for all of it (in chunks if
    /// it is large); false (nothing written) otherwise.
    fn try_frame(&mut self, f: &Frame) -> bool {
        if self.ring.is_closed() {
            return false;
        }
        let cap = self.ring.cap as u64;
        let total = f.wire_len();
        let room = self.max_record() - 64;
        let chunks = if 8 + total <= self.max_record() {
            1
        } else {
            total.div_ceil(room)
        };
        // Every record at most a max record, plus one wrap's worth of slack.
        let need = (chunks * self.max_record() + self.max_record()) as u64;
        let tail = self.ring.u64_at(TAIL).load(Ordering::Acquire);
        if cap - (self.head - tail) < need {
            return false;
        }
        // The space is there: the writes below never wait.
        self.frame(f, &|| false).is_ok()
    }

    /// Writes a record at `head` (after a wrap marker if `wrap > 0`), into
    /// space the caller checked is free, and publishes it.
    fn publish(&mut self, parts: &[&[u8]], flags: u64, wrap: u64, rec: u64) {
        let cap = self.ring.cap as u64;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let data = self.ring.data();
        if wrap > 0 {
            let pos = self.head % cap;
            // SAFETY: [pos, pos+8) is free space of ours, below cap.
            unsafe { (data.add(pos as usize) as *mut u64).write(WRAP) };
            self.head += wrap;
        }
        let at = (self.head % cap) as usize;
        // SAFETY: [at, at + rec) is free space of ours within the ring (the
        // caller checked), and does not wrap.
        unsafe {
            (data.add(at) as *mut u64).write(len as u64 | flags);
            let mut o = at + 8;
            for p in parts {
                std::ptr::copy_nonoverlapping(p.as_ptr(), data.add(o), p.len());
                o += p.len();
            }
        }
        self.head += rec;
        self.ring.u64_at(HEAD).store(self.head, Ordering::SeqCst);
        self.ring.u32_at(DATA_SEQ).fetch_add(1, Ordering::SeqCst);
        if self.ring.u32_at(CONS_WAIT).load(Ordering::SeqCst) != 0 {
            futex_wake(self.ring.u32_at(DATA_SEQ));
        }
    }

    /// Writes a frame: one record, or chunks if it is large.
    fn frame(&mut self, f: &Frame, closed: &dyn Fn() -> bool) -> Result<(), String> {
        let head = f.encode_head();
        let total = head.len() + f.payload.len();
        if 8 + total <= self.max_record() {
            return self.record(&[&head, &f.payload], 0, closed);
        }
        let chunk = self.chunk_len(total);
        let whole: [&[u8]; 2] = [&head[..], &f.payload[..]];
        // Walk the two parts in chunk-sized pieces.
        let mut sent = 0;
        while sent < total {
            let n = chunk.min(total - sent);
            let mut pieces: Vec<&[u8]> = Vec::with_capacity(2);
            let (mut skip, mut left) = (sent, n);
            for p in &whole {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                let take = (p.len() - skip).min(left);
                pieces.push(&p[skip..skip + take]);
                left -= take;
                skip = 0;
                if left == 0 {
                    break;
                }
            }
            sent += n;
            let flags = if sent < total { CONT } else { 0 };
            self.record(&pieces, flags, closed)?;
        }
        Ok(())
    }
}

/// The direct path: the caller copies its frame into the ring if it fits
/// now (the writer thread may hold the producer: then the frame is queued).
struct ShmDirect {
    producer: Arc<parking_lot::Mutex<Producer>>,
}

impl crate::link::DirectSend for ShmDirect {
    fn try_send(&self, frame: &Frame) -> Result<crate::link::Direct, String> {
        use crate::link::Direct;
        let sent = self
            .producer
            .try_lock()
            .is_some_and(|mut p| p.try_frame(frame));
        Ok(if sent { Direct::Sent } else { Direct::NotSent })
    }
}

/// The consumer side of a ring.
struct Consumer {
    ring: Arc<Ring>,
    cur: u64,
    /// A chunked frame being reassembled, and its total size.
    partial: Option<(BytesMut, usize)>,
    max_frame: u64,
    /// Receive buffer, reclaimed once the frames cut from it are dropped.
    pool: BytesMut,
}

impl Consumer {
    fn release(&self, upto: u64) {
        let ring = &self.ring;
        ring.u64_at(TAIL).store(upto, Ordering::SeqCst);
        ring.u32_at(SPACE_SEQ).fetch_add(1, Ordering::SeqCst);
        if ring.u32_at(PROD_WAIT).load(Ordering::SeqCst) != 0 {
            futex_wake(ring.u32_at(SPACE_SEQ));
        }
    }

    /// The next frame's bytes, copied out of the ring.
    fn next(&mut self, link: &Link) -> Result<Bytes, String> {
        let ring = self.ring.clone();
        let cap = ring.cap as u64;
        loop {
            let head_at = ring.u64_at(HEAD);
            let cur = self.cur;
            wait_until(
                &ring,
                DATA_SEQ,
                CONS_WAIT,
                &|| head_at.load(Ordering::Acquire) > cur,
                &|| link.is_closed(),
            )?;
            let head = head_at.load(Ordering::Acquire);
            if head < cur || head - cur > cap {
                return Err(format!(
                    "corrupt ring indices (head {head}, read position {cur})"
                ));
            }
            let pos = cur % cap;
            // SAFETY: [pos, pos+8) is inside the ring and published (cur < head).
            let word = unsafe { (ring.data().add(pos as usize) as *const u64).read_volatile() };
            if word & WRAP != 0 {
                self.cur += cap - pos;
                self.release(self.cur);
                continue;
            }
            let len = word & LEN_MASK;
            let rec = align64(8 + len as usize) as u64;
            if rec > cap - pos || cur + rec > head {
                return Err(format!("corrupt ring record of {len} bytes at {pos}"));
            }
            // SAFETY: the record [pos+8, pos+8+len) is published and not
            // written by the producer until released below.
            let bytes = unsafe {
                std::slice::from_raw_parts(ring.data().add(pos as usize + 8), len as usize)
            };
            let chunk = word & CONT != 0;
            let out = match (self.partial.as_mut(), chunk) {
                (None, false) => {
                    self.pool.clear();
                    self.pool.reserve(bytes.len());
                    self.pool.extend_from_slice(bytes);
                    Some(self.pool.split().freeze())
                }
                (None, true) => {
                    // The first chunk holds the header: size the buffer once.
                    if bytes.len() < HEADER_LEN {
                        return Err("a chunked frame's first chunk is shorter than a header".into());
                    }
                    let h = decode_header(
                        &bytes[..HEADER_LEN],
                        &Limits {
                            max_keys: u32::MAX,
                            max_meta: u32::MAX,
                            max_payload: self.max_frame,
                        },
                    )
                    .map_err(|e| e.to_string())?;
                    let total = HEADER_LEN as u64 + h.body_len();
                    if total > self.max_frame {
                        return Err(format!("a {total}-byte frame exceeds the message limit"));
                    }
                    self.pool.clear();
                    self.pool.reserve(total as usize);
                    // All of the pool's room goes to this frame.
                    let mut buf = self.pool.split_off(0);
                    buf.extend_from_slice(bytes);
                    self.partial = Some((buf, total as usize));
                    None
                }
                (Some((buf, total)), more) => {
                    if buf.len() + bytes.len() > *total {
                        return Err("chunks add up to more than their frame".into());
                    }
                    buf.extend_from_slice(bytes);
                    if more {
                        None
                    } else {
                        Some(self.partial.take().expect("present").0.freeze())
                    }
                }
            };
            self.cur += rec;
            self.release(self.cur);
            if let Some(b) = out {
                return Ok(b);
            }
        }
    }
}

/// Decodes a frame from its bytes (header, then body), checking limits.
fn parse(bytes: Bytes, limits: &Limits) -> Result<Frame, String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "a {}-byte record is shorter than a header",
            bytes.len()
        ));
    }
    let h = decode_header(&bytes[..HEADER_LEN], limits).map_err(|e| e.to_string())?;
    decode_body(h, bytes.slice(HEADER_LEN..)).map_err(|e| e.to_string())
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

/// Starts the van: a writer thread, a reader thread, and a task watching
/// the TCP connection for the peer's end.
pub(crate) fn start(
    rings: Rings,
    tcp: tokio::net::TcpStream,
    link: Arc<Link>,
    sink: Arc<dyn FrameSink>,
    limits: Limits,
    rt: &tokio::runtime::Handle,
) -> io::Result<()> {
    let tx = Arc::new(rings.tx);
    let rx = Arc::new(rings.rx);
    let producer = Arc::new(parking_lot::Mutex::new(Producer {
        ring: tx.clone(),
        head: 0,
    }));
    link.set_direct(Arc::new(ShmDirect {
        producer: producer.clone(),
    }));
    let mut consumer = Consumer {
        ring: rx.clone(),
        cur: 0,
        partial: None,
        max_frame: limits.max_payload
            + (limits.max_keys as u64) * 12
            + limits.max_meta as u64
            + HEADER_LEN as u64,
        pool: BytesMut::new(),
    };
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
    let (l, s, rxr, g) = (link.clone(), sink.clone(), rx.clone(), gone.clone());
    std::thread::Builder::new()
        .name(format!("pskv-shm-rx-{}", link.id))
        .spawn(move || loop {
            match consumer.next(&l).and_then(|b| parse(b, &limits)) {
                Ok(frame) => s.on_frame(&l, frame),
                Err(e) => {
                    let reason = match g.lock().take() {
                        Some(why) => why,
                        None => {
                            if !l.is_closed() {
                                tracing::warn!(link = l.id, "closing the shared-memory link: {e}");
                            }
                            e
                        }
                    };
                    end(&l, &s, reason);
                    rxr.close();
                    return;
                }
            }
        })?;
    drop(sink);
    rt.spawn(async move {
        let (mut rd, mut wr) = tcp.into_split();
        let mut buf = [0u8; 64];
        let mut tick = tokio::time::interval(WAIT_SLICE);
        loop {
            tokio::select! {
                r = rd.read(&mut buf) => {
                    // Nothing travels on TCP any more: data or the end both
                    // mean the peer is gone or broken.
                    let why = match r {
                        Ok(0) => "the peer closed the connection".to_string(),
                        Ok(_) => "unexpected bytes on the control connection of a shared-memory link".to_string(),
                        Err(e) => format!("read failed: {e}"),
                    };
                    // The reader drains the ring, then ends the link.
                    *gone.lock() = Some(why);
                    tx.close();
                    rx.close();
                    return;
                }
                _ = tick.tick() => {
                    if link.is_closed() {
                        tx.close();
                        rx.close();
                        let _ = wr.shutdown().await;
                        return;
                    }
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(cap: usize) -> (Producer, Consumer, Arc<Link>) {
        let (a, _) = ring_paths();
        let w = Ring::create(&a, cap).unwrap();
        let r = Ring::open(&a, cap).unwrap();
        std::fs::remove_file(&a).unwrap();
        let p = Producer {
            ring: Arc::new(w),
            head: 0,
        };
        let c = Consumer {
            ring: Arc::new(r),
            cur: 0,
            partial: None,
            max_frame: 1 << 30,
            pool: BytesMut::new(),
        };
        (p, c, Arc::new(Link::new(1, 0, "shm")))
    }

    fn frame(n: usize, tag: u8) -> Frame {
        let mut f = Frame::new(crate::wire::Kind::Request);
        f.flags = crate::wire::Flags::PUSH;
        f.keys = vec![tag as u64];
        f.lens = vec![n as u32];
        f.payload = Bytes::from(vec![tag; n]);
        f
    }

    /// Frames of every size class cross a small ring, in order, including
    /// chunked ones, while the reader keeps some of them.
    #[test]
    fn frames_cross_the_ring_whole_and_in_order() {
        let (mut p, mut c, link) = pair(1 << 16);
        let sizes = [0usize, 1, 100, 4000, 16_000, 70_000, 200_000, 5, 16_300];
        let l2 = link.clone();
        let writer = std::thread::spawn(move || {
            for round in 0..20u8 {
                for (i, &n) in sizes.iter().enumerate() {
                    p.frame(
                        &frame(n, round.wrapping_mul(31).wrapping_add(i as u8)),
                        &|| l2.is_closed(),
                    )
                    .unwrap();
                }
            }
        });
        let mut held = Vec::new();
        for round in 0..20u8 {
            for (i, &n) in sizes.iter().enumerate() {
                let f = parse(c.next(&link).unwrap(), &Limits::default()).unwrap();
                let tag = round.wrapping_mul(31).wrapping_add(i as u8);
                assert_eq!(f.keys, vec![tag as u64]);
                assert_eq!(f.payload.len(), n);
                assert!(f.payload.iter().all(|&b| b == tag));
                // Hold some payloads a while: the ring must still flow.
                held.push(f.payload);
                if held.len() > 3 {
                    held.remove(1);
                }
            }
        }
        writer.join().unwrap();
    }

    #[test]
    fn corrupt_indices_are_an_error_not_a_crash() {
        let (mut p, mut c, link) = pair(1 << 16);
        p.frame(&frame(10, 1), &|| link.is_closed()).unwrap();
        // The peer scribbles an impossible head.
        p.ring.u64_at(HEAD).store(u64::MAX / 2, Ordering::SeqCst);
        let err = c.next(&link).unwrap_err();
        assert!(err.contains("corrupt"), "{err}");
    }
}
