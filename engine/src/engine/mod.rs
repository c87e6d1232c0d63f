//! [`Engine`]: the public face of the dependency engine. This file: the
//! handle, its pushes and its profile; `waits.rs` the waits and var
//! deletion; `shutdown.rs` what the last handle's drop does.

mod shutdown;
mod waits;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::body::{AsyncBody, BodyCell, SyncBody};
use crate::config::{EngineBuilder, EngineConfig, EngineKind};
use crate::core::{self, Core};
use crate::core_ref::Held;
use crate::error::{EngineError, OpError};
use crate::executor::{Executor, Pools};
use crate::graph::OpGraph;
use crate::op::{Completion, RunContext};
use crate::profiler::{write_chrome_trace, TraceEvent};
use crate::spec::OpSpec;

/// The dependency engine: runs closures when the vars they read and write
/// allow, on worker pools per device, highest priority first.
///
/// Cloning an `Engine` gives another handle to the same engine. When the last
/// handle is dropped the engine shuts down: it waits for pending ops (up to
/// the shutdown timeout), fails the ones that can no longer run with "engine
/// stopped", and joins its threads.
///
/// ```
/// use pskv_engine::{Engine, OpSpec, Var};
/// use std::sync::{Arc, Mutex};
///
/// let engine = Engine::builder().cpu_threads(2).build()?;
/// let x = Var::named("x");
/// let value = Arc::new(Mutex::new(0));
/// for i in 1..=3 {
///     let value = value.clone();
///     // Writes of one var run one at a time, in push order.
///     engine.push_sync(OpSpec::new("add").write(&x), move |_| {
///         let mut v = value.lock().unwrap();
///         *v = *v * 10 + i;
///         Ok(())
///     })?;
/// }
/// engine.wait_for_var(&x)?;
/// assert_eq!(*value.lock().unwrap(), 123);
/// # Ok::<(), pskv_engine::EngineError>(())
/// ```
#[derive(Clone)]
pub struct Engine {
    owner: Arc<Owner>,
}

/// Shuts the engine down when the last `Engine` handle goes.
struct Owner {
    core: Arc<Core>,
}

impl Engine {
    /// An engine configured from the environment (see [`EngineBuilder::from_env`]).
    pub fn new() -> Result<Engine, EngineError> {
        EngineBuilder::from_env()?.build()
    }

    /// A builder with the default settings.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::new()
    }

    pub(crate) fn from_config(config: EngineConfig) -> Result<Engine, EngineError> {
        let id = core::next_engine_id();
        let executor = match config.kind {
            EngineKind::Threaded => Executor::Threaded(Pools::start(id, &config)?),
            EngineKind::Naive => Executor::Naive,
        };
        crate::profiler::register_thread();
        Ok(Engine {
            owner: Arc::new(Owner {
                core: Arc::new(Core::new(id, config, executor)),
            }),
        })
    }

    fn core(&self) -> &Arc<Core> {
        &self.owner.core
    }

    /// A process-wide unique id of this engine (shared by its clones), so
    /// that code holding vars of one engine can refuse another.
    pub fn id(&self) -> u64 {
        self.core().id
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.core().config
    }

    /// Threaded or naive.
    pub fn kind(&self) -> EngineKind {
        self.core().config.kind
    }

    /// Pushes an op whose closure completes it through the [`Completion`]
    /// handle, now or later from any thread. Returns at once (the naive engine:
    /// when the op has finished). The error cases are refusals: the op was not
    /// pushed.
    ///
    /// A var listed twice counts once; a var both read and written is written.
    ///
    /// ```
    /// use pskv_engine::{Engine, OpSpec, Var};
    /// let engine = Engine::builder().cpu_threads(1).build()?;
    /// let v = Var::new();
    /// engine.push_async(OpSpec::new("send").read(&v), |_ctx, done| done.complete())?;
    /// engine.wait_for_all()?;
    /// # Ok::<(), pskv_engine::EngineError>(())
    /// ```
    pub fn push_async<F>(&self, spec: OpSpec, f: F) -> Result<(), EngineError>
    where
        F: FnOnce(RunContext<'_>, Completion) + Send + 'static,
    {
        self.push_op(spec, AsyncBody::new(f))
    }

    /// Pushes an op whose closure is complete when it returns; an `Err` is
    /// stored on the op's write vars.
    ///
    /// ```
    /// use pskv_engine::{Engine, OpSpec, Var};
    /// let engine = Engine::builder().cpu_threads(1).build()?;
    /// let v = Var::new();
    /// engine.push_sync(OpSpec::new("bad").write(&v), |_| Err("no disk".into()))?;
    /// let err = engine.wait_for_var(&v).unwrap_err();
    /// assert_eq!(err.to_string(), "op 'bad' failed: no disk");
    /// # Ok::<(), pskv_engine::EngineError>(())
    /// ```
    pub fn push_sync<F>(&self, spec: OpSpec, f: F) -> Result<(), EngineError>
    where
        F: FnOnce(RunContext<'_>) -> Result<(), OpError> + Send + 'static,
    {
        self.push_sync_with(spec, false, f)
    }

    /// As [`Engine::push_sync`], but the op runs even when a var it names
    /// holds a failure (any other op is then skipped, failing with it). For
    /// ops that settle failures: take them from the vars
    /// ([`Var::take_failure`](crate::Var::take_failure)) and report them elsewhere, so that they are
    /// reported once and the vars are usable again.
    ///
    /// ```
    /// use pskv_engine::{Engine, OpSpec, Var};
    /// let engine = Engine::builder().cpu_threads(1).build()?;
    /// let v = Var::new();
    /// engine.push_sync(OpSpec::new("bad").write(&v), |_| Err("no disk".into()))?;
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// let v2 = v.clone();
    /// engine.push_settle(OpSpec::new("settle").write(&v), move |_| {
    ///     tx.send(v2.take_failure().map(|f| f.to_string())).unwrap();
    ///     Ok(())
    /// })?;
    /// assert_eq!(rx.recv().unwrap().as_deref(), Some("op 'bad' failed: no disk"));
    /// engine.wait_for_var(&v)?; // taken: the var is clean
    /// # Ok::<(), pskv_engine::EngineError>(())
    /// ```
    pub fn push_settle<F>(&self, spec: OpSpec, f: F) -> Result<(), EngineError>
    where
        F: FnOnce(RunContext<'_>) -> Result<(), OpError> + Send + 'static,
    {
        self.push_sync_with(spec, true, f)
    }

    /// Runs `f` as [`Engine::push_settle`]'s op of `spec` would run, but
    /// now, on this thread, inside this call, if it can run here at once:
    /// `spec`'s property is [`Property::Async`](crate::Property::Async) and every var it names
    /// grants it now (no op on a var it writes runs or waits; no write on a
    /// var it reads runs or waits); else gives `f` back untouched, to be
    /// pushed (`push_settle(spec.clone(), ...)`). For a caller that keeps a
    /// spec and settles the same vars again and again: neither the spec nor
    /// the closure is copied or boxed, and the closure may borrow. Also
    /// given back: a spec that writes a var it names twice (read and
    /// written, or written twice; pushed, it counts once as a write), a
    /// deleted var, a context the engine does not serve, while profiling or
    /// recording the graph, inside an op's closure or while this thread
    /// runs inline ops, and on an engine shutting down or naive.
    ///
    /// ```
    /// use pskv_engine::{Engine, OpSpec, Property, Var};
    /// let engine = Engine::builder().cpu_threads(1).build()?;
    /// let v = Var::new();
    /// let spec = OpSpec::new("settle").write(&v).property(Property::Async);
    /// let mut seen = None;
    /// let ran = engine.try_settle_now(&spec, |_| {
    ///     seen = Some(v.take_failure().is_none());
    ///     Ok(())
    /// });
    /// assert!(ran.is_ok() && seen == Some(true));
    /// # Ok::<(), pskv_engine::EngineError>(())
    /// ```
    pub fn try_settle_now<F>(&self, spec: &OpSpec, f: F) -> Result<(), F>
    where
        F: FnOnce(RunContext<'_>) -> Result<(), OpError>,
    {
        self.try_kept_now(spec, true, f)
    }

    /// As [`Engine::try_settle_now`], for an op [`Engine::push_sync`]
    /// would push: `f` is also given back when a var it names holds a
    /// failure (pushed, the op is skipped and passes the failure on). For
    /// a caller that keeps a spec and runs the same small op again and
    /// again (a planned call's host copies): given `f` back, it pushes its
    /// own op.
    ///
    /// ```
    /// use pskv_engine::{Engine, OpSpec, Property, Var};
    /// let engine = Engine::builder().cpu_threads(1).build()?;
    /// let (a, b) = (Var::new(), Var::new());
    /// let spec = OpSpec::new("copy").read(&a).write(&b).property(Property::Async);
    /// assert!(engine.try_run_now(&spec, |_| Ok(())).is_ok());
    /// # Ok::<(), pskv_engine::EngineError>(())
    /// ```
    pub fn try_run_now<F>(&self, spec: &OpSpec, f: F) -> Result<(), F>
    where
        F: FnOnce(RunContext<'_>) -> Result<(), OpError>,
    {
        self.try_kept_now(spec, false, f)
    }

    /// `try_settle_now` (`no_skip`) or `try_run_now`.
    fn try_kept_now<F>(&self, spec: &OpSpec, no_skip: bool, f: F) -> Result<(), F>
    where
        F: FnOnce(RunContext<'_>) -> Result<(), OpError>,
    {
        if self.check(spec).is_err() {
            return Err(f);
        }
        let core = self.core();
        let _held = Held::by_handle(core);
        crate::run_now::try_run_now(core, spec, no_skip, f)
    }

    /// A sync op runs at its push when it can (`run_now.rs`): an
    /// `Async` op whose vars are all free, as a small host copy or a wait
    /// on an idle var often is, needs no op record.
    fn push_sync_with<F>(&self, mut spec: OpSpec, no_skip: bool, f: F) -> Result<(), EngineError>
    where
        F: FnOnce(RunContext<'_>) -> Result<(), OpError> + Send + 'static,
    {
        self.checked(&mut spec)?;
        let core = self.core();
        let _held = Held::by_handle(core);
        match crate::run_now::try_run_now(core, &spec, no_skip, f) {
            Ok(()) => Ok(()),
            Err(f) => self.push_checked(spec, no_skip, SyncBody::new(f)),
        }
    }

    fn push_op<B: BodyCell + 'static>(&self, mut spec: OpSpec, body: B) -> Result<(), EngineError> {
        self.checked(&mut spec)?;
        self.push_checked(spec, false, body)
    }

    /// Deduplicates `spec` and checks it (`check`), in place (a spec
    /// moved in and out costs a copy of it each way).
    #[inline]
    fn checked(&self, spec: &mut OpSpec) -> Result<(), EngineError> {
        spec.dedup();
        self.check(spec)
    }

    /// Refuses `spec` if the engine is shutting down, a var it names is
    /// deleted, or its context is not served.
    #[inline]
    fn check(&self, spec: &OpSpec) -> Result<(), EngineError> {
        let core = self.core();
        if core.shutting_down.load(Ordering::Acquire) {
            return Err(EngineError::ShutDown {
                op: spec.name.to_string(),
            });
        }
        if let Some(v) = spec.vars.iter().find(|v| v.is_deleted()) {
            return Err(EngineError::VarDeleted {
                op: spec.name.to_string(),
                var: v.id(),
            });
        }
        core::prepare_pool(core, spec)
    }

    /// Pushes an op of a `checked` spec.
    fn push_checked<B: BodyCell + 'static>(
        &self,
        spec: OpSpec,
        no_skip: bool,
        body: B,
    ) -> Result<(), EngineError> {
        let core = self.core();
        // The naive engine returns when the op has finished, unless this push
        // comes from inside an op running inline on this thread: that op must
        // finish first, so waiting here would deadlock.
        let naive_wait = core.config.kind == EngineKind::Naive && !crate::inline::is_active();
        let _held = Held::by_handle(core);
        if let Some(op) = core::push(core, spec, no_skip, body, naive_wait) {
            if !core::wait_finished(&op, core.config.wait_timeout) {
                core::give_up(&op);
            }
        }
        Ok(())
    }

    /// Ops pushed and not yet finished (read from two counters one after
    /// the other: at least the number pending when the call began, perhaps
    /// more than at any one instant while ops are pushed and finished).
    pub fn pending(&self) -> usize {
        self.core().pending()
    }

    /// Starts recording every op's start and duration (see
    /// [`Engine::take_profile`]). At most four million events are kept (about
    /// 100 bytes each) until taken; later ones are dropped with a warning.
    pub fn start_profiling(&self) {
        self.core().profiler.set_enabled(true);
    }

    /// Stops recording op timings.
    pub fn stop_profiling(&self) {
        self.core().profiler.set_enabled(false);
    }

    /// The op timings recorded so far (taken: a second call returns only newer
    /// ones).
    pub fn take_profile(&self) -> Vec<TraceEvent> {
        self.core().profiler.take()
    }

    /// Writes the op timings recorded so far to `path` as Chrome trace JSON
    /// (Perfetto opens it), and takes them.
    pub fn write_profile(&self, path: impl AsRef<Path>) -> Result<(), EngineError> {
        write_chrome_trace(&self.take_profile(), path.as_ref())
    }

    /// Writes the profile to the configured file (`PSKV_PROFILE`) now, as
    /// dropping the last handle would, and stops recording: for a process
    /// whose engine may outlive its end (a server's engine is held by the
    /// transport's handler). Nothing is written at drop after this. Does
    /// nothing without a configured file.
    pub fn flush_profile(&self) -> Result<(), EngineError> {
        let core = self.core();
        let Some(path) = &core.config.profile_path else {
            return Ok(());
        };
        core.profiler.set_enabled(false);
        if core.profiler.mark_flushed() {
            write_chrome_trace(&core.profiler.take(), path)?;
        }
        Ok(())
    }

    /// Starts recording the dependency graph of the ops pushed from now on.
    pub fn start_graph(&self) {
        self.core().graph.start();
    }

    /// Stops recording and returns the dependency graph recorded.
    pub fn take_graph(&self) -> OpGraph {
        self.core().graph.take()
    }
}

/// Pushes one of the engine's own ops (a var's deletion, a wait's
/// signal): its spec is the caller's, checked there, and it runs even when
/// a var it names holds a failure.
fn push_internal<F>(core: &Arc<Core>, spec: OpSpec, f: F)
where
    F: FnOnce(RunContext<'_>) -> Result<(), OpError> + Send + 'static,
{
    let _held = Held::by_handle(core);
    if let Err(f) = crate::run_now::try_run_now(core, &spec, true, f) {
        core::push(core, spec, true, SyncBody::new(f), false);
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("kind", &self.kind())
            .field("pending", &self.pending())
            .finish()
    }
}
