//! pskv-transport: cluster membership and key/value messaging, the role
//! ps-lite plays under MXNet, re-designed.
//!
//! - [`protocol`]: the state machines (no I/O): registration, barriers,
//!   heartbeats, dead nodes, request tracking, resend.
//! - [`wire`]: the frame format and its bounded decoder.
//! - [`Postoffice`]: a node (scheduler, server or worker): runtime, sockets,
//!   links, the authentication handshake.
//! - [`KvWorker`], [`RequestHandler`]: push, pull, push-pull and commands.
//! - [`status`]: what `pskv status` shows of a running job: each node's
//!   traffic and rounds, gathered by the scheduler, and the observer's query.
//!
//! The crate knows nothing of tensors, the engine or the kernels.
#![warn(missing_docs)]

mod config;
pub mod copy;
mod error;
mod kv;
mod landing;
mod link;
mod port_pipe;
mod postoffice;
pub mod protocol;
mod security;
mod slot;
mod spin;
pub mod status;
mod trace;
mod van;
pub mod wire;

pub use config::{Config, VanKind};
pub use error::TransportError;
pub use kv::{KvRequest, KvResponse, KvWorker, Pending, RequestHandler, RequestOptions, Responder};
pub use landing::Landing;
pub use port_pipe::PortPipe;
pub use postoffice::{EndWatcher, MissedBarrier, NodeChange, NodeEnd, NodeWatcher, Postoffice};
pub use protocol::tracker::TrackError;
pub use protocol::{Group, NodeId, Role};
/// The shared-memory rings alone (`benches/shm_ring.rs`).
#[doc(hidden)]
pub use van::shm::bench::ring_round_trips as shm_ring_round_trips;
pub use van::shm::region::{Region, REGION_WORDS};
pub use van::shm::span::{Piece, SlotSpan};

/// The RDMA device `PSKV_VAN=rdma` would use (its name), or why there is
/// none: this build lacks feature `rdma`, or the machine has no device.
pub fn rdma_device() -> Result<String, TransportError> {
    van::rdma::device(false)
        .map(|d| d.name())
        .map_err(|e| TransportError::Unavailable(e.to_string()))
}
