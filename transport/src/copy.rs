//! Byte copies that keep clear of `rep movsb`'s slow distances.
//!
//! glibc's `memcpy` moves 4 KiB to 256 KiB with `rep movsb`. On this
//! project's AMD EPYC VMs (Zen 3) that instruction runs at about a tenth
//! of its speed when the destination lies a few bytes past the source
//! modulo a 4 KiB page (measured at 4 to 28 bytes): 2.9 GB/s against 30
//! GB/s (BENCHMARKS.md, "Copies whose destination is just past the source
//! in its page"). A copy from a page-aligned shared-memory slot into a heap
//! buffer, which glibc places 16 bytes into its first page, is such a copy;
//! every copy of a worker-summed round out of its value slot was one.
//! Copies at such a distance go through 64-byte blocks of vector loads and
//! stores instead; all others through `memcpy`.
//!
//! It lives in the transport, the lowest crate that moves bytes in bulk,
//! so that one mechanism serves every copy of a value: the transport's own
//! (shared-memory ring records and heap blocks, a TCP reader's buffered
//! bytes, answers copied into a caller's buffer, RDMA buffers) and the
//! kvstore's (into outputs and slots, out of slots). A TCP socket's own
//! copies are the kernel's, with the same instruction and the same slow
//! distances (BENCHMARKS.md, "The floor's receives ran at the slow
//! distance"): those are out of its reach.

/// Copies below this many bytes always go through `memcpy` (`rep movsb`
/// starts at a few KiB).
const MIN_BLOCKED: usize = 2048;
/// Copies of this many bytes and more go through `memcpy` too: glibc no
/// longer uses `rep movsb` for them (measured at distance 16: 256 KiB
/// pieces 2.9 GB/s, 512 KiB and larger 27 to 35 GB/s), and its
/// non-temporal stores serve the largest.
const MAX_BLOCKED: usize = 512 << 10;
/// Distances (destination less source, modulo a page) copied in blocks:
/// the slow ones, with a margin.
const SLOW_SKEW: std::ops::Range<usize> = 1..64;

/// Copies `src` to `dst`, `src.len()` bytes.
///
/// # Safety
/// `dst` is valid for writes of `src.len()` bytes, and the two ranges do
/// not overlap.
#[inline]
#[allow(unsafe_code)]
pub unsafe fn copy_to(dst: *mut u8, src: &[u8]) {
    if !blocked(dst as usize, src.as_ptr() as usize, src.len()) {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { blocks(dst, src) }
}

/// Whether a copy of `len` bytes from `src` to `dst` goes in blocks.
#[inline]
fn blocked(dst: usize, src: usize, len: usize) -> bool {
    (MIN_BLOCKED..MAX_BLOCKED).contains(&len) && SLOW_SKEW.contains(&(dst.wrapping_sub(src) % 4096))
}

/// Copies `src` into `dst`, which must be as long (see [`copy_to`]).
#[inline]
pub fn copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy: lengths differ");
    // SAFETY: `dst` is a distinct, writable slice of the same length.
    #[allow(unsafe_code)]
    unsafe {
        copy_to(dst.as_mut_ptr(), src)
    };
}

/// Appends `src` to `buf` (as `extend_from_slice`, through [`copy_to`]).
pub fn extend(buf: &mut bytes::BytesMut, src: &[u8]) {
    buf.reserve(src.len());
    let len = buf.len();
    // SAFETY: `reserve` made room for `src.len()` bytes past the length,
    // in `buf`'s own allocation, apart from `src`; all of them are written
    // before the length covers them.
    #[allow(unsafe_code)]
    unsafe {
        copy_to(buf.spare_capacity_mut().as_mut_ptr().cast::<u8>(), src);
        buf.set_len(len + src.len());
    }
}

/// A new vector holding a copy of `src` (as `to_vec`, through
/// [`copy_to`]).
pub fn to_vec(src: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(src.len());
    // SAFETY: `v` has room for `src.len()` bytes, a new allocation apart
    // from `src`; all of them are written before the length covers them.
    #[allow(unsafe_code)]
    unsafe {
        copy_to(v.as_mut_ptr(), src);
        v.set_len(src.len());
    }
    v
}

/// The block copy: 64 bytes a step through vector registers (SSE2, in
/// every x86-64), then the tail through `memcpy`.
///
/// # Safety
/// As `copy_to`'s.
#[inline(never)]
#[allow(unsafe_code)]
unsafe fn blocks(dst: *mut u8, src: &[u8]) {
    // The bytes copied in blocks (none without SSE2's registers).
    #[cfg(not(target_arch = "x86_64"))]
    let n = 0;
    #[cfg(target_arch = "x86_64")]
    let n = src.len() / 64 * 64;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};
        let (s, d) = (src.as_ptr(), dst);
        let mut i = 0;
        while i < n {
            // SAFETY: `i + 64 <= n <= len` on both sides (the caller's
            // contract for `dst`); unaligned loads and stores.
            unsafe {
                let a = _mm_loadu_si128(s.add(i).cast::<__m128i>());
                let b = _mm_loadu_si128(s.add(i + 16).cast::<__m128i>());
                let c = _mm_loadu_si128(s.add(i + 32).cast::<__m128i>());
                let e = _mm_loadu_si128(s.add(i + 48).cast::<__m128i>());
                _mm_storeu_si128(d.add(i).cast::<__m128i>(), a);
                _mm_storeu_si128(d.add(i + 16).cast::<__m128i>(), b);
                _mm_storeu_si128(d.add(i + 32).cast::<__m128i>(), c);
                _mm_storeu_si128(d.add(i + 48).cast::<__m128i>(), e);
            }
            i += 64;
        }
    }
    // SAFETY: the rest, within both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(n), dst.add(n), src.len() - n) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies at distances on both sides of the blocks' (1 to 63, for 2
    /// KiB up to 512 KiB), of lengths around the block size and both
    /// bounds, copy exactly the source and nothing past it.
    #[test]
    fn copies_are_exact_at_every_skew() {
        let src: Vec<u8> = (0..MAX_BLOCKED as u32 + 64)
            .map(|i| (i * 7 + 3) as u8)
            .collect();
        for skew in [0usize, 1, 16, 31, 63, 64, 100] {
            for len in [
                0usize,
                1,
                63,
                64,
                65,
                2047,
                2048,
                4096 + 17,
                12_345,
                MAX_BLOCKED - 1,
                MAX_BLOCKED,
            ] {
                let mut dst = vec![0xAAu8; 4096 + len + 64];
                // Where in `dst` the destination is `skew` past the
                // source modulo a page.
                let (s, d) = (src.as_ptr() as usize, dst.as_ptr() as usize);
                let at = (s + skew).wrapping_sub(d) % 4096;
                let end = at + len;
                assert_eq!((d + at).wrapping_sub(s) % 4096, skew);
                let slow = SLOW_SKEW.contains(&skew) && (MIN_BLOCKED..MAX_BLOCKED).contains(&len);
                assert_eq!(slow, blocked(d + at, s, len));
                copy(&mut dst[at..end], &src[..len]);
                assert_eq!(to_vec(&src[..len]), &src[..len]);
                assert_eq!(&dst[at..end], &src[..len], "skew {skew} len {len}");
                assert!(dst[..at].iter().all(|&b| b == 0xAA));
                assert!(dst[end..].iter().all(|&b| b == 0xAA));
            }
        }
    }

    /// `extend` appends whole, after what the buffer held, growing it as
    /// needed, at lengths below, inside and above the blocks' range.
    #[test]
    fn extend_appends_after_what_was_there() {
        let src: Vec<u8> = (0..300_000u32).map(|i| (i * 13 + 5) as u8).collect();
        let mut buf = bytes::BytesMut::new();
        let mut want = Vec::new();
        for (from, len) in [(0, 0), (3, 5), (100, 4096 + 17), (7, 2048), (11, 250_000)] {
            extend(&mut buf, &src[from..from + len]);
            want.extend_from_slice(&src[from..from + len]);
            assert_eq!(&buf[..], &want[..], "after {len} bytes from {from}");
        }
    }
}
