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
//! buffer or in doubt) closes the gate first: the round then goes to the
//! server whole, the workers that already arrived handing their pushes
//! over (each withdraws and sends its push, still in its slot, by
//! message). The server closes a part's gate the same way (an optimizer
//! set, a worker died), and so does a worker that learns a node died or
//! its server restarted (the old process's gates). Closing never waits: a
//! round being summed ends at the gate, which closes as it ends.
//!
//! A wait that fails while its round is being summed (its summer died,
//! or took twice the timeout) leaves its arrival counted: the part is
//! then in doubt (`parts::Unsure`), and its pushes go by message, closing
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

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use pskv_transport::{KvResponse, Region};
use smallvec::SmallVec;

use super::inflight::Inflight;
use super::parts::{OnAnswer, PartSend, Round};
use super::{DistKey, DistStore};
use crate::error::Fault;
use crate::gate::{self, Arrival, Gate, Withdrawal};
use crate::wire::Op;

/// How often the watcher looks for waits nobody polls.
const NAP: Duration = Duration::from_millis(1);
/// The watcher's longest sleep on a gate (then it looks at all waits).
const GATE_SLEEP: Duration = Duration::from_millis(2);
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
    deadline: Instant,
    /// The round was found being summed at the deadline once already.
    summing: bool,
    then: Then,
}

impl Wait {
    /// How the round came out, if it did (withdrawing a push handed over).
    fn outcome(&self) -> Option<Outcome> {
        let gate = Gate::of(&self.seg);
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
}

impl Waits {
    pub(super) fn new(timeout: Duration) -> Waits {
        Waits {
            inner: Arc::default(),
            summed: Arc::default(),
            timeout,
            watcher: Mutex::new(None),
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

    /// Finishes the waits whose rounds came out (a waiting thread's
    /// progress hook: never blocks); `leave`: that thread stops polling,
    /// so the watcher looks soon (at once if it naps; within its 2 ms
    /// sleep on a gate if it sleeps there). Whether it finished any.
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
        drop(list);
        let any = !out.is_empty();
        for (w, o) in out {
            (w.then)(o);
        }
        any
    }

    /// Adds a wait (its round had not come out when it arrived); starts
    /// the watcher on the first.
    fn add(&self, seg: Arc<Region>, epoch: u32, then: Then) {
        let inner = &self.inner;
        {
            let mut list = inner.list.lock();
            if inner.closed.load(Ordering::Acquire) {
                drop(list);
                // Not left at the gate: the others must not wait for it.
                return then(closed_outcome(&seg, epoch));
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
        if w.is_none() && !inner.closed.load(Ordering::Acquire) {
            let (inner, timeout) = (self.inner.clone(), self.timeout);
            let spawned = std::thread::Builder::new()
                .name("pskv-gate-watch".into())
                .spawn(move || watch(&inner, timeout));
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
/// deadline.
fn watch(inner: &Inner, timeout: Duration) {
    let mut empty_since = None;
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
            let summer = Gate::of(&list[i].seg).summer(list[i].epoch);
            if let Some(r) = summer.filter(|r| dead.contains(r)) {
                let f = Fault::Unavailable(format!(
                    "worker {r}, which was summing this round in shared memory, died: the round cannot end"
                ));
                done.push((list.swap_remove(i), Outcome::Failed(f, true)));
                continue;
            }
            if list[i].deadline > now {
                i += 1;
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
        let sleep_on = list
            .iter()
            .min_by_key(|w| w.deadline)
            .map(|w| (w.seg.clone(), w.epoch, w.deadline));
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
            // By message: a push closes the gate first (G1 of `gate.rs`);
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
            Arrival::Last => {
                let workers = gate.workers();
                // SAFETY: every worker wrote its slot before it arrived, and
                // nobody writes a slot or reads the value slot until the
                // round ends (G2 of `gate.rs`).
                let ins: SmallVec<[&[u8]; 4]> =
                    (0..workers).map(|r| unsafe { seg.slot(r) }).collect();
                let summed = crate::comm::sum_dense(
                    &self.comm.kernels,
                    dk.local.meta.dtype,
                    unsafe { seg.slot_mut(workers) },
                    &ins,
                );
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
                let me = self.handle();
                let (inf, cb, land) = (inf.clone(), round.on_answer.clone(), round.land.clone());
                let summed = self.waits.summed.clone();
                let then: Then = Box::new(move |o| match (o, me.upgrade()) {
                    (Outcome::HandedOver, Some(me)) => me.send_part(p, false, false, inf, cb, land),
                    (o, _) => {
                        let r = match o {
                            Outcome::Ended => {
                                summed.fetch_add(1, Ordering::Relaxed);
                                Ok(())
                            }
                            Outcome::HandedOver => {
                                Err(Fault::Unavailable("the kvstore was closed".into()))
                            }
                            Outcome::Failed(f, doubt) => {
                                if let (true, Some(u)) = (doubt, &p.unsure) {
                                    // Before the op completes: its next push
                                    // goes by message, leaving the slot alone.
                                    u.note(i, (p.head.shm_tag, p.seg.as_ref()), false);
                                }
                                Err(f)
                            }
                        };
                        slot_done(&inf, cb, i, r);
                    }
                });
                let w = Wait {
                    seg: seg.clone(),
                    epoch,
                    deadline: Instant::now(),
                    summing: false,
                    then,
                };
                // Often over already (the last worker was just behind).
                match w.outcome() {
                    Some(o) => (w.then)(o),
                    None => self.waits.add(seg, epoch, w.then),
                }
                None
            }
        }
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
        let waits = Waits::new(timeout);
        let (tx, rx) = mpsc::channel();
        let wait_on = |seg: &Arc<Region>, epoch| {
            let tx = tx.clone();
            waits.add(
                seg.clone(),
                epoch,
                Box::new(move |o| tx.send(outcome_of(o)).unwrap()),
            );
        };
        // Summer (worker 1) known dead.
        let (seg, e) = one_waiting();
        let gate = Gate::of(&seg);
        assert_eq!(gate.arrive(1), Arrival::Last);
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
        assert_eq!(gate.arrive(0), Arrival::Last);
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
        assert_eq!(gate.arrive(1), Arrival::Last);
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
}
