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

    fn add_dequantized(&self, codes: &[u32], out: &mut [f32], threshold: f32) {
        // One byte holds four codes, the first in its top bits: a table of
        // the four values of each byte, added four lanes at a time.
        let value = |c: u32| match c {
            layout::CODE_POS => threshold,
            layout::CODE_NEG => -threshold,
            _ => 0.0f32,
        };
        let mut lut = [[0.0f32; 4]; 256];
        for (b, e) in lut.iter_mut().enumerate() {
            for (k, v) in e.iter_mut().enumerate() {
                *v = value(((b as u32) >> (6 - 2 * k)) & 3);
            }
        }
        let bytes: &[u8] = bytemuck::cast_slice(codes);
        let whole = out.len() / 4;
        let mut quads = out.chunks_exact_mut(4);
        for (q, &b) in (&mut quads).zip(bytes) {
            let l = &lut[b as usize];
            q[0] += l[0];
            q[1] += l[1];
            q[2] += l[2];
            q[3] += l[3];
        }
        let rest = quads.into_remainder();
        if let Some(&b) = bytes.get(whole) {
            for (k, o) in rest.iter_mut().enumerate() {
                *o += lut[b as usize][k];
            }
        }
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
