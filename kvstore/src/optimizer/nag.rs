//! Nesterov momentum: MXNet's `nag_mom_update` kernel. Its last line reads
//! the weight after the update (the operator writes the weight in place),
//! and so does this one.

use super::real::{clip, Real};

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
