//! Ops: what a caller pushes ([`OpSpec`] plus a closure), the engine's record
//! of it while in flight (`Op`), and the handle that completes it
//! ([`Completion`]).
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

use smallvec::SmallVec;

use crate::body::BodyCell;
use crate::core::Core;
use crate::core_ref::{CoreRef, Held};
use crate::error::{FailureCause, OpError};
use crate::sync::{AtomicU32, Ordering};
use crate::var::{OpVars, Var};

/// Where an op runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum Context {
    /// Host CPU.
    #[default]
    Cpu,
    /// Page-locked host memory used for transfers to and from GPU `n`; runs on
    /// the CPU pools.
    CpuPinned(u32),
    /// GPU `n`: the op runs on that device's worker pool (compute, or copy for
    /// the copy properties). The engine knows nothing of CUDA; the closure does.
    Gpu(u32),
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Context::Cpu => f.write_str("cpu"),
            Context::CpuPinned(n) => write!(f, "cpu_pinned({n})"),
            Context::Gpu(n) => write!(f, "gpu({n})"),
        }
    }
}

/// What kind of work an op is; chooses its worker pool.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum Property {
    /// Ordinary compute: the context's normal pool.
    #[default]
    Normal,
    /// A copy from host to device: the device's copy pool.
    CopyToDevice,
    /// A copy from device to host: the device's copy pool.
    CopyFromDevice,
    /// Urgent CPU work: the CPU priority lane, which normal ops cannot fill.
    CpuPrioritized,
    /// The closure only starts work that completes later (I/O): it runs at once
    /// on the thread that makes it ready, and must not block. That thread may
    /// be one waiting in [`crate::Latch`] (`wait_for_var`, a kvstore wait) that
    /// read an answer itself ([`crate::progress`]): such a closure must not take
    /// a lock its process's waiters may hold.
    Async,
    /// Internal: the op of `delete_var`.
    DeleteVar,
}

/// A description of an op: name, vars, context, property and priority.
///
/// ```
/// use pskv_engine::{Context, OpSpec, Property, Var};
/// let (grad, weight) = (Var::new(), Var::new());
/// let spec = OpSpec::new("sgd_update")
///     .read(&grad)
///     .write(&weight)
///     .context(Context::Cpu)
///     .property(Property::Normal)
///     .priority(-3);
/// assert_eq!(spec.name(), "sgd_update");
/// ```
#[derive(Clone, Debug)]
pub struct OpSpec {
    pub(crate) name: Cow<'static, str>,
    /// The vars read, then the vars written, in one vector: the op's own
    /// list (`OpVars`) is this one, moved (two vectors joined cost about
    /// 90 instructions a push).
    pub(crate) vars: SmallVec<[Var; 4]>,
    /// How many of `vars` are read.
    pub(crate) nreads: usize,
    pub(crate) ctx: Context,
    pub(crate) prop: Property,
    pub(crate) priority: i32,
}

impl OpSpec {
    /// An op with this name, no vars, on the CPU, normal, priority 0.
    pub fn new(name: impl Into<Cow<'static, str>>) -> OpSpec {
        OpSpec {
            name: name.into(),
            vars: SmallVec::new(),
            nreads: 0,
            ctx: Context::Cpu,
            prop: Property::Normal,
            priority: 0,
        }
    }

    /// Adds a var the op reads.
    #[inline]
    pub fn read(mut self, var: &Var) -> OpSpec {
        if self.nreads == self.vars.len() {
            self.vars.push(var.clone());
        } else {
            self.insert_read(var);
        }
        self.nreads += 1;
        self
    }

    /// A read named after a write: in before the writes.
    #[cold]
    fn insert_read(&mut self, var: &Var) {
        self.vars.insert(self.nreads, var.clone());
    }

    /// Adds vars the op reads.
    pub fn reads<'a>(mut self, vars: impl IntoIterator<Item = &'a Var>) -> OpSpec {
        let before = self.vars.len();
        self.vars
            .insert_many(self.nreads, vars.into_iter().cloned());
        self.nreads += self.vars.len() - before;
        self
    }

    /// Adds a var the op writes.
    #[inline]
    pub fn write(mut self, var: &Var) -> OpSpec {
        self.vars.push(var.clone());
        self
    }

    /// Adds vars the op writes.
    pub fn writes<'a>(mut self, vars: impl IntoIterator<Item = &'a Var>) -> OpSpec {
        self.vars.extend(vars.into_iter().cloned());
        self
    }

    /// Sets where the op runs.
    #[inline]
    pub fn context(mut self, ctx: Context) -> OpSpec {
        self.ctx = ctx;
        self
    }

    /// Sets the kind of work.
    #[inline]
    pub fn property(mut self, prop: Property) -> OpSpec {
        self.prop = prop;
        self
    }

    /// Sets the priority: among ready ops of a pool, higher starts first.
    #[inline]
    pub fn priority(mut self, priority: i32) -> OpSpec {
        self.priority = priority;
        self
    }

    /// The op's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The vars read.
    pub(crate) fn read_vars(&self) -> &[Var] {
        &self.vars[..self.nreads]
    }

    /// The vars written.
    pub(crate) fn write_vars(&self) -> &[Var] {
        &self.vars[self.nreads..]
    }

    /// Removes duplicate vars: a var listed twice counts once, and a var both
    /// read and written is written (a write wins). Reads and writes each
    /// end sorted by id (but for a spec of one of each, left as it is).
    pub(crate) fn dedup(&mut self) {
        let nwrites = self.vars.len() - self.nreads;
        if self.nreads <= 1 && nwrites <= 1 {
            // The common spec, a read and a write at most: one comparison.
            if self.nreads == 1 && nwrites == 1 && self.vars[0].is(&self.vars[1]) {
                self.vars.remove(0);
                self.nreads = 0;
            }
            return;
        }
        let (reads, writes) = self.vars.split_at_mut(self.nreads);
        reads.sort_unstable_by_key(Var::id);
        writes.sort_unstable_by_key(Var::id);
        let write_ids: SmallVec<[u64; 4]> = writes.iter().map(Var::id).collect();
        // One pass over both: a read goes if it repeats the read kept
        // before it or is written; a write if it repeats the one before.
        let (nreads, mut i, mut last) = (self.nreads, 0, None);
        let mut kept_reads = 0;
        self.vars.retain(|v| {
            let id = v.id();
            let is_read = i < nreads;
            if i == nreads {
                last = None;
            }
            i += 1;
            let keep = last != Some(id) && !(is_read && write_ids.binary_search(&id).is_ok());
            if keep {
                last = Some(id);
                kept_reads += usize::from(is_read);
            }
            keep
        });
        self.nreads = kept_reads;
    }
}

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

/// `Context` in four bytes, for an op's header: the kind in the top two
/// bits, the device below. A device number is below `MAX_GPUS` (the push
/// checks it: `core::prepare_pool`), far below the 2^30 this holds.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct PackedContext(u32);

const CTX_PINNED: u32 = 1 << 30;
const CTX_GPU: u32 = 2 << 30;
const CTX_DEVICE: u32 = (1 << 30) - 1;

impl PackedContext {
    #[inline]
    pub(crate) fn new(ctx: Context) -> PackedContext {
        let device = |n: u32| {
            debug_assert!(n <= CTX_DEVICE, "device {n} past the packed range");
            n & CTX_DEVICE
        };
        PackedContext(match ctx {
            Context::Cpu => 0,
            Context::CpuPinned(n) => CTX_PINNED | device(n),
            Context::Gpu(n) => CTX_GPU | device(n),
        })
    }

    #[inline]
    pub(crate) fn get(self) -> Context {
        let n = self.0 & CTX_DEVICE;
        match self.0 & !CTX_DEVICE {
            0 => Context::Cpu,
            CTX_PINNED => Context::CpuPinned(n),
            _ => Context::Gpu(n),
        }
    }
}

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
    /// Subtracts one from the wait counter; true if this call brought it to
    /// zero (the caller must dispatch the op).
    #[inline]
    pub(crate) fn release_one(&self) -> bool {
        // Subtle: AcqRel. The grants were made under different var locks by
        // different threads; the thread that reaches zero must see all of them
        // (and the op's fields) before it runs the op.
        self.wait.fetch_sub(1, Ordering::AcqRel) == 1
    }

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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn ids(vs: &[Var]) -> Vec<u64> {
        vs.iter().map(Var::id).collect()
    }

    /// Reads and writes each once, sorted, and a var read and written only
    /// written; a spec of one read and one write keeps its order.
    #[test]
    fn dedup_keeps_each_var_once_and_a_write_wins() {
        let v: Vec<Var> = (0..5).map(|_| Var::new()).collect();
        let mut spec = OpSpec::new("x")
            .read(&v[3])
            .write(&v[2])
            .read(&v[0])
            .read(&v[3])
            .reads([&v[2], &v[1]])
            .writes([&v[4], &v[2]]);
        spec.dedup();
        assert_eq!(
            ids(spec.read_vars()),
            ids(&[v[0].clone(), v[1].clone(), v[3].clone()])
        );
        assert_eq!(ids(spec.write_vars()), ids(&[v[2].clone(), v[4].clone()]));

        let mut one = OpSpec::new("y").write(&v[4]).read(&v[1]);
        one.dedup();
        assert_eq!(
            (ids(one.read_vars()), ids(one.write_vars())),
            (vec![v[1].id()], vec![v[4].id()])
        );
        let mut same = OpSpec::new("z").read(&v[0]).write(&v[0]);
        same.dedup();
        assert_eq!(
            (ids(same.read_vars()), ids(same.write_vars())),
            (vec![], vec![v[0].id()])
        );
        let mut reads_only = OpSpec::new("r").reads([&v[1], &v[0], &v[1], &v[2], &v[0]]);
        reads_only.dedup();
        assert_eq!(
            ids(reads_only.read_vars()),
            vec![v[0].id(), v[1].id(), v[2].id()]
        );
        assert!(reads_only.write_vars().is_empty());
        let mut writes_only = OpSpec::new("w").writes([&v[3], &v[1], &v[3], &v[1]]);
        writes_only.dedup();
        assert!(writes_only.read_vars().is_empty());
        assert_eq!(ids(writes_only.write_vars()), vec![v[1].id(), v[3].id()]);
        // A read whose id sorts between two written ones, and a write named
        // before the reads (the insert path of `read`).
        let mut between = OpSpec::new("b")
            .write(&v[4])
            .read(&v[2])
            .write(&v[0])
            .reads([&v[4], &v[2]]);
        between.dedup();
        assert_eq!(ids(between.read_vars()), vec![v[2].id()]);
        assert_eq!(ids(between.write_vars()), vec![v[0].id(), v[4].id()]);
    }
}
