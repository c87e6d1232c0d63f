//! AVX2 paths of the quantize kernels, chosen at run time when the CPU has
//! AVX2 (eight lanes instead of four: +35% out of cache on the 2-bit
//! quantize). Each returns false where it does not apply, and the caller
//! runs the portable path; both give the same bits.
//!
//! The unsafe code here: unaligned vector loads and stores
//! within bounds checked on entry, in functions compiled for AVX2 and called
//! only after `is_x86_feature_detected!("avx2")`.

use std::sync::atomic::{AtomicBool, Ordering};

static AVX2_ALLOWED: AtomicBool = AtomicBool::new(true);

/// Allows or forbids the AVX2 paths (process-wide; allowed by default). For
/// tests and comparisons: both paths give the same bits.
pub fn allow_avx2(on: bool) {
    AVX2_ALLOWED.store(on, Ordering::Relaxed);
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn avx2() -> bool {
    AVX2_ALLOWED.load(Ordering::Relaxed) && std::arch::is_x86_feature_detected!("avx2")
}

/// 2-bit masks for `g.len()` elements (a multiple of 8): for each 8, the
/// "nonzero code" mask into `his` and the "+threshold" mask into `los`,
/// updating `r`. False if AVX2 is not available.
#[inline]
pub(crate) fn avx2_masks_2bit(
    g: &[f32],
    r: &mut [f32],
    his: &mut [u8],
    los: &mut [u8],
    t: f32,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let n8 = g.len() / 8;
        if avx2() && g.len() % 8 == 0 && r.len() == g.len() && his.len() >= n8 && los.len() >= n8 {
            // SAFETY: AVX2 is present; lengths were checked above.
            unsafe { x86::masks_2bit(g, r, his, los, t) };
            return true;
        }
    }
    let _ = (g, r, his, los, t);
    false
}

/// 1-bit masks for 32 elements: bit k of `m` (little-endian) set when
/// element k's updated residual is above `t`. False if AVX2 is not available.
#[inline]
pub(crate) fn avx2_masks_1bit(g: &[f32], r: &mut [f32], m: &mut [u8; 4], t: f32) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2() && g.len() == 32 && r.len() == 32 {
            // SAFETY: AVX2 is present; lengths were checked above.
            unsafe { x86::masks_1bit(g, r, m, t) };
            return true;
        }
    }
    let _ = (g, r, m, t);
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Elements ahead of the loads that the prefetches reach (1 KiB per
    /// stream): +35% out of cache on this machine's 2-bit quantize. The
    /// hardware prefetcher alone keeps too few lines in flight for two read
    /// streams and a write stream.
    const PREFETCH_AHEAD: usize = 256;

    /// Prefetches the cache lines `PREFETCH_AHEAD` elements past `at` in `g`
    /// and `r`. Prefetches never fault, so the addresses may pass the end.
    #[inline(always)]
    fn prefetch(g: &[f32], r: &[f32], at: usize) {
        let ahead = at + PREFETCH_AHEAD;
        // SAFETY: a prefetch is a hint; it reads nothing the program sees and
        // cannot fault on any address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(g.as_ptr().wrapping_add(ahead) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(r.as_ptr().wrapping_add(ahead) as *const i8);
        }
    }

    /// # Safety
    /// AVX2 must be available; `g.len() == r.len()`, a multiple of 8, and
    /// `his`, `los` hold at least `g.len() / 8` bytes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn masks_2bit(
        g: &[f32],
        r: &mut [f32],
        his: &mut [u8],
        los: &mut [u8],
        t: f32,
    ) {
        let tv = _mm256_set1_ps(t);
        let ntv = _mm256_set1_ps(-t);
        for i in 0..g.len() / 8 {
            if i % 2 == 0 {
                prefetch(g, r, 8 * i);
            }
            // SAFETY: 8 * i + 8 <= g.len() == r.len().
            let (gv, rv) = unsafe {
                (
                    _mm256_loadu_ps(g.as_ptr().add(8 * i)),
                    _mm256_loadu_ps(r.as_ptr().add(8 * i)),
                )
            };
            let v = _mm256_add_ps(rv, gv);
            let pos = _mm256_cmp_ps::<_CMP_GE_OQ>(v, tv);
            let neg = _mm256_cmp_ps::<_CMP_LE_OQ>(v, ntv);
            // v + t where neg, then v - t where pos (exclusive masks).
            let next = _mm256_blendv_ps(
                _mm256_blendv_ps(v, _mm256_add_ps(v, tv), neg),
                _mm256_sub_ps(v, tv),
                pos,
            );
            // SAFETY: as for the loads.
            unsafe { _mm256_storeu_ps(r.as_mut_ptr().add(8 * i), next) };
            his[i] = _mm256_movemask_ps(_mm256_or_ps(pos, neg)) as u8;
            los[i] = _mm256_movemask_ps(pos) as u8;
        }
    }

    /// # Safety
    /// AVX2 must be available; `g` and `r` hold 32 elements.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn masks_1bit(g: &[f32], r: &mut [f32], m: &mut [u8; 4], t: f32) {
        let tv = _mm256_set1_ps(t);
        let one = _mm256_set1_ps(1.0);
        prefetch(g, r, 0);
        prefetch(g, r, 16);
        for (i, byte) in m.iter_mut().enumerate() {
            // SAFETY: 8 * i + 8 <= 32 == g.len() == r.len().
            let (gv, rv) = unsafe {
                (
                    _mm256_loadu_ps(g.as_ptr().add(8 * i)),
                    _mm256_loadu_ps(r.as_ptr().add(8 * i)),
                )
            };
            let v = _mm256_add_ps(rv, gv);
            let set = _mm256_cmp_ps::<_CMP_GT_OQ>(v, tv);
            let next = _mm256_blendv_ps(_mm256_add_ps(v, one), _mm256_sub_ps(v, one), set);
            // SAFETY: as for the loads.
            unsafe { _mm256_storeu_ps(r.as_mut_ptr().add(8 * i), next) };
            *byte = _mm256_movemask_ps(set) as u8;
        }
    }
}
