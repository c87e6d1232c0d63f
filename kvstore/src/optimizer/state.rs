//! What an update takes and keeps: the weight and the gradient by element
//! type ([`WeightMut`], [`GradRef`]), and a key's state ([`OptState`]: its
//! update count, its state arrays, f32 master weights), made on a key's
//! first update and checked against the weight at every one.

use half::f16;

use super::Optimizer;
use crate::error::{KvError, Result};

/// A weight to update, by element type.
#[derive(Debug)]
pub enum WeightMut<'a> {
    /// f32 weights.
    F32(&'a mut [f32]),
    /// f64 weights.
    F64(&'a mut [f64]),
    /// f16 weights.
    F16(&'a mut [f16]),
}

impl WeightMut<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            WeightMut::F32(w) => w.len(),
            WeightMut::F64(w) => w.len(),
            WeightMut::F16(w) => w.len(),
        }
    }

    pub(super) fn dtype_name(&self) -> &'static str {
        match self {
            WeightMut::F32(_) => "f32",
            WeightMut::F64(_) => "f64",
            WeightMut::F16(_) => "f16",
        }
    }
}

/// A gradient, by element type.
#[derive(Debug, Clone, Copy)]
pub enum GradRef<'a> {
    /// f32 gradient.
    F32(&'a [f32]),
    /// f64 gradient.
    F64(&'a [f64]),
    /// f16 gradient.
    F16(&'a [f16]),
}

impl GradRef<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            GradRef::F32(g) => g.len(),
            GradRef::F64(g) => g.len(),
            GradRef::F16(g) => g.len(),
        }
    }

    pub(super) fn dtype_name(&self) -> &'static str {
        match self {
            GradRef::F32(_) => "f32",
            GradRef::F64(_) => "f64",
            GradRef::F16(_) => "f16",
        }
    }
}

/// One state array.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum StateVals {
    /// For f32 and f16 weights.
    F32(Vec<f32>),
    /// For f64 weights.
    F64(Vec<f64>),
}

/// What an optimizer keeps for one key: its update count, its state arrays
/// (momentum; Adam's mean and variance; AdaGrad's history) and, for f16
/// weights with multi-precision, the f32 master weights.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptState {
    /// Updates done, from `begin_num_update` (Adam's `t`).
    pub count: u64,
    /// The state arrays.
    pub bufs: Vec<StateVals>,
    /// f32 master weights (f16 weights with multi-precision).
    pub master: Option<Vec<f32>>,
}

impl OptState {
    pub(super) fn new(opt: &Optimizer, w: &WeightMut<'_>) -> OptState {
        let n = w.len();
        let k = opt.state_arrays();
        let bufs = match w {
            WeightMut::F64(_) => (0..k).map(|_| StateVals::F64(vec![0.0; n])).collect(),
            _ => (0..k).map(|_| StateVals::F32(vec![0.0; n])).collect(),
        };
        OptState {
            count: opt.begin_num_update,
            bufs,
            master: None,
        }
    }

    pub(super) fn check(&self, opt: &Optimizer, w: &WeightMut<'_>) -> Result<()> {
        let n = w.len();
        let ok_len = self.bufs.iter().all(|b| match b {
            StateVals::F32(v) => v.len() == n,
            StateVals::F64(v) => v.len() == n,
        }) && self.master.as_ref().is_none_or(|m| m.len() == n);
        if self.bufs.len() != opt.state_arrays() || !ok_len {
            return Err(KvError::invalid(format!(
                "the optimizer state ({} arrays) does not fit {} with a weight of {n} elements",
                self.bufs.len(),
                opt.name()
            )));
        }
        Ok(())
    }

    pub(super) fn bufs_f32(&mut self) -> Result<Vec<&mut [f32]>> {
        self.bufs
            .iter_mut()
            .map(|b| match b {
                StateVals::F32(v) => Ok(&mut v[..]),
                StateVals::F64(_) => Err(KvError::invalid(
                    "the optimizer state is f64 but the weight is not",
                )),
            })
            .collect()
    }

    pub(super) fn bufs_f64(&mut self) -> Result<Vec<&mut [f64]>> {
        self.bufs
            .iter_mut()
            .map(|b| match b {
                StateVals::F64(v) => Ok(&mut v[..]),
                StateVals::F32(_) => Err(KvError::invalid(
                    "the optimizer state is f32 but the weight is f64",
                )),
            })
            .collect()
    }
}
