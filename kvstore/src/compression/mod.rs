//! Gradient compression: MXNet's 2-bit and 1-bit schemes with error
//! feedback (each sender keeps a residual per key), over pskv-gpu's
//! kernels, and the wire form of a compressed message. One file per scheme
//! (`two_bit.rs`, `one_bit.rs`), each a type implementing [`Scheme`]: its
//! code layout and its kernels, on the CPU and on a device; this file is
//! the setting and the message.
//!
//! Wire form of one compressed part: `n: u32`, `threshold: f32`, then the
//! `pskv_gpu::layout` words of `n` codes, all little-endian. The header
//! makes each message self-describing, so a server needs no separate
//! "set compression" command before it can decode (MXNet's server does,
//! and sends the original size in a dummy key).

mod one_bit;
mod two_bit;

use bytes::Bytes;
use pskv_gpu::cpu::CpuKernels;
use pskv_gpu::device::{Device, DeviceMem, Lane};
use pskv_gpu::KernelError;

use crate::error::{Fault, KvError, Result};

/// One compression scheme: how many code words `n` values take, and its
/// kernels (quantize with error feedback, dequantize, dequantize-and-add)
/// on the CPU and on a device. A new scheme is a file with a type
/// implementing this, a `Compression` variant, and its wire code.
pub(crate) trait Scheme: Sync {
    /// Words of codes for `n` values.
    fn words(&self, n: usize) -> usize;
    /// Quantizes `grad` with `residual` into `codes`.
    fn quantize(
        &self,
        on: Host,
        grad: &[f32],
        residual: &mut [f32],
        codes: &mut [u32],
    ) -> Result<()>;
    /// Dequantizes `codes` into `out`, or with `add` adds them to it (in
    /// one pass: the same additions as dequantizing into a buffer and
    /// adding it, without the buffer).
    fn dequantize(&self, on: Host, codes: &[u32], out: &mut [f32], add: bool) -> Result<()>;
    /// Queues the quantize on a device lane.
    fn quantize_on(
        &self,
        on: Dev,
        grad: &DeviceMem,
        residual: &DeviceMem,
        codes: &DeviceMem,
    ) -> KernelResult;
    /// Queues the dequantize on a device lane.
    fn dequantize_on(&self, on: Dev, codes: &DeviceMem, out: &DeviceMem) -> KernelResult;
}

type KernelResult = std::result::Result<(), KernelError>;

/// Where a scheme's CPU kernels run, with the threshold.
#[derive(Clone, Copy)]
pub(crate) struct Host<'a> {
    pub(crate) k: &'a CpuKernels,
    pub(crate) threshold: f32,
}

/// Where a scheme's device kernels are queued, with the threshold.
#[derive(Clone, Copy)]
pub(crate) struct Dev<'a> {
    pub(crate) dev: &'a dyn Device,
    pub(crate) lane: Lane,
    pub(crate) threshold: f32,
}

/// Bytes of the header of a compressed part.
pub(crate) const HEADER: usize = 8;

/// A gradient compression setting.
#[derive(Clone, Copy, Debug, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub enum Compression {
    /// Gradients travel as they are.
    #[default]
    None,
    /// 16 codes per word: `+t`, `-t` or 0, with residual feedback.
    TwoBit {
        /// The threshold `t` (> 0).
        threshold: f32,
    },
    /// 32 codes per word: `+1` or `-1`, with residual feedback.
    OneBit {
        /// The threshold the residual is compared with.
        threshold: f32,
    },
}

impl Compression {
    /// 2-bit compression with this threshold.
    pub fn two_bit(threshold: f32) -> Compression {
        Compression::TwoBit { threshold }
    }

    /// 1-bit compression with this threshold.
    pub fn one_bit(threshold: f32) -> Compression {
        Compression::OneBit { threshold }
    }

    /// From MXNet's parameters: `type` (`2bit`, `1bit` or `none`) and
    /// `threshold` (default 0.5).
    pub fn from_params(params: &[(&str, &str)]) -> Result<Compression> {
        let mut kind = None;
        let mut threshold = 0.5f32;
        for &(k, v) in params {
            match k {
                "type" => kind = Some(v.to_string()),
                "threshold" => {
                    threshold = v.trim().parse().map_err(|_| {
                        KvError::invalid(format!(
                            "gradient compression: threshold '{v}' is not a number"
                        ))
                    })?
                }
                other => {
                    return Err(KvError::invalid(format!(
                        "gradient compression has no parameter '{other}' (type, threshold)"
                    )))
                }
            }
        }
        let c = match kind.as_deref() {
            Some("2bit") => Compression::two_bit(threshold),
            Some("1bit") => Compression::one_bit(threshold),
            Some("none") => Compression::None,
            Some(other) => {
                return Err(KvError::invalid(format!(
                    "unknown gradient compression type '{other}': expected 2bit, 1bit or none"
                )))
            }
            None => {
                return Err(KvError::invalid(
                    "gradient compression needs a 'type' (2bit, 1bit or none)",
                ))
            }
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the threshold.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Compression::None => Ok(()),
            Compression::TwoBit { threshold } if threshold > 0.0 && threshold.is_finite() => Ok(()),
            Compression::TwoBit { threshold } => Err(KvError::invalid(format!(
                "2-bit compression needs a finite threshold above 0, got {threshold}"
            ))),
            Compression::OneBit { threshold } if threshold.is_finite() => Ok(()),
            Compression::OneBit { threshold } => Err(KvError::invalid(format!(
                "1-bit compression needs a finite threshold, got {threshold}"
            ))),
        }
    }

    /// Whether gradients are compressed.
    pub fn is_on(&self) -> bool {
        !matches!(self, Compression::None)
    }

    /// The wire code of the scheme (0 none, 1 2-bit, 2 1-bit).
    pub(crate) fn code(&self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::TwoBit { .. } => 1,
            Compression::OneBit { .. } => 2,
        }
    }

    /// The threshold (0 without compression).
    pub(crate) fn threshold(&self) -> f32 {
        match *self {
            Compression::None => 0.0,
            Compression::TwoBit { threshold } | Compression::OneBit { threshold } => threshold,
        }
    }

    /// The scheme, if gradients are compressed.
    pub(crate) fn scheme(&self) -> Option<&'static dyn Scheme> {
        match self {
            Compression::None => None,
            Compression::TwoBit { .. } => Some(&two_bit::TwoBit),
            Compression::OneBit { .. } => Some(&one_bit::OneBit),
        }
    }

    /// The scheme, or an error saying `what` needs one.
    fn needs(&self, what: &str) -> Result<&'static dyn Scheme> {
        self.scheme()
            .ok_or_else(|| KvError::invalid(format!("{what} without compression")))
    }

    /// Words of codes for `n` elements.
    pub(crate) fn words(&self, n: usize) -> usize {
        self.scheme().map_or(0, |s| s.words(n))
    }

    /// Queues the quantize of `grad` with `residual` into `codes` on
    /// `dev`'s `lane`.
    pub(crate) fn quantize_on(
        &self,
        dev: &dyn Device,
        lane: Lane,
        grad: &DeviceMem,
        residual: &DeviceMem,
        codes: &DeviceMem,
    ) -> Result<()> {
        let s = self.needs("a device quantize")?;
        Ok(s.quantize_on(self.on_dev(dev, lane), grad, residual, codes)?)
    }

    /// Queues the dequantize of `codes` into `out` on `dev`'s `lane`.
    pub(crate) fn dequantize_on(
        &self,
        dev: &dyn Device,
        lane: Lane,
        codes: &DeviceMem,
        out: &DeviceMem,
    ) -> Result<()> {
        let s = self.needs("a device dequantize")?;
        Ok(s.dequantize_on(self.on_dev(dev, lane), codes, out)?)
    }

    /// Quantizes `grad` with `residual` into `codes`.
    pub(crate) fn quantize(
        &self,
        k: &CpuKernels,
        grad: &[f32],
        residual: &mut [f32],
        codes: &mut [u32],
    ) -> Result<()> {
        let host = self.on_host(k);
        self.needs("quantize")?
            .quantize(host, grad, residual, codes)
    }

    /// Dequantizes `codes` into `out`.
    pub(crate) fn dequantize(&self, k: &CpuKernels, codes: &[u32], out: &mut [f32]) -> Result<()> {
        let host = self.on_host(k);
        self.needs("dequantize")?
            .dequantize(host, codes, out, false)
    }

    fn on_host<'a>(&self, k: &'a CpuKernels) -> Host<'a> {
        Host {
            k,
            threshold: self.threshold(),
        }
    }

    fn on_dev<'a>(&self, dev: &'a dyn Device, lane: Lane) -> Dev<'a> {
        Dev {
            dev,
            lane,
            threshold: self.threshold(),
        }
    }

    /// Quantizes `grad` with `residual` into a message (header and codes).
    pub(crate) fn encode(
        &self,
        k: &CpuKernels,
        grad: &[f32],
        residual: &mut [f32],
    ) -> Result<Bytes> {
        let words = self.words(grad.len());
        let n = u32::try_from(grad.len()).map_err(|_| {
            KvError::invalid(format!(
                "a compressed part holds at most {} elements, got {}",
                u32::MAX,
                grad.len()
            ))
        })?;
        let mut codes = vec![0u32; words + HEADER / 4];
        codes[0] = n.to_le();
        codes[1] = self.threshold().to_bits().to_le();
        self.quantize(k, grad, residual, &mut codes[HEADER / 4..])?;
        if cfg!(target_endian = "big") {
            for w in &mut codes[HEADER / 4..] {
                *w = w.to_le();
            }
        }
        let bytes: Vec<u8> = bytemuck::cast_slice(&codes).to_vec();
        Ok(Bytes::from(bytes))
    }

    /// Decodes a message of scheme `code` for `n` elements into `out`
    /// (`out = values`, or `out += values` when `add`).
    pub(crate) fn decode(
        code: u8,
        k: &CpuKernels,
        msg: &[u8],
        out: &mut [f32],
        add: bool,
    ) -> std::result::Result<(), Fault> {
        if msg.len() < HEADER {
            return Err(Fault::Malformed(format!(
                "a compressed message needs an {HEADER}-byte header, got {} bytes",
                msg.len()
            )));
        }
        let n = u32::from_le_bytes(msg[0..4].try_into().expect("4 bytes")) as usize;
        let threshold = f32::from_le_bytes(msg[4..8].try_into().expect("4 bytes"));
        let scheme = match code {
            1 => Compression::two_bit(threshold),
            2 => Compression::one_bit(threshold),
            c => return Err(Fault::Malformed(format!("unknown compression code {c}"))),
        };
        scheme
            .validate()
            .map_err(|e| Fault::Malformed(e.to_string()))?;
        if n != out.len() {
            return Err(Fault::Mismatch(format!(
                "the compressed message holds {n} elements, the key part {}",
                out.len()
            )));
        }
        let words = scheme.words(n);
        let body = &msg[HEADER..];
        if body.len() != words * 4 {
            return Err(Fault::Malformed(format!(
                "{n} compressed elements need {} bytes of codes, got {}",
                words * 4,
                body.len()
            )));
        }
        // The words in place when aligned (and the host little-endian).
        let codes: std::borrow::Cow<'_, [u32]> = match bytemuck::try_cast_slice(body) {
            Ok(c) if cfg!(target_endian = "little") => std::borrow::Cow::Borrowed(c),
            _ => std::borrow::Cow::Owned(
                body.chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect(),
            ),
        };
        let s = scheme.needs("dequantize")?;
        Ok(s.dequantize(Host { k, threshold }, &codes, out, add)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_parse_like_mxnet() {
        assert_eq!(
            Compression::from_params(&[("type", "2bit"), ("threshold", "0.25")]).unwrap(),
            Compression::two_bit(0.25)
        );
        assert_eq!(
            Compression::from_params(&[("type", "1bit")]).unwrap(),
            Compression::one_bit(0.5)
        );
        assert!(Compression::from_params(&[("type", "3bit")]).is_err());
        assert!(Compression::from_params(&[("type", "2bit"), ("threshold", "0")]).is_err());
        assert!(Compression::from_params(&[("threshold", "1")]).is_err());
        assert!(Compression::from_params(&[("type", "2bit"), ("bits", "1")]).is_err());
    }

    #[test]
    fn messages_round_trip_and_bad_ones_are_refused() {
        let k = CpuKernels::single_threaded();
        for c in [Compression::two_bit(0.5), Compression::one_bit(0.0)] {
            let grad: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) / 8.0).collect();
            let mut res = vec![0.0f32; 37];
            let msg = c.encode(&k, &grad, &mut res).unwrap();
            let mut out = vec![0.0f32; 37];
            Compression::decode(c.code(), &k, &msg, &mut out, false).unwrap();
            // What was sent plus what stayed behind is what was pushed.
            for i in 0..37 {
                assert_eq!(out[i] + res[i], grad[i], "{c:?} element {i}");
            }
            let mut sum = out.clone();
            Compression::decode(c.code(), &k, &msg, &mut sum, true).unwrap();
            assert_eq!(sum[0], 2.0 * out[0]);
            assert!(
                Compression::decode(c.code(), &k, &msg[..msg.len() - 4], &mut out, false).is_err()
            );
            assert!(Compression::decode(c.code(), &k, &msg, &mut out[..36], false).is_err());
            assert!(Compression::decode(c.code(), &k, &msg[..3], &mut out, false).is_err());
            assert!(Compression::decode(7, &k, &msg, &mut out, false).is_err());
        }
    }
}
