//! Ops run at their push: a sync `Property::Async` op (a small host copy,
//! a wait, a ticket's settle) whose vars are all free runs on the pushing
//! thread inside its push call, with no op record: no block, no boxed
//! closure, no wait counter, one lock per var to take its grant and one to
//! release it. Such an op would run on that thread anyway (an `Async` op
//! runs where it becomes ready); what it saves is the record.
//!
//! # States
//!
//! ```text
//!   try_grant each var in turn ──all granted──► RUNNING ──► release (as a finish)
//!        │ one refuses (busy)                   (closure)
//!        ▼
//!   give the taken grants back ──► pushed as usual (an op record, queued)
//! ```
//!
//! Invariants:
//!
//! - **N1.** A grant is taken only as `VarQueue::append` would grant an op
//!   appended now (`VarQueue::try_grant`), under the var's lock; so for
//!   every other op the run is an op appended, run and finished inside the
//!   push call, and push order on each var holds.
//! - **N2.** Grants given back count no write (`VarQueue::give_back`): the
//!   versions count writes that ran. What queued behind them meanwhile is
//!   dispatched, as after a finish, and the op is pushed behind it.
//! - **N3.** No lock is held while another is taken (one var at a time), and
//!   nothing waits while holding a grant: a refusal gives back at once.
//! - **N4.** The run counts as pending (`pushed` once every grant is
//!   taken, before the closure runs; `finished` after the release):
//!   `wait_for_all` never sees the engine idle while one runs (grants held
//!   a moment before the count are a push not made yet).
//! - **N5.** The closure and the release run as the thread's outermost
//!   inline task (`inline::scope`): an op the closure pushes, or one its
//!   release makes ready, that runs inline runs after it, not nested inside
//!   it while it holds its grants (as after an op record's inline run).
//!
//! Subtle: the grants are taken one var at a time, not at one instant. An
//! op Y pushed by another thread meanwhile may queue behind this op's grant
//! on one var and be granted another before this op reaches it; this op
//! then never waits for Y (it would wait while holding what Y waits for):
//! it gives every grant back, Y goes first, and this op is pushed behind
//! Y on every var Y names. Either way every var sees the two ops in one
//! order.
//!
//! A refused op's give-back may make ready ops of other threads that run
//! inline: they run on this thread, inside its push, though its own op did
//! not run (as they would inside any finish on this thread).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::core::{in_op, release, store_failure, Core};
use crate::error::{panic_message, FailureCause, OpError, OpFailure};
use crate::executor::Executor;
use crate::inline;
use crate::op::{RunContext, EXECUTING};
use crate::spec::{OpSpec, Property};
use crate::var::Access;

/// What `EXECUTING` holds while the closure of an op run at its push runs
/// (no op record, so no key of one; op keys are block addresses, never 1).
const RUN_NOW_KEY: usize = 1;

/// Runs a sync op at its push, on this thread, without an op record, if it
/// would run on this thread anyway once ready (an `Async` op: inline) and
/// every var of `spec` grants it at once; else returns the closure, to be
/// pushed as usual. `spec` is validated (`prepare_pool`); if a var is named
/// twice it is granted twice (two reads, both released) or refused (a write
/// beside another access of it: the closure goes back to the caller, whose
/// push deduplicates).
///
/// Such an op takes its grants as an appended op would (`VarQueue::try_grant`,
/// one var at a time under its lock), runs, stores its failure, and
/// releases them as `complete` does: for every other op it is an op that
/// ran and finished inside its push. A var that cannot grant at once (an
/// op of it runs or waits) gives the grants taken so far back (what was
/// queued behind them meanwhile is dispatched) and the op is pushed as
/// usual, behind what holds that var: push order is kept on every var.
/// It counts as pending while it runs (`pushed`, `finished`).
///
/// Not run now (pushed as usual): on the naive engine (its pushes have
/// their own wait), while profiling or recording the graph (the op would
/// be missing from them), inside another op's closure or an inline drain
/// (the trampoline keeps such runs from nesting without bound), and an op
/// that would be skipped (a var holds a failure and `no_skip` is false).
#[inline]
pub(crate) fn try_run_now<F>(core: &Arc<Core>, spec: &OpSpec, no_skip: bool, f: F) -> Result<(), F>
where
    F: FnOnce(RunContext<'_>) -> Result<(), OpError>,
{
    // Inlined at every push: most ops are not `Async`, and their closure
    // is then not moved in and out of a call.
    if spec.prop != Property::Async {
        return Err(f);
    }
    try_async_now(core, spec, no_skip, f)
}

/// `try_run_now` for an `Async` op.
#[allow(unsafe_code)] // the grants' release (`core::release`)
fn try_async_now<F>(core: &Arc<Core>, spec: &OpSpec, no_skip: bool, f: F) -> Result<(), F>
where
    F: FnOnce(RunContext<'_>) -> Result<(), OpError>,
{
    if !matches!(core.executor, Executor::Threaded(_))
        || core.profiler.is_enabled()
        || core.graph.is_recording()
        || in_op()
        || inline::is_active()
    {
        return Err(f);
    }
    let all = || {
        let reads = spec.read_vars().iter().map(|v| (v, Access::Read));
        reads.chain(spec.write_vars().iter().map(|v| (v, Access::Write)))
    };
    let mut taken = 0;
    for (v, access) in all() {
        if !v.try_grant(access) {
            break;
        }
        taken += 1;
    }
    let skip =
        || !no_skip && crate::var::may_hold_failures() && all().any(|(v, _)| v.failure().is_some());
    if taken < spec.vars.len() || skip() {
        let nreads = taken.min(spec.nreads);
        // SAFETY: the grants just taken; the spec's handles are counted.
        unsafe {
            release(
                &spec.read_vars()[..nreads],
                &spec.write_vars()[..taken - nreads],
                false,
            )
        };
        return Err(f);
    }
    core.op_pushed();
    // As the outermost inline task: what the closure pushes, and what the
    // release makes ready, to run inline, runs after, not inside it (N5).
    inline::scope(|| {
        let prev = EXECUTING.with(|e| e.replace(RUN_NOW_KEY));
        let ran = catch_unwind(AssertUnwindSafe(|| f(RunContext::now(spec))));
        EXECUTING.with(|e| e.set(prev));
        let cause = match ran {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(FailureCause::Error(e)),
            Err(payload) => Some(FailureCause::Panic(panic_message(payload.as_ref()))),
        };
        if let Some(c) = cause {
            let failure = OpFailure::new(spec.name.to_string(), c);
            store_failure(core, &spec.name, spec.write_vars(), &failure);
        }
        // SAFETY: every grant is held (all were taken); the spec's handles
        // are counted.
        unsafe { release(spec.read_vars(), spec.write_vars(), true) };
        core.op_finished();
    });
    Ok(())
}
