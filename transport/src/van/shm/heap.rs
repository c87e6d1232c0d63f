//! The heap of a direction: large frames cross in one copy. The producer
//! copies the frame into free heap blocks and sends a 16-byte descriptor
//! through the ring; the consumer hands the frame up as a `Bytes` that reads
//! the blocks in place (a *lease*) and frees them when the last clone of it
//! is dropped. Blocks free out of order, so a receiver that keeps a payload
//! pins only that payload's blocks, never the ring.
//!
//! # States of a block (16 KiB), one bit each in the bitmap
//!
//! ```text
//!   free (0) --producer: alloc, sets the bit--> written by the producer (1)
//!   --producer: publishes the descriptor record--> leased to the consumer (1)
//!   --last clone of the lease dropped: consumer clears the bit--> free (0)
//! ```
//!
//! Only the producer sets bits. The consumer clears them, and so does the
//! producer for blocks it took but could not use (reserving their pages
//! failed), before it publishes anything about them.
//!
//! Memory orderings: the consumer clears with Release after its last read of
//! the block; the producer's scan loads with Acquire, so a bit it sees clear
//! orders the consumer's reads before its next writes. The producer's writes
//! reach the consumer through the ring: the record's publication (a SeqCst
//! store of `head`) comes after them, and the consumer loads `head` with
//! Acquire before it reads the descriptor.
//!
//! Subtle: the producer's scan races with the consumer's clears; a stale
//! word only makes a block look busy, which is the safe direction. The
//! `fetch_or` that takes blocks is a read-modify-write, so it cannot undo a
//! clear of another block of the same word.
//!
//! When the heap has no run of free blocks long enough, or the frame is
//! small, or reserving pages fails (a full /dev/shm), the frame goes through
//! the ring instead, copied in and out: the link never waits on a lease.
//! The file's heap is sparse: pages are reserved (`fallocate`) as the
//! producer first reaches them, so a full tmpfs is an error here, never a
//! SIGBUS later. A heap that was never used costs no memory; one that was
//! keeps its high-water mark of pages until the link ends (blocks are
//! reused first-fit from the start, so that is about the most bytes that
//! were in flight at once).
//!
//! The peer's memory is not trusted: a descriptor must name blocks inside
//! the heap that the producer marked taken, and a frame within the message
//! limit. A peer can still change bytes under a lease it gave us (it shares
//! the memory): peers are authenticated processes of the same job, as they
//! are for the ring.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::ring::Ring;
use crate::van::VanError;

/// Heap granularity.
pub(crate) const BLOCK: usize = 16 << 10;

/// Frames from this size go through the heap. Below it, copying through the
/// ring costs less than the bitmap's atomics and a lease.
pub(crate) const MIN_FRAME: usize = 64 << 10;

/// Bytes of a descriptor record's body: heap offset, frame length.
pub(super) const DESCRIPTOR: usize = 16;

/// Pages are reserved in steps of this much (or to the heap's end).
const RESERVE_STEP: usize = 8 << 20;

/// Bits `[first, first + n)` of the bitmap, as (word, mask) pairs.
fn masks(first: usize, n: usize) -> impl Iterator<Item = (usize, u64)> {
    let end = first + n;
    let mut at = first;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let word = at / 64;
        let lo = at % 64;
        let hi = (end - word * 64).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        at = word * 64 + hi;
        Some((word, mask))
    })
}

/// The producer's allocator over its direction's heap.
pub(super) struct HeapWriter {
    ring: Arc<Ring>,
    /// Heap bytes reserved in the file so far (from its start).
    reserved: usize,
    /// Reserving failed once: the heap is not used any more.
    broken: bool,
}

impl HeapWriter {
    pub(super) fn new(ring: Arc<Ring>) -> HeapWriter {
        HeapWriter {
            ring,
            reserved: 0,
            broken: false,
        }
    }

    /// Whether a frame of `len` bytes should try the heap.
    pub(super) fn wants(&self, len: usize) -> bool {
        !self.broken && len >= MIN_FRAME && len <= self.ring.heap
    }

    /// Takes the first run of free blocks that holds `len` bytes; its byte
    /// offset, or None if there is none (or pages cannot be reserved).
    pub(super) fn alloc(&mut self, len: usize) -> Option<usize> {
        let blocks = self.ring.heap / BLOCK;
        let need = len.div_ceil(BLOCK);
        let (mut start, mut run) = (0, 0);
        'scan: for w in 0..blocks.div_ceil(64) {
            let mut word = self.ring.bitmap(w).load(Ordering::Acquire);
            let valid = blocks - w * 64;
            if valid < 64 {
                // Bits past the last block count as taken.
                word |= !0u64 << valid;
            }
            // Walk the word by runs of free (0) and taken (1) bits.
            let mut bit = 0;
            while bit < 64 {
                let rest = word >> bit;
                if rest & 1 == 0 {
                    let free = (rest.trailing_zeros() as usize).min(64 - bit);
                    if run == 0 {
                        start = w * 64 + bit;
                    }
                    run += free;
                    if run >= need {
                        break 'scan;
                    }
                    bit += free;
                } else {
                    // `rest`'s top `bit` bits are 0, so this stops by 64.
                    run = 0;
                    bit += (!rest).trailing_zeros() as usize;
                }
            }
        }
        if run < need {
            return None;
        }
        for (w, mask) in masks(start, need) {
            self.ring.bitmap(w).fetch_or(mask, Ordering::Relaxed);
        }
        let end = (start + need) * BLOCK;
        if end > self.reserved {
            let to = end.next_multiple_of(RESERVE_STEP).min(self.ring.heap);
            if let Err(e) = self.ring.reserve_heap(self.reserved, to) {
                tracing::warn!(
                    "shared-memory heap: cannot reserve {} MiB in /dev/shm ({e}); large frames now go through the ring",
                    to >> 20
                );
                self.broken = true;
                free(&self.ring, start * BLOCK, len);
                return None;
            }
            self.reserved = to;
        }
        Some(start * BLOCK)
    }

    /// Copies `parts` into the heap at `at`, blocks that `alloc` gave.
    pub(super) fn write(&self, at: usize, parts: &[&[u8]]) {
        let mut o = at;
        for p in parts {
            assert!(o + p.len() <= self.ring.heap, "heap write out of bounds");
            // SAFETY: [o, o + len) lies in blocks this producer took (bits
            // set, not yet published), inside the mapped heap (checked).
            unsafe { copy(p, self.ring.heap_ptr().add(o)) };
            o += p.len();
        }
    }
}

/// Copies of this size and more bypass the caches (see `stream_copy`).
/// Below it, the receiver often finds the frame in a cache: at 16 MiB
/// streaming made the echo round trip 35% slower.
const STREAM_MIN: usize = 32 << 20;

/// Copies `src` to `dst`.
///
/// # Safety
/// `dst` is valid for `src.len()` bytes of writes and does not overlap it.
unsafe fn copy(src: &[u8], dst: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    if src.len() >= STREAM_MIN && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present; the caller's contract.
        return unsafe { stream_copy(src, dst) };
    }
    // SAFETY: the caller's contract.
    unsafe { crate::copy::copy_to(dst, src) }
}

/// A copy with non-temporal stores: a frame far larger than the caches is
/// written straight to memory, without first reading each destination line
/// in (measured on a 2-vCPU VM, 64 MiB between shared mappings: 8.4 GB/s
/// against memcpy's 6.7). The receiver reads it from memory either way.
///
/// # Safety
/// AVX2 is present; `dst` is valid for `src.len()` bytes of writes and does
/// not overlap `src`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_copy(src: &[u8], dst: *mut u8) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_stream_si256, _mm_sfence};
    let n = src.len();
    let s = src.as_ptr();
    // Plain copy up to a 32-byte aligned destination.
    let lead = dst.align_offset(32).min(n);
    // SAFETY: within both ranges (the caller's contract).
    unsafe { std::ptr::copy_nonoverlapping(s, dst, lead) };
    let mut i = lead;
    while i + 128 <= n {
        // SAFETY: [i, i + 128) is within both ranges; `dst + i` is 32-byte
        // aligned, as the stream stores require.
        unsafe {
            let a = _mm256_loadu_si256(s.add(i) as *const __m256i);
            let b = _mm256_loadu_si256(s.add(i + 32) as *const __m256i);
            let c = _mm256_loadu_si256(s.add(i + 64) as *const __m256i);
            let d = _mm256_loadu_si256(s.add(i + 96) as *const __m256i);
            _mm256_stream_si256(dst.add(i) as *mut __m256i, a);
            _mm256_stream_si256(dst.add(i + 32) as *mut __m256i, b);
            _mm256_stream_si256(dst.add(i + 64) as *mut __m256i, c);
            _mm256_stream_si256(dst.add(i + 96) as *mut __m256i, d);
        }
        i += 128;
    }
    // SAFETY: the rest, within both ranges.
    unsafe { std::ptr::copy_nonoverlapping(s.add(i), dst.add(i), n - i) };
    // Subtle: stream stores are weakly ordered; the fence puts them before
    // the record's publication, which the consumer synchronizes with.
    _mm_sfence();
}

/// Frees the blocks holding `[at, at + len)`.
fn free(ring: &Ring, at: usize, len: usize) {
    for (w, mask) in masks(at / BLOCK, len.div_ceil(BLOCK)) {
        ring.bitmap(w).fetch_and(!mask, Ordering::Release);
    }
}

/// A descriptor record's body.
pub(super) fn descriptor(at: usize, len: usize) -> [u8; DESCRIPTOR] {
    let mut d = [0u8; DESCRIPTOR];
    d[..8].copy_from_slice(&(at as u64).to_le_bytes());
    d[8..].copy_from_slice(&(len as u64).to_le_bytes());
    d
}

/// A frame read in place from the heap; frees its blocks when dropped.
struct Lease {
    ring: Arc<Ring>,
    at: usize,
    len: usize,
}

impl AsRef<[u8]> for Lease {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `lease` checked [at, at + len) is inside the heap and was
        // published to us; the producer does not reuse it before `drop`
        // clears its bits. The mapping lives as long as `ring`.
        unsafe { std::slice::from_raw_parts(self.ring.heap_ptr().add(self.at), self.len) }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        free(&self.ring, self.at, self.len);
    }
}

/// The frame a descriptor record names, leased from the heap.
pub(super) fn lease(ring: &Arc<Ring>, desc: &[u8], max_frame: u64) -> Result<Bytes, VanError> {
    let d: &[u8; DESCRIPTOR] = desc
        .try_into()
        .map_err(|_| VanError::Protocol(format!("a heap descriptor of {} bytes", desc.len())))?;
    let at = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(d[8..].try_into().expect("8 bytes"));
    let inside = at
        .checked_add(len)
        .is_some_and(|end| end <= ring.heap as u64);
    if !inside || at % BLOCK as u64 != 0 || len == 0 || len > max_frame {
        return Err(VanError::Protocol(format!(
            "a heap descriptor out of bounds ({len} bytes at {at} of a {}-byte heap)",
            ring.heap
        )));
    }
    let (at, len) = (at as usize, len as usize);
    let taken = masks(at / BLOCK, len.div_ceil(BLOCK))
        .all(|(w, mask)| ring.bitmap(w).load(Ordering::Relaxed) & mask == mask);
    if !taken {
        return Err(VanError::Protocol(format!(
            "a heap descriptor names free blocks ({len} bytes at {at})"
        )));
    }
    Ok(Bytes::from_owner(Lease {
        ring: ring.clone(),
        at,
        len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::van::shm::ring::Ring;

    /// First fit over a bitmap with holes, across word boundaries, and
    /// none when no run is long enough.
    #[test]
    fn alloc_takes_the_first_run_that_fits() {
        let (path, _) = super::super::ring_paths();
        // 200 blocks: 4 words, the last one partly past the end.
        let ring = Arc::new(Ring::create(&path, 1 << 16, 200 * BLOCK).unwrap());
        std::fs::remove_file(&path).unwrap();
        let mut h = HeapWriter::new(ring.clone());
        let set = |w: usize, v: u64| ring.bitmap(w).store(v, Ordering::SeqCst);
        // Word 0: blocks 3..=5 free. Word 1: blocks 124..=127 free, and
        // word 2 starts with 10 free: a run of 14 across the boundary.
        set(0, !0b111000);
        set(1, !(0b1111 << 60));
        set(2, !0b11_1111_1111);
        set(3, !0);
        assert_eq!(h.alloc(3 * BLOCK), Some(3 * BLOCK));
        assert_eq!(h.alloc(14 * BLOCK), Some(124 * BLOCK));
        assert_eq!(h.alloc(BLOCK), None);
        // Blocks 192..200 are the last ones; bits past 200 never count.
        set(3, !0xff);
        assert_eq!(h.alloc(8 * BLOCK), Some(192 * BLOCK));
        set(3, !0x1ff);
        assert_eq!(h.alloc(9 * BLOCK), None, "bit 200 is past the heap");
        for w in 0..4 {
            set(w, 0);
        }
        assert_eq!(h.alloc(200 * BLOCK), Some(0));
        assert_eq!(h.alloc(BLOCK), None);
    }

    #[test]
    fn copies_are_exact_at_every_alignment() {
        let src: Vec<u8> = (0..STREAM_MIN + 300)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        let mut dst = vec![0u8; src.len() + 64];
        // An offset where the destination is 32-byte aligned, and others.
        let a = dst.as_ptr().align_offset(32);
        for (off, len) in [
            (a, STREAM_MIN),
            (a + 1, STREAM_MIN + 129),
            (a + 31, STREAM_MIN + 5),
            (5, 100),
        ] {
            dst.fill(0);
            // SAFETY: dst has room for len bytes at off.
            unsafe { copy(&src[..len], dst.as_mut_ptr().add(off)) };
            assert!(dst[..off].iter().all(|&b| b == 0));
            assert_eq!(&dst[off..off + len], &src[..len], "at {off}, {len} bytes");
            assert!(dst[off + len..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn masks_cover_exactly_the_bits() {
        for first in [0usize, 1, 63, 64, 65, 100] {
            for n in [1usize, 2, 63, 64, 65, 130] {
                let mut bits = [0u64; 8];
                for (w, m) in masks(first, n) {
                    assert_eq!(bits[w] & m, 0, "overlap at {first}+{n}");
                    bits[w] |= m;
                }
                for b in 0..512 {
                    let set = bits[b / 64] >> (b % 64) & 1 == 1;
                    assert_eq!(
                        set,
                        (first..first + n).contains(&b),
                        "bit {b} of {first}+{n}"
                    );
                }
            }
        }
    }
}
