//! Vans: what moves frames between two nodes. Every connection starts as
//! TCP (the handshake and the van choice travel there); then one van carries
//! its frames:
//!
//! - [`tcp`]: the TCP stream itself (tokio, TCP_NODELAY, vectored writes,
//!   each frame's body received into one buffer);
//! - [`shm`]: two shared-memory rings, for peers on the same host; the TCP
//!   stream stays open only to notice the peer's death;
//! - [`rdma`]: verbs (feature `rdma`), or their in-memory emulation.
//!
//! A van knows nothing of the protocol: it hands every frame it receives to
//! a [`FrameSink`] and reports the end of the connection once.

pub(crate) mod rdma;
pub(crate) mod shm;
pub(crate) mod tcp;

use std::sync::Arc;

use crate::link::Link;
use crate::wire::Frame;

/// Where a van delivers what it receives.
pub(crate) trait FrameSink: Send + Sync + 'static {
    /// A whole frame arrived on `link`.
    fn on_frame(&self, link: &Arc<Link>, frame: Frame);
    /// `link` ended (called once).
    fn on_closed(&self, link: &Arc<Link>, reason: String);
}

/// Ends a link once: closes its queue and tells the sink.
pub(crate) fn end(link: &Arc<Link>, sink: &Arc<dyn FrameSink>, reason: String) {
    if link.close(reason.clone()) {
        sink.on_closed(link, reason);
    }
}
