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
