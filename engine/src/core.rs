//! The shared core of an engine: how ops are pushed onto vars, dispatched to
//! an executor, run, and finished. `Engine` (in `engine/`) is the public face.
//!
//! # Pending count
//!
//! Two counters, each on cache lines of its own so that pushers and finishers
//! do not write the same line: `pushed` (ops pushed) and `finished` (ops
//! finished); the pending count is their difference, and `wait_for_all`
//! sleeps until it is zero. An op whose read a worker holds over counts as
//! finished only when that read is released (`held_reads.rs`), with the
//! others held with it, in one addition.
//!
//! - `finished <= pushed` at every instant of the SeqCst order: a push
//!   counts its op before the op can run.
//! - A reader takes `finished` first, then `pushed`. If they are equal, the
//!   engine was idle when `finished` was read: `pushed` then was at most the
//!   later value, which equals `finished`, and at least `finished`. (Read the
//!   other way round, an op pushed and finished between the two reads could
//!   hide an older one still pending.)
//! - Subtle: a finisher that makes them equal must wake a waiter that checked
//!   a moment before. Both sides use SeqCst on the counters and
//!   `idle_waiters` (a Dekker-style handshake): the waiter registers, then
//!   reads; the finisher counts, then looks for waiters and, if any, reads
//!   `pushed` and notifies under the lock when it equals its own count. Take
//!   the finisher whose count reaches the final total: either its count
//!   came before the waiter's read (the waiter sees equality and does not
//!   sleep), or its look came after the registration and it notifies. If an
//!   op is pushed between its count and its read of `pushed`, it does not
//!   notify, and the finisher of that op takes the duty over.
//! - So `wait_for_all` returns at a moment when the whole engine is idle: a
//!   caller may wait (up to its timeout) while other threads keep pushing,
//!   as with one counter.
//! - `pending()` is `pushed` at the second read less `finished` at the
//!   first: at least the true count at either read, perhaps more than at
//!   any one instant; never less (a wrong order would show as a huge value
//!   and a wait that times out, not as an early return).

use std::borrow::Cow;
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use smallvec::SmallVec;

use crate::body::{BodyCell, Ran};
use crate::config::{EngineConfig, EngineKind};
use crate::core_ref::{CoreRef, Held};
use crate::error::{panic_message, EngineError, FailureCause, OpFailure};
use crate::executor::{Executor, MAX_GPUS};
use crate::graph::GraphRecorder;
use crate::inline;
use crate::op::{
    Op, OpRef, RunContext, Waiting, EXECUTING, FINISHED, GATE_ASYNC, GATE_FRESH, GATE_GAVE_UP,
    GATE_LATE, GATE_STARTED, RUNNING,
};
use crate::profiler::Profiler;
use crate::spec::{Context, OpSpec, PackedContext};
use crate::sync::Padded;
use crate::var::{Access, OpVars, Var, VarInner};

static NEXT_ENGINE_ID: AtomicU64 = AtomicU64::new(1);

/// A new process-wide engine id.
pub(crate) fn next_engine_id() -> u64 {
    NEXT_ENGINE_ID.fetch_add(1, Ordering::Relaxed)
}

/// The failure log's size at which it is pruned.
const FAILURE_LOG_PRUNE_AT: usize = 4096;

/// Failures recorded since the last `wait_for_all`, in order: the var each
/// reached (None for an op that writes no var) and the failure.
type FailureLog = Vec<(Option<Weak<VarInner>>, Arc<OpFailure>)>;

/// What an engine's handles, ops and workers share.
///
/// Layout: `pushed` (written by every push), `finished` (by every finish)
/// and `idle_waiters` (read by every finish) have cache lines of their own,
/// and as the first field of a `repr(C)` struct aligned to 128, `pushed`
/// also keeps the `Arc`'s counts (written by every async op's completion
/// handle and by threads outside the engine that dispatch, run or finish
/// its ops: ops themselves hold no count, `core_ref.rs`) off the lines of
/// the fields that every push and run reads.
#[repr(C)]
pub(crate) struct Core {
    pushed: Padded<AtomicUsize>,
    finished: Padded<AtomicUsize>,
    idle_waiters: Padded<AtomicUsize>,
    /// A process-wide id, so a worker thread knows which engine it serves.
    pub(crate) id: u64,
    pub(crate) config: EngineConfig,
    pub(crate) executor: Executor,
    idle: Mutex<()>,
    idle_cv: Condvar,
    /// Naive engine: signalled whenever an op finishes (pushes wait on it).
    finished_cv: Condvar,
    failures: Mutex<FailureLog>,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) profiler: Profiler,
    pub(crate) graph: GraphRecorder,
}

impl Core {
    pub(crate) fn new(engine_id: u64, config: EngineConfig, executor: Executor) -> Core {
        let profiler = Profiler::new(config.profile_path.is_some());
        Core {
            id: engine_id,
            config,
            executor,
            pushed: Padded(AtomicUsize::new(0)),
            finished: Padded(AtomicUsize::new(0)),
            idle_waiters: Padded(AtomicUsize::new(0)),
            idle: Mutex::new(()),
            idle_cv: Condvar::new(),
            finished_cv: Condvar::new(),
            failures: Mutex::new(Vec::new()),
            shutting_down: AtomicBool::new(false),
            profiler,
            graph: GraphRecorder::default(),
        }
    }

    pub(crate) fn pending(&self) -> usize {
        // `finished` first (see the module docs).
        let finished = self.finished.load(Ordering::SeqCst);
        let pushed = self.pushed.load(Ordering::SeqCst);
        debug_assert!(pushed >= finished, "an op finished that was not counted");
        pushed.wrapping_sub(finished)
    }

    /// Waits until no op is pending, or `timeout` passes (None: no limit).
    pub(crate) fn wait_idle(&self, timeout: Option<Duration>) -> Result<(), EngineError> {
        // It sleeps: what stood back while this thread polled reads again.
        crate::progress::leave();
        let start = Instant::now();
        let deadline = timeout.map(|t| start + t);
        self.idle_waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.idle.lock();
        let result = loop {
            let left = self.pending();
            if left == 0 {
                break Ok(());
            }
            match deadline {
                None => self.idle_cv.wait(&mut guard),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break Err(EngineError::Timeout {
                            what: format!("all ops to finish ({left} still pending)"),
                            after: now - start,
                        });
                    }
                    self.idle_cv.wait_for(&mut guard, d - now);
                }
            }
        };
        drop(guard);
        self.idle_waiters.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// Counts an op pushed (before it can run: see the module docs).
    #[inline]
    pub(crate) fn op_pushed(&self) {
        self.pushed.fetch_add(1, Ordering::SeqCst);
    }

    #[inline]
    pub(crate) fn op_finished(&self) {
        self.ops_finished(1);
    }

    /// Counts `n` ops finished (a worker's held reads' ops, at once:
    /// `held_reads.rs`).
    #[inline]
    pub(crate) fn ops_finished(&self, n: usize) {
        let finished = self.finished.fetch_add(n, Ordering::SeqCst) + n;
        if self.idle_waiters.load(Ordering::SeqCst) > 0
            && self.pushed.load(Ordering::SeqCst) == finished
        {
            let _guard = self.idle.lock();
            self.idle_cv.notify_all();
        }
    }

    fn log_failure(&self, var: Option<&Var>, failure: &Arc<OpFailure>) {
        let mut log = self.failures.lock();
        if log.len() >= FAILURE_LOG_PRUNE_AT {
            // Bound the log of a program that never calls wait_for_all: drop
            // entries whose var is gone or no longer holds the failure (keep
            // every var-less one up to the bound: they are the only record).
            log.retain(|(var, f)| match var {
                None => true,
                Some(w) => w
                    .upgrade()
                    .and_then(|inner| inner.failure())
                    .is_some_and(|held| Arc::ptr_eq(&held, f)),
            });
            let excess = log.len().saturating_sub(FAILURE_LOG_PRUNE_AT / 2);
            log.drain(..excess);
        }
        log.push((var.map(Var::downgrade), failure.clone()));
    }

    /// Takes the failures recorded since the last call; clears them from the
    /// vars that still hold them and returns the first one still held by a
    /// var, or the first one of an op that writes no var, of those no var
    /// handed to a caller yet (a skipped read-only op logs the failure it
    /// inherited, which a wait on its var may have reported).
    pub(crate) fn take_failures(&self) -> Option<Arc<OpFailure>> {
        let log = std::mem::take(&mut *self.failures.lock());
        let mut first = None;
        for (var, failure) in log {
            let live = match var {
                None => true,
                Some(weak) => match weak.upgrade() {
                    Some(inner) => {
                        let held = inner.failure().is_some_and(|f| Arc::ptr_eq(&f, &failure));
                        inner.clear_failure_if(&failure);
                        held
                    }
                    None => false,
                },
            };
            if live && first.is_none() && !failure.was_told() {
                first = Some(failure);
            }
        }
        first
    }
}

/// Pushes an op. `spec` must be deduplicated and validated by the caller
/// (`prepare_pool`). Returns the op if `keep` (the naive engine waits on
/// it); else the pusher's handle goes to the op's dispatch, or to the op's
/// wait counter if the op is not ready (`op_block.rs`, W1).
#[allow(unsafe_code)] // the vars' counts (`var/mod.rs`, K3); the queues' handles (W1)
pub(crate) fn push<B: BodyCell + 'static>(
    core: &Arc<Core>,
    spec: OpSpec,
    no_skip: bool,
    body: B,
    keep: bool,
) -> Option<OpRef> {
    let OpSpec {
        name,
        vars,
        nreads,
        ctx,
        prop,
        priority,
    } = spec;
    let vars = OpVars::new(vars);
    core.op_pushed();
    // Never dropped here: once a var queues the op's uncounted handle, an
    // unwind must leak the op, not free it under that handle; the count
    // goes to the dispatch or to the wait counter (W1).
    let op = ManuallyDrop::new(OpRef::new(Op {
        name,
        nreads: nreads as u32,
        ctx: PackedContext::new(ctx),
        prop,
        priority,
        no_skip,
        gate: AtomicU8::new(GATE_FRESH),
        // An op's vars are far fewer than 2^32 (`Op::wait`).
        wait: crate::sync::AtomicU32::new(vars.len() as u32 + 1),
        vars,
        state: AtomicU8::new(RUNNING),
        start_ns: AtomicU64::new(0),
        start_tid: crate::sync::AtomicU32::new(0),
        core: CoreRef::new(core),
        body,
    }));
    if core.graph.is_recording() {
        core.graph.record(&op);
    }
    let mut granted = 0;
    for (i, v) in op.vars.iter().enumerate() {
        let access = if i < nreads {
            Access::Read
        } else {
            Access::Write
        };
        // SAFETY: the push's own handle, before its subtraction (W1).
        if v.append(access, || unsafe { op.waiting() }) {
            granted += 1;
        }
    }
    // SAFETY: appended to every var, and not released from any before the
    // last subtraction below (`var/mod.rs`, K3).
    unsafe { op.vars.give_up() };
    // Made before the subtraction, after which the op may be freed unless
    // it was ready (`op_block.rs`, W1).
    let kept = keep.then(|| OpRef::clone(&op));
    // Subtle: one subtraction for the vars that granted at once and the extra
    // one held while appending; AcqRel as in `Waiting::grant`.
    let before = op
        .wait
        .fetch_sub(granted + 1, crate::sync::Ordering::AcqRel);
    if before == granted + 1 {
        // Ready: the pusher's handle becomes the dispatch's.
        dispatch(ManuallyDrop::into_inner(op));
    }
    // Else the handle's count is the wait counter's now, and `op` is not
    // touched again (W1).
    kept
}

/// Sends a ready op to where it runs.
pub(crate) fn dispatch(op: OpRef) {
    // Held to the end: a pool's wake-up touches the core after the op may
    // have run and finished on a worker.
    let core = op.core;
    let _held = Held::of(core);
    match &core.executor {
        Executor::Naive => inline::run(inline::Task::Execute(op)),
        Executor::Threaded(pools) => {
            match pools.pool_for(op.ctx.get(), op.prop) {
                Ok(None) => inline::run(inline::Task::Execute(op)),
                Ok(Some(pool)) => {
                    let Some(op) = crate::pool::keep_local(pool.shared(), op) else {
                        return;
                    };
                    if let Err(ops) = pool.shared().push(op) {
                        for op in ops {
                            inline::run(inline::Task::Stop(op));
                        }
                    }
                }
                // The pool was started at push; this cannot fail after that,
                // but if it did the op must still finish.
                Err(_) => inline::run(inline::Task::Stop(op)),
            }
        }
    }
}

/// Makes sure the op's pool exists (GPU pools start on first use) and that
/// its context is one the engine serves.
#[inline]
pub(crate) fn prepare_pool(core: &Core, spec: &OpSpec) -> Result<(), EngineError> {
    if let Context::Gpu(n) | Context::CpuPinned(n) = spec.ctx {
        if n >= MAX_GPUS {
            return Err(EngineError::InvalidContext {
                op: spec.name.to_string(),
                ctx: spec.ctx,
                max_gpus: MAX_GPUS,
            });
        }
    }
    if let Executor::Threaded(pools) = &core.executor {
        pools.pool_for(spec.ctx, spec.prop)?;
    }
    Ok(())
}

/// Whether this thread is running an op's closure.
pub(crate) fn in_op() -> bool {
    EXECUTING.with(|e| e.get() != 0)
}

/// Runs a ready op on this thread (`worker`: its index in the pool).
pub(crate) fn execute(op: OpRef, worker: usize) {
    // Held to the end: the op may finish (its completion) while its body runs.
    let core = op.core;
    let _held = Held::of(core);
    let naive = core.config.kind == EngineKind::Naive;
    if naive
        && op
            .gate
            .compare_exchange(GATE_FRESH, GATE_STARTED, Ordering::SeqCst, Ordering::SeqCst)
            == Err(GATE_GAVE_UP)
    {
        fail_unrun(&op, naive_timed_out(&core));
        return;
    }
    // A failure on any of its vars skips the op (none was ever stored in
    // most processes: then no var is looked at, the sink of a fan-in's
    // thousand among them).
    if !op.no_skip && crate::var::may_hold_failures() {
        if let Some(failure) = op.vars.iter().find_map(Var::failure) {
            op.body.discard();
            if op.claim_done() {
                complete(&op, Some(failure));
            }
            return;
        }
    }
    if core.profiler.is_enabled() {
        core.profiler.start(&op);
    }
    let ctx = RunContext::new(&op, worker);
    let prev = EXECUTING.with(|e| e.replace(op.key()));
    let ran = catch_unwind(AssertUnwindSafe(|| op.body.run(ctx, &op)));
    EXECUTING.with(|e| e.set(prev));
    let cause = match ran {
        Ok(Ran::Async) => {
            let late = naive
                && op.gate.compare_exchange(
                    GATE_STARTED,
                    GATE_ASYNC,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) == Err(GATE_LATE);
            if late {
                finish(&op, Some(naive_timed_out(&core)));
            }
            return;
        }
        Ok(Ran::Gone) => return,
        Ok(Ran::Sync(Ok(()))) => None,
        Ok(Ran::Sync(Err(e))) => Some(FailureCause::Error(e)),
        Err(payload) => Some(FailureCause::Panic(panic_message(payload.as_ref()))),
    };
    if !op.claim_done() {
        if let Some(c) = cause {
            tracing::warn!(op = %op.name, "op failed after it completed: {c}");
        }
        return;
    }
    // The op is done and this thread is free: the ops this finish makes ready
    // on this worker's pool may be kept to run here next.
    let kept = crate::pool::allow_keep(true);
    complete(&op, cause.map(|c| OpFailure::new(op.name.to_string(), c)));
    crate::pool::allow_keep(kept);
}

/// Finishes an op once: `cause` None for success.
pub(crate) fn finish(op: &OpRef, cause: Option<FailureCause>) {
    if op.claim_done() {
        let failure = cause.map(|c| OpFailure::new(op.name.to_string(), c));
        complete(op, failure);
    }
}

/// Why the naive engine's push stopped waiting for an op.
fn naive_timed_out(core: &Core) -> FailureCause {
    FailureCause::CompletionTimedOut(core.config.wait_timeout.unwrap_or_default())
}

/// The naive engine's push stopped waiting for `op` (its `wait_timeout`
/// passed). One gate, `Op::gate`, decides with `execute` what happens, so
/// that only an op that holds its vars is ever finished for it:
///
/// - not started (FRESH, most often not granted its vars yet): GAVE_UP; it
///   fails with the timeout when `execute` gets it, without running
///   (finishing it now would release grants it does not hold);
/// - its body runs (STARTED): LATE; a sync body finishes the op itself,
///   an async one is finished with the timeout once it has returned;
/// - its async body returned and no completion came (ASYNC): finished now
///   with the timeout (a late completion is then ignored).
pub(crate) fn give_up(op: &OpRef) {
    let mut seen = op.gate.load(Ordering::SeqCst);
    loop {
        let next = match seen {
            GATE_FRESH => GATE_GAVE_UP,
            GATE_STARTED => GATE_LATE,
            GATE_ASYNC => {
                finish(op, Some(naive_timed_out(&op.core)));
                return;
            }
            _ => return,
        };
        match op
            .gate
            .compare_exchange(seen, next, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => return,
            Err(now) => seen = now,
        }
    }
}

/// Fails an op that will never run because the engine stopped.
pub(crate) fn stop(op: &OpRef) {
    fail_unrun(op, FailureCause::EngineStopped);
}

/// Drops an op's closure unrun and finishes the op with `cause`.
fn fail_unrun(op: &OpRef, cause: FailureCause) {
    op.body.discard();
    finish(op, Some(cause));
}

/// The second half of finishing (the caller has claimed the op): store the
/// failure, release the vars, dispatch what became ready.
#[allow(unsafe_code)] // the vars' release (`release`)
#[inline]
fn complete(op: &OpRef, failure: Option<Arc<OpFailure>>) {
    // Held past `op_finished`, whose wake-up reads the core after its count.
    let core = op.core;
    let _held = Held::of(core);
    if let Some(f) = &failure {
        store_failure(&core, &op.name, op.writes(), f);
    }
    if core.profiler.is_enabled() {
        core.profiler.end(op, failure.is_some());
    }
    // SAFETY: the op holds its grants until here; its handles are not
    // read after (the state and counts below are the op's and the core's).
    let held = unsafe { crate::held_reads::release_finished(op) };
    op.state.store(FINISHED, Ordering::Release);
    if let Executor::Naive = core.executor {
        let _guard = core.idle.lock();
        core.finished_cv.notify_all();
    }
    if !held {
        core.op_finished();
    }
}

/// Stores the failure of op `name` on the vars it writes that hold none
/// yet, and logs it for `wait_for_all`.
pub(crate) fn store_failure(core: &Core, name: &str, writes: &[Var], f: &Arc<OpFailure>) {
    tracing::debug!(op = %name, "op failed or skipped: {f}");
    if writes.is_empty() {
        core.log_failure(None, f);
    }
    for v in writes {
        if v.failure().is_none() {
            v.set_failure(f);
            core.log_failure(Some(v), f);
        }
    }
}

/// Releases the grants of an op that reads `reads` and writes `writes`
/// (it `ran`; else they go back unused), and dispatches the ops that
/// became ready.
///
/// # Safety
/// The caller holds a grant of each var's access (an op finishing, or a
/// run at its push) and reads no uncounted handle of them after this
/// call: a var may be freed by its release (`var/mod.rs`, K2).
#[allow(unsafe_code)]
pub(crate) unsafe fn release(reads: &[Var], writes: &[Var], ran: bool) {
    let mut grants: SmallVec<[Waiting; 8]> = SmallVec::new();
    let vars = reads.iter().map(|v| (v, Access::Read));
    for (v, access) in vars.chain(writes.iter().map(|v| (v, Access::Write))) {
        // SAFETY: the caller's contract; each handle is released once here
        // and not read again.
        unsafe { v.release_grant(access, ran, &mut grants) };
    }
    // Most releases grant nothing: then no iterator is made or dropped.
    if !grants.is_empty() {
        dispatch_granted(&mut grants);
    }
}

/// Counts one grant off each of `grants` (which it empties) and
/// dispatches those now ready.
#[inline]
pub(crate) fn dispatch_granted(grants: &mut SmallVec<[Waiting; 8]>) {
    for g in grants.drain(..) {
        if let Some(op) = g.grant() {
            dispatch(op);
        }
    }
}

/// Waits until `op` has finished, or `timeout` passes (false).
pub(crate) fn wait_finished(op: &OpRef, timeout: Option<Duration>) -> bool {
    crate::progress::leave();
    let core = &op.core;
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut guard = core.idle.lock();
    while !op.is_finished() {
        match deadline {
            None => core.finished_cv.wait(&mut guard),
            Some(d) => {
                if core.finished_cv.wait_until(&mut guard, d).timed_out() {
                    return op.is_finished();
                }
            }
        }
    }
    true
}

/// A name for an internal op about `var`: with the var (`wait_for_var(var
/// 7 'w')`) while a trace or a graph is recorded, where the name is all
/// that tells one such op from another; else `what` alone (a wait's op is
/// pushed per call: formatting its name was 3% of a 4 B push-pull's time;
/// the messages that name such an op also name its var).
pub(crate) fn internal_name(core: &Core, what: &'static str, var: &Var) -> Cow<'static, str> {
    if core.profiler.is_enabled() || core.graph.is_recording() {
        Cow::Owned(format!("{what}({})", var.describe()))
    } else {
        Cow::Borrowed(what)
    }
}
