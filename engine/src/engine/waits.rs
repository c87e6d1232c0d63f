//! The engine's waits (on a var, on every op) and var deletion.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{push_internal, Engine};
use crate::core;
use crate::error::EngineError;
use crate::op::RunContext;
use crate::spec::{Context, OpSpec, Property};
use crate::var::Var;
use crate::wait::{Latch, VarReady};

impl Engine {
    /// Deletes a var: it is marked deleted now (later pushes that name it are
    /// refused) and released after every op pushed on it before has finished.
    pub fn delete_var(&self, var: &Var) -> Result<(), EngineError> {
        self.delete_var_with(var, |_| {})
    }

    /// As [`Engine::delete_var`], running `free` (for example, to release the
    /// var's buffer) after every op pushed on the var before has finished.
    pub fn delete_var_with<F>(&self, var: &Var, free: F) -> Result<(), EngineError>
    where
        F: FnOnce(RunContext<'_>) + Send + 'static,
    {
        let spec = OpSpec::new(core::internal_name(self.core(), "delete_var", var))
            .write(var)
            .property(Property::DeleteVar);
        if var.mark_deleted() {
            return Err(EngineError::VarDeleted {
                op: spec.name.into_owned(),
                var: var.id(),
            });
        }
        // Pushed as no-skip: a failure stored on the var must not keep the
        // free function from running.
        let spec = spec.context(Context::Cpu);
        let core = self.core();
        core::prepare_pool(core, &spec)?;
        push_internal(core, spec, move |ctx: RunContext<'_>| {
            free(ctx);
            Ok(())
        });
        Ok(())
    }

    /// Pushes the internal op that sets `latch` once every write pushed on
    /// `var` so far (and every op before those writes) has finished.
    fn push_wait(&self, var: &Var, latch: &Arc<Latch>) -> Result<(), EngineError> {
        let core = self.core();
        if core.shutting_down.load(Ordering::Acquire) {
            return Err(EngineError::ShutDown {
                op: format!("wait_for_var({})", var.describe()),
            });
        }
        let spec = OpSpec::new(core::internal_name(core, "wait_for_var", var))
            .read(var)
            .property(Property::Async);
        let latch = latch.clone();
        push_internal(core, spec, move |_: RunContext<'_>| {
            latch.set();
            Ok(())
        });
        Ok(())
    }

    /// Blocks until every write pushed on `var` so far has finished (and so
    /// every op pushed before the last of them), then returns the failure
    /// stored on the var, if any (and clears it: each failure is reported
    /// once per var). Waits at most the configured wait timeout.
    ///
    /// Subtle: the wait is a read of the var, as MXNet's `WaitToRead` is, so
    /// it does not wait for reads pushed after the last write: those may
    /// still be running when it returns. To wait for a read op, have the op
    /// signal its own completion, or wait on a var it writes.
    pub fn wait_for_var(&self, var: &Var) -> Result<(), EngineError> {
        self.wait_for_var_inner(var, self.core().config.wait_timeout)
    }

    /// As [`Engine::wait_for_var`] with its own time limit.
    pub fn wait_for_var_timeout(&self, var: &Var, timeout: Duration) -> Result<(), EngineError> {
        self.wait_for_var_inner(var, Some(timeout))
    }

    fn wait_for_var_inner(&self, var: &Var, timeout: Option<Duration>) -> Result<(), EngineError> {
        let latch = Latch::new();
        self.push_wait(var, &latch)?;
        if !latch.wait(timeout) {
            // Only a wait with a limit gives up, at that limit (no clock
            // read per wait for the message's sake).
            return Err(EngineError::Timeout {
                what: describe_pending(var),
                after: timeout.unwrap_or_default(),
            });
        }
        match var.take_failure() {
            Some(f) => Err(EngineError::Op(f)),
            None => Ok(()),
        }
    }

    /// A future that resolves like [`Engine::wait_for_var`] without blocking a
    /// thread; for tokio and other async code.
    pub fn var_ready(&self, var: &Var) -> VarReady {
        let latch = Latch::new();
        VarReady {
            state: match self.push_wait(var, &latch) {
                Ok(()) => Ok((latch, var.clone())),
                Err(e) => Err(Some(e)),
            },
        }
    }

    /// Blocks until every op pushed so far has finished (and any op they
    /// push), then returns the first failure recorded since the last
    /// `wait_for_all` that is still stored on a var (or that belongs to an op
    /// that writes no var) and that no wait or settle op took from a var
    /// (those reached a caller already), and clears every recorded failure
    /// from its vars.
    /// Waits at most the configured wait timeout.
    pub fn wait_for_all(&self) -> Result<(), EngineError> {
        self.wait_for_all_inner(self.core().config.wait_timeout)
    }

    /// As [`Engine::wait_for_all`] with its own time limit.
    pub fn wait_for_all_timeout(&self, timeout: Duration) -> Result<(), EngineError> {
        self.wait_for_all_inner(Some(timeout))
    }

    fn wait_for_all_inner(&self, timeout: Option<Duration>) -> Result<(), EngineError> {
        let core = self.core();
        core.wait_idle(timeout)?;
        match core.take_failures() {
            Some(f) => Err(EngineError::Op(f)),
            None => Ok(()),
        }
    }
}

/// What a wait on `var` is still waiting for, for a timeout message.
fn describe_pending(var: &Var) -> String {
    let q = var.inner().queue.lock();
    let (reads, write, queued) = q.pending();
    let mut s = format!(
        "{} ({} running read(s), {} running write, {} queued",
        var.describe(),
        reads,
        if write { "a" } else { "no" },
        queued.saturating_sub(1) // the wait itself is queued
    );
    let names: Vec<String> = q
        .waiting()
        .take(3)
        .map(|op| format!("'{}'", op.name))
        .collect();
    if !names.is_empty() {
        s.push_str(&format!("; next: {}", names.join(", ")));
    }
    s.push(')');
    s
}
