//! Element types: [`DType`], the runtime tag, and [`Elem`], the Rust types
//! behind it.

use std::fmt;

use half::f16;

/// The element type of a tensor.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// IEEE half precision.
    F16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::F16 => 2,
        }
    }

    /// Its name: `f32`, `f64`, `f16`, `i32`, `i64`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }

    /// Whether it is a floating-point type (optimizers update those only).
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16)
    }

    /// MXNet's (mshadow's) type code, used on the wire.
    pub const fn code(self) -> u8 {
        match self {
            DType::F32 => 0,
            DType::F64 => 1,
            DType::F16 => 2,
            DType::I32 => 4,
            DType::I64 => 6,
        }
    }

    /// The type of an mshadow type code.
    pub const fn from_code(code: u8) -> Option<DType> {
        Some(match code {
            0 => DType::F32,
            1 => DType::F64,
            2 => DType::F16,
            4 => DType::I32,
            6 => DType::I64,
            _ => return None,
        })
    }

    /// Parses a name (`f32`, `float32`, ...).
    pub fn parse(name: &str) -> Option<DType> {
        Some(match name {
            "f32" | "float32" => DType::F32,
            "f64" | "float64" => DType::F64,
            "f16" | "float16" => DType::F16,
            "i32" | "int32" => DType::I32,
            "i64" | "int64" => DType::I64,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust element type of a tensor: `f32`, `f64`, `half::f16`, `i32`, `i64`.
pub trait Elem: bytemuck::Pod + Default + Send + Sync + PartialEq + fmt::Debug + 'static {
    /// Its runtime tag.
    const DTYPE: DType;
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
}
impl Elem for f64 {
    const DTYPE: DType = DType::F64;
}
impl Elem for f16 {
    const DTYPE: DType = DType::F16;
}
impl Elem for i32 {
    const DTYPE: DType = DType::I32;
}
impl Elem for i64 {
    const DTYPE: DType = DType::I64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for d in [DType::F32, DType::F64, DType::F16, DType::I32, DType::I64] {
            assert_eq!(DType::from_code(d.code()), Some(d));
            assert_eq!(DType::parse(d.name()), Some(d));
        }
        assert_eq!(DType::from_code(3), None);
        assert_eq!(f16::DTYPE.size(), 2);
    }
}
