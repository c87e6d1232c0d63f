//! The 1-bit scheme (MXNet 2.0): 32 codes per word, `+1` or `-1`, with the
//! residual keeping what was not sent; the threshold decides the sign.

use pskv_gpu::cpu::CpuKernels;
use pskv_gpu::device::{Device, DeviceMem, Lane};
use pskv_gpu::{layout, KernelError, Kernels};

use super::Scheme;
use crate::error::Result;

pub(crate) struct OneBit;

impl Scheme for OneBit {
    fn words(&self, n: usize) -> usize {
        layout::words_1bit(n)
    }

    fn quantize(
        &self,
        k: &CpuKernels,
        grad: &[f32],
        residual: &mut [f32],
        codes: &mut [u32],
        threshold: f32,
    ) -> Result<()> {
        Ok(k.quantize_1bit(grad, residual, codes, threshold)?)
    }

    fn dequantize(&self, k: &CpuKernels, codes: &[u32], out: &mut [f32], _: f32) -> Result<()> {
        Ok(k.dequantize_1bit(codes, out)?)
    }

    fn add_dequantized(
        &self,
        k: &CpuKernels,
        codes: &[u32],
        out: &mut [f32],
        _: f32,
    ) -> Result<()> {
        Ok(k.add_dequantized_1bit(codes, out)?)
    }

    fn quantize_on(
        &self,
        dev: &dyn Device,
        lane: Lane,
        grad: &DeviceMem,
        residual: &DeviceMem,
        codes: &DeviceMem,
        threshold: f32,
    ) -> std::result::Result<(), KernelError> {
        dev.quantize_1bit(lane, grad, residual, codes, threshold)
    }

    fn dequantize_on(
        &self,
        dev: &dyn Device,
        lane: Lane,
        codes: &DeviceMem,
        out: &DeviceMem,
        _: f32,
    ) -> std::result::Result<(), KernelError> {
        dev.dequantize_1bit(lane, codes, out)
    }
}
