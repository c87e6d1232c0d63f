//! The errors of the transport.

use std::time::Duration;

use crate::protocol::tracker::TrackError;
use crate::wire::WireError;

/// Everything the transport can report.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// A configuration value (builder or environment) is not valid.
    #[error("invalid transport setting {name}={value:?}: {reason}")]
    Config {
        /// The variable or builder field.
        name: String,
        /// The value given.
        value: String,
        /// What is expected.
        reason: String,
    },
    /// A socket or file operation failed.
    #[error("{context}: {message}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        message: String,
    },
    /// A wait ran out of time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        after: Duration,
    },
    /// The scheduler refused this node, or did not answer.
    #[error("registration refused: {0}")]
    Rejected(String),
    /// A peer failed the token check, or this node failed the peer's.
    #[error("authentication failed with {peer}: {reason}")]
    Auth {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// A request failed (a node died, a connection broke, a server error).
    #[error(transparent)]
    Request(#[from] TrackError),
    /// A malformed frame.
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
    /// Bad arguments to a call.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A barrier failed (a member is dead, or the scheduler is gone).
    #[error("{0}")]
    Barrier(String),
    /// The node is not (or no longer) part of a running cluster.
    #[error("not running: {0}")]
    NotRunning(String),
    /// A feature that this build or machine does not have.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl TransportError {
    pub(crate) fn io(context: impl Into<String>, e: impl std::fmt::Display) -> TransportError {
        TransportError::Io {
            context: context.into(),
            message: e.to_string(),
        }
    }
}
