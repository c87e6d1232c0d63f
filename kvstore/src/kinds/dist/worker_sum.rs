//! Rounds this worker sums with the others at a part's gate (`gate/mod.rs`),
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
//! buffer or in doubt) closes the gate first: the round then goes to the
//! server whole, the workers that already arrived handing their pushes
//! over (each withdraws and sends its push, still in its slot, by
//! message). The server closes a part's gate the same way (an optimizer
//! set, a worker died), and so does a worker that learns a node died or
//! its server restarted (the old process's gates). Closing never waits: a
//! round being summed ends at the gate, which closes as it ends (unless it
//! never ends: below).
//!
//! A part of at least two chunks (`gate/chunks.rs`) is summed by the
//! summer and the waiters together: a thread that polls its waits, or the
//! watcher (awake for up to `SHARED_SPIN` while such a round gathers),
//! claims chunks of each round it finds being summed and sums them beside
//! the summer (`Helper`: one thread of this worker at a time), which ends
//! the round once every chunk is summed: at once, or, if a helper holds
//! the last chunks for longer than a moment (`chunks_summed_soon`), by a
//! wait of its own in `Waits` (`Wait::finishing`), so that it never
//! blocks.
//!
//! A round whose summer, or a helper holding a chunk, died or stalls
//! never ends. A wait that fails while its round is being summed (its
//! summer or a busy helper known dead, or twice the timeout) leaves its
//! arrival counted; a summer whose helper holds a chunk past the timeout,
//! or is known dead, fails its own part without ending the round. Either
//! part is then in doubt (`parts::Unsure`), and its pushes go by message, closing
//! the gate. If the round does end there after all, the server counts it
//! while this worker's count of the key's rounds (`DistKey::seen`) does
//! not: the push it sends again is answered as a push of a round done, as
//! on the message path after such a failure.
//!
//! # Waits: states
//!
//! A wait is in `Inner::list` from its arrival until it is finished, by
//! exactly one thread: the one that takes it out of the list under the
//! lock (a poller, the watcher, or `close`). Callbacks run after the lock
//! is let go (they complete engine ops, which may run the next op of a key
//! inline, which may arrive at a gate and add a wait; or send a push
//! handed over).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use pskv_gpu::cpu::CpuKernels;
use pskv_transport::{KvResponse, Region};
use smallvec::SmallVec;

use super::inflight::Inflight;
use super::parts::{OnAnswer, PartSend, Round};
use super::{DistKey, DistStore};
use crate::dtype::DType;
use crate::error::Fault;
use crate::gate::{self, Arrival, Gate, Shared, Withdrawal, MAX_HELPER_RANK};
use crate::wire::Op;

/// How often the watcher looks for waits nobody polls.
const NAP: Duration = Duration::from_millis(1);
/// The watcher's longest sleep on a gate (then it looks at all waits).
const GATE_SLEEP: Duration = Duration::from_millis(2);
/// How long a helper waits awake for the rounds it helped to end (the
/// summer ends a round once it sees the last chunk summed).
const SETTLE: Duration = Duration::from_micros(200);
/// How long the watcher watches awake for a round to share (then it sleeps
/// on the gate).
const SHARED_SPIN: Duration = Duration::from_millis(1);
/// How long the watcher naps with nothing waiting before it sleeps until
/// a wait is added.
const IDLE: Duration = Duration::from_millis(50);

/// How a waiting part's round came out.
enum Outcome {
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
type Then = Box<dyn FnOnce(Outcome) + Send>;

/// One part waiting for the others at its gate.
struct Wait {
    seg: Arc<Region>,
    epoch: u32,
    /// The part's type (to help sum its round).
    dtype: DType,
    deadline: Instant,
    /// The round was found being summed at the deadline once already.
    summing: bool,
    /// This worker sums the round: it ends it once every chunk is summed
    /// (its helpers' too: `gate/chunks.rs`).
    finishing: bool,
    then: Then,
}

impl Wait {
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
pub(super) struct Waits {
    inner: Arc<Inner>,
    /// Parts whose rounds the workers summed (`worker_summed_parts`).
    summed: Arc<AtomicU64>,
    timeout: Duration,
    watcher: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// What helps sum the rounds of the waits (None: this worker's rank is
    /// too high to help).
    helper: Option<Arc<Helper>>,
}

/// The rounds a wait may help sum: the part's segment, epoch and type.
type ToHelp = SmallVec<[(Arc<Region>, u32, DType); 2]>;

/// The rounds of `list` being summed with chunks left to claim (none
/// unless `helps`).
fn shared_rounds(list: &[Wait], helps: bool) -> ToHelp {
    if !helps {
        return SmallVec::new();
    }
    list.iter()
        .filter(|w| Gate::of(&w.seg).shared(w.epoch, w.seg.slot_len()).is_some())
        .map(|w| (w.seg.clone(), w.epoch, w.dtype))
        .collect()
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
        for (seg, epoch, dtype) in rounds {
            if let Some(sh) = Gate::of(seg).shared(*epoch, seg.slot_len()) {
                let n = sh.sum_chunks(Some(self.rank), |c| {
                    // Cannot fail for slots of one size; the summer's own
                    // chunks would show it.
                    let _ = sum_slots(&self.kernels, seg, *dtype, c);
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
            .any(|(seg, e, _)| Gate::of(seg).round(*e) == gate::Round::Gathering)
            && t.elapsed() < SETTLE
        {
            for _ in 0..16 {
                std::hint::spin_loop();
            }
        }
    }
}

impl Waits {
    pub(super) fn new(timeout: Duration, kernels: Arc<CpuKernels>, rank: usize) -> Waits {
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
    pub(super) fn worker_died(&self, rank: usize) {
        self.inner.dead.lock().push(rank);
        self.inner.cv.notify_one();
    }

    /// Parts whose rounds the workers summed, so far.
    pub(super) fn summed(&self) -> u64 {
        self.summed.load(Ordering::Relaxed)
    }

    /// Chunks this worker summed beside another worker's summer, so far.
    pub(super) fn helped(&self) -> u64 {
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
        let out = take_out(&mut list, &inner.len);
        let shared = shared_rounds(&list, self.helper.is_some());
        drop(list);
        let mut any = !out.is_empty();
        for (w, o) in out {
            (w.then)(o);
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

    /// Adds a wait (its round had not come out when it arrived); starts
    /// the watcher on the first.
    fn add(&self, mut w: Wait) {
        let inner = &self.inner;
        {
            let mut list = inner.list.lock();
            if inner.closed.load(Ordering::Acquire) {
                drop(list);
                // Not left at the gate: the others must not wait for it.
                return (w.then)(closed_outcome(&w.seg, w.epoch));
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
    pub(super) fn close(&self) {
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
    /// end.
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
            (w.then)(closed_outcome(&w.seg, w.epoch));
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
        if list.iter().any(|w| w.finishing) {
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
                if helper.is_some() && gate::chunk_bytes(len).is_some() && watched != Some(round) {
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

/// Whether every chunk of the summer's round `sh` is summed within a
/// moment (its helpers hold the last ones for a chunk's time, unless one is
/// not running).
fn chunks_summed_soon(sh: &Shared<'_, '_>) -> bool {
    let t = Instant::now();
    let mut spins = 0u32;
    while !sh.all_summed() {
        spins = spins.wrapping_add(1);
        if spins <= 128 {
            std::hint::spin_loop();
        } else if t.elapsed() < SETTLE {
            std::thread::yield_now();
        } else {
            return false;
        }
    }
    true
}

/// A rank among the bits `busy` that is in `dead`.
fn dead_among(dead: &[usize], busy: u32) -> Option<usize> {
    dead.iter()
        .copied()
        .find(|&r| r < MAX_HELPER_RANK && busy & (1 << r) != 0)
}

/// Sums the byte range `range` of the slots of `seg`'s workers into the
/// value slot, in rank order.
fn sum_slots(k: &CpuKernels, seg: &Region, dtype: DType, range: Range<usize>) -> Result<(), Fault> {
    let workers = Gate::of(seg).workers();
    // SAFETY: every worker wrote its slot before it arrived, and nobody but
    // the round's summers, each its own chunks, reads a slot or writes the
    // value slot until the round ends (G2 of `gate/mod.rs`, S1 and S2 of
    // `gate/chunks.rs`).
    let ins: SmallVec<[&[u8]; 4]> = (0..workers)
        .map(|r| {
            unsafe { seg.slot(r) }
                .get(range.clone())
                .unwrap_or_default()
        })
        .collect();
    let out = unsafe { seg.slot_mut(workers) }.get_mut(range);
    crate::comm::sum_dense(k, dtype, out.unwrap_or_default(), &ins)
}

/// Part `i` of `inf` done through the value slot: its answer carries no
/// values (`cb` copies them out of the slot), or `r`'s error.
fn slot_done(inf: &Inflight, cb: OnAnswer, i: usize, r: Result<(), Fault>) {
    inf.part_done(Ok(KvResponse::default()), move |resp| {
        r.and_then(|()| cb(i, resp, false))
    });
}

impl DistStore {
    /// Part `p` of an op at its segment's gate. None if it was handled
    /// here: summed at the gate (or waiting there), read from the value
    /// slot, or failed; else the part, to be sent to its server (having
    /// closed the gate, if it is a push).
    pub(super) fn at_gate(
        &self,
        dk: &DistKey,
        inf: &Arc<Inflight>,
        round: &Round,
        p: PartSend,
    ) -> Option<PartSend> {
        let op = p.head.op;
        let pushes = matches!(op, Op::Push | Op::PushPull | Op::RowPush);
        if !p.head.sync || !(pushes || op == Op::Pull) {
            return Some(p);
        }
        let Some(seg) = dk.segs.read().get(p.i).cloned().flatten() else {
            return Some(p);
        };
        let gate = Gate::of(&seg);
        let i = p.i;
        let answer = |r| slot_done(inf, round.on_answer.clone(), i, r);
        if !p.head.shm || seg.tag() != p.head.shm_tag {
            // By message: a push closes the gate first (G1 of `gate/mod.rs`);
            // a round gathering there is handed over to the server.
            if pushes {
                gate.close();
            }
            return Some(p);
        }
        if op == Op::Pull {
            // The value slot holds the last round's value while the gate is
            // open (the next round needs this worker's push, which comes
            // after this pull).
            if !gate.is_open() {
                return Some(p);
            }
            answer(Ok(()));
            return None;
        }
        match gate.arrive(self.po.my_rank() as usize) {
            Arrival::Closed => Some(p),
            Arrival::Last(epoch) => {
                let (dtype, len) = (dk.local.meta.dtype, seg.slot_len());
                let k = &self.comm.kernels;
                let summed = match gate.share(epoch, len) {
                    None => sum_slots(k, &seg, dtype, 0..len),
                    Some(sh) => {
                        let mut r = Ok(());
                        sh.sum_chunks(None, |c| r = r.clone().and(sum_slots(k, &seg, dtype, c)));
                        if !chunks_summed_soon(&sh) {
                            // A helper holds a chunk and is not running: the
                            // round ends once it is summed, by whoever polls
                            // the waits (this thread must not block here).
                            let w = Wait {
                                seg: seg.clone(),
                                epoch,
                                dtype,
                                deadline: Instant::now(),
                                summing: false,
                                finishing: true,
                                then: self.then_of(p, inf, round),
                            };
                            match w.outcome() {
                                Some(o) => (w.then)(o),
                                None => self.waits.add(w),
                            }
                            return None;
                        }
                        r
                    }
                };
                // The others are let go even if the sum failed (it cannot for
                // slots of one size): they must not wait for the timeout.
                gate.finish();
                if summed.is_ok() {
                    self.waits.summed.fetch_add(1, Ordering::Relaxed);
                }
                answer(summed);
                None
            }
            Arrival::Waiting(epoch) => {
                let w = Wait {
                    seg: seg.clone(),
                    epoch,
                    dtype: dk.local.meta.dtype,
                    deadline: Instant::now(),
                    summing: false,
                    finishing: false,
                    then: self.then_of(p, inf, round),
                };
                // Often over already (the last worker was just behind).
                match w.outcome() {
                    Some(o) => (w.then)(o),
                    None => self.waits.add(w),
                }
                None
            }
        }
    }

    /// What finishes part `p` of `inf` once its round at the gate comes
    /// out: done (the value slot holds the sum), sent to the server (handed
    /// over), or failed (in doubt if its arrival stays counted).
    fn then_of(&self, p: PartSend, inf: &Arc<Inflight>, round: &Round) -> Then {
        let i = p.i;
        let me = self.handle();
        let (inf, cb, land) = (inf.clone(), round.on_answer.clone(), round.land.clone());
        let summed = self.waits.summed.clone();
        Box::new(move |o| match (o, me.upgrade()) {
            (Outcome::HandedOver, Some(me)) => me.send_part(p, false, false, inf, cb, land),
            (o, _) => {
                let r = match o {
                    Outcome::Ended => {
                        summed.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Outcome::HandedOver => Err(Fault::Unavailable("the kvstore was closed".into())),
                    Outcome::Failed(f, doubt) => {
                        if let (true, Some(u)) = (doubt, &p.unsure) {
                            // Before the op completes: its next push goes by
                            // message, leaving the slot alone.
                            u.note(i, (p.head.shm_tag, p.seg.as_ref()), false);
                        }
                        Err(f)
                    }
                };
                slot_done(&inf, cb, i, r);
            }
        })
    }

    /// Closes the gates of `dk`'s parts on server `rank` (None: on every
    /// server): rounds gathering there are handed over to their server,
    /// and the next rounds go to it. After a node died (a worker: the
    /// server fails the rounds, naming it; the server: its parts' pushes
    /// fail) or a server restarted (the new process refuses pushes meant
    /// for the old one's segments: the caller pushes again).
    pub(super) fn close_gates_of(&self, dk: &DistKey, rank: Option<u32>) {
        let segs = dk.segs.read();
        for (s, p) in segs.iter().zip(dk.parts.iter()) {
            if let (Some(seg), true) = (s, rank.is_none_or(|r| p.server == r)) {
                Gate::of(seg).close();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// An open gate of two workers, worker 0 waiting at it; its epoch.
    fn one_waiting() -> (Arc<Region>, u32) {
        let seg = Arc::new(Region::create(3, 8).unwrap());
        let gate = Gate::of(&seg);
        gate.open();
        let Arrival::Waiting(e) = gate.arrive(0) else {
            panic!("the first of two waits")
        };
        (seg, e)
    }

    /// What a wait came to: "ended", "handed over", or the failure with its
    /// doubt.
    fn outcome_of(o: Outcome) -> (String, bool) {
        match o {
            Outcome::Ended => ("ended".into(), false),
            Outcome::HandedOver => ("handed over".into(), false),
            Outcome::Failed(f, doubt) => (f.to_string(), doubt),
        }
    }

    /// A wait on a round whose last worker arrived but never finishes (its
    /// summer died): failed, in doubt, as soon as the death is known; else
    /// at twice the timeout. A wait on a gate closed under it is handed
    /// over; one whose round ends, ended.
    #[test]
    fn the_watcher_fails_a_dead_summers_waiters_and_hands_over_closed_rounds() {
        let timeout = Duration::from_millis(200);
        let waits = Waits::new(timeout, Arc::new(CpuKernels::single_threaded()), 0);
        let (tx, rx) = mpsc::channel();
        let wait_on = |seg: &Arc<Region>, epoch| {
            let tx = tx.clone();
            waits.add(Wait {
                seg: seg.clone(),
                epoch,
                dtype: DType::F32,
                deadline: Instant::now(),
                summing: false,
                finishing: false,
                then: Box::new(move |o| tx.send(outcome_of(o)).unwrap()),
            });
        };
        // Summer (worker 1) known dead.
        let (seg, e) = one_waiting();
        let gate = Gate::of(&seg);
        assert!(matches!(gate.arrive(1), Arrival::Last(_)));
        let t = Instant::now();
        wait_on(&seg, e);
        waits.worker_died(1);
        let (msg, doubt) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            msg.contains("worker 1") && msg.contains("died") && doubt,
            "{msg}"
        );
        assert!(t.elapsed() < timeout, "took {:?}", t.elapsed());
        // Summer not known dead: twice the timeout.
        let (seg, e) = one_waiting();
        let gate = Gate::of(&seg);
        assert!(matches!(gate.arrive(0), Arrival::Last(_)));
        let t = Instant::now();
        wait_on(&seg, e);
        let (msg, doubt) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(msg.contains("did not finish") && doubt, "{msg}");
        assert!(t.elapsed() >= timeout * 2, "took {:?}", t.elapsed());
        // Closed under it: handed over; a round that ends: ended.
        let (seg, e) = one_waiting();
        let gate = Gate::of(&seg);
        wait_on(&seg, e);
        gate.close();
        let (msg, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(msg, "handed over");
        assert_eq!(gate.arrived(), 0, "its arrival taken back");
        gate.open();
        let Arrival::Waiting(e) = gate.arrive(0) else {
            panic!("waits")
        };
        wait_on(&seg, e);
        assert!(matches!(gate.arrive(1), Arrival::Last(_)));
        gate.finish();
        let (msg, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(msg, "ended");
        // A round nobody joins: timed out, taken back, not in doubt.
        let Arrival::Waiting(e) = gate.arrive(0) else {
            panic!("waits")
        };
        wait_on(&seg, e);
        let (msg, doubt) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(msg.contains("did not end within") && !doubt, "{msg}");
        assert_eq!(gate.arrived(), 0);
        waits.close();
    }

    /// A round of three workers shared in chunks: worker 0 waits, worker 1
    /// sums, worker 2 helps. `hold` runs in worker 2's chunk.
    fn shared_round_of_three(
        len: usize,
        hold: impl FnOnce() + Send + 'static,
    ) -> (Arc<Region>, u32, std::thread::JoinHandle<()>) {
        let seg = Arc::new(Region::create(4, len).unwrap());
        let gate = Gate::of(&seg);
        gate.open();
        let Arrival::Waiting(e) = gate.arrive(0) else {
            panic!("waits")
        };
        let Arrival::Waiting(_) = gate.arrive(2) else {
            panic!("waits")
        };
        let Arrival::Last(_) = gate.arrive(1) else {
            panic!("the last")
        };
        gate.share(e, len).unwrap();
        let (tx, rx) = mpsc::channel();
        let helper = {
            let seg = seg.clone();
            std::thread::spawn(move || {
                let gate = Gate::of(&seg);
                let mut hold = Some(hold);
                gate.shared(e, len).unwrap().sum_chunks(Some(2), |_| {
                    tx.send(()).unwrap();
                    if let Some(h) = hold.take() {
                        h()
                    }
                });
            })
        };
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        (seg, e, helper)
    }

    /// A wait at `seg`'s gate for the round of `epoch` that reports to `tx`.
    fn wait(
        seg: &Arc<Region>,
        epoch: u32,
        finishing: bool,
        tx: &mpsc::Sender<(String, bool)>,
    ) -> Wait {
        let tx = tx.clone();
        Wait {
            seg: seg.clone(),
            epoch,
            dtype: DType::F32,
            deadline: Instant::now(),
            summing: false,
            finishing,
            then: Box::new(move |o| tx.send(outcome_of(o)).unwrap()),
        }
    }

    /// The summer does not end a round while a helper holds a chunk of it:
    /// it leaves the ending to its waits, which end it once the chunk is
    /// summed.
    #[test]
    fn the_summer_ends_a_round_only_once_its_helpers_chunks_are_summed() {
        const LEN: usize = 64 << 10;
        let kernels = Arc::new(CpuKernels::single_threaded());
        let summer = Waits::new(Duration::from_secs(20), kernels.clone(), 1);
        let go = Arc::new(std::sync::Barrier::new(2));
        let g = go.clone();
        let (seg, e, helper) = shared_round_of_three(LEN, move || {
            g.wait();
        });
        let gate = Gate::of(&seg);
        let sh = gate.summed_round(e, LEN).unwrap();
        assert_eq!(
            sh.sum_chunks(None, |c| sum_slots(&kernels, &seg, DType::F32, c).unwrap()),
            1
        );
        assert!(!chunks_summed_soon(&sh), "the helper holds its chunk");
        let (tx, rx) = mpsc::channel();
        summer.add(wait(&seg, e, true, &tx));
        std::thread::sleep(Duration::from_millis(20));
        assert!(rx.try_recv().is_err(), "not ended under a helper's chunk");
        assert_eq!(gate.round(e), gate::Round::Gathering);
        go.wait();
        helper.join().unwrap();
        let (msg, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(msg, "ended");
        assert_eq!(gate.round(e), gate::Round::Ended);
        summer.close();
    }

    /// A helper that dies holding a chunk (here: its sum panics, so it
    /// neither counts the chunk nor clears its bit) leaves the round
    /// unended: the summer's part and the waiter's fail, in doubt, naming
    /// it once it is known dead; while it is not (it might still write),
    /// the summer's at the timeout and the waiter's at twice that.
    #[test]
    fn a_helper_that_died_holding_a_chunk_fails_the_round() {
        const LEN: usize = 64 << 10;
        let timeout = Duration::from_millis(300);
        let kernels = Arc::new(CpuKernels::single_threaded());
        for known_dead in [false, true] {
            // Worker 1 sums; worker 0 waits (and, its rank too high, does
            // not help); worker 2 helps, and dies.
            let summer = Waits::new(timeout, kernels.clone(), 1);
            let waiter = Waits::new(timeout, kernels.clone(), MAX_HELPER_RANK);
            let (seg, e, helper) =
                shared_round_of_three(LEN, || panic!("the helper dies in its chunk"));
            assert!(helper.join().is_err());
            let gate = Gate::of(&seg);
            assert_eq!(gate.helpers_busy(e, LEN), 1 << 2);
            let sh = gate.summed_round(e, LEN).unwrap();
            assert_eq!(
                sh.sum_chunks(None, |c| sum_slots(&kernels, &seg, DType::F32, c).unwrap()),
                1
            );
            assert!(!chunks_summed_soon(&sh));
            let (tx, rx) = mpsc::channel();
            let (wtx, wrx) = mpsc::channel();
            let t = Instant::now();
            summer.add(wait(&seg, e, true, &tx));
            waiter.add(wait(&seg, e, false, &wtx));
            if known_dead {
                summer.worker_died(2);
                waiter.worker_died(2);
            }
            let (msg, doubt) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            let (wmsg, wdoubt) = wrx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert!(doubt && wdoubt);
            if known_dead {
                for m in [&msg, &wmsg] {
                    assert!(m.contains("worker 2") && m.contains("helping"), "{m}");
                }
                assert!(t.elapsed() < timeout, "took {:?}", t.elapsed());
            } else {
                assert!(msg.contains("held a chunk"), "{msg}");
                assert!(wmsg.contains("did not finish"), "{wmsg}");
                assert!(t.elapsed() >= timeout * 2, "took {:?}", t.elapsed());
            }
            assert_eq!(gate.round(e), gate::Round::Gathering, "never ended");
            summer.close();
            waiter.close();
        }
    }
}
