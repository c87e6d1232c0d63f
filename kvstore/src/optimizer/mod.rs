//! Optimizers that run where the weights are stored (on the servers of a
//! distributed store, in the store of a local one): SGD (with momentum),
//! NAG, Adam and AdaGrad, each matching MXNet 1.9.1 to the bit for f32 and
//! f64 weights and for f16 weights with `multi_precision` (f32 master
//! weights). One file per method: a type that implements `Rule` (its
//! hyperparameters, state and step), held by a [`Method`] variant;
//! `state.rs` holds what an update takes and keeps (weights, gradients,
//! a key's [`OptState`]); `update.rs` runs one update (the key's rate and
//! decay now, the checks, the method's step over all rows or some).
//!
//! What "matching" covers, beyond the kernels' formulas (see each file):
//! - hyperparameters reach the kernels as MXNet's C++ parses them from
//!   Python's text ([`mxparse`]);
//! - per-key update counts (Adam's `t`), learning-rate and weight-decay
//!   multipliers, and the state each method keeps, as MXNet's Python
//!   `Optimizer` and `Updater` do.
//!
//! - learning-rate schedulers ([`schedule`]), driven as MXNet drives them
//!   by `num_update`, the most updates of any key this optimizer updated
//!   (counts start at `begin_num_update`).
//!
//! f16 weights without `multi_precision` are updated in f32 and rounded
//! once per element; MXNet's half-precision kernels round some
//! intermediate results to f16, so the two can differ in the last bit.

mod adagrad;
mod adam;
mod create;
pub mod mxparse;
mod nag;
mod real;
pub mod schedule;
mod sgd;
mod state;
mod update;

pub use adagrad::AdaGrad;
pub use adam::Adam;
pub use nag::Nag;
pub use sgd::Sgd;
pub use state::{GradRef, OptState, StateVals, WeightMut};

use std::collections::BTreeMap;

use crate::error::{KvError, Result};
use crate::key::Key;
use mxparse::{param_f32, scalar_f32, scalar_f64};
use real::Real;
use schedule::LrScheduler;
use update::Step;

/// The update rule and its own hyperparameters: one variant per method,
/// each holding its file's type (which implements the method's `Rule`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Method {
    /// Stochastic gradient descent, with momentum when `momentum != 0`.
    Sgd(Sgd),
    /// Nesterov accelerated gradient.
    Nag(Nag),
    /// Adam.
    Adam(Adam),
    /// AdaGrad.
    AdaGrad(AdaGrad),
}

impl Method {
    fn rule(&self) -> &dyn Rule {
        match self {
            Method::Sgd(r) => r,
            Method::Nag(r) => r,
            Method::Adam(r) => r,
            Method::AdaGrad(r) => r,
        }
    }

    fn rule_mut(&mut self) -> &mut dyn Rule {
        match self {
            Method::Sgd(r) => r,
            Method::Nag(r) => r,
            Method::Adam(r) => r,
            Method::AdaGrad(r) => r,
        }
    }
}

/// What one method's file implements: its name, its hyperparameters (as
/// MXNet names them), its state, and its step. A new method is a file with
/// a type implementing this, a [`Method`] variant holding it, a line in
/// [`Optimizer::create`], and its MXNet fixture.
trait Rule {
    /// MXNet's name.
    fn name(&self) -> &'static str;
    /// Its own hyperparameters, for the checks and errors.
    fn params(&self) -> Vec<(&'static str, f64)>;
    /// Sets hyperparameter `name` (MXNet's spelling); false if it has none
    /// of that name.
    fn set(&mut self, name: &str, v: f64) -> bool;
    /// The first hyperparameter out of its range, if any: what (with the
    /// range), and its value. `opt` is the optimizer it belongs to.
    fn out_of_range(&self, opt: &Optimizer) -> Option<(&'static str, f64)>;
    /// How many state arrays it keeps per key.
    fn state_arrays(&self) -> usize;
    /// One update of f32 values.
    fn step_f32(&self, s: &Step<'_>, w: &mut [f32], g: &[f32], bufs: Vec<&mut [f32]>);
    /// One update of f64 values.
    fn step_f64(&self, s: &Step<'_>, w: &mut [f64], g: &[f64], bufs: Vec<&mut [f64]>);
}

/// Implements `Rule::step_f32` and `step_f64` with the type's generic
/// `step`.
macro_rules! steps_by_type {
    () => {
        fn step_f32(&self, s: &Step<'_>, w: &mut [f32], g: &[f32], bufs: Vec<&mut [f32]>) {
            self.step(s, w, g, bufs)
        }
        fn step_f64(&self, s: &Step<'_>, w: &mut [f64], g: &[f64], bufs: Vec<&mut [f64]>) {
            self.step(s, w, g, bufs)
        }
    };
}
use steps_by_type;

/// An optimizer: method, learning rate, weight decay, gradient rescaling
/// and clipping, multi-precision, and per-key multipliers. Hyperparameters
/// are f64, as Python floats are.
///
/// ```
/// use pskv_kvstore::Optimizer;
/// let opt = Optimizer::sgd(0.1).momentum(0.9).wd(1e-4).rescale_grad(1.0 / 128.0);
/// assert!(opt.validate().is_ok());
/// let adam = Optimizer::create("adam", &[("learning_rate", 0.002), ("beta1", 0.8)])?;
/// assert_eq!(adam.learning_rate, 0.002);
/// # Ok::<(), pskv_kvstore::KvError>(())
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Optimizer {
    /// The rule.
    pub method: Method,
    /// Learning rate.
    pub learning_rate: f64,
    /// Weight decay.
    pub wd: f64,
    /// Gradients are multiplied by this first (MXNet users set it to
    /// 1/batch size; the server never averages on its own).
    pub rescale_grad: f64,
    /// Clip gradients to `[-c, c]`. SGD, NAG and Adam follow MXNet: `None`,
    /// 0 or a negative value mean no clipping; AdaGrad clips whenever it is
    /// `Some`.
    pub clip_gradient: Option<f64>,
    /// Keep f32 master weights (and f32 state) for f16 weights.
    pub multi_precision: bool,
    /// Learning-rate multiplier per key id ([`Key::id`]).
    pub lr_mult: BTreeMap<u64, f64>,
    /// Weight-decay multiplier per key id.
    pub wd_mult: BTreeMap<u64, f64>,
    /// The learning rate by update count, if not constant.
    #[serde(default)]
    pub lr_scheduler: Option<LrScheduler>,
    /// Where update counts start (MXNet's `begin_num_update`): Adam's `t`
    /// and the scheduler's `num_update` count from it.
    #[serde(default)]
    pub begin_num_update: u64,
    /// The most updates of any key so far, and the scheduler's memo: not
    /// part of the optimizer's description (not sent, not compared), and a
    /// clone, like a copy sent to a server, starts afresh.
    #[serde(skip)]
    progress: Progress,
}

/// `num_update` and a scheduler's memo, shared by the threads updating
/// keys through one optimizer.
#[derive(Debug, Default)]
struct Progress {
    num_update: std::sync::atomic::AtomicU64,
    memo: parking_lot::Mutex<schedule::Memo>,
}

impl Progress {
    /// Records that a key reached `count` updates; `num_update` now.
    fn observe(&self, count: u64) -> u64 {
        use std::sync::atomic::Ordering;
        self.num_update
            .fetch_max(count, Ordering::Relaxed)
            .max(count)
    }
}

impl Clone for Progress {
    fn clone(&self) -> Progress {
        Progress::default()
    }
}

impl PartialEq for Progress {
    fn eq(&self, _: &Progress) -> bool {
        true
    }
}

impl Optimizer {
    fn with(method: Method, learning_rate: f64) -> Optimizer {
        Optimizer {
            method,
            learning_rate,
            wd: 0.0,
            rescale_grad: 1.0,
            clip_gradient: None,
            multi_precision: false,
            lr_mult: BTreeMap::new(),
            wd_mult: BTreeMap::new(),
            lr_scheduler: None,
            begin_num_update: 0,
            progress: Progress::default(),
        }
    }

    /// SGD without momentum.
    pub fn sgd(learning_rate: f64) -> Optimizer {
        Optimizer::with(Method::Sgd(Sgd { momentum: 0.0 }), learning_rate)
    }

    /// NAG with this momentum.
    pub fn nag(learning_rate: f64, momentum: f64) -> Optimizer {
        Optimizer::with(Method::Nag(Nag { momentum }), learning_rate)
    }

    /// Adam with MXNet's defaults (beta1 0.9, beta2 0.999, epsilon 1e-8).
    pub fn adam(learning_rate: f64) -> Optimizer {
        Optimizer::with(
            Method::Adam(Adam {
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
            }),
            learning_rate,
        )
    }

    /// AdaGrad with MXNet's default epsilon (1e-7).
    pub fn adagrad(learning_rate: f64) -> Optimizer {
        Optimizer::with(Method::AdaGrad(AdaGrad { epsilon: 1e-7 }), learning_rate)
    }

    /// Sets the momentum (SGD, NAG).
    pub fn momentum(mut self, m: f64) -> Optimizer {
        self.method.rule_mut().set("momentum", m);
        self
    }

    /// Sets Adam's betas.
    pub fn betas(mut self, b1: f64, b2: f64) -> Optimizer {
        let r = self.method.rule_mut();
        r.set("beta1", b1);
        r.set("beta2", b2);
        self
    }

    /// Sets epsilon (Adam, AdaGrad).
    pub fn epsilon(mut self, e: f64) -> Optimizer {
        self.method.rule_mut().set("epsilon", e);
        self
    }

    /// Sets the weight decay.
    pub fn wd(mut self, wd: f64) -> Optimizer {
        self.wd = wd;
        self
    }

    /// Sets the gradient rescaling factor.
    pub fn rescale_grad(mut self, r: f64) -> Optimizer {
        self.rescale_grad = r;
        self
    }

    /// Sets gradient clipping.
    pub fn clip_gradient(mut self, c: f64) -> Optimizer {
        self.clip_gradient = Some(c);
        self
    }

    /// Keeps f32 master weights for f16 weights.
    pub fn multi_precision(mut self, on: bool) -> Optimizer {
        self.multi_precision = on;
        self
    }

    /// Sets a learning-rate scheduler (MXNet's `lr_scheduler`). The
    /// optimizer's learning rate plays MXNet's `learning_rate=`: Factor and
    /// MultiFactor decay from it (see [`schedule`]). For MXNet's
    /// `create('sgd', lr_scheduler=s)` without a learning rate, see
    /// [`Optimizer::create_scheduled`].
    pub fn lr_scheduler(mut self, s: LrScheduler) -> Optimizer {
        self.lr_scheduler = Some(s);
        self.progress = Progress::default();
        self
    }

    /// Sets where update counts start (MXNet's `begin_num_update`).
    pub fn begin_num_update(mut self, n: u64) -> Optimizer {
        self.begin_num_update = n;
        self.progress = Progress::default();
        self
    }

    /// Counts a key's restored update count into `num_update` (states put
    /// back from a file or a checkpoint).
    pub(crate) fn note_count(&self, count: u64) {
        self.progress.observe(count);
    }

    /// The most updates of any key this optimizer has done (MXNet's
    /// `num_update`; `begin_num_update` before the first).
    pub fn num_update(&self) -> u64 {
        self.progress
            .num_update
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(self.begin_num_update)
    }

    /// Multiplies the learning rate of one key.
    pub fn lr_mult(mut self, key: impl Into<Key>, m: f64) -> Optimizer {
        self.lr_mult.insert(key.into().id(), m);
        self
    }

    /// Multiplies the weight decay of one key.
    pub fn wd_mult(mut self, key: impl Into<Key>, m: f64) -> Optimizer {
        self.wd_mult.insert(key.into().id(), m);
        self
    }

    /// The method's name, as MXNet spells it.
    pub fn name(&self) -> &'static str {
        self.method.rule().name()
    }

    /// Checks that every hyperparameter is finite and in range.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64| {
            Err(KvError::invalid(format!(
                "optimizer {}: {what} = {v} is out of range",
                self.name()
            )))
        };
        let mut all = vec![
            ("learning_rate", self.learning_rate),
            ("wd", self.wd),
            ("rescale_grad", self.rescale_grad),
        ];
        if let Some(c) = self.clip_gradient {
            all.push(("clip_gradient", c));
        }
        all.extend(self.method.rule().params());
        for m in self.lr_mult.values().chain(self.wd_mult.values()) {
            all.push(("a multiplier", *m));
        }
        if let Some(s) = &self.lr_scheduler {
            s.validate()?;
        }
        if self.begin_num_update >= 1 << 62 {
            return bad("begin_num_update", self.begin_num_update as f64);
        }
        for (what, v) in all {
            if !v.is_finite() {
                return bad(what, v);
            }
        }
        // Values that are finite but make no sense: a negative rate climbs
        // the loss, a momentum of 1 or more diverges, a zero rescale drops
        // every gradient, a zero epsilon divides by zero.
        if self.learning_rate < 0.0 {
            return bad("learning_rate (must be 0 or more)", self.learning_rate);
        }
        if self.wd < 0.0 {
            return bad("wd (must be 0 or more)", self.wd);
        }
        if self.rescale_grad == 0.0 {
            return bad("rescale_grad (0 drops every gradient)", self.rescale_grad);
        }
        if let Some((what, v)) = self.method.rule().out_of_range(self) {
            return bad(what, v);
        }
        Ok(())
    }
}

/// An NDArray scalar as the element type `T` receives it: `DType(double)`.
fn scalar_of<T: Real>(x: f64) -> f64 {
    if std::mem::size_of::<T>() == 4 {
        scalar_f32(x) as f64
    } else {
        scalar_f64(x)
    }
}

#[cfg(test)]
mod tests;
