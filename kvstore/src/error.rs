//! Errors of the kvstore: one enum, [`KvError`]. Every message names the key
//! and the sizes involved, and says what to do.

use pskv_engine::EngineError;
use pskv_gpu::KernelError;
use pskv_transport::TransportError;

/// Everything a kvstore, a tensor or a server can report.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// `KvStore::create` was given a name it does not know.
    #[error(
        "unknown kvstore type '{0}': expected local, device, dist_sync, dist_async, \
         dist_sync_device or dist_device_sync"
    )]
    UnknownKind(String),

    /// A key was used before `init`.
    #[error("key {key} was never initialized: call init (or broadcast) on it first")]
    NotInitialized {
        /// The key, as the caller named it.
        key: String,
    },

    /// `init` (or `broadcast`) was called twice on a key.
    #[error("key {key} is already initialized: init and broadcast may be called once per key")]
    AlreadyInitialized {
        /// The key.
        key: String,
    },

    /// A value does not fit the key: size, shape, dtype or storage differ.
    #[error("key {key}: {what}")]
    Mismatch {
        /// The key.
        key: String,
        /// What differs, with both sizes.
        what: String,
    },

    /// A bad argument from the caller.
    #[error("{0}")]
    Invalid(String),

    /// A feature is missing from this build or this store kind.
    #[error("{what} is not supported: {why}")]
    Unsupported {
        /// What was asked for.
        what: String,
        /// Why it cannot be done, and what to do instead.
        why: String,
    },

    /// A server refused or failed a request.
    #[error("{op} of key {key}: {message}")]
    Server {
        /// The operation (push, pull, init, ...).
        op: &'static str,
        /// The key.
        key: String,
        /// The server's message (it names the server).
        message: String,
    },

    /// A call every worker makes together failed (on every worker, with
    /// the same cause): a worker's part failed, or they disagree on what
    /// they must share.
    #[error("{call} failed on every worker: {message}")]
    Collective {
        /// The call (init, set_optimizer, barrier).
        call: &'static str,
        /// Why, naming the worker (or workers) and what they brought.
        message: String,
    },

    /// A wait ran out of time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long the wait lasted.
        after: std::time::Duration,
    },

    /// Reading or writing a file.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },

    /// The engine refused an op, or an op failed.
    #[error(transparent)]
    Engine(#[from] EngineError),

    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),

    /// A kernel refused its arguments.
    #[error(transparent)]
    Kernel(#[from] KernelError),

    /// A server's checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] crate::server::CheckpointError),
}

impl KvError {
    pub(crate) fn invalid(msg: impl Into<String>) -> KvError {
        KvError::Invalid(msg.into())
    }

    pub(crate) fn mismatch(key: impl std::fmt::Display, what: impl Into<String>) -> KvError {
        KvError::Mismatch {
            key: key.to_string(),
            what: what.into(),
        }
    }
}

/// Results of this crate.
pub type Result<T, E = KvError> = std::result::Result<T, E>;

/// Why a step inside the kvstore failed, before it reaches a caller: a
/// server's refusal of a request (it travels to the worker as the answer's
/// text and comes out there as [`KvError::Server`]), a worker's check of an
/// answer, a local sum. The message says it all; the variant says what
/// kind of failure it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Fault {
    /// Bytes that do not decode: a request head, a body, a row list, a
    /// compressed message, a replica's copy.
    #[error("{0}")]
    Malformed(String),
    /// A request or an answer that does not fit the key as it is held:
    /// another type, size or shape, a rank or row out of range.
    #[error("{0}")]
    Mismatch(String),
    /// What cannot be served now: dead workers, a shared segment of a
    /// server that restarted since, a role this server does not have.
    #[error("{0}")]
    Unavailable(String),
    /// This process's own work failed: a kernel, an update rule, a file, an
    /// encoding.
    #[error("{0}")]
    Failed(String),
}

impl From<KernelError> for Fault {
    fn from(e: KernelError) -> Fault {
        Fault::Failed(e.to_string())
    }
}

impl From<KvError> for Fault {
    fn from(e: KvError) -> Fault {
        match e {
            KvError::Mismatch { .. } | KvError::Invalid(_) => Fault::Mismatch(e.to_string()),
            e => Fault::Failed(e.to_string()),
        }
    }
}
