//! The waits of a worker's parts at their gates (`Waits`): the list every
//! waiting thread polls, and the helper that sums chunks of the rounds
//! others sum; `watch.rs` the watcher thread (the states and rules: the
//! parent's `mod.rs`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use pskv_gpu::cpu::CpuKernels;
use pskv_transport::Region;
use smallvec::SmallVec;

use super::{sum_slots, ChunkOut, LatePart};
use crate::dtype::DType;
use crate::error::Fault;
use crate::gate::{self, Gate, Withdrawal, MAX_HELPER_RANK};

mod pollers;
mod watch;
use pollers::Pollers;
use watch::watch;

/// How often the watcher looks for waits nobody polls.
const NAP: Duration = Duration::from_millis(1);
/// The watcher's longest sleep on a gate (then it looks at all waits).
const GATE_SLEEP: Duration = Duration::from_millis(2);
/// How long a helper waits awake for the rounds it helped to end (the
/// summer ends a round once it sees the last chunk summed).
pub(super) const SETTLE: Duration = Duration::from_micros(200);
/// How long the watcher watches awake for a round to share (then it sleeps
/// on the gate).
const SHARED_SPIN: Duration = Duration::from_millis(1);
/// How long the watcher watches awake, once per part, for the sums and
/// copies of a round of late copies to come ready.
const LATE_SPIN: Duration = Duration::from_millis(2);
/// How long the watcher naps with nothing waiting before it sleeps until
/// a wait is added.
const IDLE: Duration = Duration::from_millis(50);

/// How a waiting part's round came out.
pub(super) enum Outcome {
    /// It ended: the value slot holds the sum.
    Ended,
    /// The gate closed under it: its push goes to the server.
    HandedOver,
    /// It failed (timed out, the store closed); `doubt`: its arrival is
    /// still counted (the round is being summed), so its slot may still be
    /// read.
    Failed(Fault, bool),
}

/// What finishes a waiting part.
pub(super) type Then = Box<dyn FnOnce(Outcome) + Send>;

/// One part waiting for the others at its gate.
pub(super) struct Wait {
    pub(super) seg: Arc<Region>,
    pub(super) epoch: u32,
    /// The part's type (to help sum its round).
    pub(super) dtype: DType,
    pub(super) deadline: Instant,
    /// The round was found being summed at the deadline once already.
    pub(super) summing: bool,
    /// This worker sums the round: it ends it once every chunk is summed
    /// (its helpers' too: `gate/chunks.rs`).
    pub(super) finishing: bool,
    /// Where this worker's threads copy the chunks they sum (a
    /// push-pull's output).
    pub(super) out: Option<Arc<ChunkOut>>,
    /// This worker's part of a round of late copies (`late.rs`): its sums
    /// and copies, which whoever polls the waits makes as they come ready.
    pub(super) late: Option<Arc<LatePart>>,
    pub(super) then: Then,
}

impl Wait {
    /// A wait of a part that arrived at the round of `epoch` at `seg`'s
    /// gate, finished by `then`: not this worker's to end, with nothing of
    /// its own to copy or sum (the fields set otherwise say so).
    pub(super) fn new(seg: Arc<Region>, epoch: u32, dtype: DType, then: Then) -> Wait {
        Wait {
            seg,
            epoch,
            dtype,
            deadline: Instant::now(),
            summing: false,
            finishing: false,
            out: None,
            late: None,
            then,
        }
    }

    /// How the round came out, if it did (withdrawing a push handed over).
    fn outcome(&self) -> Option<Outcome> {
        let gate = Gate::of(&self.seg);
        if self.finishing {
            let sh = gate.summed_round(self.epoch, self.seg.slot_len())?;
            return sh.all_summed().then(|| {
                gate.finish();
                Outcome::Ended
            });
        }
        let o = match gate.round(self.epoch) {
            gate::Round::Gathering => None,
            gate::Round::Ended => Some(Outcome::Ended),
            gate::Round::HandedOver => match gate.withdraw(self.epoch) {
                Withdrawal::Left => Some(Outcome::HandedOver),
                Withdrawal::Ended => Some(Outcome::Ended),
                Withdrawal::Summing => None,
            },
        };
        match (o, &self.late) {
            // A part of a round of late copies ends once its output holds
            // the round too (L4 of `gate/late.rs`).
            (Some(Outcome::Ended), Some(part)) if !part.done() => None,
            (o, _) => o,
        }
    }
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
    /// The threads polling the waits now: the watcher sleeps on a gate
    /// only while none does.
    pollers: Pollers,
    /// Ranks of workers known dead: a round one of them sums never ends.
    dead: Mutex<Vec<usize>>,
}

/// The waits of a store's parts at their gates, and their watcher.
pub(in crate::kinds::dist) struct Waits {
    inner: Arc<Inner>,
    /// Parts whose rounds the workers summed (`worker_summed_parts`).
    pub(super) summed: Arc<AtomicU64>,
    /// Of those, parts of rounds of late copies (`worker_late_parts`).
    pub(super) late: Arc<AtomicU64>,
    timeout: Duration,
    watcher: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// What helps sum the rounds of the waits (None: this worker's rank is
    /// too high to help).
    helper: Option<Arc<Helper>>,
}

/// The rounds a wait may help sum: the part's segment, epoch and type, and
/// where this worker wants the chunks it sums.
type ToHelp = SmallVec<[(Arc<Region>, u32, DType, Option<Arc<ChunkOut>>); 2]>;

/// The rounds of `list` being summed with chunks left to claim (none
/// unless `helps`).
fn shared_rounds(list: &[Wait], helps: bool) -> ToHelp {
    if !helps {
        return SmallVec::new();
    }
    list.iter()
        .filter(|w| w.late.is_none())
        .filter(|w| Gate::of(&w.seg).shared(w.epoch, w.seg.slot_len()).is_some())
        .map(|w| (w.seg.clone(), w.epoch, w.dtype, w.out.clone()))
        .collect()
}

/// This worker's parts of rounds of late copies with work left.
fn late_parts(list: &[Wait]) -> SmallVec<[Arc<LatePart>; 2]> {
    list.iter()
        .filter_map(|w| w.late.clone())
        .filter(|l| !l.done())
        .collect()
}

/// Makes what progress it can in `parts` (`LatePart::progress`); whether
/// any is done now.
fn progress(parts: &[Arc<LatePart>]) -> bool {
    // Every part, not stopping at the first done (`any` would).
    let mut done = false;
    for l in parts {
        done |= l.progress() == Some(true);
    }
    done
}

/// The sum kernel, and this worker's rank: to help sum rounds.
struct Helper {
    kernels: Arc<CpuKernels>,
    rank: usize,
    /// Held by the one thread of this worker that helps at a time (S3 of
    /// `gate/chunks.rs`: the rank's bit in `BUSY` is one thread's).
    one: Mutex<()>,
    /// Chunks this worker summed beside another's summer.
    helped: AtomicU64,
}

impl Helper {
    /// Sums chunks of each round beside its summer, while any are left
    /// (`gate/chunks.rs`). Whether it summed any (None: another thread of
    /// this worker helps).
    fn help(&self, rounds: &ToHelp) -> Option<bool> {
        let _one = self.one.try_lock()?;
        let mut any = 0;
        for (seg, epoch, dtype, out) in rounds {
            if let Some(sh) = Gate::of(seg).shared(*epoch, seg.slot_len()) {
                let n = sh.sum_chunks(Some(self.rank), |c| {
                    // Cannot fail for slots of one size; the summer's own
                    // chunks would show it.
                    if sum_slots(&self.kernels, seg, *dtype, c.clone()).is_ok() {
                        if let Some(o) = out {
                            o.copy(c);
                        }
                    }
                });
                any += n;
            }
        }
        self.helped.fetch_add(any as u64, Ordering::Relaxed);
        Some(any != 0)
    }

    /// Waits, awake and briefly (`SETTLE`), for the rounds it helped to
    /// end.
    fn settle(&self, rounds: &ToHelp) {
        let t = Instant::now();
        while rounds
            .iter()
            .any(|(seg, e, ..)| Gate::of(seg).round(*e) == gate::Round::Gathering)
            && t.elapsed() < SETTLE
        {
            for _ in 0..16 {
                std::hint::spin_loop();
            }
        }
    }
}

impl Waits {
    pub(in crate::kinds::dist) fn new(
        timeout: Duration,
        kernels: Arc<CpuKernels>,
        rank: usize,
    ) -> Waits {
        Waits {
            inner: Arc::default(),
            summed: Arc::default(),
            late: Arc::default(),
            timeout,
            watcher: Mutex::new(None),
            helper: (rank < MAX_HELPER_RANK).then(|| {
                Arc::new(Helper {
                    kernels,
                    rank,
                    one: Mutex::new(()),
                    helped: AtomicU64::new(0),
                })
            }),
        }
    }

    /// Worker `rank` died: waits whose round it sums fail (the watcher
    /// looks now).
    pub(in crate::kinds::dist) fn worker_died(&self, rank: usize) {
        self.inner.dead.lock().push(rank);
        self.inner.cv.notify_one();
    }

    /// Parts whose rounds the workers summed, so far.
    pub(in crate::kinds::dist) fn summed(&self) -> u64 {
        self.summed.load(Ordering::Relaxed)
    }

    /// Of `summed`, parts of rounds of late copies, so far.
    pub(in crate::kinds::dist) fn late(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }

    /// Chunks this worker summed beside another worker's summer, so far.
    pub(in crate::kinds::dist) fn helped(&self) -> u64 {
        self.helper
            .as_ref()
            .map_or(0, |h| h.helped.load(Ordering::Relaxed))
    }

    /// Finishes the waits whose rounds came out (a waiting thread's
    /// progress hook: it never waits for a lock or for another thread, but
    /// it sums chunks of the rounds being summed that it can help with,
    /// then waits awake, at most `SETTLE`, for them to end); not `leave`:
    /// the thread counts among the pollers (`pollers.rs`); `leave`: it
    /// stops polling, and if it was the last (or did not poll while none
    /// does) the watcher looks soon (at once if it naps on its condvar;
    /// within its 2 ms sleep on a gate if it sleeps there). Whether it
    /// finished or helped with any.
    pub(in crate::kinds::dist) fn poll(&self, leave: bool) -> bool {
        let inner = &self.inner;
        if leave {
            let last = inner.pollers.stop();
            if std::thread::panicking() {
                // A wait that unwinds: uncounted, and nothing more run here.
                if last {
                    self.wake_watcher();
                }
                return false;
            }
            // The last poller to stop, or a thread that did not poll while
            // none did (the watcher may nap on an empty list): the watcher
            // looks now; while others poll, they finish the waits.
            if last || !inner.pollers.any() {
                self.wake_watcher();
            }
        } else {
            inner.pollers.start();
        }
        if inner.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        let Some(mut list) = inner.list.try_lock() else {
            return false;
        };
        let out = take_out(&mut list, &inner.len);
        let shared = shared_rounds(&list, self.helper.is_some());
        let late = late_parts(&list);
        drop(list);
        let mut any = !out.is_empty();
        for (w, o) in out {
            (w.then)(o);
        }
        if !late.is_empty() && progress(&late) {
            any = true;
            self.finish_ready();
        }
        if let (false, Some(h)) = (shared.is_empty(), &self.helper) {
            if h.help(&shared) == Some(true) {
                any = true;
                // Finish the waits here, awake, rather than leave them to
                // a wake-up: the rounds end a moment after their last
                // chunk.
                h.settle(&shared);
                self.finish_ready();
            }
        }
        any
    }

    /// The wait of a thread that polled ended (`Call::End`): the last
    /// poller to stop wakes the watcher if waits are left, which it left
    /// to this thread while it polled (`pollers.rs`).
    pub(in crate::kinds::dist) fn end(&self) {
        if self.inner.pollers.stop() {
            self.wake_watcher();
        }
    }

    /// Wakes the watcher if waits are left (a poller stopped).
    fn wake_watcher(&self) {
        let inner = &self.inner;
        // Subtle: SeqCst after the stop (`pollers.rs`, "Ordering").
        if inner.len.load(Ordering::SeqCst) != 0 {
            // Under the lock when it is free: then the watcher is either
            // asleep on the condvar or yet to read the count.
            let _list = inner.list.try_lock();
            inner.cv.notify_one();
        }
    }

    /// Threads counted as polling these waits now.
    #[cfg(test)]
    pub(super) fn pollers_now(&self) -> usize {
        self.inner.pollers.count()
    }

    /// Finishes the waits whose rounds came out, unless another thread
    /// holds the list (it looks itself).
    fn finish_ready(&self) {
        let inner = &self.inner;
        if let Some(mut list) = inner.list.try_lock() {
            let out = take_out(&mut list, &inner.len);
            drop(list);
            for (w, o) in out {
                (w.then)(o);
            }
        }
    }

    /// Finishes `w` at once if its round came out already, else adds it.
    pub(super) fn enter(&self, w: Wait) {
        match w.outcome() {
            Some(o) => (w.then)(o),
            None => self.add(w),
        }
    }

    /// Adds a wait (its round had not come out when it arrived); starts
    /// the watcher on the first.
    pub(super) fn add(&self, mut w: Wait) {
        let inner = &self.inner;
        {
            let mut list = inner.list.lock();
            if inner.closed.load(Ordering::Acquire) {
                drop(list);
                // Not left at the gate: the others must not wait for it.
                let o = closed_outcome_of(&w);
                return (w.then)(o);
            }
            w.deadline = Instant::now() + self.timeout;
            w.summing = false;
            list.push(w);
            // Subtle: SeqCst, against a poller's stop (`pollers.rs`).
            inner.len.store(list.len(), Ordering::SeqCst);
        }
        if inner.idle.load(Ordering::Acquire) {
            inner.cv.notify_one();
        }
        let mut w = self.watcher.lock();
        if w.is_none() && !inner.closed.load(Ordering::Acquire) {
            let (inner, timeout, helper) = (self.inner.clone(), self.timeout, self.helper.clone());
            let spawned = std::thread::Builder::new()
                .name("pskv-gate-watch".into())
                .spawn(move || watch(&inner, timeout, helper.as_deref()));
            match spawned {
                Ok(h) => *w = Some(h),
                // Callers that wait still poll; the store's timeout is
                // then not enforced on waits nobody polls.
                Err(e) => tracing::warn!("no thread to watch the workers' rounds: {e}"),
            }
        }
    }

    /// Fails every wait (taking its arrival back) and ends the watcher
    /// (the store is closing); waits for it to end.
    pub(in crate::kinds::dist) fn close(&self) {
        self.stop();
        // Subtle: the handle is taken out before the join (the watcher may
        // be in `add`, from a callback, waiting for this lock), and not
        // joined from the watcher itself.
        let h = self.watcher.lock().take();
        if let Some(h) = h.filter(|h| h.thread().id() != std::thread::current().id()) {
            let _ = h.join();
        }
    }

    /// Fails every wait (taking its arrival back) and tells the watcher to
    /// end. (A failed part's `ChunkOut::close` may wait for a chunk copy
    /// into its output that another thread of this worker is making: a
    /// moment, never a wait for another wait.)
    fn stop(&self) {
        let inner = &self.inner;
        let waits = {
            let mut list = inner.list.lock();
            inner.closed.store(true, Ordering::Release);
            inner.len.store(0, Ordering::Release);
            std::mem::take(&mut *list)
        };
        inner.cv.notify_all();
        for w in waits {
            let o = closed_outcome_of(&w);
            (w.then)(o);
        }
    }
}

impl Drop for Waits {
    fn drop(&mut self) {
        // No join: the last handle may go inside a progress hook (which
        // must not block); the watcher ends on its own, within a nap.
        self.stop();
    }
}

/// How a wait on the round of `epoch` at `seg`'s gate comes out when the
/// store closes: its arrival taken back (failed), unless the round ended
/// (or is being summed: failed, the slot in doubt).
fn closed_outcome(seg: &Region, epoch: u32) -> Outcome {
    let closed = || Fault::Unavailable("the kvstore was closed".into());
    match Gate::of(seg).withdraw(epoch) {
        Withdrawal::Ended => Outcome::Ended,
        Withdrawal::Left => Outcome::Failed(closed(), false),
        Withdrawal::Summing => Outcome::Failed(closed(), true),
    }
}

/// `closed_outcome` for wait `w`: a part of a round of late copies that
/// is not handed over keeps its arrival (it supplied chunks that others
/// may be summing): failed, in doubt, unless the round ended.
fn closed_outcome_of(w: &Wait) -> Outcome {
    let Some(part) = &w.late else {
        return closed_outcome(&w.seg, w.epoch);
    };
    let closed = || Fault::Unavailable("the kvstore was closed".into());
    let gate = Gate::of(&w.seg);
    match gate.round(w.epoch) {
        gate::Round::Ended if part.done() => Outcome::Ended,
        gate::Round::HandedOver => closed_outcome(&w.seg, w.epoch),
        _ => {
            // Its arrival stays: the next rounds go to the server.
            gate.close();
            Outcome::Failed(closed(), true)
        }
    }
}

/// Takes the waits whose rounds came out out of `list`.
fn take_out(list: &mut Vec<Wait>, len: &AtomicUsize) -> Vec<(Wait, Outcome)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < list.len() {
        match list[i].outcome() {
            Some(o) => out.push((list.swap_remove(i), o)),
            None => i += 1,
        }
    }
    len.store(list.len(), Ordering::Release);
    out
}
