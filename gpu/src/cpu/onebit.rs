//! MXNet 2.0's 1-bit compression on slices, single-threaded.

use super::put;
use crate::layout::{shift_1bit, CODES_PER_WORD_1BIT as W};

#[inline(always)]
fn quantize_one(g: f32, r: &mut f32, t: f32) -> u32 {
    let v = *r + g;
    let set = v > t;
    // MXNet: a set bit means +1, so r -= 1; a clear bit means -1, so r += 1.
    *r = if set { v - 1.0 } else { v + 1.0 };
    set as u32
}

/// Thirty-two elements. The comparison masks put element k at bit k; MXNet
/// puts it at bit `0x80 >> (k % 8)` of byte `k / 8`, which is bit k reversed
/// within its byte: reverse all 32 bits, then the bytes.
#[inline(always)]
fn quantize_word(g: &[f32], r: &mut [f32], t: f32) -> u32 {
    let mut m = [0u8; 4];
    if !crate::cpu::simd::avx2_masks_1bit(g, r, &mut m, t) {
        sse_masks(g, r, &mut m, t);
    }
    u32::from_le_bytes(m).reverse_bits().swap_bytes()
}

/// The masks of `quantize_word`, four lanes at a time (`wide`).
#[inline(always)]
fn sse_masks(g: &[f32], r: &mut [f32], m: &mut [u8; 4], t: f32) {
    use wide::{f32x4, CmpGt};
    let tv = f32x4::splat(t);
    let one = f32x4::splat(1.0);
    let mut bits = 0u32;
    for (j, (g4, r4)) in g.chunks_exact(4).zip(r.chunks_exact_mut(4)).enumerate() {
        let g4: [f32; 4] = g4.try_into().expect("chunks of 4");
        let v = f32x4::new(r4.as_ref().try_into().expect("chunks of 4")) + f32x4::new(g4);
        let set = v.cmp_gt(tv);
        let next = set.blend(v - one, v + one);
        r4.copy_from_slice(&next.to_array());
        bits |= (set.move_mask() as u32) << (4 * j);
    }
    *m = bits.to_le_bytes();
}

/// Quantizes `grad` into `codes` (`words_1bit(grad.len())`).
pub(crate) fn quantize(grad: &[f32], residual: &mut [f32], codes: &mut [u32], t: f32) {
    let full = grad.len() / W;
    let (g_full, g_tail) = grad.split_at(full * W);
    let (r_full, r_tail) = residual.split_at_mut(full * W);
    for ((word, g), r) in codes
        .iter_mut()
        .zip(g_full.chunks_exact(W))
        .zip(r_full.chunks_exact_mut(W))
    {
        *word = quantize_word(g, r, t);
    }
    if !g_tail.is_empty() {
        let mut w = 0u32;
        for (k, (g, r)) in g_tail.iter().zip(r_tail.iter_mut()).enumerate() {
            w |= quantize_one(*g, r, t) << shift_1bit(k);
        }
        codes[full] = w;
    }
}

/// Dequantizes `codes` into `out` (+1 for a set bit, -1 for a clear one),
/// or with `ADD` adds them to it.
pub(crate) fn dequantize<const ADD: bool>(codes: &[u32], out: &mut [f32]) {
    let one = |word: u32, k: usize| {
        if (word >> shift_1bit(k)) & 1 == 1 {
            1.0
        } else {
            -1.0
        }
    };
    let full = out.len() / W;
    let (o_full, o_tail) = out.split_at_mut(full * W);
    for (&word, o) in codes.iter().zip(o_full.chunks_exact_mut(W)) {
        for (k, o) in o.iter_mut().enumerate() {
            *o = put::<ADD>(*o, one(word, k));
        }
    }
    if !o_tail.is_empty() {
        let word = codes[full];
        for (k, o) in o_tail.iter_mut().enumerate() {
            *o = put::<ADD>(*o, one(word, k));
        }
    }
}
