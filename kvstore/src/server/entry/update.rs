//! A completed round's sum applied to the stored value: replaced by the sum
//! (sync rounds) or added to (async pushes) without a rule; else the
//! rule's step (an optimizer, or a custom updater) on the gradient, with
//! f32 master weights for an f16 key with multi-precision, and only the
//! touched rows for row pushes.

use std::borrow::Cow;

use half::f16;

use super::EntryState;
use crate::comm::elems;
use crate::dtype::DType;
use crate::error::Fault;
use crate::server::acc::{write_sum, Acc};
use crate::updater::Rule;

impl EntryState {
    /// Applies the round's sum to the stored value.
    pub(super) fn apply(
        &mut self,
        rule: Option<&Rule>,
        acc: &Acc,
        touched: Option<(usize, Vec<bool>)>,
        sync: bool,
    ) -> Result<(), Fault> {
        let rows: Option<(usize, Vec<i64>)> = touched.map(|(rl, t)| {
            (
                rl,
                t.iter()
                    .enumerate()
                    .filter(|(_, x)| **x)
                    .map(|(i, _)| i as i64)
                    .collect(),
            )
        });
        let Some(rule) = rule else {
            // Summation only: sync rounds replace the value with the sum
            // (untouched rows are zero); async pushes add to it.
            let dtype = self.dtype;
            let keep = !sync;
            let out = self.value_mut(keep);
            write_sum(out, dtype, acc, !sync);
            return Ok(());
        };
        // Multipliers are by key id, which the server knows.
        let id = self.key_id;
        let shape = [self.elems];
        match (acc, self.dtype) {
            (Acc::F32(sum), DType::F16) if self.opt_multi_precision(rule) => {
                // f32 master weights, updated with the f32 sum.
                if self.master.is_none() {
                    let m = elems::<f16>(self.value_bytes())
                        .iter()
                        .map(|h| h.to_f32())
                        .collect();
                    self.master = Some(m);
                }
                let master = self.master.as_mut().expect("made above");
                let (g, r) = grad_rows(bytemuck::cast_slice(sum), &rows, 4);
                let mut mstate = std::mem::take(&mut self.opt);
                let res = rule.apply(
                    id,
                    None,
                    DType::F32,
                    &row_shape(&shape, &rows),
                    &g,
                    r.as_deref(),
                    bytemuck::cast_slice_mut(master),
                    &mut mstate,
                );
                self.opt = mstate;
                res?;
                let m: Vec<f16> = self
                    .master
                    .as_ref()
                    .expect("set above")
                    .iter()
                    .map(|x| f16::from_f32(*x))
                    .collect();
                self.value_mut(false)
                    .copy_from_slice(bytemuck::cast_slice(&m));
                Ok(())
            }
            _ => {
                let dtype = self.dtype;
                let mut grad = vec![0u8; self.nbytes];
                write_sum(&mut grad, dtype, acc, false);
                let (g, r) = grad_rows(&grad, &rows, dtype.size());
                let mut st = std::mem::take(&mut self.opt);
                let sh = row_shape(&shape, &rows);
                let res = rule.apply(
                    id,
                    None,
                    dtype,
                    &sh,
                    &g,
                    r.as_deref(),
                    self.value_mut(true),
                    &mut st,
                );
                self.opt = st;
                res
            }
        }
    }

    pub(super) fn opt_multi_precision(&self, rule: &Rule) -> bool {
        matches!(rule, Rule::Optimizer { opt, .. } if opt.multi_precision)
    }
}

/// The shape an updater sees: rows of `row_len` for row pushes.
fn row_shape(shape: &[usize; 1], rows: &Option<(usize, Vec<i64>)>) -> Vec<usize> {
    match rows {
        Some((rl, _)) => vec![shape[0] / rl, *rl],
        None => shape.to_vec(),
    }
}

/// The gradient bytes for the update: all of them, or the touched rows'
/// packed (with the row ids).
fn grad_rows<'a>(
    grad: &'a [u8],
    rows: &Option<(usize, Vec<i64>)>,
    size: usize,
) -> (Cow<'a, [u8]>, Option<Vec<i64>>) {
    match rows {
        None => (Cow::Borrowed(grad), None),
        Some((rl, r)) => {
            let rb = rl * size;
            let mut g = Vec::with_capacity(r.len() * rb);
            for &row in r {
                let row = row as usize;
                g.extend_from_slice(&grad[row * rb..(row + 1) * rb]);
            }
            (Cow::Owned(g), Some(r.clone()))
        }
    }
}
