//! Adam: MXNet's `adam_update` kernel. Weight decay joins the gradient
//! before clipping; bias correction is folded into the learning rate by the
//! caller (in f64, as MXNet's Python does); epsilon is not corrected.

use super::mxparse::param_f32;
use super::real::{clip, Real};
use super::{steps_by_type, Optimizer, Rule, Step};

/// The kernel's parameters, already in the element type.
pub(crate) struct AdamArgs<T> {
    /// The bias-corrected step size.
    pub lr: T,
    pub wd: T,
    pub rescale: T,
    pub clip: Option<T>,
    pub beta1: T,
    pub beta2: T,
    pub epsilon: T,
}

/// `g' = clip(g*rs + w*wd); m = b1*m + (1-b1)*g'; v = b2*v + (1-b2)*g'*g';
/// w -= lr*m / (sqrt(v) + eps)`.
pub(crate) fn update<T: Real>(
    w: &mut [T],
    g: &[T],
    mean: &mut [T],
    var: &mut [T],
    a: &AdamArgs<T>,
) {
    for (((w, &g), m), v) in w.iter_mut().zip(g).zip(mean.iter_mut()).zip(var.iter_mut()) {
        let mut gr = g * a.rescale + *w * a.wd;
        if let Some(c) = a.clip {
            gr = clip(gr, c);
        }
        *m = a.beta1 * *m + (T::ONE - a.beta1) * gr;
        *v = a.beta2 * *v + (T::ONE - a.beta2) * gr * gr;
        *w = *w - a.lr * *m / ((*v).sqrt() + a.epsilon);
    }
}

/// Adam's hyperparameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Adam {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub epsilon: f64,
}

impl Adam {
    fn step<T: Real>(&self, s: &Step<'_>, w: &mut [T], g: &[T], mut bufs: Vec<&mut [T]>) {
        // Python: coef1 = 1 - beta1**t; coef2 = 1 - beta2**t;
        // lr *= sqrt(coef2)/coef1, all in f64.
        let tf = s.t as f64;
        let coef1 = 1.0 - self.beta1.powf(tf);
        let coef2 = 1.0 - self.beta2.powf(tf);
        let lr_t = s.lr * (coef2.sqrt() / coef1);
        let a = AdamArgs {
            lr: T::of_f32(param_f32(lr_t)),
            wd: T::of_f32(param_f32(s.wd)),
            rescale: s.rescale(),
            clip: s.kernel_clip(),
            beta1: T::of_f32(param_f32(self.beta1)),
            beta2: T::of_f32(param_f32(self.beta2)),
            epsilon: T::of_f32(param_f32(self.epsilon)),
        };
        s.each(w, g, &mut bufs, &mut |w, g, b| {
            let (m, v) = b.split_at_mut(1);
            update(w, g, m[0], v[0], &a)
        });
    }
}

impl Rule for Adam {
    fn name(&self) -> &'static str {
        "adam"
    }

    fn params(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("epsilon", self.epsilon),
        ]
    }

    fn set(&mut self, name: &str, v: f64) -> bool {
        match name {
            "beta1" => self.beta1 = v,
            "beta2" => self.beta2 = v,
            "epsilon" | "eps" => self.epsilon = v,
            _ => return false,
        }
        true
    }

    fn out_of_range(&self, _: &Optimizer) -> Option<(&'static str, f64)> {
        if !(0.0..1.0).contains(&self.beta1) {
            return Some(("beta1", self.beta1));
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return Some(("beta2", self.beta2));
        }
        (self.epsilon <= 0.0).then_some(("epsilon (must be above 0)", self.epsilon))
    }

    fn state_arrays(&self) -> usize {
        2
    }

    steps_by_type!();
}
