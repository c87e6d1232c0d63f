//! The CPU kernels: vectorizable single-thread loops, split for large
//! buffers between the calling thread and helper threads (`split.rs`).
//!
//! Splitting never changes a result: chunks are cut at multiples of 32
//! elements (whole compressed words for both formats), and every element is
//! computed by the same code whatever chunk it falls in.

mod onebit;
mod simd;
pub use simd::allow_avx2;
mod reduce;
pub(crate) use reduce::SumElem;
mod split;
mod twobit;

use std::sync::Arc;

use split::Helpers;

use crate::error::check_len;
use crate::{Bits, Element, KernelError, Kernels, Scalar};

/// What a kernel call returns.
type Res = Result<(), KernelError>;

/// Buffers below this many elements are processed on the calling thread:
/// splitting costs more than it saves.
pub const MIN_PARALLEL_ELEMS: usize = 1 << 17;

/// CPU kernels: single-threaded, or split between the calling thread and
/// owned helper threads.
///
/// ```
/// use pskv_gpu::{cpu::CpuKernels, Kernels};
/// let k = CpuKernels::with_threads(2)?;
/// let (a, b) = (vec![1.0f32; 1000], vec![2.0f32; 1000]);
/// let mut out = vec![0.0f32; 1000];
/// k.sum(&mut out[..], &[&a[..], &b[..]])?;
/// assert!(out.iter().all(|&x| x == 3.0));
/// # Ok::<(), pskv_gpu::KernelError>(())
/// ```
#[derive(Clone)]
pub struct CpuKernels {
    helpers: Option<Arc<Helpers>>,
    threads: usize,
}

impl std::fmt::Debug for CpuKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuKernels")
            .field("threads", &self.threads)
            .finish()
    }
}

impl CpuKernels {
    /// Every kernel runs on the calling thread.
    pub fn single_threaded() -> CpuKernels {
        CpuKernels {
            helpers: None,
            threads: 1,
        }
    }

    /// Large buffers are split across `threads` threads: the calling one and
    /// `threads - 1` helpers owned by this value (1: single-threaded).
    pub fn with_threads(threads: usize) -> Result<CpuKernels, KernelError> {
        if threads <= 1 {
            return Ok(CpuKernels::single_threaded());
        }
        let helpers = Helpers::start(threads - 1).map_err(|e| KernelError::Threads {
            threads,
            message: e.to_string(),
        })?;
        Ok(CpuKernels {
            helpers: Some(Arc::new(helpers)),
            threads,
        })
    }

    /// The number of threads large buffers are split across.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The chunk length for `n` elements, or None to run on this thread.
    fn chunk(&self, n: usize) -> Option<(&Helpers, usize)> {
        let helpers = self.helpers.as_deref()?;
        if n < MIN_PARALLEL_ELEMS {
            return None;
        }
        // Small chunks, so that the caller takes what a busy helper does not
        // start: eight per thread, at least MIN/4, a multiple of 32.
        let per = n.div_ceil(self.threads * 8).max(MIN_PARALLEL_ELEMS / 4);
        Some((helpers, per.next_multiple_of(32)))
    }
}

impl Default for CpuKernels {
    /// As many threads as cores (single-threaded if the pool cannot start).
    fn default() -> Self {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        CpuKernels::with_threads(n).unwrap_or_else(|_| CpuKernels::single_threaded())
    }
}

impl CpuKernels {
    /// Quantizes `grad` with `residual` into `codes`, in parallel blocks
    /// when large.
    fn encode(
        &self,
        bits: Bits,
        kernel: &'static str,
        (grad, residual, codes): (&[f32], &mut [f32], &mut [u32]),
        t: f32,
    ) -> Result<(), KernelError> {
        bits.check_quantize(kernel, grad.len(), (residual.len(), codes.len()), t)?;
        let one = match bits {
            Bits::Two => twobit::quantize,
            Bits::One => onebit::quantize,
        };
        match self.chunk(grad.len()) {
            None => one(grad, residual, codes, t),
            Some((helpers, c)) => {
                let parts = grad
                    .chunks(c)
                    .zip(residual.chunks_mut(c))
                    .zip(codes.chunks_mut(c / bits.per_word()))
                    .collect();
                helpers.for_each(parts, |((g, r), w)| one(g, r, w, t));
            }
        }
        Ok(())
    }

    /// Dequantizes `codes` into `out`, or with `ADD` onto it.
    fn decode<const ADD: bool>(
        &self,
        bits: Bits,
        kernel: &'static str,
        codes: &[u32],
        out: &mut [f32],
        t: f32,
    ) -> Result<(), KernelError> {
        bits.check_dequantize(kernel, out.len(), codes.len(), t)?;
        let one = |w: &[u32], o: &mut [f32]| match bits {
            Bits::Two => twobit::dequantize::<ADD>(w, o, t),
            Bits::One => onebit::dequantize::<ADD>(w, o),
        };
        match self.chunk(out.len()) {
            None => one(codes, out),
            Some((helpers, c)) => {
                let parts = codes
                    .chunks(c / bits.per_word())
                    .zip(out.chunks_mut(c))
                    .collect();
                helpers.for_each(parts, |(w, o)| one(w, o));
            }
        }
        Ok(())
    }
}

/// A decoded value stored, or with `ADD` added to what is there.
#[inline(always)]
pub(crate) fn put<const ADD: bool>(old: f32, v: f32) -> f32 {
    if ADD {
        old + v
    } else {
        v
    }
}

impl Kernels for CpuKernels {
    type Buf<T: Scalar> = [T];

    fn sum<T: Element>(&self, out: &mut [T], inputs: &[&[T]]) -> Result<(), KernelError> {
        const K: &str = "sum";
        if inputs.is_empty() {
            return Err(KernelError::NoInputs { kernel: K });
        }
        for input in inputs {
            check_len(K, "an input", out.len(), input.len())?;
        }
        sum_dispatch(self, out, inputs);
        Ok(())
    }

    fn quantize_2bit(&self, g: &[f32], r: &mut [f32], c: &mut [u32], t: f32) -> Res {
        self.encode(Bits::Two, "quantize_2bit", (g, r, c), t)
    }

    fn dequantize_2bit(&self, codes: &[u32], out: &mut [f32], t: f32) -> Result<(), KernelError> {
        self.decode::<false>(Bits::Two, "dequantize_2bit", codes, out, t)
    }

    fn add_dequantized_2bit(
        &self,
        codes: &[u32],
        out: &mut [f32],
        t: f32,
    ) -> Result<(), KernelError> {
        self.decode::<true>(Bits::Two, "add_dequantized_2bit", codes, out, t)
    }

    fn quantize_1bit(&self, g: &[f32], r: &mut [f32], c: &mut [u32], t: f32) -> Res {
        self.encode(Bits::One, "quantize_1bit", (g, r, c), t)
    }

    fn dequantize_1bit(&self, codes: &[u32], out: &mut [f32]) -> Result<(), KernelError> {
        self.decode::<false>(Bits::One, "dequantize_1bit", codes, out, 0.0)
    }

    fn add_dequantized_1bit(&self, codes: &[u32], out: &mut [f32]) -> Result<(), KernelError> {
        self.decode::<true>(Bits::One, "add_dequantized_1bit", codes, out, 0.0)
    }
}

fn sum_dispatch<T: Element>(k: &CpuKernels, out: &mut [T], inputs: &[&[T]]) {
    match k.chunk(out.len()) {
        None => reduce::sum_range(out, inputs, 0),
        Some((helpers, c)) => {
            let parts = out.chunks_mut(c).enumerate().collect();
            helpers.for_each(parts, |(i, o)| reduce::sum_range(o, inputs, i * c));
        }
    }
}
