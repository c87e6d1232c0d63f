//! An update: the optimizer's rate and decay for a key now, the checks of
//! weight, gradient and state, and one method's step over the whole arrays
//! or the rows a row-sparse gradient names (f16 weights through f32).

use half::f16;

use super::real::Real;
use super::state::{GradRef, OptState, WeightMut};
use super::{param_f32, Optimizer};
use crate::error::{KvError, Result};

/// What a method's step gets from the optimizer: the key's rate and decay
/// now, its update count, gradient rescaling and clipping, and which rows.
pub(super) struct Step<'a> {
    /// The learning rate (schedule and multiplier applied).
    pub(super) lr: f64,
    /// The weight decay (multiplier applied).
    pub(super) wd: f64,
    /// The key's update count, this update included.
    pub(super) t: u64,
    pub(super) rescale_grad: f64,
    pub(super) clip_gradient: Option<f64>,
    /// The rows updated (row ids, row length), or all.
    pub(super) rows: Option<(&'a [i64], usize)>,
}

impl Step<'_> {
    /// MXNet's `if self.clip_gradient:` for the fused kernels, then the
    /// kernel's own `clip_gradient >= 0`.
    pub(super) fn kernel_clip<T: Real>(&self) -> Option<T> {
        let c = self.clip_gradient.filter(|c| *c != 0.0)?;
        let c = param_f32(c);
        (c >= 0.0).then(|| T::of_f32(c))
    }

    /// `rescale_grad` as a kernel parameter.
    pub(super) fn rescale<T: Real>(&self) -> T {
        T::of_f32(param_f32(self.rescale_grad))
    }

    /// Runs `f` on the whole arrays, or row by row.
    pub(super) fn each<T: Real>(
        &self,
        w: &mut [T],
        g: &[T],
        bufs: &mut [&mut [T]],
        f: &mut RowFn<'_, T>,
    ) {
        match self.rows {
            None => f(w, g, bufs),
            Some((r, rl)) => {
                for (i, &row) in r.iter().enumerate() {
                    let s = row as usize * rl;
                    let mut sub: Vec<&mut [T]> =
                        bufs.iter_mut().map(|b| &mut b[s..s + rl]).collect();
                    f(&mut w[s..s + rl], &g[i * rl..(i + 1) * rl], &mut sub);
                }
            }
        }
    }
}

/// A kernel applied to weights, gradient and state arrays (whole, or one
/// row of each).
type RowFn<'a, T> = dyn FnMut(&mut [T], &[T], &mut [&mut [T]]) + 'a;

impl Optimizer {
    /// The key's rate when `num_update` is this (MXNet's `_get_lr`).
    fn lr_of(&self, key: u64, num_update: u64) -> f64 {
        let base = match &self.lr_scheduler {
            None => self.learning_rate,
            Some(s) => s.lr(
                num_update,
                self.learning_rate,
                self.begin_num_update,
                &mut self.progress.memo.lock(),
            ),
        };
        base * self.lr_mult.get(&key).copied().unwrap_or(1.0)
    }

    fn wd_of(&self, key: u64) -> f64 {
        self.wd * self.wd_mult.get(&key).copied().unwrap_or(1.0)
    }

    /// How many state arrays the method keeps per key.
    pub(super) fn state_arrays(&self) -> usize {
        self.method.rule().state_arrays()
    }

    /// Updates `weight` with `grad` (dense, same length) and the key's state.
    pub fn update(
        &self,
        key: u64,
        weight: WeightMut<'_>,
        grad: GradRef<'_>,
        state: &mut Option<OptState>,
    ) -> Result<()> {
        self.update_any(key, weight, grad, None, state)
    }

    /// Updates the rows of `weight` (dense, `row_len` elements per row) that
    /// `rows` names, with `grad` holding those rows' gradients packed (a
    /// row-sparse gradient): MXNet's lazy update. Rows not named keep their
    /// weights and state.
    pub fn update_rows(
        &self,
        key: u64,
        weight: WeightMut<'_>,
        rows: &[i64],
        row_len: usize,
        grad: GradRef<'_>,
        state: &mut Option<OptState>,
    ) -> Result<()> {
        self.update_any(key, weight, grad, Some((rows, row_len)), state)
    }

    fn update_any(
        &self,
        key: u64,
        weight: WeightMut<'_>,
        grad: GradRef<'_>,
        rows: Option<(&[i64], usize)>,
        state: &mut Option<OptState>,
    ) -> Result<()> {
        let n = weight.len();
        let want_grad = match rows {
            None => n,
            Some((r, rl)) => {
                if let Some(&bad) = r.iter().find(|&&x| x < 0 || (x as usize + 1) * rl > n) {
                    return Err(KvError::invalid(format!(
                        "row {bad} is outside the {} rows of the weight",
                        n.checked_div(rl).unwrap_or(0)
                    )));
                }
                r.len() * rl
            }
        };
        if grad.len() != want_grad {
            return Err(KvError::invalid(format!(
                "the gradient has {} elements, the update needs {want_grad}",
                grad.len()
            )));
        }
        let st = state.get_or_insert_with(|| OptState::new(self, &weight));
        if st.count == self.begin_num_update && st.bufs.len() != self.state_arrays() {
            *st = OptState::new(self, &weight);
        }
        st.check(self, &weight)?;
        match (weight, grad) {
            (WeightMut::F32(w), GradRef::F32(g)) => {
                let t = st.count + 1;
                let bufs = st.bufs_f32()?;
                self.method
                    .rule()
                    .step_f32(&self.step_of(key, t, rows), w, g, bufs);
                st.count = t;
            }
            (WeightMut::F64(w), GradRef::F64(g)) => {
                let t = st.count + 1;
                let bufs = st.bufs_f64()?;
                self.method
                    .rule()
                    .step_f64(&self.step_of(key, t, rows), w, g, bufs);
                st.count = t;
            }
            (WeightMut::F16(w), GradRef::F16(g)) => {
                let g32: Vec<f32> = g.iter().map(|x| x.to_f32()).collect();
                let mut master = match st.master.take() {
                    Some(m) => m,
                    None => w.iter().map(|x| x.to_f32()).collect(),
                };
                let t = st.count + 1;
                let bufs = st.bufs_f32()?;
                self.method
                    .rule()
                    .step_f32(&self.step_of(key, t, rows), &mut master, &g32, bufs);
                st.count = t;
                match rows {
                    None => {
                        for (w, m) in w.iter_mut().zip(&master) {
                            *w = f16::from_f32(*m);
                        }
                    }
                    Some((r, rl)) => {
                        for &row in r {
                            let s = row as usize * rl;
                            for i in s..s + rl {
                                w[i] = f16::from_f32(master[i]);
                            }
                        }
                    }
                }
                if self.multi_precision {
                    st.master = Some(master);
                }
            }
            (w, g) => {
                return Err(KvError::invalid(format!(
                    "the weight is {} but the gradient {}",
                    w.dtype_name(),
                    g.dtype_name()
                )))
            }
        }
        Ok(())
    }

    /// The step of one update: `t` is the key's update count, already
    /// incremented (MXNet's `_update_count` runs before the learning rate
    /// is read).
    fn step_of<'a>(&self, key: u64, t: u64, rows: Option<(&'a [i64], usize)>) -> Step<'a> {
        Step {
            lr: self.lr_of(key, self.progress.observe(t)),
            wd: self.wd_of(key),
            t,
            rescale_grad: self.rescale_grad,
            clip_gradient: self.clip_gradient,
            rows,
        }
    }
}
