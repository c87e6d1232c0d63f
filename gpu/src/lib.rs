//! pskv-gpu: the kernels under the kvstore — sum-reduce of N buffers, and
//! MXNet's 2-bit and 1-bit gradient compression with error feedback — on the
//! CPU, and on CUDA GPUs (feature `cuda`) through kernels compiled at run time
//! by NVRTC.
//!
//! Both back ends implement one interface, [`Kernels`], over their own buffer
//! type (host slices for [`cpu::CpuKernels`], device buffers for
//! `cuda::CudaKernels`), and agree bit for bit.
//!
//! [`device`] is device memory and device work behind one interface
//! ([`device::Device`]): a CUDA GPU (feature `cuda`), or a device emulated
//! in host memory where there is none, picked at run time (`PSKV_GPU`).
//!
//! ```
//! use pskv_gpu::{cpu::CpuKernels, layout, Kernels};
//!
//! let k = CpuKernels::single_threaded();
//! let grad = [0.75f32, -0.25, -1.0, 0.125];
//! let mut residual = [0.0f32; 4];
//! let mut codes = vec![0u32; layout::words_2bit(grad.len())];
//! k.quantize_2bit(&grad, &mut residual, &mut codes, 0.5)?;
//! let mut out = [0.0f32; 4];
//! k.dequantize_2bit(&codes, &mut out, 0.5)?;
//! assert_eq!(out, [0.5, 0.0, -0.5, 0.0]);
//! assert_eq!(residual, [0.25, -0.25, -0.5, 0.125]);
//! # Ok::<(), pskv_gpu::KernelError>(())
//! ```
//!
//! # The compressed layouts (MXNet's, byte for byte)
//!
//! **2-bit** (`src/kvstore/gradient_compression-inl.h` in MXNet): 16 codes per
//! 32-bit word, 4 per byte, element `i` in byte `i / 4` of the message, in the
//! two bits `0xC0 >> 2*(i % 4)`: `11` means `+threshold`, `10` means
//! `-threshold`, anything else 0. Quantize: `r += g`; `r >= t` gives `11` and
//! `r -= t`; else `r <= -t` gives `10` and `r += t`; else `00`.
//!
//! **1-bit** (MXNet 2.0): 32 codes per word, 8 per byte, element `i` in byte
//! `i / 8`, bit `0x80 >> (i % 8)`: set means `+1`, clear means `-1`.
//! Quantize: `r += g`; `r > t` sets the bit and `r -= 1`; else `r += 1`.
//!
//! Words are stored as `u32` in little-endian byte order (the order of the
//! message bytes on every machine pskv runs on); bits of a trailing word past
//! the last element are zero.

#![warn(missing_docs)]

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
mod error;
pub mod layout;

use error::check_len;
pub use error::KernelError;

mod sealed {
    /// Seals [`crate::Element`], and carries each type's CPU sum.
    pub trait Sealed: crate::cpu::SumElem {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::f16 {}
}

/// A value a kernel buffer holds: the element types, and `u32` for
/// compressed words.
#[cfg(not(feature = "cuda"))]
pub trait Scalar: Copy + Default + Send + Sync + 'static {}

/// A value a kernel buffer holds: the element types, and `u32` for
/// compressed words.
#[cfg(feature = "cuda")]
pub trait Scalar:
    Copy
    + Default
    + Send
    + Sync
    + 'static
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
{
}

impl Scalar for f32 {}
impl Scalar for f64 {}
impl Scalar for half::f16 {}
impl Scalar for u32 {}

/// The element types the reduce kernels take: `f32`, `f64` and `half::f16`
/// (summed in `f32` and rounded once, to nearest even).
pub trait Element: sealed::Sealed + Scalar {
    /// Its name, for messages.
    const NAME: &'static str;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
}
impl Element for f64 {
    const NAME: &'static str = "f64";
}
impl Element for half::f16 {
    const NAME: &'static str = "f16";
}

/// The kernels, over a back end's buffer type `Buf<T>`.
///
/// Every method checks lengths (`layout` gives the compressed sizes) and
/// returns an error rather than panicking.
pub trait Kernels {
    /// The buffer a kernel reads and writes: `[T]` on the CPU, a device
    /// buffer on CUDA.
    type Buf<T: Scalar>: ?Sized;

    /// `out[i] = inputs[0][i] + inputs[1][i] + ...`, added left to right (a
    /// fixed order, so results are reproducible). f16 is summed in f32.
    fn sum<T: Element>(
        &self,
        out: &mut Self::Buf<T>,
        inputs: &[&Self::Buf<T>],
    ) -> Result<(), KernelError>;

    /// 2-bit quantize of `grad` with error feedback into `residual`; writes
    /// `layout::words_2bit(n)` words to `codes`. `threshold > 0`.
    fn quantize_2bit(
        &self,
        grad: &Self::Buf<f32>,
        residual: &mut Self::Buf<f32>,
        codes: &mut Self::Buf<u32>,
        threshold: f32,
    ) -> Result<(), KernelError>;

    /// 2-bit dequantize of `codes` into `out` (`+threshold`, `-threshold` or 0).
    fn dequantize_2bit(
        &self,
        codes: &Self::Buf<u32>,
        out: &mut Self::Buf<f32>,
        threshold: f32,
    ) -> Result<(), KernelError>;

    /// `out[i] += ` the 2-bit dequantize of `codes`, in one pass: the same
    /// additions, bit for bit, as dequantizing into a buffer and adding it
    /// (a server summing compressed pushes), without the buffer.
    fn add_dequantized_2bit(
        &self,
        codes: &Self::Buf<u32>,
        out: &mut Self::Buf<f32>,
        threshold: f32,
    ) -> Result<(), KernelError>;

    /// 1-bit quantize of `grad` with error feedback into `residual`; writes
    /// `layout::words_1bit(n)` words to `codes`. Any finite threshold.
    fn quantize_1bit(
        &self,
        grad: &Self::Buf<f32>,
        residual: &mut Self::Buf<f32>,
        codes: &mut Self::Buf<u32>,
        threshold: f32,
    ) -> Result<(), KernelError>;

    /// 1-bit dequantize of `codes` into `out` (+1 or -1).
    fn dequantize_1bit(
        &self,
        codes: &Self::Buf<u32>,
        out: &mut Self::Buf<f32>,
    ) -> Result<(), KernelError>;

    /// `out[i] += ` the 1-bit dequantize of `codes`, in one pass (as
    /// [`Kernels::add_dequantized_2bit`]).
    fn add_dequantized_1bit(
        &self,
        codes: &Self::Buf<u32>,
        out: &mut Self::Buf<f32>,
    ) -> Result<(), KernelError>;
}

/// The two gradient compressions: what a device's `quantize` and
/// `dequantize` ([`device::Device`]) do, and what both back ends check
/// alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bits {
    /// MXNet's 2-bit codes, 16 per word.
    Two,
    /// The 1-bit codes, 32 per word.
    One,
}

impl Bits {
    /// The quantize kernel's name, for messages.
    pub(crate) fn quantize_name(self) -> &'static str {
        match self {
            Bits::Two => "quantize_2bit",
            Bits::One => "quantize_1bit",
        }
    }

    /// The dequantize kernel's name, for messages.
    pub(crate) fn dequantize_name(self) -> &'static str {
        match self {
            Bits::Two => "dequantize_2bit",
            Bits::One => "dequantize_1bit",
        }
    }

    /// Codes per word.
    pub(crate) fn per_word(self) -> usize {
        match self {
            Bits::Two => layout::CODES_PER_WORD_2BIT,
            Bits::One => layout::CODES_PER_WORD_1BIT,
        }
    }

    /// Words of codes for `n` elements.
    pub(crate) fn words(self, n: usize) -> usize {
        match self {
            Bits::Two => layout::words_2bit(n),
            Bits::One => layout::words_1bit(n),
        }
    }

    /// 2-bit needs a finite threshold above 0, 1-bit any finite one.
    pub(crate) fn check_threshold(self, kernel: &'static str, t: f32) -> Result<(), KernelError> {
        let (ok, reason) = match self {
            Bits::Two => (
                t > 0.0 && t.is_finite(),
                "2-bit compression needs a finite threshold above 0",
            ),
            Bits::One => (t.is_finite(), "1-bit compression needs a finite threshold"),
        };
        if ok {
            Ok(())
        } else {
            Err(KernelError::Threshold {
                kernel,
                threshold: t,
                reason,
            })
        }
    }

    /// A quantize's checks: the threshold, a residual as long as the
    /// gradient (`n`), and the codes' words.
    pub(crate) fn check_quantize(
        self,
        kernel: &'static str,
        n: usize,
        (residual, codes): (usize, usize),
        t: f32,
    ) -> Result<(), KernelError> {
        self.check_threshold(kernel, t)?;
        check_len(kernel, "the residual", n, residual)?;
        check_len(kernel, "the codes", self.words(n), codes)
    }

    /// A dequantize's checks, for `n` elements out of `codes` words (the
    /// threshold matters to 2-bit only).
    pub(crate) fn check_dequantize(
        self,
        kernel: &'static str,
        n: usize,
        codes: usize,
        t: f32,
    ) -> Result<(), KernelError> {
        if self == Bits::Two {
            self.check_threshold(kernel, t)?;
        }
        check_len(kernel, "the codes", self.words(n), codes)
    }
}
