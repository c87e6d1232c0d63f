//! One direction of a shared-memory link: the mapped file, its ring of
//! records, the futex waits, and the producer and consumer ends.
//!
//! # The file
//!
//! ```text
//!   0     magic "PSKVRING", ring capacity, heap bytes
//!   64    head   (u64)  bytes published by the producer, ever increasing
//!   128   tail   (u64)  bytes released by the consumer, ever increasing
//!   192   data_seq (u32), consumer_waiting (u32)    futex: "data arrived"
//!   256   space_seq (u32), producer_waiting (u32)   futex: "space freed"
//!   320   closed (u32)
//!   4096  ring data: records [u64 word | bytes], 64-byte aligned, never
//!         wrapping. word: bits 0..48 length; bit 61 HEAP (the record is a
//!         heap descriptor, see heap.rs); bit 62 CONTINUED (a chunk of a
//!         frame larger than a record may be: a quarter of the ring, at
//!         most 1 MiB); bit 63 WRAP (skip to the start)
//!   4096+cap          heap bitmap, one bit per block, page-rounded
//!   after the bitmap  heap blocks (heap.rs)
//! ```
//!
//! Invariants: `tail <= head <= tail + capacity` (checked by both ends on
//! every read of the other's index: the peer's memory is not trusted, and a
//! violation closes the link); the
//! producer writes only `[head, tail + capacity)`; the consumer releases each
//! record, in order, as soon as it has copied it (or, for a heap record, as
//! soon as it has read the descriptor).
//!
//! Waking without lost wake-ups: the waiter publishes its "waiting" flag,
//! then re-checks the index, then sleeps on the sequence word with the value
//! it read before; the other side publishes the index, bumps the sequence,
//! then reads the flag (all SeqCst). Either the waiter sees the new index,
//! or the other side sees the flag and wakes it; a bump between the read and
//! the sleep makes the futex return at once. Sleeps last at most 100 ms, so
//! both threads notice a closed link. Before sleeping, a waiter spins
//! (`crate::spin`: about as long as its last wait, within bounds).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use memmap2::MmapRaw;

use super::heap::{self, HeapWriter, BLOCK};
use crate::link::Link;
use crate::spin::Spin;
use crate::van::{slice_parts, VanError};
use crate::wire::{decode_header, Frame, Limits, HEADER_LEN};

const MAGIC: u64 = u64::from_le_bytes(*b"PSKVRING");
const HDR: usize = 4096;
const PAGE: usize = 4096;
const HEAD: usize = 64;
const TAIL: usize = 128;
const DATA_SEQ: usize = 192;
const CONS_WAIT: usize = 196;
const SPACE_SEQ: usize = 256;
const PROD_WAIT: usize = 260;
const CLOSED: usize = 320;

const LEN_MASK: u64 = (1 << 48) - 1;
pub(super) const HEAP_FLAG: u64 = 1 << 61;
pub(super) const CONT: u64 = 1 << 62;
pub(super) const WRAP: u64 = 1 << 63;

/// Frames above a record's size travel in chunks of about this size
/// (pipelined copies).
const CHUNK_BYTES: usize = 256 * 1024;

/// Sleep slices of the futex waits.
pub(super) const WAIT_SLICE: Duration = Duration::from_millis(100);

/// The largest heap a file may declare (the bitmap is scanned per frame).
pub(crate) const MAX_HEAP: usize = 16 << 30;

fn align64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

/// Bytes of the bitmap of a heap of `heap` bytes (`layout` page-rounds it).
fn bitmap_len(heap: usize) -> usize {
    (heap / BLOCK).div_ceil(64) * 8
}

/// One mapped direction: ring and heap.
pub(crate) struct Ring {
    /// Reached only through raw pointers (never a `&[u8]`): the peer
    /// writes this memory while we hold it.
    map: MmapRaw,
    /// Kept to reserve heap pages as they are first used (fallocate).
    file: File,
    pub(super) cap: usize,
    /// Heap bytes (a multiple of BLOCK; 0: no heap).
    pub(super) heap: usize,
    bitmap_at: usize,
    heap_at: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics (the
// header and the bitmap) and through the record and block protocols (data),
// which give each byte of data to one side at a time.
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

/// Where the bitmap and the heap start, and the file's length.
fn layout(cap: usize, heap: usize) -> (usize, usize, usize) {
    let bitmap_at = HDR + cap;
    let heap_at = bitmap_at + bitmap_len(heap).next_multiple_of(PAGE);
    (bitmap_at, heap_at, heap_at + heap)
}

/// Reserves `[off, off + len)` of a tmpfs file, so that touching those pages
/// later cannot fault with SIGBUS when /dev/shm is full.
pub(super) fn reserve(file: &File, off: usize, len: usize) -> io::Result<()> {
    // SAFETY: a plain syscall on an open descriptor.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), off as i64, len as i64) };
    match rc {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

impl Ring {
    /// Creates the file (fails if it exists), reserves the ring's pages and
    /// maps it. `heap` is rounded up to whole blocks (0: no heap).
    pub(crate) fn create(path: &Path, cap: usize, heap: usize) -> io::Result<Ring> {
        let cap = align64(cap.max(1 << 16));
        let heap = heap.min(MAX_HEAP).next_multiple_of(BLOCK);
        let (_, heap_at, len) = layout(cap, heap);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.set_len(len as u64)?;
        // The heap stays sparse: its pages are reserved as the producer
        // first uses them (heap.rs).
        reserve(&file, 0, heap_at)?;
        let map = MmapRaw::map_raw(&file)?;
        // SAFETY: the first 24 bytes of a fresh mapping nobody else has yet.
        unsafe {
            let p = map.as_mut_ptr() as *mut u64;
            p.write(MAGIC.to_le());
            p.add(1).write((cap as u64).to_le());
            p.add(2).write((heap as u64).to_le());
        }
        Ok(Ring::mapped(map, file, cap, heap))
    }

    /// A mapped file of this ring size and heap size (checked by the
    /// caller).
    fn mapped(map: MmapRaw, file: File, cap: usize, heap: usize) -> Ring {
        let (bitmap_at, heap_at, _) = layout(cap, heap);
        Ring {
            map,
            file,
            cap,
            heap,
            bitmap_at,
            heap_at,
        }
    }

    /// Maps an existing file and checks its header and size.
    pub(crate) fn open(path: &Path, cap: usize) -> io::Result<Ring> {
        let bad = |what: &str| Err(io::Error::new(io::ErrorKind::InvalidData, what.to_string()));
        let cap = align64(cap.max(1 << 16));
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len() as usize;
        if size < HDR + cap {
            return bad("ring file is too short");
        }
        let map = MmapRaw::map_raw(&file)?;
        // SAFETY: the header is inside the checked size; the peer does not
        // change it after creating the file.
        let word =
            |i: usize| unsafe { u64::from_le((map.as_ptr() as *const u64).add(i).read_volatile()) };
        let (magic, got_cap, heap) = (word(0), word(1), word(2) as usize);
        if magic != MAGIC || got_cap != cap as u64 {
            return bad("not a pskv ring of the agreed size");
        }
        if heap > MAX_HEAP || heap % BLOCK != 0 {
            return bad("ring file declares an impossible heap");
        }
        if size != layout(cap, heap).2 {
            return bad("ring file has the wrong size");
        }
        Ok(Ring::mapped(map, file, cap, heap))
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

    /// Word `i` of the heap bitmap (`i < heap / BLOCK / 64`, rounded up).
    pub(super) fn bitmap(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < bitmap_len(self.heap) / 8);
        self.u64_at(self.bitmap_at + 8 * i)
    }

    /// The heap's first byte.
    pub(super) fn heap_ptr(&self) -> *mut u8 {
        // SAFETY: heap_at is within the mapping (its length was checked).
        unsafe { self.map.as_mut_ptr().add(self.heap_at) }
    }

    /// Reserves heap bytes `[from, to)` in the file (see `reserve`).
    pub(super) fn reserve_heap(&self, from: usize, to: usize) -> io::Result<()> {
        reserve(&self.file, self.heap_at + from, to - from)
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: HDR is within the mapping.
        unsafe { self.map.as_mut_ptr().add(HDR) }
    }

    pub(super) fn close(&self) {
        self.u32_at(CLOSED).store(1, Ordering::SeqCst);
        self.u32_at(DATA_SEQ).fetch_add(1, Ordering::SeqCst);
        self.u32_at(SPACE_SEQ).fetch_add(1, Ordering::SeqCst);
        futex_wake(self.u32_at(DATA_SEQ));
        futex_wake(self.u32_at(SPACE_SEQ));
    }

    pub(super) fn is_closed(&self) -> bool {
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

impl Ring {
    /// The "data arrived" futex word and the consumer's waiting flag, for
    /// a reader that sleeps on several rings at once (`group.rs`; the
    /// protocol is this module's).
    pub(super) fn data_wait(&self) -> (&AtomicU32, &AtomicU32) {
        (self.u32_at(DATA_SEQ), self.u32_at(CONS_WAIT))
    }

    /// Bytes the producer has published, ever (the peer's word: a reader
    /// compares it with its own position, never with the peer's tail).
    pub(super) fn head(&self) -> u64 {
        self.u64_at(HEAD).load(Ordering::Acquire)
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: a futex wake on a word of a live mapping.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// Waits until `ready()` or the ring closes; `seq`/`flag` are the futex word
/// and the waiting flag of this direction of waiting, `spin` its budget.
fn wait_until(
    ring: &Ring,
    seq: usize,
    flag: usize,
    spin: &mut Spin,
    ready: &dyn Fn() -> bool,
    closed: &dyn Fn() -> bool,
) -> Result<(), VanError> {
    let ok = spin.wait(ready, &mut || {
        if ring.is_closed() || closed() {
            return true;
        }
        let seen = ring.u32_at(seq).load(Ordering::SeqCst);
        ring.u32_at(flag).store(1, Ordering::SeqCst);
        if !ready() && !ring.is_closed() {
            futex_wait(ring.u32_at(seq), seen, WAIT_SLICE);
        }
        ring.u32_at(flag).store(0, Ordering::SeqCst);
        false
    });
    // Subtle: a frame published just before the close must still be read,
    // so look once more after giving up.
    if ok || ready() {
        Ok(())
    } else {
        Err(VanError::Closed("shared-memory ring"))
    }
}

/// Free bytes of a ring of `cap` bytes with these indices, or why they are
/// impossible (the consumer's `tail` comes from shared memory).
fn free_room(tail: u64, head: u64, cap: u64) -> Result<u64, VanError> {
    if tail > head || head - tail > cap {
        return Err(VanError::Protocol(format!(
            "corrupt ring indices (read position {tail}, write position {head})"
        )));
    }
    Ok(cap - (head - tail))
}

/// The producer side of a direction.
pub(super) struct Producer {
    pub(super) ring: Arc<Ring>,
    head: u64,
    heap: HeapWriter,
    spin: Spin,
    /// Frames sent through the heap.
    pub(super) heap_frames: u64,
}

impl Producer {
    pub(super) fn new(ring: Arc<Ring>) -> Producer {
        Producer {
            heap: HeapWriter::new(ring.clone()),
            ring,
            head: 0,
            spin: Spin::new(),
            heap_frames: 0,
        }
    }

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

    /// Ring bytes a record of `len` body bytes needs at `head` (a wrap
    /// marker's skip included), and that skip.
    fn need(&self, len: usize) -> (u64, u64) {
        let cap = self.ring.cap as u64;
        let rec = align64(8 + len) as u64;
        let pos = self.head % cap;
        let wrap = if cap - pos < rec { cap - pos } else { 0 };
        (wrap + rec, wrap)
    }

    /// Appends one record (`CONT` or `HEAP` in `flags`).
    fn record(
        &mut self,
        parts: &[&[u8]],
        flags: u64,
        closed: &dyn Fn() -> bool,
    ) -> Result<(), VanError> {
        let cap = self.ring.cap as u64;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let (need, wrap) = self.need(len);
        let tail = self.ring.u64_at(TAIL);
        let head = self.head;
        // An impossible index ends the wait too; `room` then reports it.
        wait_until(
            &self.ring,
            SPACE_SEQ,
            PROD_WAIT,
            &mut self.spin,
            &|| free_room(tail.load(Ordering::Acquire), head, cap).map_or(true, |r| r >= need),
            closed,
        )?;
        if self.room()? < need {
            return Err(VanError::protocol("the ring has less room than waited for"));
        }
        self.publish(parts, flags, wrap, need - wrap);
        Ok(())
    }

    /// Free ring bytes now, or why the consumer's index is impossible.
    fn room(&self) -> Result<u64, VanError> {
        let tail = self.ring.u64_at(TAIL).load(Ordering::Acquire);
        free_room(tail, self.head, self.ring.cap as u64)
    }

    /// Writes a frame now if there is room for all of it; false (nothing
    /// written) otherwise.
    pub(super) fn try_frame(&mut self, f: &Frame) -> bool {
        if self.ring.is_closed() {
            return false;
        }
        let Ok(room) = self.room() else {
            return false;
        };
        let total = f.wire_len();
        if self.heap.wants(total) && room >= self.need(heap::DESCRIPTOR).0 {
            if let Some(at) = self.heap.alloc(total) {
                // The room was checked: this does not wait (it fails only
                // if the ring closes meanwhile; the writer then fails too).
                return self.heap_frame(f, at, &|| true).is_ok();
            }
        }
        // The records `inline_frame` writes, plus one wrap's worth of slack
        // (at most one wrap per ring's worth of writes, shorter than a
        // record).
        let max = self.max_record();
        let records = if 8 + total <= max {
            align64(8 + total)
        } else {
            let chunk = self.chunk_len(total);
            total.div_ceil(chunk) * align64(8 + chunk)
        };
        if room < (records + max) as u64 {
            return false;
        }
        // The space is there: the writes below never wait.
        self.inline_frame(f, &|| true).is_ok()
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

    /// Writes a frame: into the heap if it is large and the heap has room,
    /// else through the ring (in chunks if it is large).
    pub(super) fn frame(&mut self, f: &Frame, closed: &dyn Fn() -> bool) -> Result<(), VanError> {
        let total = f.wire_len();
        if self.heap.wants(total) {
            if let Some(at) = self.heap.alloc(total) {
                return self.heap_frame(f, at, closed);
            }
        }
        self.inline_frame(f, closed)
    }

    /// Copies a frame into heap blocks allocated at `at`, then publishes
    /// their descriptor.
    fn heap_frame(
        &mut self,
        f: &Frame,
        at: usize,
        closed: &dyn Fn() -> bool,
    ) -> Result<(), VanError> {
        let head = f.encode_head();
        self.heap.write(at, &[&head, &f.payload]);
        let desc = heap::descriptor(at, f.wire_len());
        self.heap_frames += 1;
        self.record(&[&desc], HEAP_FLAG, closed)
    }

    /// Writes a frame through the ring: one record, or chunks.
    fn inline_frame(&mut self, f: &Frame, closed: &dyn Fn() -> bool) -> Result<(), VanError> {
        let head = f.encode_head();
        let total = head.len() + f.payload.len();
        if 8 + total <= self.max_record() {
            return self.record(&[&head, &f.payload], 0, closed);
        }
        let chunk = self.chunk_len(total);
        let whole: [&[u8]; 2] = [&head[..], &f.payload[..]];
        let mut sent = 0;
        while sent < total {
            let n = chunk.min(total - sent);
            let pieces = slice_parts(&whole, sent, n);
            sent += n;
            let flags = if sent < total { CONT } else { 0 };
            self.record(&pieces, flags, closed)?;
        }
        Ok(())
    }
}

/// The consumer side of a direction.
pub(super) struct Consumer {
    ring: Arc<Ring>,
    cur: u64,
    /// A chunked frame being reassembled, and its total size.
    partial: Option<(BytesMut, usize)>,
    max_frame: u64,
    /// Receive buffer, reclaimed once the frames cut from it are dropped.
    pool: BytesMut,
    spin: Spin,
}

impl Consumer {
    pub(super) fn new(ring: Arc<Ring>, max_frame: u64) -> Consumer {
        Consumer {
            ring,
            cur: 0,
            partial: None,
            max_frame,
            pool: BytesMut::new(),
            spin: Spin::new(),
        }
    }

    fn release(&self, upto: u64) {
        let ring = &self.ring;
        ring.u64_at(TAIL).store(upto, Ordering::SeqCst);
        ring.u32_at(SPACE_SEQ).fetch_add(1, Ordering::SeqCst);
        if ring.u32_at(PROD_WAIT).load(Ordering::SeqCst) != 0 {
            futex_wake(ring.u32_at(SPACE_SEQ));
        }
    }

    /// The next frame's bytes: copied out of the ring, or leased from the
    /// heap; waits for them (the tests' reader; the van's waits without
    /// the consumer, `reader.rs`).
    #[cfg(test)]
    pub(super) fn next(&mut self, link: &Link) -> Result<Bytes, VanError> {
        loop {
            if let Some(b) = self.read(Some(link))? {
                return Ok(b);
            }
        }
    }

    /// The next frame's bytes if the ring holds the rest of it now, else
    /// None (the chunks of a frame read so far are kept for the next
    /// call). Never waits.
    pub(super) fn try_next(&mut self) -> Result<Option<Bytes>, VanError> {
        self.read(None)
    }

    /// Where this consumer reads next (bytes of the stream; see
    /// [`Watch::wait_beyond`]).
    pub(super) fn position(&self) -> u64 {
        self.cur
    }

    /// Reads records until a frame is whole. With `wait` (the link, whose
    /// close ends the wait), waits for each; without, returns None as soon
    /// as the ring holds no more.
    fn read(&mut self, wait: Option<&Link>) -> Result<Option<Bytes>, VanError> {
        let ring = self.ring.clone();
        let cap = ring.cap as u64;
        loop {
            let head_at = ring.u64_at(HEAD);
            let cur = self.cur;
            match wait {
                Some(link) => wait_until(
                    &ring,
                    DATA_SEQ,
                    CONS_WAIT,
                    &mut self.spin,
                    &|| head_at.load(Ordering::Acquire) > cur,
                    &|| link.is_closed(),
                )?,
                None if head_at.load(Ordering::Acquire) > cur => {}
                None => return Ok(None),
            }
            let head = head_at.load(Ordering::Acquire);
            if head < cur || head - cur > cap {
                return Err(VanError::Protocol(format!(
                    "corrupt ring indices (head {head}, read position {cur})"
                )));
            }
            let pos = cur % cap;
            // SAFETY: [pos, pos+8) is inside the ring and published (cur < head).
            let word = unsafe { (ring.data().add(pos as usize) as *const u64).read_volatile() };
            if word & WRAP != 0 {
                if cur + (cap - pos) > head {
                    return Err(VanError::Protocol(format!("corrupt wrap marker at {pos}")));
                }
                self.cur += cap - pos;
                self.release(self.cur);
                continue;
            }
            let len = word & LEN_MASK;
            let rec = align64(8 + len as usize) as u64;
            if rec > cap - pos || cur + rec > head {
                return Err(VanError::Protocol(format!(
                    "corrupt ring record of {len} bytes at {pos}"
                )));
            }
            // SAFETY: the record [pos+8, pos+8+len) is published and not
            // written by the producer until released below.
            let bytes = unsafe {
                std::slice::from_raw_parts(ring.data().add(pos as usize + 8), len as usize)
            };
            let chunk = word & CONT != 0;
            if word & HEAP_FLAG != 0 {
                if chunk || self.partial.is_some() {
                    return Err(VanError::protocol("a heap record inside a chunked frame"));
                }
                // The descriptor is read: its record can go at once.
                let b = heap::lease(&ring, bytes, self.max_frame)?;
                self.cur += rec;
                self.release(self.cur);
                return Ok(Some(b));
            }
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
                        return Err(VanError::protocol(
                            "a chunked frame's first chunk is shorter than a header",
                        ));
                    }
                    let h = decode_header(
                        &bytes[..HEADER_LEN],
                        &Limits {
                            max_keys: u32::MAX,
                            max_meta: u32::MAX,
                            max_payload: self.max_frame,
                        },
                    )
                    .map_err(VanError::from)?;
                    let total = HEADER_LEN as u64 + h.body_len();
                    if total > self.max_frame {
                        return Err(VanError::Protocol(format!(
                            "a {total}-byte frame exceeds the message limit"
                        )));
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
                        return Err(VanError::protocol("chunks add up to more than their frame"));
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
                return Ok(Some(b));
            }
        }
    }
}

/// Waits for data on a ring without holding its [`Consumer`] (which a
/// thread that polls the ring may hold meanwhile: see `shm/mod.rs`).
pub(super) struct Watch {
    ring: Arc<Ring>,
    spin: Spin,
}

impl Watch {
    pub(super) fn new(ring: Arc<Ring>) -> Watch {
        Watch {
            ring,
            spin: Spin::new(),
        }
    }

    /// Waits until the producer published beyond stream position `pos`,
    /// or `stop()` (checked while spinning and between sleeps), or the
    /// ring closes (an error, once nothing beyond `pos` is published).
    pub(super) fn wait_beyond(
        &mut self,
        pos: u64,
        link: &Link,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), VanError> {
        let head_at = self.ring.u64_at(HEAD);
        wait_until(
            &self.ring,
            DATA_SEQ,
            CONS_WAIT,
            &mut self.spin,
            &|| head_at.load(Ordering::Acquire) > pos || stop(),
            &|| link.is_closed(),
        )
    }
}

#[cfg(test)]
impl Producer {
    /// Scribbles the published head (tests of a hostile peer).
    pub(super) fn corrupt_head(&self, v: u64) {
        self.ring.u64_at(HEAD).store(v, Ordering::SeqCst);
    }

    /// Scribbles the consumer's index (tests of a hostile peer).
    pub(super) fn corrupt_tail(&self, v: u64) {
        self.ring.u64_at(TAIL).store(v, Ordering::SeqCst);
    }

    /// Writes raw bytes into the ring's data at `at` (modulo its size) and
    /// sets a heap bitmap word, as a hostile peer might.
    pub(super) fn scribble(&self, at: usize, bytes: &[u8], bitmap: u64) {
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: inside the ring's data (modulo its size).
            unsafe { self.ring.data().add((at + i) % self.ring.cap).write(*b) };
        }
        if self.ring.heap > 0 {
            self.ring.bitmap(0).store(bitmap, Ordering::SeqCst);
        }
    }

    /// Publishes a record as a hostile peer might.
    pub(super) fn raw_record(&mut self, body: &[u8], flags: u64) {
        self.record(&[body], flags, &|| false).unwrap();
    }
}
