//! One ps key on a server: its stored value, optimizer state, and the
//! round of pushes being summed.
//!
//! # States of a round (sync mode)
//!
//! A round collects one push from each of the `W` workers. Pushes arrive
//! in any order; they are **folded in rank order**: a push from rank `r`
//! waits in `pending[r]` until ranks `0..r` are folded, so the sum is
//! `((g0 + g1) + g2) + ...` whatever the arrival order, and a run is
//! bit-reproducible (MXNet adds in arrival order). When rank `W-1` is
//! folded the round completes: the optimizer runs once on the sum (or the
//! sum becomes the stored value), then every waiting push (and push-pull)
//! is answered, and the round starts over.
//!
//! All of this runs inside engine ops that write the entry's var, so one
//! op at a time touches an entry; the mutex around the state is never
//! contended and only satisfies the type system.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use half::f16;
use pskv_gpu::cpu::CpuKernels;

use crate::compression::Compression;
use crate::dtype::DType;
use crate::tensor::{share, Buf};
use crate::updater::{KeyState, Rule};
use crate::wire::{split_rows, Head, Op};

/// How a waiting request is answered: with nothing (a push), the stored
/// value (a push-pull), or an error.
pub(crate) type Answer = Box<dyn FnOnce(Result<Option<Bytes>, String>) + Send>;

/// A push waiting for its turn in the fold.
struct Arrival {
    head: Head,
    vals: Bytes,
    answer: Answer,
}

/// The running sum of a round: f32 for f32 and f16 keys (f16 is summed in
/// f32 and rounded once), f64, i32, i64.
enum Acc {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

impl Acc {
    fn zeros(dtype: DType, n: usize) -> Acc {
        match dtype {
            DType::F32 | DType::F16 => Acc::F32(vec![0.0; n]),
            DType::F64 => Acc::F64(vec![0.0; n]),
            DType::I32 => Acc::I32(vec![0; n]),
            DType::I64 => Acc::I64(vec![0; n]),
        }
    }
}

/// Reads little-endian elements that may not be aligned.
fn elems<T: bytemuck::Pod>(b: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(b) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(
            b.chunks_exact(std::mem::size_of::<T>())
                .map(bytemuck::pod_read_unaligned)
                .collect(),
        ),
    }
}

/// `acc[range] = v` (first) or `acc[range] += v`, for `v` of `dtype`.
fn fold_into(acc: &mut Acc, at: usize, dtype: DType, v: &[u8], first: bool) {
    macro_rules! fold {
        ($a:expr, $src:expr, $add:expr) => {{
            let a = &mut $a[at..at + $src.len()];
            if first {
                a.copy_from_slice(&$src);
            } else {
                for (x, y) in a.iter_mut().zip($src.iter()) {
                    $add(x, *y);
                }
            }
        }};
    }
    match (acc, dtype) {
        (Acc::F32(a), DType::F32) => fold!(a, elems::<f32>(v), |x: &mut f32, y| *x += y),
        (Acc::F32(a), DType::F16) => {
            let src: Vec<f32> = elems::<f16>(v).iter().map(|h| h.to_f32()).collect();
            fold!(a, src, |x: &mut f32, y| *x += y)
        }
        (Acc::F64(a), _) => fold!(a, elems::<f64>(v), |x: &mut f64, y| *x += y),
        (Acc::I32(a), _) => fold!(a, elems::<i32>(v), |x: &mut i32, y: i32| *x =
            x.wrapping_add(y)),
        (Acc::I64(a), _) => fold!(a, elems::<i64>(v), |x: &mut i64, y: i64| *x =
            x.wrapping_add(y)),
        (Acc::F32(_), _) => unreachable!("an f32 sum holds f32 and f16 keys only"),
    }
}

/// One ps key.
pub(crate) struct EntryState {
    pub(crate) key_id: u64,
    pub(crate) part: u64,
    pub(crate) dtype: DType,
    /// Elements of this part.
    pub(crate) elems: usize,
    /// The stored value, in `dtype` (shared with answers in flight: it is
    /// replaced, never changed in place, while shared).
    pub(crate) value: Arc<Buf>,
    /// f32 master weights of an f16 key with multi-precision.
    pub(crate) master: Option<Vec<f32>>,
    pub(crate) opt: KeyState,
    workers: usize,
    pending: Vec<Option<Arrival>>,
    next: usize,
    acc: Option<Acc>,
    /// Rows touched in this round (row pushes), as a flag per row.
    touched: Option<(usize, Vec<bool>)>,
    waiters: Vec<(Answer, bool)>,
    round_sync: Option<bool>,
}

impl EntryState {
    pub(crate) fn new(key_id: u64, part: u64, dtype: DType, value: &[u8], workers: usize) -> Self {
        EntryState {
            key_id,
            part,
            dtype,
            elems: value.len() / dtype.size(),
            value: Arc::new(Buf::from_bytes(value)),
            master: None,
            opt: KeyState::default(),
            workers,
            pending: (0..workers).map(|_| None).collect(),
            next: 0,
            acc: None,
            touched: None,
            waiters: Vec::new(),
            round_sync: None,
        }
    }

    pub(crate) fn name(&self) -> String {
        format!("key id {} part {}", self.key_id, self.part)
    }

    /// The stored value, shared without a copy.
    pub(crate) fn snapshot(&self) -> Bytes {
        share(&self.value, 0..self.value.len())
    }

    /// The stored value's bytes, to overwrite or change (a copy first if
    /// an answer in flight shares them).
    fn value_mut(&mut self, keep: bool) -> &mut [u8] {
        if Arc::get_mut(&mut self.value).is_none() {
            self.value = Arc::new(if keep {
                Buf::from_bytes(self.value.bytes())
            } else {
                Buf::zeroed(self.value.len())
            });
        }
        Arc::get_mut(&mut self.value)
            .expect("made unique above")
            .bytes_mut()
    }

    /// Checks a push against the key and the round; an error is for the
    /// pusher only (the round goes on without it).
    fn check_push(&self, head: &Head, vals: &[u8], rank: usize) -> Result<(), String> {
        if head.dtype != self.dtype {
            return Err(format!(
                "{}: pushed {} but the key holds {}",
                self.name(),
                head.dtype,
                self.dtype
            ));
        }
        if rank >= self.workers {
            return Err(format!(
                "{}: a push from worker rank {rank}, but the cluster has {} workers",
                self.name(),
                self.workers
            ));
        }
        if head.compression != 0 {
            if self.dtype != DType::F32 {
                return Err(format!(
                    "{}: compressed push to a {} key (compression takes f32 only)",
                    self.name(),
                    self.dtype
                ));
            }
        } else if head.op != Op::RowPush && vals.len() != self.value.len() {
            return Err(format!(
                "{}: pushed {} bytes ({} elements) but the key holds {} bytes ({} elements)",
                self.name(),
                vals.len(),
                vals.len() / self.dtype.size(),
                self.value.len(),
                self.elems
            ));
        }
        if let Some(sync) = self.round_sync {
            if sync != head.sync {
                return Err(format!(
                    "{}: a {} push arrived during a {} round: every worker must use one mode",
                    self.name(),
                    if head.sync { "sync" } else { "async" },
                    if sync { "sync" } else { "async" }
                ));
            }
        }
        if head.sync && (self.pending[rank].is_some() || rank < self.next) {
            return Err(format!(
                "{}: worker {rank} pushed twice in one round",
                self.name()
            ));
        }
        Ok(())
    }

    /// Takes a push (or push-pull) from worker `rank`.
    pub(crate) fn push(
        &mut self,
        k: &CpuKernels,
        rule: Option<&Rule>,
        head: Head,
        vals: Bytes,
        rank: usize,
        answer: Answer,
    ) {
        if let Err(e) = self.check_push(&head, &vals, rank) {
            answer(Err(e));
            return;
        }
        if !head.sync {
            // Async: apply this push alone, now.
            self.round_sync = Some(false);
            let pull = head.op == Op::PushPull;
            if let Err(e) = self.fold(k, &head, &vals, true) {
                self.reset_round();
                answer(Err(e));
                return;
            }
            self.waiters.push((answer, pull));
            self.complete(rule, false);
            return;
        }
        self.round_sync = Some(true);
        self.pending[rank] = Some(Arrival { head, vals, answer });
        while self.next < self.workers {
            let Some(a) = self.pending[self.next].take() else {
                return;
            };
            let first = self.next == 0;
            self.next += 1;
            match self.fold(k, &a.head, &a.vals, first) {
                Ok(()) => self.waiters.push((a.answer, a.head.op == Op::PushPull)),
                Err(e) => {
                    // A malformed push: the round cannot be summed.
                    (a.answer)(Err(e.clone()));
                    self.fail_round(&format!("the round was abandoned: {e}"));
                    return;
                }
            }
        }
        self.complete(rule, true);
    }

    /// Adds one push to the round's sum.
    fn fold(
        &mut self,
        k: &CpuKernels,
        head: &Head,
        vals: &[u8],
        first: bool,
    ) -> Result<(), String> {
        let n = self.elems;
        let dtype = self.dtype;
        if first {
            self.acc = Some(Acc::zeros(dtype, n));
            self.touched = None;
        }
        let acc = self.acc.as_mut().expect("made by the first push");
        if head.op == Op::RowPush {
            let (h, data) = split_rows(vals)?;
            if n % h.row_len != 0 {
                return Err(format!(
                    "key id {} part {}: rows of {} elements do not divide its {n} elements",
                    self.key_id, self.part, h.row_len
                ));
            }
            let nrows = n / h.row_len;
            let rb = h.row_len * dtype.size();
            if data.len() != h.rows.len() * rb {
                return Err(format!(
                    "{} rows of {} bytes need {} bytes, got {}",
                    h.rows.len(),
                    rb,
                    h.rows.len() * rb,
                    data.len()
                ));
            }
            let touched = &mut self
                .touched
                .get_or_insert_with(|| (h.row_len, vec![false; nrows]))
                .1;
            for (i, &r) in h.rows.iter().enumerate() {
                if r < 0 || r as usize >= nrows {
                    return Err(format!("row {r} is outside the part's {nrows} rows"));
                }
                let r = r as usize;
                let first_touch = !touched[r];
                touched[r] = true;
                fold_into(
                    acc,
                    r * h.row_len,
                    dtype,
                    &data[i * rb..(i + 1) * rb],
                    first_touch,
                );
            }
            return Ok(());
        }
        if head.compression != 0 {
            let Acc::F32(a) = acc else {
                return Err("a compressed push to a key that is not f32".into());
            };
            return Compression::decode(head.compression, k, vals, a, !first);
        }
        fold_into(acc, 0, dtype, vals, first);
        Ok(())
    }

    /// Ends a round: the update (or the sum becomes the value), then the
    /// answers.
    fn complete(&mut self, rule: Option<&Rule>, sync: bool) {
        let acc = self.acc.take().expect("a round has a sum");
        let touched = self.touched.take();
        let result = self.apply(rule, acc, touched, sync);
        let waiters = std::mem::take(&mut self.waiters);
        self.reset_round();
        match result {
            Ok(()) => {
                let snap = waiters
                    .iter()
                    .any(|(_, pull)| *pull)
                    .then(|| self.snapshot());
                for (answer, pull) in waiters {
                    answer(Ok(if pull { snap.clone() } else { None }));
                }
            }
            Err(e) => {
                for (answer, _) in waiters {
                    answer(Err(e.clone()));
                }
            }
        }
    }

    fn reset_round(&mut self) {
        self.next = 0;
        self.acc = None;
        self.touched = None;
        self.round_sync = None;
        for p in &mut self.pending {
            debug_assert!(p.is_none());
            *p = None;
        }
    }

    /// Answers every push of the round with an error and starts over.
    fn fail_round(&mut self, msg: &str) {
        for (answer, _) in std::mem::take(&mut self.waiters) {
            answer(Err(msg.to_string()));
        }
        for p in &mut self.pending {
            if let Some(a) = p.take() {
                (a.answer)(Err(msg.to_string()));
            }
        }
        self.reset_round();
    }

    /// Applies the round's sum to the stored value.
    fn apply(
        &mut self,
        rule: Option<&Rule>,
        acc: Acc,
        touched: Option<(usize, Vec<bool>)>,
        sync: bool,
    ) -> Result<(), String> {
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
            write_sum(out, dtype, &acc, !sync);
            return Ok(());
        };
        // Multipliers are by key id, which the server knows.
        let id = self.key_id;
        let shape = [self.elems];
        match (&acc, self.dtype) {
            (Acc::F32(sum), DType::F16) if self.opt_multi_precision(rule) => {
                // f32 master weights, updated with the f32 sum.
                let master = self.master.get_or_insert_with(|| {
                    elems::<f16>(self.value.bytes())
                        .iter()
                        .map(|h| h.to_f32())
                        .collect()
                });
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
                let mut grad = vec![0u8; self.value.len()];
                write_sum(&mut grad, dtype, &acc, false);
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

    fn opt_multi_precision(&self, rule: &Rule) -> bool {
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

/// Writes (or adds, for async summation) a sum into value bytes of `dtype`.
fn write_sum(out: &mut [u8], dtype: DType, acc: &Acc, add: bool) {
    match (acc, dtype) {
        (Acc::F32(a), DType::F32) => {
            let o: &mut [f32] = bytemuck::cast_slice_mut(out);
            if add {
                o.iter_mut().zip(a).for_each(|(x, y)| *x += *y);
            } else {
                o.copy_from_slice(a);
            }
        }
        (Acc::F32(a), DType::F16) => {
            let o: &mut [f16] = bytemuck::cast_slice_mut(out);
            for (x, y) in o.iter_mut().zip(a) {
                *x = if add {
                    f16::from_f32(x.to_f32() + *y)
                } else {
                    f16::from_f32(*y)
                };
            }
        }
        (Acc::F64(a), _) => {
            let o: &mut [f64] = bytemuck::cast_slice_mut(out);
            if add {
                o.iter_mut().zip(a).for_each(|(x, y)| *x += *y);
            } else {
                o.copy_from_slice(a);
            }
        }
        (Acc::I32(a), _) => {
            let o: &mut [i32] = bytemuck::cast_slice_mut(out);
            if add {
                o.iter_mut()
                    .zip(a)
                    .for_each(|(x, y)| *x = x.wrapping_add(*y));
            } else {
                o.copy_from_slice(a);
            }
        }
        (Acc::I64(a), _) => {
            let o: &mut [i64] = bytemuck::cast_slice_mut(out);
            if add {
                o.iter_mut()
                    .zip(a)
                    .for_each(|(x, y)| *x = x.wrapping_add(*y));
            } else {
                o.copy_from_slice(a);
            }
        }
        (Acc::F32(_), _) => unreachable!("an f32 sum holds f32 and f16 keys only"),
    }
}
