//! A worker pool: threads that take ready ops, highest priority first.
//!
//! # States
//!
//! A pool has two places for ready ops:
//!
//! - the *inbox*, a lock-free FIFO (`crossbeam_deque::Injector`): every
//!   `push` lands here, without a lock;
//! - `PoolState`, under one mutex per pool: the ready queue (by priority),
//!   and the counts of sleeping and searching workers; `stop` sets the
//!   stop flag (`Gate::stopped`) under it too. Workers take the lock to
//!   pop: under it a worker first moves the whole inbox into the ready
//!   queue, then pops the highest op. A pusher takes it only to wake a
//!   sleeper; `stop` and `join` at shutdown.
//!
//! So an op's place among the ready ones is fixed when a worker moves it,
//! in inbox order: equal priorities keep FIFO order and no op starves among
//! equals, as when pushes went straight into the ready queue.
//!
//! Why the inbox: a pusher and the workers of a busy pool took the one
//! lock per op, and on a VM with fewer vCPUs than threads the lock's holder
//! is sometimes preempted while holding it; the pusher then spun and parked
//! (the dispatch bench's fan-out/fan-in: about a third of the pusher's
//! samples in the pool lock's slow path and the context switches it
//! caused).
//!
//! - RUNNING: `push` adds to the inbox and wakes one sleeper if there is
//!   one and no worker searches. A worker that finds nothing releases the
//!   reads it holds over (`held_reads.rs`; what that makes ready it takes
//!   in), then searches (spins a moment on the hints), then sleeps on the
//!   condvar. A worker that took an op it may not run while it holds reads
//!   releases them and gives the op back, first in its turn.
//! - STOPPED (`stop`, once, at engine shutdown): workers wake, finish the op
//!   in hand and exit (a worker reads the stop flag before it runs the op
//!   its own finish made ready; its batch, and an op given back, then go to
//!   `pop`, which fails them; at its exit it releases what it holds and
//!   fails what that kept). Ops in the queue and the inbox are handed back by
//!   `stop` to be failed; a `push` that sees `stopped` takes back what is in
//!   the inbox for its caller to fail.
//!
//! # Memory ordering: no wake-up and no op lost
//!
//! Store-fence-load pairs (Dekker's), a store, a `SeqCst` fence and a load
//! on either side, so that at least one side sees the other's store:
//!
//! - **W1 (sleep).** A pusher: inbox push, fence, load `idle`. A worker
//!   about to sleep, under the lock: store `idle` (counted asleep, no
//!   longer searching), fence, look at the inbox. Either the worker sees
//!   the op (and takes the inbox in instead of sleeping) or the pusher sees
//!   it asleep with no searcher; the pusher then takes the lock (so the
//!   sleeper is inside `wait`, which released it) and notifies. Subtle: ops
//!   the look finds may have been pushed while the worker still searched
//!   (their pushers skipped their wake-ups), so, as in W1', the worker
//!   wakes a sleeper for any it leaves behind.
//! - **W1' (a searcher finds an op).** A searcher counted in `idle` lets a
//!   pusher skip its wake-up (the searcher will take the op). A searcher
//!   that finds an op, under the lock: store `idle` (no longer searching),
//!   fence, look at the inbox and the queue; if anything is left and no one
//!   else searches, it wakes a sleeper. Either it sees an op pushed while
//!   it was counted, or that op's pusher saw it no longer searching (and
//!   woke a sleeper itself). So work still spreads over the pool.
//! - **W2 (stop).** A pusher: inbox push, fence, load `stopped`. `stop`:
//!   store `stopped`, fence, drain the inbox. Either `stop` drains the op or
//!   the pusher sees `stopped` and drains it (both may drain: each op is
//!   taken once). Subtle: after `stop`, no worker moves the inbox in
//!   (`take_in` checks `stopped` under the lock that `stop` set it under);
//!   an op it moved into the queue then would be neither run nor failed.
//!
//! `idle` is written only under the lock, at each change of the counts: a
//! worker starts searching (no fence: a pusher that sees it counted skips
//! a wake-up that W1' makes up for), finds an op while searching (W1'),
//! goes to sleep (W1), wakes (no fence: it takes the inbox in next), or
//! leaves at stop. (A wake-up is a futex call, and on a VM an interrupt to
//! another vCPU.)

use std::sync::atomic::{
    fence, AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering as AtomicOrdering,
};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_deque::{Injector, Steal};
use parking_lot::{Condvar, Mutex, MutexGuard};
use smallvec::SmallVec;

use crate::error::EngineError;
use crate::op::OpRef;
use crate::sync::Padded;

mod batch;
mod ready;

use batch::take_batch;
pub(crate) use batch::{allow_keep, keep_local};
use ready::ReadyQueue;

#[derive(Default)]
struct PoolState {
    ready: ReadyQueue,
    sleeping: usize,
    /// Workers between finding the queue empty and sleeping.
    searching: usize,
    exited: usize,
}

/// `Gate::idle`: sleeping workers in the low half, searching ones in the
/// high half.
const SEARCHING_ONE: u64 = 1 << 32;

/// What a pusher reads after its push, on lines of their own (written
/// only when a worker starts or stops searching or sleeping, and at stop).
#[derive(Default)]
struct Gate {
    /// `sleeping` and `searching` of `PoolState`, written under the lock
    /// with them, read by pushers without it (W1).
    idle: AtomicU64,
    /// Set by `stop`, under the lock: read by pushers without it (W2), by
    /// workers under it.
    stopped: AtomicBool,
}

/// Hints for `keep_local` and searchers, written under the lock at every
/// pop: ops in the ready queue, and the highest priority there.
struct Hints {
    queued: AtomicUsize,
    top: AtomicI32,
}

/// Layout: the inbox's ends, the gate, the hints and the locked state each
/// have lines of their own (`Padded`; the inbox pads its ends itself), so
/// that a worker's pop does not take from a pusher the lines it reads.
pub(crate) struct PoolShared {
    /// Where pushes land (see the module docs).
    inbox: Injector<OpRef>,
    gate: Padded<Gate>,
    hints: Padded<Hints>,
    state: Padded<Mutex<PoolState>>,
    work: Condvar,
    exit: Condvar,
    name: String,
}

impl PoolShared {
    /// Queues a ready op. If the pool has stopped, returns the ops this
    /// call took back out of the inbox (this one among them unless `stop`
    /// took it first) for the caller to fail.
    pub(crate) fn push(&self, op: OpRef) -> Result<(), Vec<OpRef>> {
        self.inbox.push(op);
        // Subtle: W1, W1' and W2 of the module docs, the pusher's side.
        fence(AtomicOrdering::SeqCst);
        if self.stopped() {
            return Err(self.take_inbox());
        }
        let idle = self.gate.idle.load(AtomicOrdering::Relaxed);
        if idle % SEARCHING_ONE > 0 && idle / SEARCHING_ONE == 0 {
            // The sleeper that W1 saw is inside `wait` once the lock is free.
            drop(self.state.lock());
            self.work.notify_one();
        }
        Ok(())
    }

    /// Everything in the inbox, oldest first.
    fn take_inbox(&self) -> Vec<OpRef> {
        let mut ops = Vec::new();
        self.steal_all(|op| ops.push(op));
        ops
    }

    /// Hands `put` every op in the inbox, oldest first.
    fn steal_all(&self, mut put: impl FnMut(OpRef)) {
        while !self.inbox.is_empty() {
            match self.inbox.steal() {
                Steal::Success(op) => put(op),
                Steal::Empty => break,
                Steal::Retry => std::hint::spin_loop(),
            }
        }
    }

    /// Whether `stop` ran (under the lock: as of the holder's critical
    /// section, since `stop` sets it under the lock).
    fn stopped(&self) -> bool {
        self.gate.stopped.load(AtomicOrdering::Relaxed)
    }

    /// Moves the inbox into the ready queue (the caller holds the lock);
    /// nothing once stopped (W2). Subtle: a steal may wait for a slot whose
    /// pusher was preempted between taking it and writing it (the inbox's
    /// `Backoff` yields meanwhile), holding the lock that long.
    fn take_in(&self, st: &mut PoolState) {
        if !self.stopped() {
            self.steal_all(|op| st.ready.push(op));
        }
    }

    fn publish(&self, st: &PoolState) {
        self.hints
            .queued
            .store(st.ready.len(), AtomicOrdering::Relaxed);
        self.hints
            .top
            .store(st.ready.top().unwrap_or(i32::MIN), AtomicOrdering::Relaxed);
    }

    /// Writes `idle` from the state (under the lock).
    fn publish_idle(&self, st: &PoolState) {
        let idle = st.sleeping as u64 + st.searching as u64 * SEARCHING_ONE;
        self.gate.idle.store(idle, AtomicOrdering::Relaxed);
    }

    /// Whether anything waits in the inbox or the ready queue (a hint).
    fn has_work(&self) -> bool {
        self.hints.queued.load(AtomicOrdering::Relaxed) > 0 || !self.inbox.is_empty()
    }

    /// Queues `batch`, then takes the next op (sleeping while there is none);
    /// None once the pool has stopped, with the batch's ops failed.
    /// `front`, if any, goes back first in its priority's turn (an op this
    /// worker took and gave back).
    // Subtle: always, for the worker loop's own call (the other, from
    // `flush_and_retake`, is cold): out of line, a worker's op cost about 60
    // instructions more (callgrind of the dispatch bench's (a)).
    #[inline(always)]
    fn pop(&self, front: Option<OpRef>, batch: Option<SmallVec<[OpRef; 4]>>) -> Option<OpRef> {
        let mut spins = 0;
        let mut st = self.state.lock();
        if self.stopped() {
            drop(st);
            for op in front.into_iter().chain(batch.into_iter().flatten()) {
                crate::inline::run(crate::inline::Task::Stop(op));
            }
            return None;
        }
        // The inbox first, then the batch: ops take their FIFO turns in the
        // order they reach the queue, as when pushes went straight in.
        self.take_in(&mut st);
        let more = batch.as_ref().map_or(0, |b| b.len()) + usize::from(front.is_some()) > 1;
        if let Some(op) = front {
            st.ready.push_front(op);
        }
        if let Some(batch) = batch {
            for op in batch {
                st.ready.push(op);
            }
        }
        let mut searching = false;
        // The last `sleep` returned without sleeping (W1's look found ops).
        let mut looked = false;
        loop {
            if self.stopped() {
                if searching {
                    st.searching -= 1;
                    self.publish_idle(&st);
                }
                return None;
            }
            if let Some(op) = st.ready.pop() {
                self.publish(&st);
                let mut left = st.ready.len() > 0;
                if searching {
                    st.searching -= 1;
                    self.publish_idle(&st);
                    // Subtle: W1', the searcher's side.
                    fence(AtomicOrdering::SeqCst);
                    left = left || !self.inbox.is_empty();
                }
                // Subtle: `looked`: W1's look found ops whose pushers may
                // have skipped their wake-ups while this worker searched;
                // it took them all in after the fence, so `left` is exact.
                let wake =
                    (more || searching || looked) && st.sleeping > 0 && st.searching == 0 && left;
                drop(st);
                if wake {
                    self.work.notify_one();
                }
                return Some(op);
            }
            if !searching && crate::held_reads::holding() {
                // Held reads go before this worker waits (`held_reads.rs`),
                // and what their release made ready and this worker kept
                // (inline tasks' finishes) is queued: as a finish's batch.
                drop(st);
                return flush_and_retake(self, None);
            }
            if !searching {
                searching = true;
                st.searching += 1;
                self.publish_idle(&st);
            }
            if spins < SPIN_ROUNDS {
                // Ops often arrive microseconds apart: watch the hints for a
                // moment before paying for a sleep and a wake-up.
                spins += 1;
                drop(st);
                for _ in 0..SPIN_CHECKS {
                    std::hint::spin_loop();
                    if self.has_work() {
                        break;
                    }
                }
                std::thread::yield_now();
                st = self.state.lock();
                self.take_in(&mut st);
                continue;
            }
            let slept;
            (st, slept) = self.sleep(st);
            searching = false;
            looked = !slept;
            spins = 0;
        }
    }

    /// Stops searching and sleeps until woken, unless W1's look finds an
    /// op; returns with the inbox taken in, and whether it slept: false
    /// when W1's look found ops (whose pushers may have skipped their
    /// wake-ups while this worker searched: the caller then wakes a sleeper
    /// for what it leaves).
    fn sleep<'a>(&'a self, mut st: MutexGuard<'a, PoolState>) -> (MutexGuard<'a, PoolState>, bool) {
        // Subtle: stops searching in the critical section of the look below
        // (see the module docs).
        st.searching -= 1;
        st.sleeping += 1;
        self.publish_idle(&st);
        // Subtle: W1, the worker's side.
        fence(AtomicOrdering::SeqCst);
        let slept = self.inbox.is_empty() && !self.stopped();
        if slept {
            self.work.wait(&mut st);
        }
        st.sleeping -= 1;
        self.publish_idle(&st);
        self.take_in(&mut st);
        (st, slept)
    }

    /// Whether `op` may run before everything queued (and the pool has not
    /// stopped: then the batch goes to `pop`, which fails it).
    fn runs_first(&self, op: &OpRef) -> bool {
        !self.stopped()
            && self.inbox.is_empty()
            && (self.hints.queued.load(AtomicOrdering::Relaxed) == 0
                || op.priority > self.hints.top.load(AtomicOrdering::Relaxed))
    }
}

/// A set of worker threads over one ready queue.
pub(crate) struct Pool {
    shared: Arc<PoolShared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// Starts `nthreads` workers named `pskv-{name}-{i}` for engine `engine_id`.
    pub(crate) fn start(engine_id: u64, name: &str, nthreads: usize) -> Result<Pool, EngineError> {
        let shared = Arc::new(PoolShared {
            name: name.to_string(),
            inbox: Injector::new(),
            gate: Padded(Gate::default()),
            hints: Padded(Hints {
                queued: AtomicUsize::new(0),
                top: AtomicI32::new(i32::MIN),
            }),
            state: Padded(Mutex::new(PoolState::default())),
            work: Condvar::new(),
            exit: Condvar::new(),
        });
        let pool = Pool {
            shared,
            threads: Mutex::new(Vec::new()),
        };
        for i in 0..nthreads.max(1) {
            let shared = pool.shared.clone();
            let tname = format!("pskv-{name}-{i}");
            let handle = std::thread::Builder::new()
                .name(tname.clone())
                .spawn(move || {
                    WORKER_OF.with(|w| w.set(engine_id));
                    worker_loop(&shared, i)
                })
                .map_err(|source| EngineError::Spawn {
                    name: tname,
                    source,
                })?;
            pool.threads.lock().push(handle);
        }
        Ok(pool)
    }

    pub(crate) fn shared(&self) -> &Arc<PoolShared> {
        &self.shared
    }

    /// Stops the pool: no new ops; workers exit after the op in hand. Returns
    /// the ops that were still queued, for the caller to fail.
    pub(crate) fn stop(&self) -> Vec<OpRef> {
        let mut st = self.shared.state.lock();
        self.shared
            .gate
            .stopped
            .store(true, AtomicOrdering::Relaxed);
        // Subtle: W2, the stopping side.
        fence(AtomicOrdering::SeqCst);
        let mut left = st.ready.drain();
        left.extend(self.shared.take_inbox());
        drop(st);
        self.shared.work.notify_all();
        left
    }

    /// Joins the workers that exit before `deadline`; returns the names of
    /// those still busy (left detached: they are inside a closure that does not
    /// return).
    pub(crate) fn join(&self, deadline: Instant) -> Vec<String> {
        let threads = std::mem::take(&mut *self.threads.lock());
        let n = threads.len();
        let mut st = self.shared.state.lock();
        while st.exited < n {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            self.shared.exit.wait_for(&mut st, deadline - now);
        }
        let all_exited = st.exited >= n;
        drop(st);
        let mut busy = Vec::new();
        for h in threads {
            if all_exited || h.is_finished() {
                let _ = h.join();
            } else {
                busy.push(h.thread().name().unwrap_or(&self.shared.name).to_string());
            }
        }
        busy
    }
}

thread_local! {
    /// The id of the engine whose worker this thread is (0: none).
    static WORKER_OF: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Whether the calling thread is a worker of engine `engine_id`.
#[inline]
pub(crate) fn is_worker_of(engine_id: u64) -> bool {
    WORKER_OF.with(|w| w.get()) == engine_id
}

/// Releases the reads this worker holds over (`held_reads.rs`) and takes
/// again: before an op it took that does not read their var (`front`, which
/// goes back first in its turn, since what the release makes ready may come
/// before it by priority), or before it searches (no `front`). What the
/// finishes of inline tasks the release ran kept here goes to the queue as
/// a finish's batch. None once the pool has stopped. Out of line: most ops
/// take nothing of it.
#[cold]
#[inline(never)]
fn flush_and_retake(shared: &PoolShared, front: Option<OpRef>) -> Option<OpRef> {
    crate::held_reads::flush();
    shared.pop(front, take_batch())
}

fn worker_loop(shared: &Arc<PoolShared>, index: usize) {
    crate::profiler::register_thread();
    batch::serve(shared);
    'ops: loop {
        let mut op = match take_batch() {
            Some(mut batch) if batch.len() == 1 && shared.runs_first(&batch[0]) => {
                batch.pop().expect("one op in the batch")
            }
            batch => match shared.pop(None, batch) {
                Some(op) => op,
                None => break,
            },
        };
        while crate::held_reads::must_flush_before(&op) {
            op = match flush_and_retake(shared, Some(op)) {
                Some(op) => op,
                None => break 'ops,
            };
        }
        crate::core::execute(op, index);
    }
    // The pool has stopped: what is held goes, and from here on this
    // thread holds none (the ops failed below finish here too).
    crate::held_reads::stop_holding();
    // A loop: failing an op may run an inline task whose finish keeps more.
    while let Some(batch) = take_batch() {
        for op in batch {
            crate::inline::run(crate::inline::Task::Stop(op));
        }
    }
    debug_assert!(
        !crate::held_reads::holding(),
        "a read held past a worker's exit"
    );
    let mut st = shared.state.lock();
    st.exited += 1;
    drop(st);
    shared.exit.notify_all();
}

/// Idle rounds (spin, then yield) a worker makes before it sleeps: about
/// 35 µs on an AMD EPYC VM with nothing else to run (a round: 2.1 to 2.4
/// µs). 16 rather than 4 since the inbox: the pusher
/// of a busy pool then wakes sleepers less often (BENCHMARKS.md, "The
/// pool's inbox").
const SPIN_ROUNDS: u32 = 16;
/// Checks of the queue hint per idle round.
const SPIN_CHECKS: u32 = 64;

/// How long shutdown waits for a worker to leave a closure that is still
/// running after the pending ops were waited for.
pub(crate) const JOIN_GRACE: Duration = Duration::from_secs(2);
