//! Adam: MXNet's `adam_update` kernel. Weight decay joins the gradient
//! before clipping; bias correction is folded into the learning rate by the
//! caller (in f64, as MXNet's Python does); epsilon is not corrected.

use super::real::{clip, Real};

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
