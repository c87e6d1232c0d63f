//! The errors of the `pskv` program's commands: what `main` prints, after
//! the command's name, before it exits non-zero.

use pskv::engine::EngineError;
use pskv::gpu::KernelError;
use pskv::kvstore::KvError;
use pskv::transport::TransportError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Arguments, settings or files that cannot work, said so the user can
    /// fix them.
    #[error("{0}")]
    Usage(String),
    /// The system refused: a file, a socket, a process, a signal handler.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The run failed: a node exited with an error, a result was wrong, a
    /// wait ran out.
    #[error("{0}")]
    Failed(String),
    /// The kvstore refused or failed.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// The transport refused or failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A kernel or device refused or failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

impl CliError {
    /// For `map_err`: a system error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
        let what = what.into();
        move |source| CliError::Io { what, source }
    }
}

/// What a command returns.
pub type CliResult<T = ()> = Result<T, CliError>;
