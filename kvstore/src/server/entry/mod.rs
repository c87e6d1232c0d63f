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
//! is answered, and the round starts over. A push of a rank that already
//! pushed in this round takes the first one's place (a worker sends a push
//! again only when the first one's answer was lost): in `pending`, or, if
//! the first is in the sum already, among the answers only.
//!
//! All of this runs inside engine ops that write the entry's var, so one
//! op at a time touches an entry. The mutex around the state is taken
//! outside ops only briefly: by commands (optimizer states), checkpoints,
//! copies from a primary, a worker's death, shutdown, a request's size
//! lookup on the I/O thread, the gates' closing and, never waiting for
//! it, the count of the rounds summed at the gate for the round log
//! (`Server`'s refresh, at each status snapshot).
//!
//! Rooms: this file is the entry's state and its rounds (a push taken,
//! folded, the round completed and answered); `cut_short.rs` rounds that
//! end without completing (failed, a push given way to its retry, or
//! learned done from the workers' count after a restart); `segment.rs`
//! the shared segment of the co-located fast path (made at a worker's
//! check, read for its pushes, its file removed once nobody will map it,
//! its gate closed and its rounds counted); `value.rs` the stored value
//! (its own buffer, or the segment's value slot); `update.rs` a completed
//! round's sum applied to the stored value (the optimizer's step, or the
//! sum becoming the value).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use pskv_gpu::cpu::CpuKernels;
use pskv_transport::Region;
use smallvec::SmallVec;

use super::acc::{fold_into, Acc};
use crate::comm::sum_dense;
use crate::compression::Compression;
use crate::dtype::DType;
use crate::error::Fault;
use crate::gate::Gate;
use crate::tensor::Buf;
use crate::updater::{KeyState, Rule};
use crate::wire::{split_rows, Head, Op};

mod cut_short;
mod segment;
mod update;
mod value;

/// How a waiting request is answered: with nothing (a push), the stored
/// value (a push-pull), or an error.
pub(crate) type Answer = Box<dyn FnOnce(Result<Option<Bytes>, Fault>) + Send>;

/// What a waiting request wants back when its round completes.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Want {
    /// Nothing (a push).
    Nothing,
    /// The new value (a push-pull).
    Value,
    /// Word that the new value is in the value slot (a shared-memory
    /// push-pull).
    Slot,
}

impl Want {
    fn of(head: &Head) -> Want {
        match (head.op, head.shm) {
            (Op::PushPull, false) => Want::Value,
            (Op::PushPull, true) => Want::Slot,
            _ => Want::Nothing,
        }
    }
}

/// A round's pushes, in rank order (inline for up to 4 workers: no
/// allocation per round).
type Arrivals = SmallVec<[Arrival; 4]>;

/// A push waiting for its round.
struct Arrival {
    head: Head,
    vals: Bytes,
    answer: Answer,
}

/// One ps key.
pub(crate) struct EntryState {
    pub(crate) key_id: u64,
    pub(crate) part: u64,
    pub(crate) dtype: DType,
    /// Elements of this part.
    pub(crate) elems: usize,
    /// The stored value, in `dtype` (shared with answers in flight: it is
    /// replaced, never changed in place, while shared). Stale once the
    /// value lives in a shared segment.
    value: Arc<Buf>,
    nbytes: usize,
    /// The shared segment of the co-located fast path: worker slots, then
    /// the value slot, which holds the value from then on (until
    /// `value_left_slot`).
    shm: Option<Arc<Region>>,
    /// The value left the segment's value slot for `value`, for good: a
    /// round at the part's gate never ended, and a worker's thread that
    /// sums it may still write the slot (`segment.rs`, `leave_stuck_slot`).
    value_left_slot: bool,
    /// Per worker rank: it checked the part (after its init or this
    /// server's restart), and whether it has yet to use the segment it was
    /// given. The segment's file goes once every worker checked and every
    /// one that took the segment used it, or once a round completes when
    /// every worker checked and every pending one took the segment at
    /// least `SHM_GRACE` ago (a worker that could not map it pushes by
    /// message): no file is left for a worker that never maps it (another
    /// host, TCP only).
    checked: Vec<bool>,
    /// Per worker: when it took the segment, until it used it.
    shm_pending: Vec<Option<Instant>>,
    /// f32 master weights of an f16 key with multi-precision.
    pub(crate) master: Option<Vec<f32>>,
    pub(crate) opt: KeyState,
    workers: usize,
    pending: Vec<Option<Arrival>>,
    arrived: usize,
    /// Ranks `0..folded` of this round are in the sum already.
    folded: usize,
    /// The gradient sum a rule reads, kept between rounds.
    grad_buf: Buf,
    acc: Option<Acc>,
    /// The previous round's sum buffer, for the next round.
    spare: Option<Acc>,
    /// Rows touched in this round (row pushes), as a flag per row.
    touched: Option<(usize, Vec<bool>)>,
    waiters: Vec<(Answer, Want)>,
    round_sync: Option<bool>,
    /// The last round completed, as the workers count a key's rounds: the
    /// rounds applied to the value since its init (sync rounds, or async
    /// pushes), plus any that a restart lost (`cut_short.rs`).
    pub(crate) rounds: u64,
    /// When the latest round's first push arrived (`pskv status`).
    pub(crate) round_began: Option<Instant>,
    /// Whether the round being completed may open the segment's gate, as
    /// the server sees it (no optimizer, checkpoints or replicas; the part
    /// small enough: set by `keys.rs` before each push); the round itself
    /// must be plain pushes through every worker's slot (`gate/mod.rs`).
    pub(crate) gate_ok: bool,
    /// The gate's count of rounds the workers summed, as far as `rounds`
    /// holds them.
    gate_seen: u32,
    /// Profiling: time the update of a round (the optimizer's step, or the
    /// sum becoming the value) into `update_span`.
    pub(crate) time_update: bool,
    pub(crate) update_span: Option<(Instant, Instant)>,
}

impl EntryState {
    pub(crate) fn new(key_id: u64, part: u64, dtype: DType, value: &[u8], workers: usize) -> Self {
        EntryState {
            key_id,
            part,
            dtype,
            elems: value.len() / dtype.size(),
            value: Arc::new(Buf::from_bytes(value)),
            nbytes: value.len(),
            shm: None,
            value_left_slot: false,
            checked: vec![false; workers],
            shm_pending: vec![None; workers],
            master: None,
            opt: KeyState::default(),
            workers,
            pending: (0..workers).map(|_| None).collect(),
            arrived: 0,
            folded: 0,
            grad_buf: Buf::zeroed(0),
            acc: None,
            spare: None,
            touched: None,
            waiters: Vec::new(),
            round_sync: None,
            rounds: 0,
            round_began: None,
            gate_ok: false,
            gate_seen: 0,
            time_update: false,
            update_span: None,
        }
    }

    pub(crate) fn name(&self) -> String {
        format!("key id {} part {}", self.key_id, self.part)
    }

    /// Bytes of the stored value.
    pub(crate) fn nbytes(&self) -> usize {
        self.nbytes
    }

    /// Checks a push against the key and the round; an error is for the
    /// pusher only (the round goes on without it).
    fn check_push(&self, head: &Head, vals: &[u8], rank: usize) -> Result<(), Fault> {
        if head.dtype != self.dtype {
            return Err(Fault::Mismatch(format!(
                "{}: pushed {} but the key holds {}",
                self.name(),
                head.dtype,
                self.dtype
            )));
        }
        if rank >= self.workers {
            return Err(Fault::Mismatch(format!(
                "{}: a push from worker rank {rank}, but the cluster has {} workers",
                self.name(),
                self.workers
            )));
        }
        if head.compression != 0 {
            if self.dtype != DType::F32 {
                return Err(Fault::Mismatch(format!(
                    "{}: compressed push to a {} key (compression takes f32 only)",
                    self.name(),
                    self.dtype
                )));
            }
        } else if head.op != Op::RowPush && vals.len() != self.nbytes {
            return Err(Fault::Mismatch(format!(
                "{}: pushed {} bytes ({} elements) but the key holds {} bytes ({} elements) \
                 (workers cut a key into the same parts only with the same \
                 PSKV_PARTITION_BYTES and PSKV_VAN: parts of {} KiB with PSKV_VAN=tcp by \
                 default, {} KiB otherwise)",
                self.name(),
                vals.len(),
                vals.len() / self.dtype.size(),
                self.nbytes,
                self.elems,
                crate::options::TCP_PARTITION_BYTES >> 10,
                crate::options::DEFAULT_PARTITION_BYTES >> 10,
            )));
        }
        if let Some(sync) = self.round_sync {
            if sync != head.sync {
                return Err(Fault::Mismatch(format!(
                    "{}: a {} push arrived during a {} round: every worker must use one mode",
                    self.name(),
                    if head.sync { "sync" } else { "async" },
                    if sync { "sync" } else { "async" }
                )));
            }
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
            self.round_began = Some(Instant::now());
            self.round_sync = Some(false);
            let want = Want::of(&head);
            if let Err(e) = self.fold(k, &head, &vals, true) {
                self.reset_round();
                answer(Err(e));
                return;
            }
            self.waiters.push((answer, want));
            self.complete(rule, false);
            return;
        }
        self.round_sync = Some(true);
        let eager = !self.plain(rule, std::iter::once(&head));
        // Subtle: a worker sends a push again only when its first one's
        // answer was lost (a worker's next push on a key waits for the
        // round's answer), so a second push of a pending rank is that
        // retry: it takes the first one's place, whose answer goes to a
        // request its worker gave up on. Refused, the retry would land in
        // the next round, that worker a push ahead of the others for good.
        if rank < self.folded {
            // Its first push is in the sum already (a key folded as pushes
            // come): the one sent again takes its place among the answers
            // only (`fold_ready` keeps them in rank order), and its values
            // are not added a second time.
            let want = Want::of(&head);
            let msg = self.gave_way(rank);
            match self.waiters.get_mut(rank) {
                Some(w) => (std::mem::replace(w, (answer, want)).0)(msg),
                None => answer(Err(Fault::Failed(format!(
                    "{}: internal: worker {rank} is in the sum without an answer",
                    self.name()
                )))),
            }
            return;
        }
        let again = self.pending[rank].replace(Arrival { head, vals, answer });
        if let Some(first) = again {
            (first.answer)(self.gave_way(rank));
            return;
        }
        self.arrived += 1;
        if self.arrived == 1 {
            self.round_began = Some(Instant::now());
        }
        if self.arrived < self.workers {
            // Pushes the sum kernel cannot take in one pass (compressed,
            // rows, integers, f16 for an f32 master) are folded as soon as
            // the ranks before them are, while the round waits for others.
            if eager && self.folded == self.arrived - 1 {
                self.fold_ready(k);
            }
            return;
        }
        // Every worker pushed: sum in rank order.
        self.arrived = 0;
        self.leave_stuck_slot();
        if self.folded == 0 {
            let arrivals: Arrivals = self
                .pending
                .iter_mut()
                .map(|p| p.take().expect("every worker pushed"))
                .collect();
            if self.plain(rule, arrivals.iter().map(|a| &a.head)) {
                return self.complete_plain(k, rule, arrivals);
            }
            for (i, a) in arrivals.into_iter().enumerate() {
                self.pending[i] = Some(a);
            }
        }
        if !self.fold_ready(k) {
            return;
        }
        self.folded = 0;
        self.complete(rule, true);
    }

    /// Folds the pending pushes of ranks `folded..` that have arrived, in
    /// rank order; false if a malformed push abandoned the round.
    fn fold_ready(&mut self, k: &CpuKernels) -> bool {
        while self.folded < self.workers {
            let Some(a) = self.pending[self.folded].take() else {
                return true;
            };
            let first = self.folded == 0;
            self.folded += 1;
            match self.fold(k, &a.head, &a.vals, first) {
                Ok(()) => self.waiters.push((a.answer, Want::of(&a.head))),
                Err(e) => {
                    // A malformed push: the round cannot be summed.
                    (a.answer)(Err(e.clone()));
                    self.fail_round(Fault::Malformed(format!("the round was abandoned: {e}")));
                    return false;
                }
            }
        }
        true
    }

    /// Whether a round's pushes are plain dense floats that one pass of
    /// the sum kernel can add (f16 with multi-precision needs the f32 sum,
    /// so it folds).
    fn plain<'a>(&self, rule: Option<&Rule>, mut heads: impl Iterator<Item = &'a Head>) -> bool {
        let float = match self.dtype {
            DType::F32 | DType::F64 => true,
            DType::F16 => !rule.is_some_and(|r| self.opt_multi_precision(r)),
            DType::I32 | DType::I64 => false,
        };
        float && heads.all(|h| h.compression == 0 && h.op != Op::RowPush)
    }

    /// Sums plain pushes in one pass (the kernel adds its inputs left to
    /// right, in rank order here) straight into the stored value, or into
    /// the gradient buffer the rule reads; then answers.
    fn complete_plain(&mut self, k: &CpuKernels, rule: Option<&Rule>, arrivals: Arrivals) {
        let dtype = self.dtype;
        let result = (|| -> Result<(), Fault> {
            let ins: SmallVec<[&[u8]; 4]> = arrivals.iter().map(|a| &a.vals[..]).collect();
            match rule {
                None => sum_dense(k, dtype, self.value_mut(false), &ins),
                Some(rule) => {
                    let n = self.nbytes;
                    let mut grad = std::mem::replace(&mut self.grad_buf, Buf::zeroed(0));
                    if grad.len() != n {
                        grad = Buf::zeroed(n);
                    }
                    sum_dense(k, dtype, grad.bytes_mut(), &ins)?;
                    let mut st = std::mem::take(&mut self.opt);
                    let shape = [self.elems];
                    let res = self.timed_update(|me| {
                        rule.apply(
                            me.key_id,
                            None,
                            dtype,
                            &shape,
                            grad.bytes(),
                            None,
                            me.value_mut(true),
                            &mut st,
                        )
                    });
                    self.opt = st;
                    self.grad_buf = grad;
                    res
                }
            }
        })();
        self.reset_round();
        if result.is_ok() {
            self.rounds += 1;
            self.maybe_unlink(true);
            // Before the answers: each worker's next push must find the
            // gate open (G1 of `gate/mod.rs`).
            if rule.is_none() && self.gate_ok && arrivals.iter().all(|a| a.head.shm) {
                if let Some(seg) = self.value_slot() {
                    Gate::of(seg).open();
                }
            }
        }
        match result {
            Ok(()) => {
                let snap = arrivals
                    .iter()
                    .any(|a| self.want(Want::of(&a.head)) == Want::Value)
                    .then(|| self.snapshot());
                for a in arrivals {
                    let want = self.want(Want::of(&a.head));
                    (a.answer)(Ok(answer_of(want, &snap)));
                }
            }
            Err(e) => {
                for a in arrivals {
                    (a.answer)(Err(e.clone()));
                }
            }
        }
    }

    /// Adds one push to the round's sum.
    fn fold(&mut self, k: &CpuKernels, head: &Head, vals: &[u8], first: bool) -> Result<(), Fault> {
        let n = self.elems;
        let dtype = self.dtype;
        if first {
            // The last round's buffer, if it fits (reused: no allocation or
            // page faults per round). Rows need zeros; the other first pushes
            // overwrite every element.
            let acc = match self.spare.take() {
                Some(mut a) if a.fits(dtype, n) => {
                    if head.op == Op::RowPush {
                        a.zero();
                    }
                    a
                }
                _ => Acc::zeros(dtype, n),
            };
            self.acc = Some(acc);
            self.touched = None;
        }
        let acc = self.acc.as_mut().expect("made by the first push");
        if head.op == Op::RowPush {
            let (h, data) = split_rows(vals)?;
            if n % h.row_len != 0 {
                return Err(Fault::Mismatch(format!(
                    "key id {} part {}: rows of {} elements do not divide its {n} elements",
                    self.key_id, self.part, h.row_len
                )));
            }
            let nrows = n / h.row_len;
            let rb = h.row_len * dtype.size();
            if data.len() != h.rows.len() * rb {
                return Err(Fault::Mismatch(format!(
                    "{} rows of {} bytes need {} bytes, got {}",
                    h.rows.len(),
                    rb,
                    h.rows.len() * rb,
                    data.len()
                )));
            }
            let touched = &mut self
                .touched
                .get_or_insert_with(|| (h.row_len, vec![false; nrows]))
                .1;
            for (i, &r) in h.rows.iter().enumerate() {
                if r < 0 || r as usize >= nrows {
                    return Err(Fault::Mismatch(format!(
                        "row {r} is outside the part's {nrows} rows"
                    )));
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
                return Err(Fault::Mismatch(
                    "a compressed push to a key that is not f32".into(),
                ));
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
        let result = self.timed_update(|me| me.apply(rule, &acc, touched, sync));
        if result.is_ok() {
            self.rounds += 1;
            self.maybe_unlink(true);
        }
        self.spare = Some(acc);
        let waiters = std::mem::take(&mut self.waiters);
        self.reset_round();
        match result {
            Ok(()) => self.answer_value(waiters),
            Err(e) => {
                for (answer, _) in waiters {
                    answer(Err(e.clone()));
                }
            }
        }
    }

    /// Answers each waiter with what it wants of the stored value.
    fn answer_value(&self, waiters: Vec<(Answer, Want)>) {
        let snap = waiters
            .iter()
            .any(|(_, w)| self.want(*w) == Want::Value)
            .then(|| self.snapshot());
        for (answer, want) in waiters {
            answer(Ok(answer_of(self.want(want), &snap)));
        }
    }

    /// What a request that wants `w` gets: the value itself, rather than
    /// word that it is in the value slot, once it left the slot.
    fn want(&self, w: Want) -> Want {
        match w {
            Want::Slot if self.value_left_slot => Want::Value,
            w => w,
        }
    }

    /// Runs a round's update, timed into `update_span` when profiling.
    fn timed_update<T>(&mut self, update: impl FnOnce(&mut Self) -> T) -> T {
        let began = self.time_update.then(Instant::now);
        let out = update(self);
        self.update_span = began.map(|b| (b, Instant::now()));
        out
    }

    fn reset_round(&mut self) {
        self.arrived = 0;
        self.folded = 0;
        self.acc = None;
        self.touched = None;
        self.round_sync = None;
        for p in &mut self.pending {
            debug_assert!(p.is_none());
            *p = None;
        }
    }
}

/// The answer of a completed round for one waiter.
fn answer_of(want: Want, snap: &Option<Bytes>) -> Option<Bytes> {
    match want {
        Want::Nothing => None,
        Want::Value => snap.clone(),
        Want::Slot => Some(Bytes::new()),
    }
}

#[cfg(test)]
mod tests;
