//! The verbs the RDMA van uses, as a small interface: register memory,
//! queue pairs (connect, post receive, post send, post RDMA write with
//! immediate), and completions. Two implementations: [`super::emulated`]
//! (in memory, with verbs semantics: for tests everywhere) and `ibv` (the
//! libibverbs through `ibverbs-sys`, feature `rdma`: for machines with a
//! device).
//!
//! Semantics the van relies on, as on a reliable-connected (RC) queue pair:
//! operations posted on one queue pair are executed in order; a send
//! consumes one posted receive of the peer and completes there as `Recv`
//! with its length; an RDMA write with immediate puts bytes straight into
//! the peer's registered memory (no receive buffer involved) and then
//! consumes one posted receive, completing there as `RecvImm` with the
//! immediate value; every posted operation completes once on its own side.
//! A send with no receive posted on the peer stalls in real verbs (the
//! device retries while the receiver is not ready): the van never does it
//! (credits). Receives may be posted before `connect` (a new queue pair is
//! in INIT, where real verbs accept them).

use std::sync::Arc;
use std::time::Duration;

use crate::van::VanError;

/// What verbs can report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("verbs: {0}")]
pub(crate) struct VerbsError(pub(crate) String);

/// What a verbs call that hands nothing back returns.
pub(crate) type VerbsResult = Result<(), VerbsError>;

impl From<VerbsError> for VanError {
    fn from(e: VerbsError) -> VanError {
        VanError::system("RDMA", e)
    }
}

/// Where a peer may write: a registered region's address, key and size.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RemoteRegion {
    pub(crate) addr: u64,
    pub(crate) rkey: u32,
    pub(crate) len: u64,
}

/// Bytes `offset..offset + len` of a registered region: what one work
/// request reads or fills (verbs' scatter/gather element).
#[derive(Clone, Copy)]
pub(crate) struct Span<'a> {
    pub(crate) region: &'a Arc<dyn Region>,
    pub(crate) offset: usize,
    pub(crate) len: usize,
}

impl<'a> Span<'a> {
    pub(crate) fn new(region: &'a Arc<dyn Region>, offset: usize, len: usize) -> Span<'a> {
        Span {
            region,
            offset,
            len,
        }
    }
}

/// Where an RDMA write lands: `offset` bytes into the peer's region `to`,
/// announced to the peer with the immediate value `imm`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RemoteWrite {
    pub(crate) to: RemoteRegion,
    pub(crate) offset: u64,
    pub(crate) imm: u32,
}

/// Registered memory.
pub(crate) trait Region: Send + Sync + 'static {
    /// For a backend to find its own region type again (the ibverbs one
    /// does; the emulation reads regions through this interface).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    fn as_any(&self) -> &dyn std::any::Any;
    /// Its size.
    fn len(&self) -> usize;
    /// What a peer needs to write into it.
    fn remote(&self) -> RemoteRegion;
    /// Copies `bytes` in at `offset` (the region must not be in use by a
    /// posted operation).
    fn write(&self, offset: usize, bytes: &[u8]);
    /// Copies `out.len()` bytes out from `offset`.
    fn read(&self, offset: usize, out: &mut [u8]);
}

/// A completed operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    /// A send of ours finished.
    Send { wr_id: u64 },
    /// An RDMA write of ours finished.
    Write { wr_id: u64 },
    /// A receive of ours got `len` bytes from a peer's send.
    Recv { wr_id: u64, len: usize },
    /// A receive of ours was consumed by a peer's RDMA write with immediate.
    RecvImm { wr_id: u64, imm: u32, len: usize },
    /// An operation failed; the queue pair is unusable.
    Error { wr_id: u64, message: String },
}

/// A reliable-connected queue pair with its completion queue.
pub(crate) trait QueuePair: Send + Sync {
    /// What the peer needs to connect to this queue pair (sent over TCP).
    fn endpoint(&self) -> Vec<u8>;
    /// Connects to the peer's endpoint.
    fn connect(&self, remote: &[u8]) -> VerbsResult;
    /// Posts a receive into `into`.
    fn post_recv(&self, into: Span<'_>, wr_id: u64) -> VerbsResult;
    /// Posts a send of `from`.
    fn post_send(&self, from: Span<'_>, wr_id: u64) -> VerbsResult;
    /// Posts an RDMA write of `from` to `to`, with its immediate value.
    fn post_write_imm(&self, from: Span<'_>, to: RemoteWrite, wr_id: u64) -> VerbsResult;
    /// Waits up to `timeout` for completions and appends them to `out`.
    fn poll(&self, out: &mut Vec<Completion>, timeout: Duration) -> VerbsResult;
    /// Whether RDMA write with immediate is available.
    fn supports_write_imm(&self) -> bool;
}

/// A device: registers memory and creates queue pairs.
pub(crate) trait Device: Send + Sync {
    /// A name for logs.
    fn name(&self) -> String;
    /// Allocates and registers `len` bytes (remote write allowed).
    fn register(&self, len: usize) -> Result<Arc<dyn Region>, VerbsError>;
    /// A new queue pair.
    fn queue_pair(&self) -> Result<Arc<dyn QueuePair>, VerbsError>;
}
