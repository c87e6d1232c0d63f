//! Errors of the engine: one enum, [`EngineError`], and the record of a failed
//! op, [`OpFailure`], which is shared by every var the failure reaches.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The error a closure hands back through [`crate::Completion::fail`] or returns
/// from a [`crate::Engine::push_sync`] closure.
pub type OpError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an op failed.
#[derive(Debug)]
pub enum FailureCause {
    /// The closure returned or reported this error.
    Error(OpError),
    /// The closure panicked; the panic message.
    Panic(String),
    /// The op's [`crate::Completion`] was dropped without being completed.
    CompletionDropped,
    /// The engine stopped before the op could run.
    EngineStopped,
    /// The naive engine's push waited this long for the op: an async op's
    /// completion did not come, or the op was still queued for its vars
    /// (it then fails so when they are granted, without running).
    CompletionTimedOut(Duration),
}

impl fmt::Display for FailureCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureCause::Error(e) => write!(f, "{e}"),
            FailureCause::Panic(msg) => write!(f, "panicked: {msg}"),
            FailureCause::CompletionDropped => {
                f.write_str("its completion handle was dropped without being completed")
            }
            FailureCause::EngineStopped => f.write_str("the engine stopped before it could run"),
            FailureCause::CompletionTimedOut(d) => {
                write!(f, "it did not complete within {d:?} (naive engine)")
            }
        }
    }
}

/// The record of one failed op. Every var the failure reaches (the op's write
/// vars, and the write vars of every later op that read or wrote a failed var
/// and was therefore skipped) shares this one record, so the error always names
/// the op that failed first.
///
/// Once a var hands the failure to a caller ([`crate::Var::take_failure`]:
/// a wait, a settle op) it is marked told: `wait_for_all` then does not
/// report it again, though a skipped op that writes no var logged it too.
#[derive(Debug)]
pub struct OpFailure {
    op: String,
    cause: FailureCause,
    told: std::sync::atomic::AtomicBool,
}

impl OpFailure {
    pub(crate) fn new(op: impl Into<String>, cause: FailureCause) -> Arc<Self> {
        Arc::new(OpFailure {
            op: op.into(),
            cause,
            told: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Marks the failure as reported to a caller.
    pub(crate) fn mark_told(&self) {
        self.told.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether a var handed this failure to a caller.
    pub(crate) fn was_told(&self) -> bool {
        self.told.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The name of the op that failed first.
    pub fn op(&self) -> &str {
        &self.op
    }

    /// Why it failed.
    pub fn cause(&self) -> &FailureCause {
        &self.cause
    }
}

impl fmt::Display for OpFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op '{}' failed: {}", self.op, self.cause)
    }
}

impl std::error::Error for OpFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            FailureCause::Error(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}

/// Everything the engine can report.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// An op failed; its error reached the var or the wait that returned this.
    #[error("{0}")]
    Op(Arc<OpFailure>),

    /// A wait ran out of time. `what` says what was waited for and what was
    /// still pending.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long the wait lasted.
        after: Duration,
    },

    /// An op was pushed on a var that `delete_var` has already been called on.
    #[error("op '{op}' uses var {var}, which was deleted; create a new var instead")]
    VarDeleted {
        /// The op that was refused.
        op: String,
        /// The id of the deleted var.
        var: u64,
    },

    /// An op named a device the engine cannot run on.
    #[error("op '{op}' asks for {ctx}, but the engine serves GPU ids 0..{max_gpus}")]
    InvalidContext {
        /// The op that was refused.
        op: String,
        /// The context it asked for.
        ctx: crate::Context,
        /// The number of GPU ids the engine serves.
        max_gpus: u32,
    },

    /// The engine is shutting down and takes no new ops.
    #[error("op '{op}' was pushed after the engine began to shut down")]
    ShutDown {
        /// The op that was refused.
        op: String,
    },

    /// A configuration value (builder or environment) is not valid.
    #[error("invalid engine setting {name}={value:?}: {reason}")]
    Config {
        /// The setting (environment variable or builder field).
        name: String,
        /// The value given.
        value: String,
        /// What is wrong and what is expected.
        reason: String,
    },

    /// Writing a profile or graph failed.
    #[error("could not write {what} to {path}: {source}")]
    Io {
        /// What was being written.
        what: &'static str,
        /// Where.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },

    /// A worker thread could not be started.
    #[error("could not start engine worker thread '{name}': {source}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl EngineError {
    /// The failure record, if this error is an op failure.
    pub fn failure(&self) -> Option<&OpFailure> {
        match self {
            EngineError::Op(f) => Some(f),
            _ => None,
        }
    }
}

/// Turns a panic payload into its message.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}
