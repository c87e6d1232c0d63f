//! A worker pool: threads that take ready ops, highest priority first.
//!
//! # States
//!
//! `PoolState` sits under one mutex per pool; it holds the ready queue, the
//! number of sleeping workers and the `stopped` flag.
//!
//! - RUNNING: `push` adds to the queue and wakes one sleeper if there is one.
//!   Workers pop; a worker that finds the queue empty sleeps on the condvar.
//! - STOPPED (`stop`, once, at engine shutdown): `push` is refused (the caller
//!   fails the op with "engine stopped"); workers wake, finish the op in hand
//!   and exit. Ops still in the queue are handed back by `stop` to be failed.
//!
//! Ordering among ready ops: higher priority first, then the order in which
//! they became ready, so equal-priority ops keep FIFO order and no op starves
//! among equals.
//!
//! Subtle: the wake-up is sent after the lock is released (so the woken thread
//! does not block on it at once), and `sleeping` is read under the lock, so a
//! worker that is about to sleep is either counted or has not yet checked the
//! heap: no wake-up is lost.
//!
//! Wake-ups are spared while a worker is *searching* (it found the queue
//! empty and spins a moment before it sleeps): `push` wakes a sleeper only
//! when no worker searches, since the searcher will take the op. A searcher
//! stops searching under the lock, in the same critical section as its last
//! look at the queue and its `sleeping += 1`, so an op pushed while it
//! searched is either seen by that look or pushed after it counted itself
//! asleep (and then wakes it). A searcher that finds an op and leaves more
//! behind wakes a sleeper if no one else searches, so work still spreads
//! over the pool. (A wake-up is a futex call, and on a VM an interrupt to
//! another vCPU.)

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use smallvec::SmallVec;

use crate::error::EngineError;
use crate::op::OpRef;

/// Ready ops by priority: buckets sorted from the highest priority down, each
/// a FIFO. With one priority in use (the common case) push and pop are O(1);
/// with P priorities, push is O(log P).
#[derive(Default)]
pub(crate) struct ReadyQueue {
    buckets: Vec<(i32, VecDeque<OpRef>)>,
    len: usize,
}

/// Empty buckets kept for reuse before they are pruned.
const SPARE_BUCKETS: usize = 8;

impl ReadyQueue {
    pub(crate) fn push(&mut self, op: OpRef) {
        let p = op.priority;
        // Sorted descending: search with the comparison reversed.
        match self.buckets.binary_search_by(|(bp, _)| p.cmp(bp)) {
            Ok(i) => self.buckets[i].1.push_back(op),
            Err(i) => self.buckets.insert(i, (p, VecDeque::from([op]))),
        }
        self.len += 1;
    }

    pub(crate) fn pop(&mut self) -> Option<OpRef> {
        if self.len == 0 {
            return None;
        }
        let i = self.buckets.iter().position(|(_, q)| !q.is_empty())?;
        let op = self.buckets[i].1.pop_front();
        self.len -= 1;
        if self.buckets.len() > SPARE_BUCKETS && self.buckets[i].1.is_empty() {
            self.buckets.retain(|(_, q)| !q.is_empty());
        }
        op
    }

    /// The highest priority queued.
    fn top(&self) -> Option<i32> {
        self.buckets
            .iter()
            .find(|(_, q)| !q.is_empty())
            .map(|(p, _)| *p)
    }

    pub(crate) fn drain(&mut self) -> Vec<OpRef> {
        self.len = 0;
        std::mem::take(&mut self.buckets)
            .into_iter()
            .flat_map(|(_, q)| q)
            .collect()
    }
}

/// Worker-local state: the pool this thread serves, and the ops of that pool
/// made ready by the op this worker just finished.
///
/// When a `push_sync` op finishes on a worker, the ops it makes ready that
/// belong to the same pool are collected here instead of being queued one by
/// one. After the finish, the worker either runs the single collected op at
/// once, when its priority is above every queued op or nothing is queued
/// (`queued`/`top` hints), or queues the whole batch and takes the next op
/// under one lock. Strictly above, so queued ops of equal priority keep their
/// FIFO turn. Subtle: the hints are read without the lock; a racing push of a
/// higher-priority op can at worst start one op later.
struct Local {
    pool: *const PoolShared,
    batch: SmallVec<[OpRef; 4]>,
}

thread_local! {
    static LOCAL: std::cell::RefCell<Local> =
        std::cell::RefCell::new(Local { pool: std::ptr::null(), batch: SmallVec::new() });
    /// Whether `keep_local` may keep: inside a finish on a worker. A cell of
    /// its own (const, no lazy init): it is set and reset around every op.
    static ALLOW: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Allows (or stops allowing) `keep_local` on this thread; what it was.
/// Callers restore it: finishes nest (an op run inline inside another's
/// finish), and each level must leave the outer one's setting as it was.
pub(crate) fn allow_keep(on: bool) -> bool {
    ALLOW.with(|a| a.replace(on))
}

/// Collects `op` into this worker's batch if it is a worker of `pool` inside
/// an allowed finish; gives it back otherwise.
pub(crate) fn keep_local(pool: &PoolShared, op: OpRef) -> Option<OpRef> {
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        if ALLOW.with(std::cell::Cell::get) && std::ptr::eq(l.pool, pool) {
            l.batch.push(op);
            None
        } else {
            Some(op)
        }
    })
}

fn take_batch() -> SmallVec<[OpRef; 4]> {
    LOCAL.with(|l| std::mem::take(&mut l.borrow_mut().batch))
}

#[derive(Default)]
struct PoolState {
    ready: ReadyQueue,
    sleeping: usize,
    /// Workers between finding the queue empty and sleeping.
    searching: usize,
    stopped: bool,
    exited: usize,
}

pub(crate) struct PoolShared {
    name: String,
    /// Hints for `keep_local`, written under the lock: ops queued, and the
    /// highest priority queued.
    queued: AtomicUsize,
    top: AtomicI32,
    state: Mutex<PoolState>,
    work: Condvar,
    exit: Condvar,
}

impl PoolShared {
    /// Queues a ready op; gives it back if the pool has stopped.
    pub(crate) fn push(&self, op: OpRef) -> Result<(), OpRef> {
        let mut st = self.state.lock();
        if st.stopped {
            return Err(op);
        }
        st.ready.push(op);
        self.publish(&st);
        let wake = st.sleeping > 0 && st.searching == 0;
        drop(st);
        if wake {
            self.work.notify_one();
        }
        Ok(())
    }

    fn publish(&self, st: &PoolState) {
        self.queued.store(st.ready.len, AtomicOrdering::Relaxed);
        self.top
            .store(st.ready.top().unwrap_or(i32::MIN), AtomicOrdering::Relaxed);
    }

    /// Queues `batch`, then takes the next op (sleeping while there is none);
    /// None once the pool has stopped, with the batch's ops failed.
    fn pop(&self, batch: SmallVec<[OpRef; 4]>) -> Option<OpRef> {
        let mut spins = 0;
        let mut st = self.state.lock();
        if st.stopped {
            drop(st);
            for op in batch {
                crate::inline::run(crate::inline::Task::Stop(op));
            }
            return None;
        }
        let more = batch.len() > 1;
        for op in batch {
            st.ready.push(op);
        }
        let mut searching = false;
        loop {
            if st.stopped {
                if searching {
                    st.searching -= 1;
                }
                return None;
            }
            if let Some(op) = st.ready.pop() {
                self.publish(&st);
                if searching {
                    st.searching -= 1;
                }
                let wake =
                    (more || searching) && st.sleeping > 0 && st.searching == 0 && st.ready.len > 0;
                drop(st);
                if wake {
                    self.work.notify_one();
                }
                return Some(op);
            }
            if !searching {
                searching = true;
                st.searching += 1;
            }
            if spins < SPIN_ROUNDS {
                // Ops often arrive microseconds apart: watch the hint for a
                // moment before paying for a sleep and a wake-up.
                spins += 1;
                drop(st);
                for _ in 0..SPIN_CHECKS {
                    std::hint::spin_loop();
                    if self.queued.load(AtomicOrdering::Relaxed) > 0 {
                        break;
                    }
                }
                std::thread::yield_now();
                st = self.state.lock();
                continue;
            }
            // Subtle: stops searching in the critical section of the look
            // above (see the module docs).
            st.searching -= 1;
            searching = false;
            st.sleeping += 1;
            self.work.wait(&mut st);
            st.sleeping -= 1;
            spins = 0;
        }
    }

    /// Whether `op` may run before everything queued.
    fn runs_first(&self, op: &OpRef) -> bool {
        self.queued.load(AtomicOrdering::Relaxed) == 0
            || op.priority > self.top.load(AtomicOrdering::Relaxed)
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
            queued: AtomicUsize::new(0),
            top: AtomicI32::new(i32::MIN),
            state: Mutex::new(PoolState::default()),
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
        st.stopped = true;
        let left = st.ready.drain();
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
pub(crate) fn is_worker_of(engine_id: u64) -> bool {
    WORKER_OF.with(|w| w.get()) == engine_id
}

fn worker_loop(shared: &Arc<PoolShared>, index: usize) {
    crate::profiler::register_thread();
    LOCAL.with(|l| l.borrow_mut().pool = Arc::as_ptr(shared));
    loop {
        let mut batch = take_batch();
        let op = if batch.len() == 1 && shared.runs_first(&batch[0]) {
            batch.pop().expect("one op in the batch")
        } else {
            match shared.pop(batch) {
                Some(op) => op,
                None => break,
            }
        };
        crate::core::execute(op, index);
    }
    let mut st = shared.state.lock();
    st.exited += 1;
    drop(st);
    shared.exit.notify_all();
}

/// Idle rounds (spin, then yield) a worker makes before it sleeps.
const SPIN_ROUNDS: u32 = 4;
/// Checks of the queue hint per idle round.
const SPIN_CHECKS: u32 = 64;

/// How long shutdown waits for a worker to leave a closure that is still
/// running after the pending ops were waited for.
pub(crate) const JOIN_GRACE: Duration = Duration::from_secs(2);
