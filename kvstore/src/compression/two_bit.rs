//! MXNet's 2-bit scheme: 16 codes per word, `+t`, `-t` or 0, with the
//! residual keeping what was not sent.

use pskv_gpu::cpu::CpuKernels;
use pskv_gpu::device::{Device, DeviceMem, Lane};
use pskv_gpu::{layout, KernelError, Kernels};

use super::Scheme;
use crate::error::Result;

pub(crate) struct TwoBit;

impl Scheme for TwoBit {
    fn words(&self, n: usize) -> usize {
        layout::words_2bit(n)
    }

    fn quantize(
        &self,
        k: &CpuKernels,
        grad: &[f32],
        residual: &mut [f32],
        codes: &mut [u32],
        threshold: f32,
    ) -> Result<()> {
        Ok(k.quantize_2bit(grad, residual, codes, threshold)?)
    }

    fn dequantize(
        &self,
        k: &CpuKernels,
        codes: &[u32],
        out: &mut [f32],
        threshold: f32,
    ) -> Result<()> {
        Ok(k.dequantize_2bit(codes, out, threshold)?)
    }

    fn add_dequantized(
        &self,
        k: &CpuKernels,
        codes: &[u32],
        out: &mut [f32],
        threshold: f32,
    ) -> Result<()> {
        Ok(k.add_dequantized_2bit(codes, out, threshold)?)
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
        dev.quantize_2bit(lane, grad, residual, codes, threshold)
    }

    fn dequantize_on(
        &self,
        dev: &dyn Device,
        lane: Lane,
        codes: &DeviceMem,
        out: &DeviceMem,
        threshold: f32,
    ) -> std::result::Result<(), KernelError> {
        dev.dequantize_2bit(lane, codes, out, threshold)
    }
}
