//! SGD with optional momentum: MXNet's `multi_sgd_update` /
//! `multi_sgd_mom_update` kernel (what its default `Updater` runs for dense
//! arrays, aggregated or not), and `sgd_update` / `sgd_mom_update` (what it
//! runs for row-sparse gradients, row by row).

use super::real::{clip, Real};

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
