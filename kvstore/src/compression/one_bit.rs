//! The 1-bit scheme (MXNet 2.0): 32 codes per word, `+1` or `-1`, with the
//! residual keeping what was not sent; the threshold decides the sign.

use pskv_gpu::device::DeviceMem;
use pskv_gpu::{layout, Bits, Kernels};

use super::{Dev, Host, KernelResult, Scheme};
use crate::error::Result;

pub(crate) struct OneBit;

impl Scheme for OneBit {
    fn words(&self, n: usize) -> usize {
        layout::words_1bit(n)
    }

    fn quantize(&self, on: Host, g: &[f32], r: &mut [f32], c: &mut [u32]) -> Result<()> {
        Ok(on.k.quantize_1bit(g, r, c, on.threshold)?)
    }

    fn dequantize(&self, on: Host, codes: &[u32], out: &mut [f32], add: bool) -> Result<()> {
        Ok(if add {
            on.k.add_dequantized_1bit(codes, out)
        } else {
            on.k.dequantize_1bit(codes, out)
        }?)
    }

    fn quantize_on(&self, on: Dev, g: &DeviceMem, r: &DeviceMem, c: &DeviceMem) -> KernelResult {
        on.dev.quantize(on.lane, Bits::One, g, r, c, on.threshold)
    }

    fn dequantize_on(&self, on: Dev, codes: &DeviceMem, out: &DeviceMem) -> KernelResult {
        on.dev
            .dequantize(on.lane, Bits::One, codes, out, on.threshold)
    }
}
