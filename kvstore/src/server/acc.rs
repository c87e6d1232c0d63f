//! A round's accumulators: the running sum of a key's pushes, in the
//! key's type (f16 summed in f32 and rounded once), the fold of one push
//! into it, and the sum written into the stored value.

use half::f16;
use pskv_transport::copy::copy;

use crate::comm::elems;
use crate::dtype::DType;

/// The running sum of a round: f32 for f32 and f16 keys (f16 is summed in
/// f32 and rounded once), f64, i32, i64.
pub(super) enum Acc {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

impl Acc {
    pub(super) fn fits(&self, dtype: DType, n: usize) -> bool {
        match self {
            Acc::F32(v) => matches!(dtype, DType::F32 | DType::F16) && v.len() == n,
            Acc::F64(v) => dtype == DType::F64 && v.len() == n,
            Acc::I32(v) => dtype == DType::I32 && v.len() == n,
            Acc::I64(v) => dtype == DType::I64 && v.len() == n,
        }
    }

    pub(super) fn zero(&mut self) {
        match self {
            Acc::F32(v) => v.fill(0.0),
            Acc::F64(v) => v.fill(0.0),
            Acc::I32(v) => v.fill(0),
            Acc::I64(v) => v.fill(0),
        }
    }

    pub(super) fn zeros(dtype: DType, n: usize) -> Acc {
        match dtype {
            DType::F32 | DType::F16 => Acc::F32(vec![0.0; n]),
            DType::F64 => Acc::F64(vec![0.0; n]),
            DType::I32 => Acc::I32(vec![0; n]),
            DType::I64 => Acc::I64(vec![0; n]),
        }
    }
}

/// `acc[range] = v` (first) or `acc[range] += v`, for `v` of `dtype`.
pub(super) fn fold_into(acc: &mut Acc, at: usize, dtype: DType, v: &[u8], first: bool) {
    macro_rules! fold {
        ($a:expr, $src:expr, $add:expr) => {{
            let a = &mut $a[at..at + $src.len()];
            if first {
                // The source may be a page-aligned slot (`copy`'s doc).
                copy(bytemuck::cast_slice_mut(a), bytemuck::cast_slice(&$src));
            } else {
                for (x, y) in a.iter_mut().zip($src.iter()) {
                    $add(x, *y);
                }
            }
        }};
    }
    match (acc, dtype) {
        (Acc::F32(a), DType::F32) => fold!(a, elems::<f32>(v), |x: &mut f32, y| *x += y),
        (Acc::F32(a), DType::F16) => {
            let src: Vec<f32> = elems::<f16>(v).iter().map(|h| h.to_f32()).collect();
            fold!(a, src, |x: &mut f32, y| *x += y)
        }
        (Acc::F64(a), _) => fold!(a, elems::<f64>(v), |x: &mut f64, y| *x += y),
        (Acc::I32(a), _) => fold!(a, elems::<i32>(v), |x: &mut i32, y: i32| *x =
            x.wrapping_add(y)),
        (Acc::I64(a), _) => fold!(a, elems::<i64>(v), |x: &mut i64, y: i64| *x =
            x.wrapping_add(y)),
        (Acc::F32(_), _) => unreachable!("an f32 sum holds f32 and f16 keys only"),
    }
}

/// Writes (or adds, for async summation) a sum into value bytes of `dtype`.
pub(super) fn write_sum(out: &mut [u8], dtype: DType, acc: &Acc, add: bool) {
    /// `out = a`, or with `add` `out = plus(out, a)`, element by element.
    fn put<T: bytemuck::Pod>(out: &mut [u8], a: &[T], add: bool, plus: impl Fn(T, T) -> T) {
        let o: &mut [T] = bytemuck::cast_slice_mut(out);
        if add {
            o.iter_mut().zip(a).for_each(|(x, y)| *x = plus(*x, *y));
        } else {
            o.copy_from_slice(a);
        }
    }
    match (acc, dtype) {
        (Acc::F32(a), DType::F32) => put(out, a, add, |x, y| x + y),
        (Acc::F32(a), DType::F16) => {
            let o: &mut [f16] = bytemuck::cast_slice_mut(out);
            for (x, y) in o.iter_mut().zip(a) {
                *x = if add {
                    f16::from_f32(x.to_f32() + *y)
                } else {
                    f16::from_f32(*y)
                };
            }
        }
        (Acc::F64(a), _) => put(out, a, add, |x, y| x + y),
        (Acc::I32(a), _) => put(out, a, add, i32::wrapping_add),
        (Acc::I64(a), _) => put(out, a, add, i64::wrapping_add),
        (Acc::F32(_), _) => unreachable!("an f32 sum holds f32 and f16 keys only"),
    }
}
