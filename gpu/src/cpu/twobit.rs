//! MXNet's 2-bit compression on slices, single-threaded.
//!
//! Each word covers 16 elements. Quantize runs four SIMD lanes at a time
//! (`wide`: SSE on x86-64, NEON on aarch64, scalar elsewhere) and takes the
//! codes from the comparison masks; dequantize is branch-free integer work
//! that LLVM vectorizes. Both give MXNet's bits exactly.

use super::put;
use crate::layout::{shift_2bit, CODES_PER_WORD_2BIT as W, CODE_NEG, CODE_POS};

/// One element: returns its code, updates its residual.
///
/// Written with masks instead of `if`: on random gradients the branches of
/// `if r >= t {..} else if r <= -t {..}` mispredict half the time, and the
/// masked form vectorizes. The result is bit for bit MXNet's: the residual
/// is `v - t`, `v + t` (MXNet's `r -= -t`), or `v` itself (so `-0.0` stays
/// `-0.0`); NaN fails both tests and gives code 0.
#[inline(always)]
fn quantize_one(g: f32, r: &mut f32, t: f32) -> (u32, u32) {
    let v = *r + g;
    let pos = (v >= t) as u32;
    let neg = (v <= -t) as u32; // exclusive with pos, since t > 0
    let mpos = 0u32.wrapping_sub(pos);
    let mneg = 0u32.wrapping_sub(neg);
    let bits =
        ((v - t).to_bits() & mpos) | ((v + t).to_bits() & mneg) | (v.to_bits() & !(mpos | mneg));
    *r = f32::from_bits(bits);
    // The code's high bit (set for 11 and 10) and low bit (set for 11).
    (pos | neg, pos)
}

/// Spreads the 16 bits of `x` to the even bit positions (bit k to bit 2k).
#[inline(always)]
fn spread(x: u32) -> u32 {
    let x = (x | (x << 8)) & 0x00FF_00FF;
    let x = (x | (x << 4)) & 0x0F0F_0F0F;
    let x = (x | (x << 2)) & 0x3333_3333;
    (x | (x << 1)) & 0x5555_5555
}

/// Builds a word from the high-bit and low-bit masks of its 16 codes (bit k
/// of each mask for element k): interleave them (element k at bits 2k+1, 2k),
/// then reverse the four 2-bit groups of each byte, since MXNet puts element
/// k at `0xC0 >> 2*(k % 4)` of byte k / 4.
#[inline(always)]
fn assemble(hi: u32, lo: u32) -> u32 {
    let z = (spread(hi) << 1) | spread(lo);
    let z = ((z & 0x0F0F_0F0F) << 4) | ((z >> 4) & 0x0F0F_0F0F);
    ((z & 0x3333_3333) << 2) | ((z >> 2) & 0x3333_3333)
}

/// Elements per block: the masks of a block are collected first and turned
/// into words after, so the streaming loop carries no word-building work
/// (interleaving the two halved the bandwidth out of cache).
const BLOCK: usize = 1024;

/// One block (a multiple of 16 elements): the lane masks of the two
/// comparisons are the codes' high and low bits (`move_mask`), kept as one
/// byte per 8 elements; then each word is built from two bytes of each.
#[inline(always)]
fn quantize_block(g: &[f32], r: &mut [f32], codes: &mut [u32], t: f32) {
    let mut his = [0u8; BLOCK / 8];
    let mut los = [0u8; BLOCK / 8];
    let n8 = g.len() / 8;
    if !crate::cpu::simd::avx2_masks_2bit(g, r, &mut his[..n8], &mut los[..n8], t) {
        sse_masks(g, r, &mut his[..n8], &mut los[..n8], t);
    }
    let pair = |m: &[u8]| m[0] as u32 | (m[1] as u32) << 8;
    for ((word, hi), lo) in codes
        .iter_mut()
        .zip(his.chunks_exact(2))
        .zip(los.chunks_exact(2))
    {
        *word = assemble(pair(hi), pair(lo));
    }
}

/// The masks of `quantize_block`, four lanes at a time (`wide`: SSE on
/// x86-64, NEON on aarch64, scalar elsewhere).
#[inline(always)]
fn sse_masks(g: &[f32], r: &mut [f32], his: &mut [u8], los: &mut [u8], t: f32) {
    use wide::{f32x4, CmpGe, CmpLe};
    let tv = f32x4::splat(t);
    let ntv = f32x4::splat(-t);
    let eights = g.chunks_exact(8).zip(r.chunks_exact_mut(8));
    for (((g8, r8), hi), lo) in eights.zip(his.iter_mut()).zip(los.iter_mut()) {
        let (mut h, mut l) = (0u8, 0u8);
        for (j, (g4, r4)) in g8.chunks_exact(4).zip(r8.chunks_exact_mut(4)).enumerate() {
            let g4: [f32; 4] = g4.try_into().expect("chunks of 4");
            let v = f32x4::new(r4.as_ref().try_into().expect("chunks of 4")) + f32x4::new(g4);
            let pos = v.cmp_ge(tv);
            let neg = v.cmp_le(ntv);
            // Lane by lane: v - t, v + t, or v itself (bit-exact selects).
            let next = pos.blend(v - tv, neg.blend(v + tv, v));
            r4.copy_from_slice(&next.to_array());
            h |= ((pos | neg).move_mask() as u8) << (4 * j);
            l |= (pos.move_mask() as u8) << (4 * j);
        }
        *hi = h;
        *lo = l;
    }
}

/// Quantizes `grad` (any length) into `codes` (`words_2bit(grad.len())`).
pub(crate) fn quantize(grad: &[f32], residual: &mut [f32], codes: &mut [u32], t: f32) {
    let full = grad.len() / W;
    let (g_full, g_tail) = grad.split_at(full * W);
    let (r_full, r_tail) = residual.split_at_mut(full * W);
    let blocks = g_full.chunks(BLOCK).zip(r_full.chunks_mut(BLOCK));
    for ((g, r), w) in blocks.zip(codes.chunks_mut(BLOCK / W)) {
        quantize_block(g, r, w, t);
    }
    if !g_tail.is_empty() {
        let (mut hi, mut lo) = (0u32, 0u32);
        for (k, (g, r)) in g_tail.iter().zip(r_tail.iter_mut()).enumerate() {
            let (h, l) = quantize_one(*g, r, t);
            hi |= h << k;
            lo |= l << k;
        }
        codes[full] = assemble(hi, lo);
    }
}

/// One code: `11` gives `t`, `10` gives `-t`, `00` and `01` give `+0.0`.
/// Branch-free: the high bit selects `|t|`, a clear low bit sets the sign.
#[inline(always)]
fn dequantize_one(code: u32, t: f32) -> f32 {
    const { assert!(CODE_POS == 0b11 && CODE_NEG == 0b10) };
    let hi = code >> 1;
    let lo = code & 1;
    f32::from_bits((t.to_bits() | ((lo ^ 1) << 31)) & 0u32.wrapping_sub(hi))
}

/// Below this many elements the byte table costs more than it saves.
const TABLE_MIN: usize = 4096;

/// Dequantizes `codes` into `out`, or with `ADD` adds them to it (any
/// length; `codes` has `words_2bit(out.len())`). A byte holds four codes,
/// the first in its top bits: a table of the four values of each byte
/// turns the decode into one load per four elements.
pub(crate) fn dequantize<const ADD: bool>(codes: &[u32], out: &mut [f32], t: f32) {
    let full = out.len() / W;
    let (o_full, o_tail) = out.split_at_mut(full * W);
    if o_full.len() >= TABLE_MIN {
        let mut table = [[0.0f32; 4]; 256];
        for (b, e) in table.iter_mut().enumerate() {
            for (k, v) in e.iter_mut().enumerate() {
                *v = dequantize_one(((b as u32) >> (6 - 2 * k)) & 3, t);
            }
        }
        for (word, o) in codes.iter().zip(o_full.chunks_exact_mut(W)) {
            for (byte, q) in word.to_le_bytes().into_iter().zip(o.chunks_exact_mut(4)) {
                let v = &table[byte as usize];
                for (o, &v) in q.iter_mut().zip(v) {
                    *o = put::<ADD>(*o, v);
                }
            }
        }
    } else {
        for (word, o) in codes.iter().zip(o_full.chunks_exact_mut(W)) {
            for (k, o) in o.iter_mut().enumerate() {
                *o = put::<ADD>(*o, dequantize_one((word >> shift_2bit(k)) & 3, t));
            }
        }
    }
    if !o_tail.is_empty() {
        let word = codes[full];
        for (k, o) in o_tail.iter_mut().enumerate() {
            *o = put::<ADD>(*o, dequantize_one((word >> shift_2bit(k)) & 3, t));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn assemble_places_codes_like_shift_2bit() {
        for k in 0..16 {
            for (hi, lo, code) in [(1, 1, 3u32), (1, 0, 2), (0, 1, 1)] {
                assert_eq!(
                    super::assemble(hi << k, lo << k),
                    code << super::shift_2bit(k),
                    "k={k}"
                );
            }
        }
    }
}
