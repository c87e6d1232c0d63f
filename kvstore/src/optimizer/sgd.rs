//! SGD with optional momentum: MXNet's `multi_sgd_update` /
//! `multi_sgd_mom_update` kernel (what its default `Updater` runs for dense
//! arrays, aggregated or not), and `sgd_update` / `sgd_mom_update` (what it
//! runs for row-sparse gradients, row by row).

use super::mxparse::{param_f32, tuple_f32};
use super::real::{clip, Real};
use super::{steps_by_type, Optimizer, Rule, Step};

/// The kernel's parameters, already in the element type.
pub(crate) struct SgdArgs<T> {
    pub lr: T,
    pub wd: T,
    pub rescale: T,
    /// `Some` when MXNet clips (clip_gradient given, nonzero and ≥ 0).
    pub clip: Option<T>,
    pub momentum: T,
}

/// `MultiSGDKernel`: `mom = momentum*mom - lr*wd*w - lr*g'` (left to
/// right), `w += mom`; without momentum state `mom` starts at 0 each time.
pub(crate) fn multi<T: Real>(w: &mut [T], g: &[T], mom: Option<&mut [T]>, a: &SgdArgs<T>) {
    let step = |w: T, g: T, m: T| -> T {
        let grad_term = match a.clip {
            Some(c) => a.lr * clip(a.rescale * g, c),
            None => a.lr * a.rescale * g,
        };
        a.momentum * m - a.lr * a.wd * w - grad_term
    };
    match mom {
        Some(mom) => {
            for ((w, &g), m) in w.iter_mut().zip(g).zip(mom.iter_mut()) {
                *m = step(*w, g, *m);
                *w = *w + *m;
            }
        }
        None => {
            for (w, &g) in w.iter_mut().zip(g) {
                let m = step(*w, g, T::default());
                *w = *w + m;
            }
        }
    }
}

/// `SGDKernel` / `SGDMomKernel` (the single-array operators).
pub(crate) fn single<T: Real>(w: &mut [T], g: &[T], mom: Option<&mut [T]>, a: &SgdArgs<T>) {
    match mom {
        None => {
            let decay = T::ONE - a.lr * a.wd;
            for (w, &g) in w.iter_mut().zip(g) {
                *w = match a.clip {
                    Some(c) => decay * *w - a.lr * clip(a.rescale * g, c),
                    None => decay * *w - (a.lr * a.rescale) * g,
                };
            }
        }
        Some(mom) => {
            for ((w, &g), m) in w.iter_mut().zip(g).zip(mom.iter_mut()) {
                *m = match a.clip {
                    Some(c) => a.momentum * *m - a.lr * a.wd * *w - a.lr * clip(a.rescale * g, c),
                    None => a.momentum * *m - a.lr * a.wd * *w - a.lr * a.rescale * g,
                };
                *w = *w + *m;
            }
        }
    }
}

/// SGD's hyperparameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sgd {
    /// Momentum factor (0: no momentum state).
    pub momentum: f64,
}

impl Sgd {
    fn step<T: Real>(&self, s: &Step<'_>, w: &mut [T], g: &[T], mut bufs: Vec<&mut [T]>) {
        // Dense arrays go through multi_sgd (lr and wd as a correctly
        // rounded tuple); row-sparse ones through sgd_update (lr and wd as
        // dmlc-parsed floats).
        let dense = s.rows.is_none();
        let scalar = |x: f64| T::of_f32(if dense { tuple_f32(x) } else { param_f32(x) });
        let a = SgdArgs {
            lr: scalar(s.lr),
            wd: scalar(s.wd),
            rescale: s.rescale(),
            clip: s.kernel_clip(),
            momentum: T::of_f32(param_f32(self.momentum)),
        };
        s.each(w, g, &mut bufs, &mut |w, g, b| {
            let mom = b.first_mut().map(|m| &mut **m);
            if dense {
                multi(w, g, mom, &a)
            } else {
                single(w, g, mom, &a)
            }
        });
    }
}

impl Rule for Sgd {
    fn name(&self) -> &'static str {
        "sgd"
    }

    momentum_rule!();
    steps_by_type!();
}

/// The `Rule` methods of a method whose one hyperparameter is `momentum`
/// in [0, 1), with a state array when it is not 0 (SGD, NAG).
macro_rules! momentum_rule {
    () => {
        fn params(&self) -> Vec<(&'static str, f64)> {
            vec![("momentum", self.momentum)]
        }

        fn set(&mut self, name: &str, v: f64) -> bool {
            if name != "momentum" {
                return false;
            }
            self.momentum = v;
            true
        }

        fn out_of_range(&self, _: &Optimizer) -> Option<(&'static str, f64)> {
            // 1 or more diverges.
            (!(0.0..1.0).contains(&self.momentum))
                .then_some(("momentum (must be in [0, 1))", self.momentum))
        }

        fn state_arrays(&self) -> usize {
            (self.momentum != 0.0) as usize
        }
    };
}
pub(crate) use momentum_rule;
