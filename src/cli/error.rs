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
    /// A library refused or failed: the kvstore, or the engine, the
    /// transport or the kernels below it (as the kvstore wraps their
    /// errors).
    #[error(transparent)]
    Lib(#[from] KvError),
}

/// The errors of the libraries below the kvstore, as the kvstore wraps them.
macro_rules! through_kvstore {
    ($($t:ty),*) => {$(
        impl From<$t> for CliError {
            fn from(e: $t) -> CliError {
                CliError::Lib(KvError::from(e))
            }
        }
    )*};
}
through_kvstore!(EngineError, TransportError, KernelError);

impl CliError {
    /// For `map_err`: a system error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
        let what = what.into();
        move |source| CliError::Io { what, source }
    }
}

/// What a command returns.
pub type CliResult<T = ()> = Result<T, CliError>;
