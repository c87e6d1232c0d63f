//! The float types the optimizer kernels are written over, and MXNet's
//! `clip`.

use std::ops::{Add, Div, Mul, Neg, Sub};

/// `f32` or `f64`: kernels are generic so one text serves both, and
/// evaluate exactly the operations, in exactly the order, of MXNet's.
pub(crate) trait Real:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + Send
    + Sync
    + Default
    + 'static
{
    const ONE: Self;
    /// A `float` parameter cast to the element type (`static_cast<DType>`).
    fn of_f32(x: f32) -> Self;
    /// A `double` scalar cast to the element type.
    fn of_f64(x: f64) -> Self;
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    const ONE: f32 = 1.0;
    fn of_f32(x: f32) -> f32 {
        x
    }
    fn of_f64(x: f64) -> f32 {
        x as f32
    }
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    const ONE: f64 = 1.0;
    fn of_f32(x: f32) -> f64 {
        x as f64
    }
    fn of_f64(x: f64) -> f64 {
        x
    }
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
}

/// mshadow's `clip::Map(x, b)`: `b` above, `-b` below, NaN passes through.
#[inline(always)]
pub(crate) fn clip<T: Real>(x: T, b: T) -> T {
    if x > b {
        b
    } else if x < -b {
        -b
    } else {
        x
    }
}
