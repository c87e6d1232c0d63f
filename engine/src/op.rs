//! Ops in flight: the engine's record of a pushed op (`Op`), what its
//! closure learns when it runs ([`RunContext`]), and the handle that
//! completes it ([`Completion`]). What a caller pushes ([`OpSpec`] plus a
//! closure) is `spec.rs`'s; the closure's cell, `body.rs`'s.
//!
//! # The op wait counter
//!
//! `Op::wait` starts at `vars + 1`. Each var that grants the op subtracts one;
//! the pusher subtracts the extra one after it has appended the op to every
//! var, so an op can never be dispatched while it is still being appended. The
//! thread that brings the counter to zero owns the op's dispatch (exactly one
//! thread does).
//!
//! # Completion
//!
//! `Op::state` goes RUNNING → CLAIMED → FINISHED. Whoever makes the first step
//! (a completion handle, the handle's drop, the executor after a return or a
//! panic, a skip, or shutdown) runs the op's finish: store the failure,
//! release the vars, dispatch what became ready, mark it FINISHED, then
//! count it as no longer pending. Later attempts are ignored.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::Ordering::{AcqRel, Acquire};
use std::sync::atomic::{AtomicU64, AtomicU8};
use std::sync::Arc;

use crate::body::BodyCell;
use crate::core::Core;
use crate::core_ref::{CoreRef, Held};
use crate::error::{FailureCause, OpError};
use crate::spec::{Context, OpSpec, PackedContext, Property};
use crate::sync::AtomicU32;
use crate::var::{OpVars, Var};

/// What a running closure learns about where it runs, and its grant: the
/// vars its op names, which nothing else touches while the closure runs
/// (the engine runs a writer of a var alone, and readers together). The
/// borrow ties the grant to the call: a `RunContext` cannot outlive it.
#[derive(Clone)]
pub struct RunContext<'a> {
    /// The op's context.
    pub ctx: Context,
    /// The index of the worker thread within its pool (a GPU closure can map
    /// it to a stream); 0 for ops run inline.
    pub worker: usize,
    /// The op's priority.
    pub priority: i32,
    grant: Grant<'a>,
}

/// What a closure runs under: an op of the engine's, or the grant of an op
/// run at its push (`run_now.rs`), which has no op record.
#[derive(Clone, Copy)]
enum Grant<'a> {
    Op(&'a Op),
    Now(&'a OpSpec),
}

/// How a running op holds a var it names.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// The op reads it: other readers may run beside it, no writer.
    Read,
    /// The op writes it: nothing else that names it runs meanwhile.
    Write,
}

impl<'a> RunContext<'a> {
    pub(crate) fn new(op: &'a Op, worker: usize) -> RunContext<'a> {
        RunContext {
            ctx: op.ctx.get(),
            worker,
            priority: op.priority,
            grant: Grant::Op(op),
        }
    }

    /// For an op run at its push, on the pushing thread, under the grants
    /// of `spec`'s vars (deduplicated); it is not profiled.
    pub(crate) fn now(spec: &'a OpSpec) -> RunContext<'a> {
        RunContext {
            ctx: spec.ctx,
            worker: 0,
            priority: spec.priority,
            grant: Grant::Now(spec),
        }
    }

    /// The op's name.
    pub fn op_name(&self) -> &str {
        match self.grant {
            Grant::Op(op) => &op.name,
            Grant::Now(spec) => &spec.name,
        }
    }

    /// Whether the engine is profiling: an op may then time its own parts
    /// and [`record`](Self::record) them.
    pub fn profiling(&self) -> bool {
        match self.grant {
            Grant::Op(op) => op.core.profiler.is_enabled(),
            // Only run at its push while the profiler was off.
            Grant::Now(_) => false,
        }
    }

    /// Records a part of this op, from `start` to `end`, as a slice of its
    /// own on this thread in the profile (nested in the op's slice), named
    /// `name`, with `detail` in place of the context. Nothing when the
    /// engine is not profiling.
    pub fn record(
        &self,
        name: &str,
        detail: &str,
        start: std::time::Instant,
        end: std::time::Instant,
    ) {
        let Grant::Op(op) = self.grant else { return };
        let p = &op.core.profiler;
        if p.is_enabled() {
            p.part(name, detail, start, end, self.priority);
        }
    }

    /// How this op holds `var`, or None if its spec does not name it. The
    /// grant lasts while the closure runs, and for an async op until its
    /// completion is called: after that, None.
    pub fn access(&self, var: &Var) -> Option<Access> {
        let (reads, writes) = match self.grant {
            Grant::Op(op) => {
                // Subtle: an async op's completion may have released its
                // vars (and freed one no handle names any more: `var/`,
                // K3): its handles are compared as addresses, never read.
                if op.state.load(Acquire) != RUNNING {
                    return None;
                }
                (op.reads(), op.writes())
            }
            Grant::Now(spec) => (spec.read_vars(), spec.write_vars()),
        };
        let named = |vs: &[Var]| vs.iter().any(|v| v.is(var));
        if named(writes) {
            Some(Access::Write)
        } else if named(reads) {
            Some(Access::Read)
        } else {
            None
        }
    }
}

impl fmt::Debug for RunContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunContext")
            .field("op", &self.op_name())
            .field("ctx", &self.ctx)
            .field("worker", &self.worker)
            .field("priority", &self.priority)
            .finish()
    }
}

pub(crate) use crate::op_block::{OpRef, Waiting};

/// Naive engine, `Op::gate`: not started yet.
pub(crate) const GATE_FRESH: u8 = 0;
/// Its body runs (or its skip is under way).
pub(crate) const GATE_STARTED: u8 = 1;
/// Its async body returned: it waits for its completion handle.
pub(crate) const GATE_ASYNC: u8 = 2;
/// Its push stopped waiting before it started (it was not granted its
/// vars yet): when granted it fails with `CompletionTimedOut`, unrun.
pub(crate) const GATE_GAVE_UP: u8 = 3;
/// Its push stopped waiting while its body ran: a sync body finishes the
/// op as usual; an async one, once returned, is finished with the timeout.
pub(crate) const GATE_LATE: u8 = 4;

/// An op's life, in `Op::state`.
pub(crate) const RUNNING: u8 = 0;
/// Someone claimed the finish (completion, drop, panic, skip or stop).
pub(crate) const CLAIMED: u8 = 1;
/// The finish is over: vars released, successors dispatched.
pub(crate) const FINISHED: u8 = 2;

/// The engine's record of an op in flight: one allocation holding the
/// header and the closure (an [`OpRef`]'s block).
///
/// Layout: with a one-word closure, the block (header, closure and the
/// reference count) is 128 bytes, the smallest size class of
/// `op_block.rs`: two cache lines. Every field here costs every op those
/// bytes' memory traffic (the dispatch bench's (a) ran 17 to 20% faster when its
/// blocks went from 152 to 128 bytes);
/// `op_block::tests::one_word_closures_fit_the_smallest_class` checks it.
pub(crate) struct Op<B: ?Sized = dyn BodyCell> {
    pub(crate) name: Cow<'static, str>,
    /// The read vars, then the write vars (deduplicated). Uncounted once
    /// the push has appended the op to them (`var/mod.rs`, K3).
    pub(crate) vars: OpVars,
    pub(crate) nreads: u32,
    pub(crate) ctx: PackedContext,
    pub(crate) prop: Property,
    pub(crate) priority: i32,
    /// Run even when an input var holds a failure (the waits of
    /// `wait_for_var` and `var_ready`, and `delete_var`).
    pub(crate) no_skip: bool,
    /// Naive engine: how far the op got, for a push that stops waiting
    /// for it (`core::give_up`): `GATE_*`.
    pub(crate) gate: AtomicU8,
    /// Grants still to come, plus the push's hold (module docs). An op's
    /// vars are far fewer than 2^32 (each is a 512-byte allocation).
    pub(crate) wait: AtomicU32,
    /// RUNNING → CLAIMED → FINISHED.
    pub(crate) state: AtomicU8,
    /// Profiler: start time (ns since the profiler's epoch; 0: not started)
    /// and thread (its trace id, saturated at `u32::MAX`).
    pub(crate) start_ns: AtomicU64,
    pub(crate) start_tid: AtomicU32,
    pub(crate) core: CoreRef,
    pub(crate) body: B,
}

impl<B: ?Sized> Op<B> {
    pub(crate) fn reads(&self) -> &[Var] {
        &self.vars[..self.nreads as usize]
    }

    pub(crate) fn writes(&self) -> &[Var] {
        &self.vars[self.nreads as usize..]
    }
}

impl Op {
    /// RUNNING → CLAIMED; true for the one caller that gets to finish the op.
    #[inline]
    pub(crate) fn claim_done(&self) -> bool {
        self.state
            .compare_exchange(RUNNING, CLAIMED, AcqRel, Acquire)
            .is_ok()
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.state.load(Acquire) == FINISHED
    }
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Op").field("name", &self.name).finish()
    }
}

thread_local! {
    /// The op (`OpRef::key`) whose closure runs on this thread right now
    /// (0: none). Lets a
    /// completion handle dropped by a panic leave the report to the executor,
    /// which knows the panic message.
    pub(crate) static EXECUTING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The handle that completes an op. Call [`Completion::complete`] or
/// [`Completion::fail`] exactly once, from any thread. Dropping it without
/// either fails the op with [`FailureCause::CompletionDropped`], so a lost
/// handle is an error on the op's write vars, never a hang.
///
/// ```
/// use pskv_engine::{Engine, OpSpec, Property, Var};
/// let engine = Engine::builder().cpu_threads(1).build()?;
/// let v = Var::new();
/// engine.push_async(OpSpec::new("io").write(&v).property(Property::Async), |_ctx, done| {
///     // Hand the completion to another thread, as an I/O callback would.
///     std::thread::spawn(move || done.complete());
/// })?;
/// engine.wait_for_var(&v)?;
/// # Ok::<(), pskv_engine::EngineError>(())
/// ```
pub struct Completion {
    op: Option<OpRef>,
    /// The op's engine core, counted: the handle may finish the op on any
    /// thread, after the engine's handles are gone (`core_ref.rs`).
    core: Arc<Core>,
}

impl Completion {
    /// For `op`, which runs its body on this thread.
    pub(crate) fn new(op: OpRef) -> Completion {
        // The op is unfinished: its core is alive (C1).
        let core = op.core.upgrade();
        Completion { op: Some(op), core }
    }

    fn finish(&mut self, cause: Option<FailureCause>) {
        if let Some(op) = self.op.take() {
            let _held = Held::by_handle(&self.core);
            crate::core::finish(&op, cause);
        }
    }

    /// The op succeeded.
    pub fn complete(mut self) {
        self.finish(None);
    }

    /// The op failed with `err`: the error is stored on its write vars.
    pub fn fail(mut self, err: impl Into<OpError>) {
        self.finish(Some(FailureCause::Error(err.into())));
    }

    /// The name of the op this handle completes.
    pub fn op_name(&self) -> &str {
        self.op.as_ref().map_or("", |op| &op.name)
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(op) = &self.op {
            if std::thread::panicking() && EXECUTING.with(|e| e.get()) == op.key() {
                // The executor catches this panic and reports it with its
                // message; it still holds the op.
                return;
            }
        }
        self.finish(Some(FailureCause::CompletionDropped));
    }
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completion")
            .field("op", &self.op_name())
            .finish()
    }
}
