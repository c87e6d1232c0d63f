//! Nesterov momentum: MXNet's `nag_mom_update` kernel. Its last line reads
//! the weight after the update (the operator writes the weight in place),
//! and so does this one.

use super::mxparse::param_f32;
use super::real::{clip, Real};
use super::sgd::{momentum_rule, single, SgdArgs};
use super::{steps_by_type, Optimizer, Rule, Step};

/// The kernel's parameters, already in the element type.
pub(crate) struct NagArgs<T> {
    pub lr: T,
    pub wd: T,
    pub rescale: T,
    pub clip: Option<T>,
    pub momentum: T,
}

/// `m1 = mu*m; w' = (w - m1) + (mu+1)*(m1 - lr*(g' + wd*w));
/// m' = m1 - lr*(g' + wd*w')`.
pub(crate) fn update<T: Real>(w: &mut [T], g: &[T], mom: &mut [T], a: &NagArgs<T>) {
    for ((w, &g), m) in w.iter_mut().zip(g).zip(mom.iter_mut()) {
        let gc = match a.clip {
            Some(c) => clip(a.rescale * g, c),
            None => a.rescale * g,
        };
        let m1 = a.momentum * *m;
        *w = *w - m1 + (a.momentum + T::ONE) * (m1 - a.lr * (gc + a.wd * *w));
        *m = m1 - a.lr * (gc + a.wd * *w);
    }
}

/// NAG's hyperparameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Nag {
    /// Momentum factor (0: plain SGD, as in MXNet).
    pub momentum: f64,
}

impl Nag {
    fn step<T: Real>(&self, s: &Step<'_>, w: &mut [T], g: &[T], mut bufs: Vec<&mut [T]>) {
        let (lr, wd) = (T::of_f32(param_f32(s.lr)), T::of_f32(param_f32(s.wd)));
        if self.momentum == 0.0 {
            let a = SgdArgs {
                lr,
                wd,
                rescale: s.rescale(),
                clip: s.kernel_clip(),
                momentum: T::default(),
            };
            s.each(w, g, &mut bufs, &mut |w, g, _| single(w, g, None, &a));
        } else {
            let a = NagArgs {
                lr,
                wd,
                rescale: s.rescale(),
                clip: s.kernel_clip(),
                momentum: T::of_f32(param_f32(self.momentum)),
            };
            s.each(w, g, &mut bufs, &mut |w, g, b| update(w, g, b[0], &a));
        }
    }
}

impl Rule for Nag {
    fn name(&self) -> &'static str {
        "nag"
    }

    momentum_rule!();
    steps_by_type!();
}
