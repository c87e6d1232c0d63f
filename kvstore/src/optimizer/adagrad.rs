//! AdaGrad: MXNet 1.9.1 runs the dense update as NDArray arithmetic in
//! Python, one rounded operation at a time; this replays those operations.
//! Epsilon sits inside the square root; the history starts at zero.

use super::mxparse::param_f32;
use super::real::Real;
use super::{scalar_of, steps_by_type, Optimizer, Rule, Step};

/// The scalars of the NDArray operations, already in the element type.
pub(crate) struct AdaGradArgs<T> {
    pub rescale: T,
    /// `clip(grad, -c, c)` when clip_gradient is not None.
    pub clip: Option<(T, T)>,
    pub epsilon: T,
    pub wd: T,
    pub neg_lr: T,
}

/// `g = clip(g*rs); h += g*g; d = g / sqrt(h + eps); w += (d + w*wd) * -lr`.
pub(crate) fn update<T: Real>(w: &mut [T], g: &[T], hist: &mut [T], a: &AdaGradArgs<T>) {
    for ((w, &g), h) in w.iter_mut().zip(g).zip(hist.iter_mut()) {
        let mut gr = g * a.rescale;
        if let Some((lo, hi)) = a.clip {
            // NDArray `clip(x, a_min, a_max)`.
            gr = if gr < lo {
                lo
            } else if gr > hi {
                hi
            } else {
                gr
            };
        }
        *h = *h + gr * gr;
        let d = gr / (*h + a.epsilon).sqrt();
        *w = *w + (d + *w * a.wd) * a.neg_lr;
    }
}

/// AdaGrad's hyperparameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdaGrad {
    /// Added inside the square root.
    pub epsilon: f64,
}

impl AdaGrad {
    fn step<T: Real>(&self, s: &Step<'_>, w: &mut [T], g: &[T], mut bufs: Vec<&mut [T]>) {
        let sc = |x: f64| T::of_f64(scalar_of::<T>(x));
        let a = AdaGradArgs {
            rescale: sc(s.rescale_grad),
            clip: s
                .clip_gradient
                .map(|c| (T::of_f32(param_f32(-c)), T::of_f32(param_f32(c)))),
            epsilon: sc(self.epsilon),
            wd: sc(s.wd),
            neg_lr: sc(-s.lr),
        };
        s.each(w, g, &mut bufs, &mut |w, g, b| update(w, g, b[0], &a));
    }
}

impl Rule for AdaGrad {
    fn name(&self) -> &'static str {
        "adagrad"
    }

    fn params(&self) -> Vec<(&'static str, f64)> {
        vec![("epsilon", self.epsilon)]
    }

    fn set(&mut self, name: &str, v: f64) -> bool {
        match name {
            "epsilon" | "eps" => self.epsilon = v,
            _ => return false,
        }
        true
    }

    fn out_of_range(&self, opt: &Optimizer) -> Option<(&'static str, f64)> {
        if let Some(c) = opt.clip_gradient.filter(|c| *c < 0.0) {
            return Some(("clip_gradient (AdaGrad clips to [-c, c])", c));
        }
        (self.epsilon <= 0.0).then_some(("epsilon (must be above 0)", self.epsilon))
    }

    fn state_arrays(&self) -> usize {
        1
    }

    steps_by_type!();
}
