//! Vans: what moves frames between two nodes. Every connection starts as
//! TCP (the login handshake, `protocol::handshake`, and the van offer travel
//! there); then one van carries its frames:
//!
//! - [`tcp`]: the TCP stream itself (tokio, TCP_NODELAY, vectored writes,
//!   each frame's body received into one buffer);
//! - [`shm`]: two shared-memory rings, for peers on the same host;
//! - [`rdma`]: verbs (feature `rdma`), or their in-memory emulation.
//!
//! Each is one module behind [`Van`]: the connector's side makes an offer
//! (its own bytes: ring names, a queue-pair endpoint), the acceptor's side
//! takes it and answers, and each side's [`Half`] then runs the van on the
//! link. The postoffice picks a van by its [`VanId`] and never looks inside
//! an offer. A van that leaves the TCP stream (shm, rdma) keeps it open
//! only to notice the peer's end ([`watch_peer`]).
//!
//! A van knows nothing of the protocol: it hands every frame it receives to
//! a [`FrameSink`] and reports the end of the connection once.

pub(crate) mod rdma;
pub(crate) mod shm;
pub(crate) mod tcp;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::link::Link;
use crate::wire::{Frame, Limits, VanId};
use tcp::FrameReader;

/// Why a van could not be set up, or why a link's van stopped. The
/// postoffice turns it into the link's close reason or a
/// [`TransportError`](crate::TransportError) naming the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum VanError {
    /// The link closed (this side closed it, or saw the peer's end) while
    /// the van waited to send.
    #[error("the {0} closed")]
    Closed(&'static str),
    /// What the peer sent, or left in memory both sides map, breaks the
    /// van's protocol: a malformed offer, record, chunk or descriptor.
    #[error("{0}")]
    Protocol(String),
    /// The operating system or the device refused (a socket, a file in
    /// /dev/shm, a verbs call).
    #[error("{context}: {message}")]
    System {
        /// What was being done.
        context: String,
        /// What the system said.
        message: String,
    },
    /// The van cannot run here: no device, a build without it, or a node
    /// that does not run it (`PSKV_VAN`).
    #[error("{0}")]
    Unavailable(String),
}

impl VanError {
    /// A system error while doing `context`.
    pub(crate) fn system(context: impl Into<String>, e: impl std::fmt::Display) -> VanError {
        VanError::System {
            context: context.into(),
            message: e.to_string(),
        }
    }

    /// A protocol error.
    pub(crate) fn protocol(what: impl Into<String>) -> VanError {
        VanError::Protocol(what.into())
    }
}

impl From<crate::wire::WireError> for VanError {
    fn from(e: crate::wire::WireError) -> VanError {
        VanError::Protocol(format!("malformed frame: {e}"))
    }
}

/// Where a van delivers what it receives.
pub(crate) trait FrameSink: Send + Sync + 'static {
    /// A whole frame arrived on `link`.
    fn on_frame(&self, link: &Arc<Link>, frame: Frame);
    /// `link` ended (called once).
    fn on_closed(&self, link: &Arc<Link>, reason: String);
    /// Where the payload of answer `request_id` from `link`'s node may be
    /// received, if the request gave a landing (`crate::Landing`).
    fn landing(&self, _link: &Link, _request_id: u64) -> Option<Arc<crate::landing::Landing>> {
        None
    }
    /// `link`'s van lets a waiting thread read it (`shm/reader.rs`): the
    /// sink's `progress` polls it until the link ends.
    fn add_poller(&self, _link: &Arc<Link>, _poller: Arc<dyn shm::Poll>) {}
    /// Link `link`'s poller is gone (its reader thread ended).
    fn remove_poller(&self, _link: crate::link::LinkId) {}
}

/// One kind of link: how its two sides agree on it and start it.
pub(crate) trait Van: Send + Sync {
    /// Which van this is (the offer names it).
    fn id(&self) -> VanId;
    /// The connector's side: prepares this end; the offer for the peer.
    fn offer(&self) -> Result<(Vec<u8>, Box<dyn Half>), VanError>;
    /// The acceptor's side: takes the peer's offer and prepares this end;
    /// the answer for the peer. An error declines the offer (the link then
    /// runs TCP, or fails where the connector insists).
    fn accept(&self, offer: &[u8]) -> Result<(Vec<u8>, Box<dyn Half>), VanError>;
}

/// One side of a van, prepared during the handshake.
pub(crate) trait Half: Send {
    /// The connector's side: the acceptor took the offer with `answer`.
    fn finish(&mut self, answer: &[u8]) -> Result<(), VanError> {
        let _ = answer;
        Ok(())
    }
    /// Runs the van on the link.
    fn start(self: Box<Self>, on: Start<'_>) -> Result<(), VanError>;
}

/// What a van's side starts on.
pub(crate) struct Start<'a> {
    /// The handshake's connection.
    pub(crate) conn: Handshaken,
    /// The link whose queue the van drains.
    pub(crate) link: Arc<Link>,
    /// Where received frames go.
    pub(crate) sink: Arc<dyn FrameSink>,
    /// The node's runtime.
    pub(crate) rt: &'a tokio::runtime::Handle,
}

/// The connection a handshake ran on, with what its reader buffered.
pub(crate) struct Handshaken {
    pub(crate) reader: FrameReader<OwnedReadHalf>,
    pub(crate) wr: OwnedWriteHalf,
}

impl Handshaken {
    /// A fresh connection, read with the handshake's small limits.
    pub(crate) fn new(stream: TcpStream) -> Handshaken {
        let (rd, wr) = stream.into_split();
        Handshaken {
            reader: FrameReader::new(rd, Limits::HANDSHAKE),
            wr,
        }
    }

    /// The TCP stream whole again, for a van that only watches it; an
    /// error if the peer sent bytes past the van answer.
    pub(crate) fn into_stream(self) -> Result<TcpStream, VanError> {
        let (rd, rest) = self.reader.into_parts();
        if !rest.is_empty() {
            return Err(VanError::protocol(
                "bytes arrived on tcp after the van answer",
            ));
        }
        rd.reunite(self.wr)
            .map_err(|e| VanError::system("taking the handshake's stream back", e))
    }
}

/// Watches the TCP connection of a link whose frames travel elsewhere.
/// Nothing travels on it any more, so data or its end both mean the peer
/// is gone or broken: `gone` gets why (once). Once `link` closes from this
/// side, `closed` runs and the connection is shut down, so the peer's watch
/// sees the end. Checks `link` every `tick`.
pub(crate) fn watch_peer(
    tcp: TcpStream,
    link: Arc<Link>,
    van: &'static str,
    tick: Duration,
    rt: &tokio::runtime::Handle,
    gone: impl FnOnce(String) + Send + 'static,
    closed: impl FnOnce() + Send + 'static,
) {
    rt.spawn(async move {
        let (mut rd, mut wr) = tcp.into_split();
        let mut buf = [0u8; 64];
        let mut tick = tokio::time::interval(tick);
        loop {
            tokio::select! {
                r = rd.read(&mut buf) => {
                    gone(match r {
                        Ok(0) => "the peer closed the connection".to_string(),
                        Ok(_) => format!("unexpected bytes on the control connection of the {van} link"),
                        Err(e) => format!("read failed: {e}"),
                    });
                    return;
                }
                _ = tick.tick() => {
                    if link.is_closed() {
                        closed();
                        let _ = wr.shutdown().await;
                        return;
                    }
                }
            }
        }
    });
}

/// Bytes `[start, start + len)` of the concatenation of `parts`, as slices
/// of them (no copy): how the vans cut a frame's head and payload into
/// chunks.
pub(crate) fn slice_parts<'a>(parts: &[&'a [u8]], start: usize, len: usize) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(parts.len());
    let (mut skip, mut left) = (start, len);
    for p in parts {
        if left == 0 {
            break;
        }
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let take = (p.len() - skip).min(left);
        out.push(&p[skip..skip + take]);
        left -= take;
        skip = 0;
    }
    out
}

/// Ends a link once: closes its queue and tells the sink.
pub(crate) fn end(link: &Arc<Link>, sink: &Arc<dyn FrameSink>, reason: String) {
    if link.close(reason.clone()) {
        sink.on_closed(link, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::slice_parts;

    #[test]
    fn slices_of_parts_cover_exactly_the_range() {
        let (a, b) = (b"head".as_slice(), b"payload".as_slice());
        let whole = [a, b];
        let joined: Vec<u8> = [a, b].concat();
        for start in 0..=joined.len() {
            for len in 0..=joined.len() - start {
                let got: Vec<u8> = slice_parts(&whole, start, len).concat();
                assert_eq!(got, &joined[start..start + len], "{start}+{len}");
            }
        }
    }
}
