//! AdaGrad: MXNet 1.9.1 runs the dense update as NDArray arithmetic in
//! Python, one rounded operation at a time; this replays those operations.
//! Epsilon sits inside the square root; the history starts at zero.

use super::real::Real;

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
