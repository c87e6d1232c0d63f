//! The waits of a worker's parts at their gates (`Waits`): the list every
//! waiting thread polls, the watcher thread, and the helper that sums
//! chunks of the rounds others sum (the states and rules: `mod.rs`).

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
    /// How the round came out, if it did (withdrawing a push handed over).
    fn outcome(&self) -> Option<Outcome> {
        let gate = Gate::of(&self.seg);
        if let Some(part) = &self.late {
            // Ended once the round ended and this worker's output holds it
            // (L4 of `gate/late.rs`); a round handed over is left whole.
            return match gate.round(self.epoch) {
                gate::Round::Ended => part.done().then_some(Outcome::Ended),
                gate::Round::Gathering => None,
                gate::Round::HandedOver => match gate.withdraw(self.epoch) {
                    Withdrawal::Left => Some(Outcome::HandedOver),
                    Withdrawal::Ended => part.done().then_some(Outcome::Ended),
                    Withdrawal::Summing => None,
                },
            };
        }
        if self.finishing {
            let sh = gate.summed_round(self.epoch, self.seg.slot_len())?;
            return sh.all_summed().then(|| {
                gate.finish();
                Outcome::Ended
            });
        }
        match gate.round(self.epoch) {
            gate::Round::Gathering => None,
            gate::Round::Ended => Some(Outcome::Ended),
            gate::Round::HandedOver => match gate.withdraw(self.epoch) {
                Withdrawal::Left => Some(Outcome::HandedOver),
                Withdrawal::Ended => Some(Outcome::Ended),
                Withdrawal::Summing => None,
            },
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
    /// Ranks of workers known dead: a round one of them sums never ends.
    dead: Mutex<Vec<usize>>,
}

/// The waits of a store's parts at their gates, and their watcher.
pub(in crate::kinds::dist) struct Waits {
    inner: Arc<Inner>,
    /// Parts whose rounds the workers summed (`worker_summed_parts`).
    pub(super) summed: Arc<AtomicU64>,
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

    /// Chunks this worker summed beside another worker's summer, so far.
    pub(in crate::kinds::dist) fn helped(&self) -> u64 {
        self.helper
            .as_ref()
            .map_or(0, |h| h.helped.load(Ordering::Relaxed))
    }

    /// Finishes the waits whose rounds came out (a waiting thread's
    /// progress hook: it never waits for a lock or for another thread, but
    /// it sums chunks of the rounds being summed that it can help with,
    /// then waits awake, at most `SETTLE`, for them to end); `leave`: that
    /// thread stops polling, so the watcher looks soon (at once if it
    /// naps; within its 2 ms sleep on a gate if it sleeps there). Whether
    /// it finished or helped with any.
    pub(in crate::kinds::dist) fn poll(&self, leave: bool) -> bool {
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
            if let Some(mut list) = inner.list.try_lock() {
                let out = take_out(&mut list, &inner.len);
                drop(list);
                for (w, o) in out {
                    (w.then)(o);
                }
            }
        }
        if let (false, Some(h)) = (shared.is_empty(), &self.helper) {
            if h.help(&shared) == Some(true) {
                any = true;
                // Finish the waits here, awake, rather than leave them to
                // a wake-up: the rounds end a moment after their last
                // chunk.
                h.settle(&shared);
                if let Some(mut list) = inner.list.try_lock() {
                    let out = take_out(&mut list, &inner.len);
                    drop(list);
                    for (w, o) in out {
                        (w.then)(o);
                    }
                }
            }
        }
        any
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
            inner.len.store(list.len(), Ordering::Release);
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

/// The watcher: finishes the waits nobody polls, fails those past their
/// deadline, helps sum their rounds (the summer wakes it: `Gate::share`).
fn watch(inner: &Inner, timeout: Duration, helper: Option<&Helper>) {
    let mut empty_since = None;
    // The round last watched awake (its segment, epoch): once per round,
    // so a worker that waits long for a slow one sleeps.
    let mut watched: Option<(usize, u32)> = None;
    // The round of late copies (its segment, epoch) last watched awake.
    let mut late_watched: Option<(usize, u32)> = None;
    loop {
        let mut list = inner.list.lock();
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let mut done = take_out(&mut list, &inner.len);
        let now = Instant::now();
        let dead = inner.dead.lock().clone();
        let mut i = 0;
        while i < list.len() {
            if let Some(part) = list[i].late.clone() {
                if let Some(o) = late_overdue(&mut list[i], &part, &dead, now, timeout) {
                    done.push((list.swap_remove(i), o));
                } else {
                    i += 1;
                }
                continue;
            }
            let gate = Gate::of(&list[i].seg);
            let summer = gate.summer(list[i].epoch).filter(|r| dead.contains(r));
            // A helper that died holding a chunk: the round cannot end
            // either (S2 of `gate/chunks.rs`).
            let len = list[i].seg.slot_len();
            let helper = || dead_among(&dead, gate.helpers_busy(list[i].epoch, len));
            if let Some((r, what)) = summer
                .map(|r| (r, "summing"))
                .or_else(|| helper().map(|r| (r, "helping to sum")))
            {
                let f = Fault::Unavailable(format!(
                    "worker {r}, which was {what} this round in shared memory, died: the round cannot end"
                ));
                done.push((list.swap_remove(i), Outcome::Failed(f, true)));
                continue;
            }
            if list[i].deadline > now {
                i += 1;
                continue;
            }
            if list[i].finishing {
                // S2 of `gate/chunks.rs`: the round cannot end while the
                // helper may still write.
                let f = Fault::Failed(format!(
                    "a worker helping to sum this round in shared memory held a chunk of it for {timeout:?} (ranks busy: {:#x}): the round cannot end",
                    gate.helpers_busy(list[i].epoch, len)
                ));
                done.push((list.swap_remove(i), Outcome::Failed(f, true)));
                continue;
            }
            let w = &mut list[i];
            let gate = Gate::of(&w.seg);
            let workers = gate.workers();
            let outcome = match gate.withdraw(w.epoch) {
                Withdrawal::Ended => Some(Outcome::Ended),
                // The gate closed since the look above: handed over, not
                // timed out (the others' pushes go to the server too).
                Withdrawal::Left if gate.round(w.epoch) == gate::Round::HandedOver => {
                    Some(Outcome::HandedOver)
                }
                Withdrawal::Left => Some(Outcome::Failed(
                    Fault::Unavailable(format!(
                        "the round that the workers sum in shared memory did not end within {timeout:?}: {} of {workers} workers had arrived at it with this one (its push is taken back; the others have not pushed this round)",
                        gate.arrived() + 1
                    )),
                    false,
                )),
                Withdrawal::Summing if !w.summing => {
                    // The last worker is summing: give it the time again.
                    w.summing = true;
                    w.deadline = now + timeout;
                    None
                }
                // Subtle: the arrival stays counted (the round is the
                // summer's now), so the slot may still be read: in doubt.
                Withdrawal::Summing => Some(Outcome::Failed(
                    Fault::Failed(
                        "the worker that came last to a round summed in shared memory did not finish it (it may have died while summing)".into(),
                    ),
                    true,
                )),
            };
            match outcome {
                Some(o) => done.push((list.swap_remove(i), o)),
                None => i += 1,
            }
        }
        inner.len.store(list.len(), Ordering::Release);
        if !done.is_empty() {
            drop(list);
            for (w, o) in done {
                (w.then)(o);
            }
            continue;
        }
        let late = late_parts(&list);
        if !late.is_empty() {
            drop(list);
            // Awake for a while once per part: its sums and copies come
            // ready as the others supply and sum, which wakes nobody.
            let part = (Arc::as_ptr(&late[0].seg) as usize, late[0].epoch);
            let spin = late_watched != Some(part);
            late_watched = Some(part);
            let t = Instant::now();
            let mut finished = progress(&late);
            while spin && !finished && t.elapsed() < LATE_SPIN && late.iter().any(|l| !l.done()) {
                std::thread::yield_now();
                finished = progress(&late);
            }
            if finished || spin {
                continue;
            }
            list = inner.list.lock();
        }
        let shared = shared_rounds(&list, helper.is_some());
        if let (false, Some(h)) = (shared.is_empty(), helper) {
            drop(list);
            match h.help(&shared) {
                Some(helped) => {
                    if helped {
                        h.settle(&shared);
                    }
                    continue;
                }
                // Another thread of this worker helps: sleep, below.
                None => list = inner.list.lock(),
            }
        }
        if list
            .iter()
            .any(|w| w.finishing || w.late.as_ref().is_some_and(|l| !l.done()))
        {
            // A round this worker sums waits for a helper's chunk: nothing
            // wakes anyone when it is summed, and only a look at the wait
            // ends the round.
            drop(list);
            empty_since = None;
            std::thread::sleep(NAP);
            continue;
        }
        let sleep_on = list
            .iter()
            .min_by_key(|w| w.deadline)
            .map(|w| (w.seg.clone(), w.epoch, w.deadline));
        match sleep_on {
            Some((seg, epoch, deadline)) => {
                drop(list);
                empty_since = None;
                let gate = Gate::of(&seg);
                let len = seg.slot_len();
                let round = (Arc::as_ptr(&seg) as usize, epoch);
                let late = gate::late_chunk(gate.workers(), len).is_some();
                if helper.is_some()
                    && !late
                    && gate::chunk_bytes(len).is_some()
                    && watched != Some(round)
                {
                    watched = Some(round);
                    // A round worth helping with: watch for its sharing
                    // (or end) awake, for a while; a wake-up would come
                    // late for a round of a few hundred microseconds.
                    let t = Instant::now();
                    while gate.round(epoch) == gate::Round::Gathering
                        && gate.shared(epoch, len).is_none()
                        && t.elapsed() < SHARED_SPIN
                    {
                        for _ in 0..32 {
                            std::hint::spin_loop();
                        }
                        std::thread::yield_now();
                    }
                    if t.elapsed() < SHARED_SPIN {
                        continue;
                    }
                }
                let left = deadline.saturating_duration_since(Instant::now());
                gate.sleep(epoch, left.min(GATE_SLEEP));
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

/// How a wait of a round of late copies comes out at the watcher's look
/// at `now`, if it does: failed, in doubt, once a worker holding a chunk
/// not summed is known dead, or past its deadline (given the time again
/// once while every worker has arrived; never withdrawn, L2 of
/// `gate/late.rs`: its chunks may be in others' sums).
fn late_overdue(
    w: &mut Wait,
    part: &LatePart,
    dead: &[usize],
    now: Instant,
    timeout: Duration,
) -> Option<Outcome> {
    let gate = Gate::of(&w.seg);
    if let Some(r) = dead_among(dead, part.claimers_unsummed()) {
        // Its arrival stays (L2 of `gate/late.rs`): the next rounds go to
        // the server.
        gate.close();
        let f = Fault::Unavailable(format!(
            "worker {r}, which was summing part of this round in shared memory, died: the round cannot end"
        ));
        return Some(Outcome::Failed(f, true));
    }
    if w.deadline > now {
        return None;
    }
    match gate.round(w.epoch) {
        // The next look takes it out.
        gate::Round::HandedOver => return None,
        gate::Round::Ended if part.done() => return None,
        _ => {}
    }
    let (arrived, workers) = (gate.arrived() as usize, gate.workers());
    if arrived >= workers && !w.summing {
        w.summing = true;
        w.deadline = now + timeout;
        return None;
    }
    gate.close();
    let f = Fault::Failed(format!(
        "the round that the workers sum in shared memory did not end within {timeout:?} ({arrived} of {workers} workers had arrived; this worker's push stays in it, in doubt)"
    ));
    Some(Outcome::Failed(f, true))
}

/// A rank among the bits `busy` that is in `dead`.
fn dead_among(dead: &[usize], busy: u32) -> Option<usize> {
    dead.iter()
        .copied()
        .find(|&r| r < MAX_HELPER_RANK && busy & (1 << r) != 0)
}
