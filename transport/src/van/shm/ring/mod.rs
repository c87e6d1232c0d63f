//! One direction of a shared-memory link: the mapped file, its ring of
//! records, the protocol of its waits (this file; the futex calls are
//! `../futex.rs`), and the producer and consumer ends (`produce.rs`,
//! `consume.rs`).
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
//! Waking without lost wake-ups: the waiter reads the sequence word,
//! publishes its "waiting" flag, then (after a SeqCst fence) re-checks the
//! index, then sleeps on the sequence word with the value it read; the
//! other side publishes the index, then reads the flag, and only if it is
//! set bumps the sequence and wakes (`wake_waiter`; the index store, the
//! flag's store and load SeqCst). Either the waiter sees the new index, or
//! the other side sees the flag and wakes it; a bump between the waiter's
//! read and its sleep makes the futex return at once. A side that finds
//! no waiter writes nothing but its index: while both threads spin, each
//! header line has one writer, and the sequence and flag lines are not
//! written at all (the producer also reads the consumer's index only when
//! the room it last saw runs short: `produce.rs`). Sleeps last at most 100
//! ms, so both threads notice a closed link. Before sleeping, a waiter
//! spins (`crate::spin`: about as long as its last wait, within bounds).
//!
//! Subtle: one waiter per flag. Each direction's "data arrived" word has
//! one sleeper at a time (the link's reader thread, or its group's thread:
//! `shm/mod.rs` picks one; pollers never sleep on it), and the "space
//! freed" word has the producer's (the producer is behind a mutex). A second
//! sleeper could clear the flag while the first is about to sleep, and
//! the first would then sleep out its slice: with no flag seen, nobody
//! bumps the word.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use memmap2::MmapRaw;

use super::futex;
use super::heap::{self, HeapWriter, BLOCK};
use crate::spin::Spin;
use crate::van::VanError;

mod consume;
mod produce;

pub(super) use consume::{Consumer, Watch};
pub(super) use produce::Producer;

/// What a closed ring's error names (`VanError::Closed`): the peer closed
/// its end, or this side's link closed.
pub(super) const RING_CLOSED: &str = "shared-memory ring";

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

/// The most bytes of a ring mapped in at once when it is opened
/// (`populate`).
const POPULATE_MAX: usize = 64 << 20;

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

/// Maps the first `len` bytes of `map` (header and ring, whose pages the
/// file has reserved) into this process's page tables now, so that the
/// first pass of the records over the ring does not take a page fault every
/// 4 KiB on both sides (about one a round trip in 30 of 4 B frames: a
/// 16 MiB ring is a lap of 130,000 of them). Best effort: a kernel without
/// `MADV_POPULATE_WRITE` (before 5.14) faults the pages in as they are
/// first written, as before. The heap stays sparse (`heap.rs`), and so
/// does a ring's part past `POPULATE_MAX` (the peer may declare a ring of
/// up to 16 GiB; the handshake that maps it should not wait for that).
fn populate(map: &MmapRaw, len: usize) {
    let len = len.min(POPULATE_MAX);
    // SAFETY: advice on a range of our own live mapping; it changes no
    // byte of it.
    unsafe {
        libc::madvise(
            map.as_mut_ptr().cast(),
            len.min(map.len()),
            libc::MADV_POPULATE_WRITE,
        );
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
        populate(&map, HDR + cap);
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
        populate(&map, HDR + cap);
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
        futex::wake(self.u32_at(DATA_SEQ));
        futex::wake(self.u32_at(SPACE_SEQ));
    }

    pub(super) fn is_closed(&self) -> bool {
        self.u32_at(CLOSED).load(Ordering::SeqCst) != 0
    }

    /// Whether the consumer and the producer have said they sleep (their
    /// flags; tests of the wait protocol).
    #[cfg(test)]
    pub(in crate::van::shm) fn sleepers(&self) -> (bool, bool) {
        (
            self.u32_at(CONS_WAIT).load(Ordering::SeqCst) != 0,
            self.u32_at(PROD_WAIT).load(Ordering::SeqCst) != 0,
        )
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
        // Orders the flag before `ready`'s loads of the index (which are
        // Acquire): the other side's store of the index (`publish`,
        // `release`) and its load of the flag (`wake_waiter`) are SeqCst.
        fence(Ordering::SeqCst);
        if !ready() && !ring.is_closed() {
            futex::wait(ring.u32_at(seq), seen, WAIT_SLICE);
        }
        ring.u32_at(flag).store(0, Ordering::SeqCst);
        false
    });
    // Subtle: a frame published just before the close must still be read,
    // so look once more after giving up.
    if ok || ready() {
        Ok(())
    } else {
        Err(VanError::Closed(RING_CLOSED))
    }
}

/// After this side published its index (SeqCst): wakes the other side if
/// it waits on `seq` (its flag `flag` set), bumping `seq` first so that a
/// waiter not yet asleep does not sleep (the module docs' protocol).
fn wake_waiter(ring: &Ring, seq: usize, flag: usize) {
    if ring.u32_at(flag).load(Ordering::SeqCst) != 0 {
        ring.u32_at(seq).fetch_add(1, Ordering::SeqCst);
        futex::wake(ring.u32_at(seq));
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
