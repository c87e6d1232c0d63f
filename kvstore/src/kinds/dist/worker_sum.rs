//! Rounds this worker sums with the others at a part's gate (`gate.rs`),
//! and pulls read from the value slot, while the part's server has opened
//! the gate.
//!
//! A part of a push that went through its slot arrives at the gate: if it
//! came last it sums the slots into the value slot and the part is done
//! at once; if not, the part waits in `Waits` until the round ends. Every
//! thread that waits for an op polls the waits between its spins (the
//! store's progress hook), so a caller waiting for its push-pull finishes
//! it itself the moment the last worker lets it go; a watcher thread
//! finishes the waits nobody polls (it looks every `NAP`, and sleeps on the
//! gate of a wait it found, so the summer wakes it), and fails those that
//! pass the store's timeout, taking their arrival back.
//!
//! A part going to its server by message while its gate is open (a
//! compressed or row-sparse push, or one whose slot is held by a push
//! buffer or in doubt) closes the gate first: the whole round then goes to
//! the server. If other workers have already arrived, this push cannot
//! join them, and fails with an error naming why (the others' waits fail
//! at the timeout).
//!
//! # Waits: states
//!
//! A wait is in `Inner::list` from its arrival until it is finished, by
//! exactly one thread: the one that takes it out of the list under the
//! lock (a poller, the watcher, or `close`). Callbacks run after the lock
//! is let go (they complete engine ops, which may run the next op of a key
//! inline, which may arrive at a gate and add a wait).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use pskv_transport::{KvResponse, Region};
use smallvec::SmallVec;

use super::inflight::Inflight;
use super::parts::Round;
use super::{DistKey, DistStore};
use crate::error::Fault;
use crate::gate::{Arrival, Gate, Withdrawal};
use crate::wire::Op;

/// How often the watcher looks for waits nobody polls.
const NAP: Duration = Duration::from_millis(1);
/// The watcher's longest sleep on a gate (then it looks at all waits).
const GATE_SLEEP: Duration = Duration::from_millis(20);
/// How long the watcher naps with nothing waiting before it sleeps until
/// a wait is added.
const IDLE: Duration = Duration::from_millis(50);

/// What finishes a waiting part: Ok once its round ended (its value is
/// in the value slot), or the error.
type Then = Box<dyn FnOnce(Result<(), Fault>) + Send>;

/// One part waiting for the others at its gate.
struct Wait {
    seg: Arc<Region>,
    epoch: u32,
    deadline: Instant,
    /// The round was found being summed at the deadline once already.
    summing: bool,
    then: Then,
}

#[derive(Default)]
struct Inner {
    list: Mutex<Vec<Wait>>,
    /// `list`'s length, for pollers that find nothing to do (the usual
    /// case) without the lock.
    len: AtomicUsize,
    /// The watcher sleeps on this while nothing waits.
    cv: Condvar,
    /// The watcher sleeps on `cv` (an added wait wakes it).
    idle: AtomicBool,
    /// The store closed: the watcher ends.
    closed: AtomicBool,
}

/// The waits of a store's parts at their gates, and their watcher.
pub(super) struct Waits {
    inner: Arc<Inner>,
    /// Parts that arrived at an open gate (`worker_summed_parts`).
    summed: std::sync::atomic::AtomicU64,
    workers: usize,
    timeout: Duration,
    watcher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Waits {
    pub(super) fn new(workers: usize, timeout: Duration) -> Waits {
        Waits {
            inner: Arc::default(),
            summed: Default::default(),
            workers,
            timeout,
            watcher: Mutex::new(None),
        }
    }

    /// Parts that arrived at an open gate, so far.
    pub(super) fn summed(&self) -> u64 {
        self.summed.load(Ordering::Relaxed)
    }

    /// Finishes the waits whose rounds ended (a waiting thread's progress
    /// hook: never blocks); `leave`: that thread stops polling, so the
    /// watcher looks now. Whether it finished any.
    pub(super) fn poll(&self, leave: bool) -> bool {
        let inner = &self.inner;
        if leave && inner.len.load(Ordering::Acquire) != 0 {
            inner.cv.notify_one();
        }
        if inner.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        let Some(mut list) = inner.list.try_lock() else {
            return false;
        };
        let ended = take_ended(&mut list, &inner.len);
        drop(list);
        let any = !ended.is_empty();
        for w in ended {
            (w.then)(Ok(()));
        }
        any
    }

    /// Adds a wait (its round had not ended when it arrived); starts the
    /// watcher on the first.
    fn add(&self, seg: Arc<Region>, epoch: u32, then: Then) {
        let inner = &self.inner;
        {
            let mut list = inner.list.lock();
            if inner.closed.load(Ordering::Acquire) {
                drop(list);
                return then(Err(Fault::Unavailable("the kvstore was closed".into())));
            }
            list.push(Wait {
                seg,
                epoch,
                deadline: Instant::now() + self.timeout,
                summing: false,
                then,
            });
            inner.len.store(list.len(), Ordering::Release);
        }
        if inner.idle.load(Ordering::Acquire) {
            inner.cv.notify_one();
        }
        let mut w = self.watcher.lock();
        if w.is_none() {
            let (inner, workers, timeout) = (self.inner.clone(), self.workers, self.timeout);
            let spawned = std::thread::Builder::new()
                .name("pskv-gate-watch".into())
                .spawn(move || watch(&inner, workers, timeout));
            match spawned {
                Ok(h) => *w = Some(h),
                // Callers that wait still poll; the store's timeout is
                // then not enforced on waits nobody polls.
                Err(e) => tracing::warn!("no thread to watch the workers' rounds: {e}"),
            }
        }
    }

    /// Fails every wait and ends the watcher (the store is closing).
    pub(super) fn close(&self) {
        let inner = &self.inner;
        let waits = {
            let mut list = inner.list.lock();
            inner.closed.store(true, Ordering::Release);
            inner.len.store(0, Ordering::Release);
            std::mem::take(&mut *list)
        };
        inner.cv.notify_all();
        for w in waits {
            (w.then)(Err(Fault::Unavailable("the kvstore was closed".into())));
        }
        if let Some(h) = self.watcher.lock().take() {
            // Not from the watcher itself (a callback it ran may drop the
            // last handle of the store).
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Waits {
    fn drop(&mut self) {
        self.close();
    }
}

/// Takes the waits whose rounds ended out of `list`.
fn take_ended(list: &mut Vec<Wait>, len: &AtomicUsize) -> SmallVec<[Wait; 2]> {
    let mut ended = SmallVec::new();
    let mut i = 0;
    while i < list.len() {
        if Gate::of(&list[i].seg).ended(list[i].epoch) {
            ended.push(list.swap_remove(i));
        } else {
            i += 1;
        }
    }
    len.store(list.len(), Ordering::Release);
    ended
}

/// The watcher: finishes the waits nobody polls, fails those past their
/// deadline.
fn watch(inner: &Inner, workers: usize, timeout: Duration) {
    let mut empty_since = None;
    loop {
        let mut list = inner.list.lock();
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let mut done: Vec<(Wait, Result<(), Fault>)> = take_ended(&mut list, &inner.len)
            .into_iter()
            .map(|w| (w, Ok(())))
            .collect();
        let now = Instant::now();
        let mut i = 0;
        while i < list.len() {
            if list[i].deadline > now {
                i += 1;
                continue;
            }
            let w = &mut list[i];
            let gate = Gate::of(&w.seg);
            let outcome = match gate.withdraw(w.epoch, workers) {
                Withdrawal::Ended => Some(Ok(())),
                Withdrawal::Left => Some(Err(Fault::Unavailable(format!(
                    "the round that the workers sum in shared memory did not end within {timeout:?}: {} of {workers} workers had arrived at it with this one (its push is taken back; the others have not pushed this round)",
                    gate.arrived() + 1
                )))),
                Withdrawal::Summing if !w.summing => {
                    // The last worker is summing: give it the time again.
                    w.summing = true;
                    w.deadline = now + timeout;
                    None
                }
                Withdrawal::Summing => Some(Err(Fault::Failed(
                    "the worker that came last to a round summed in shared memory did not finish it (it may have died while summing)".into(),
                ))),
            };
            match outcome {
                Some(r) => done.push((list.swap_remove(i), r)),
                None => i += 1,
            }
        }
        inner.len.store(list.len(), Ordering::Release);
        let sleep_on = list
            .iter()
            .min_by_key(|w| w.deadline)
            .map(|w| (w.seg.clone(), w.epoch, w.deadline));
        if !done.is_empty() {
            drop(list);
            for (w, r) in done {
                (w.then)(r);
            }
            continue;
        }
        match sleep_on {
            Some((seg, epoch, deadline)) => {
                drop(list);
                empty_since = None;
                let left = deadline.saturating_duration_since(Instant::now());
                Gate::of(&seg).sleep(epoch, left.min(GATE_SLEEP));
            }
            None => {
                let since = *empty_since.get_or_insert(now);
                if now - since < IDLE {
                    inner.cv.wait_for(&mut list, NAP);
                } else {
                    inner.idle.store(true, Ordering::Release);
                    // Subtle: `add` pushes under the lock, then reads
                    // `idle`; this thread set `idle` under it, so either
                    // the push is seen below or `add` notifies after the
                    // wait began (the wait lets the lock go atomically).
                    if inner.len.load(Ordering::Acquire) == 0 {
                        inner.cv.wait_for(&mut list, IDLE * 20);
                    }
                    inner.idle.store(false, Ordering::Release);
                    empty_since = None;
                }
            }
        }
    }
}

/// The answer of a part whose values are in the value slot.
fn slot_answer() -> KvResponse {
    KvResponse {
        keys: Vec::new(),
        lens: Vec::new(),
        parts: Vec::new(),
        bodies: Vec::new(),
    }
}

impl DistStore {
    /// Part `i` of an op at its segment's gate (`shm_tag`: the segment its
    /// values went into, or 0: by message). True if it was handled here:
    /// arrived and summed or waiting, read from the value slot, or failed;
    /// false if it goes to its server.
    pub(super) fn at_gate(
        &self,
        dk: &DistKey,
        inf: &Arc<Inflight>,
        round: &Round,
        i: usize,
        shm_tag: u16,
    ) -> bool {
        let op = round.head.op;
        let pushes = matches!(op, Op::Push | Op::PushPull | Op::RowPush);
        if !round.head.sync || !(pushes || op == Op::Pull) {
            return false;
        }
        let Some(seg) = dk.segs.read().get(i).cloned().flatten() else {
            return false;
        };
        let gate = Gate::of(&seg);
        let answer = |r: Result<(), Fault>| {
            let cb = round.on_answer.clone();
            inf.part_done(Ok(slot_answer()), move |resp| {
                r.and_then(|()| cb(i, resp, false))
            });
        };
        if shm_tag == 0 || seg.tag() != shm_tag {
            // By message: a push closes the gate first (G1 of `gate.rs`).
            if let (true, Err(n)) = (pushes, gate.try_close()) {
                answer(Err(Fault::Mismatch(format!(
                    "{n} of {} workers pushed this round of part {i} into shared memory, to be summed there, but this push goes to the server (it is compressed or row-sparse, or this worker's slot is held by a push buffer or in doubt after a failure): every worker must push a key's round the same way",
                    self.po.num_workers()
                ))));
                return true;
            }
            return false;
        }
        if op == Op::Pull {
            // The value slot holds the last round's value while the gate is
            // open (the next round needs this worker's push, which comes
            // after this pull).
            if !gate.is_open() {
                return false;
            }
            answer(Ok(()));
            return true;
        }
        let arrival = gate.arrive(self.waits.workers);
        if arrival != Arrival::Closed {
            self.waits.summed.fetch_add(1, Ordering::Relaxed);
        }
        match arrival {
            Arrival::Closed => false,
            Arrival::Last => {
                let w = self.waits.workers;
                // SAFETY: every worker wrote its slot before it arrived, and
                // nobody writes a slot or reads the value slot until the
                // round ends (G2 of `gate.rs`).
                let ins: SmallVec<[&[u8]; 4]> = (0..w).map(|r| unsafe { seg.slot(r) }).collect();
                let summed = crate::comm::sum_dense(
                    &self.comm.kernels,
                    dk.local.meta.dtype,
                    unsafe { seg.slot_mut(w) },
                    &ins,
                );
                // The others are let go even if the sum failed (it cannot for
                // slots of one size): they must not wait for the timeout.
                gate.finish();
                answer(summed);
                true
            }
            Arrival::Waiting(epoch) => {
                if gate.ended(epoch) {
                    answer(Ok(()));
                    return true;
                }
                let (inf, cb) = (inf.clone(), round.on_answer.clone());
                let then: Then = Box::new(move |r| {
                    inf.part_done(Ok(slot_answer()), move |resp| {
                        r.and_then(|()| cb(i, resp, false))
                    });
                });
                self.waits.add(seg, epoch, then);
                true
            }
        }
    }
}
