//! MXNet's 2-bit scheme: 16 codes per word, `+t`, `-t` or 0, with the
//! residual keeping what was not sent.

use pskv_gpu::device::DeviceMem;
use pskv_gpu::{layout, Bits, Kernels};

use super::{Dev, Host, KernelResult, Scheme};
use crate::error::Result;

pub(crate) struct TwoBit;

impl Scheme for TwoBit {
    fn words(&self, n: usize) -> usize {
        layout::words_2bit(n)
    }

    fn quantize(&self, on: Host, g: &[f32], r: &mut [f32], c: &mut [u32]) -> Result<()> {
        Ok(on.k.quantize_2bit(g, r, c, on.threshold)?)
    }

    fn dequantize(&self, on: Host, codes: &[u32], out: &mut [f32], add: bool) -> Result<()> {
        Ok(if add {
            on.k.add_dequantized_2bit(codes, out, on.threshold)
        } else {
            on.k.dequantize_2bit(codes, out, on.threshold)
        }?)
    }

    fn quantize_on(&self, on: Dev, g: &DeviceMem, r: &DeviceMem, c: &DeviceMem) -> KernelResult {
        on.dev.quantize(on.lane, Bits::Two, g, r, c, on.threshold)
    }

    fn dequantize_on(&self, on: Dev, codes: &DeviceMem, out: &DeviceMem) -> KernelResult {
        on.dev
            .dequantize(on.lane, Bits::Two, codes, out, on.threshold)
    }
}
