//! Sum-reduce of N slices, single-threaded, in blocks that stay in L1.
//!
//! Each element is `in[0] + in[1] + ...`, left to right. The inner loops are
//! plain slice zips over one block, which LLVM vectorizes.

use half::f16;

/// Elements per block: 4 KiB of f32, so the accumulator and one input block
/// stay in L1 while every input is added.
const BLOCK: usize = 1024;

/// How an element type is summed (the supertrait of the sealed `Element`).
pub trait SumElem: Copy {
    /// Sums `inputs[..][offset..offset + out.len()]` into `out`.
    fn sum_block(out: &mut [Self], inputs: &[&[Self]], offset: usize);
}

fn sum_native<T: Copy + std::ops::Add<Output = T>>(out: &mut [T], inputs: &[&[T]], offset: usize) {
    let n = out.len();
    let first = &inputs[0][offset..offset + n];
    match inputs.get(1) {
        None => out.copy_from_slice(first),
        Some(second) => {
            let second = &second[offset..offset + n];
            for ((o, a), b) in out.iter_mut().zip(first).zip(second) {
                *o = *a + *b;
            }
        }
    }
    for input in inputs.iter().skip(2) {
        for (o, x) in out.iter_mut().zip(&input[offset..offset + n]) {
            *o = *o + *x;
        }
    }
}

impl SumElem for f32 {
    fn sum_block(out: &mut [f32], inputs: &[&[f32]], offset: usize) {
        sum_native(out, inputs, offset)
    }
}

impl SumElem for f64 {
    fn sum_block(out: &mut [f64], inputs: &[&[f64]], offset: usize) {
        sum_native(out, inputs, offset)
    }
}

impl SumElem for f16 {
    fn sum_block(out: &mut [f16], inputs: &[&[f16]], offset: usize) {
        use half::slice::HalfFloatSliceExt;
        let n = out.len();
        let mut acc = [0f32; BLOCK];
        let mut tmp = [0f32; BLOCK];
        let acc = &mut acc[..n];
        let tmp = &mut tmp[..n];
        inputs[0][offset..offset + n].convert_to_f32_slice(acc);
        for input in &inputs[1..] {
            input[offset..offset + n].convert_to_f32_slice(tmp);
            for (a, t) in acc.iter_mut().zip(tmp.iter()) {
                *a += *t;
            }
        }
        out.convert_from_f32_slice(acc);
    }
}

/// `out[i] = sum of inputs[k][start + i]` for the range of `out`.
/// `inputs` non-empty, every input at least `start + out.len()` long.
pub(crate) fn sum_range<T: SumElem>(out: &mut [T], inputs: &[&[T]], start: usize) {
    for (b, block) in out.chunks_mut(BLOCK).enumerate() {
        T::sum_block(block, inputs, start + b * BLOCK);
    }
}
