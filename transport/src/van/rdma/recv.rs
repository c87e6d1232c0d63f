//! The receiving side of an RDMA link: the poller thread's loop over
//! completions, receives re-posted as soon as they are read, chunks
//! reassembled into frames, credits taken back, and the buffers granted
//! for rendezvous.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::verbs::{Completion, RemoteRegion, Span};
use super::{
    rdv_key_from, Ctl, GrantOut, RdvKey, Shared, CHUNK_HDR, K_CREDIT, K_DATA, K_DATA_LAST, K_FREE,
    K_GRANT, K_RDV_HEAD, K_WANT, RECV_SLOTS, RENDEZVOUS_BUDGET, SLOT, WAIT, WR_RECV,
};
use crate::link::Link;
use crate::van::{FrameSink, VanError};
use crate::wire::{decode_frame, decode_header, Frame, HEADER_LEN};

pub(super) fn poll_loop(
    sh: &Shared,
    link: &Arc<Link>,
    sink: &Arc<dyn FrameSink>,
) -> Result<(), VanError> {
    let mut done = Vec::new();
    let mut partial: Option<BytesMut> = None;
    loop {
        let closing = sh.state.lock().closed || link.is_closed();
        done.clear();
        // Closing: one last look, without waiting, at what already arrived.
        let wait = if closing { Duration::ZERO } else { WAIT };
        sh.qp.poll(&mut done, wait).map_err(VanError::from)?;
        if closing && done.is_empty() {
            return Ok(());
        }
        for c in done.drain(..) {
            match c {
                Completion::Send { wr_id } => {
                    let mut st = sh.state.lock();
                    st.free_slots.push((wr_id & 0xffff_ffff) as usize);
                    drop(st);
                    sh.cv.notify_all();
                }
                Completion::Write { .. } => {}
                Completion::RecvImm { wr_id, .. } => {
                    // The payload landed in a granted buffer; its head follows.
                    repost(sh, wr_id)?;
                }
                Completion::Recv { wr_id, len } => {
                    let slot = (wr_id & 0xffff_ffff) as usize;
                    let mut chunk = vec![0u8; len];
                    sh.recv.read(slot * SLOT, &mut chunk);
                    repost(sh, wr_id)?;
                    if let Some(frame) = on_chunk(sh, &chunk, &mut partial)? {
                        sink.on_frame(link, frame);
                    }
                }
                Completion::Error { message, .. } => {
                    return Err(VanError::system("an RDMA operation", message))
                }
            }
        }
    }
}

/// Re-posts a receive and counts the credit owed to the peer.
pub(super) fn repost(sh: &Shared, wr_id: u64) -> Result<(), VanError> {
    let slot = (wr_id & 0xffff_ffff) as usize;
    sh.qp
        .post_recv(
            Span::new(&sh.recv, slot * SLOT, SLOT),
            WR_RECV | slot as u64,
        )
        .map_err(VanError::from)?;
    sh.state.lock().owed += 1;
    sh.cv.notify_all();
    Ok(())
}

/// Handles one received chunk; a whole frame when one is complete.
pub(super) fn on_chunk(
    sh: &Shared,
    chunk: &[u8],
    partial: &mut Option<BytesMut>,
) -> Result<Option<Frame>, VanError> {
    if chunk.len() < CHUNK_HDR {
        return Err(VanError::protocol("a chunk shorter than its header"));
    }
    let kind = u32::from_le_bytes(chunk[0..4].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(chunk[4..8].try_into().expect("4 bytes")) as usize;
    let credits = u32::from_le_bytes(chunk[8..12].try_into().expect("4 bytes"));
    if len != chunk.len() - CHUNK_HDR || credits as usize > RECV_SLOTS {
        return Err(VanError::protocol("a malformed chunk header"));
    }
    if credits > 0 {
        sh.state.lock().credits += credits;
        sh.cv.notify_all();
    }
    let body = &chunk[CHUNK_HDR..];
    let max_frame = sh.limits.max_payload
        + sh.limits.max_meta as u64
        + sh.limits.max_keys as u64 * 12
        + HEADER_LEN as u64;
    match kind {
        K_CREDIT => Ok(None),
        K_DATA | K_DATA_LAST => {
            let buf = partial.get_or_insert_with(BytesMut::new);
            if (buf.len() + body.len()) as u64 > max_frame {
                return Err(VanError::protocol("a frame larger than the message limit"));
            }
            crate::copy::extend(buf, body);
            if kind == K_DATA_LAST {
                let bytes = partial.take().expect("present").freeze();
                return decode_frame(bytes, &sh.limits)
                    .map_err(VanError::from)
                    .map(Some);
            }
            Ok(None)
        }
        K_WANT => {
            let key = rdv_key_from(body).ok_or(VanError::protocol("a malformed WANT"))?;
            let want = u64::from_le_bytes(
                body.get(9..17)
                    .ok_or(VanError::protocol("a malformed WANT"))?
                    .try_into()
                    .expect("8 bytes"),
            );
            grant(sh, key, want);
            Ok(None)
        }
        K_GRANT => {
            if body.len() < 9 + 4 + 8 + 4 + 8 {
                return Err(VanError::protocol("a malformed GRANT"));
            }
            let key = rdv_key_from(body).ok_or(VanError::protocol("a malformed GRANT"))?;
            let id = u32::from_le_bytes(body[9..13].try_into().expect("4 bytes"));
            let region = RemoteRegion {
                addr: u64::from_le_bytes(body[13..21].try_into().expect("8 bytes")),
                rkey: u32::from_le_bytes(body[21..25].try_into().expect("4 bytes")),
                len: u64::from_le_bytes(body[25..33].try_into().expect("8 bytes")),
            };
            let mut st = sh.state.lock();
            st.wanted.remove(&key);
            st.grants_out.insert(
                key,
                GrantOut {
                    id,
                    region,
                    busy: false,
                },
            );
            Ok(None)
        }
        K_FREE => {
            let key = rdv_key_from(body).ok_or(VanError::protocol("a malformed FREE"))?;
            if let Some(g) = sh.state.lock().grants_out.get_mut(&key) {
                g.busy = false;
            }
            Ok(None)
        }
        K_RDV_HEAD => {
            if body.len() < 4 + HEADER_LEN {
                return Err(VanError::protocol("a malformed rendezvous head"));
            }
            let id = u32::from_le_bytes(body[0..4].try_into().expect("4 bytes"));
            let head = &body[4..];
            let h = decode_header(&head[..HEADER_LEN], &sh.limits).map_err(VanError::from)?;
            let payload_len = h.payload_len as usize;
            if head.len() as u64 + h.payload_len != HEADER_LEN as u64 + h.body_len() {
                return Err(VanError::protocol(
                    "a rendezvous head that does not match its header",
                ));
            }
            let (key, region) = sh.state.lock().grants_in.get(&id).cloned().ok_or_else(|| {
                VanError::Protocol(format!("a rendezvous head for unknown buffer {id}"))
            })?;
            if payload_len > region.len() {
                return Err(VanError::protocol(
                    "a rendezvous payload larger than its buffer",
                ));
            }
            let mut bytes = BytesMut::with_capacity(head.len() + payload_len);
            bytes.extend_from_slice(head);
            bytes.resize(head.len() + payload_len, 0);
            region.read(0, &mut bytes[head.len()..]);
            // The buffer is free again for the sender's next write.
            sh.state.lock().outbox.push_back(Ctl::Free { key });
            sh.cv.notify_all();
            decode_frame(bytes.freeze(), &sh.limits)
                .map_err(VanError::from)
                .map(Some)
        }
        k => Err(VanError::Protocol(format!("unknown chunk kind {k}"))),
    }
}

/// Registers (or re-registers, larger) the buffer for `key` and queues the
/// grant; within the link's budget, otherwise the sender stays eager.
pub(super) fn grant(sh: &Shared, key: RdvKey, want: u64) {
    if want > sh.limits.max_payload || want as usize > RENDEZVOUS_BUDGET {
        return;
    }
    let st = sh.state.lock();
    let old = st.grant_of.get(&key).copied();
    let freed = old
        .and_then(|id| st.grants_in.get(&id))
        .map_or(0, |(_, r)| r.len());
    if st.granted_bytes - freed + want as usize > RENDEZVOUS_BUDGET {
        return;
    }
    drop(st);
    let Ok(region) = sh.dev.register(want as usize) else {
        return;
    };
    let mut st = sh.state.lock();
    if let Some(id) = old {
        st.grants_in.remove(&id);
    }
    st.granted_bytes = st.granted_bytes - freed + region.len();
    let id = st.next_grant;
    st.next_grant += 1;
    let remote = region.remote();
    st.grants_in.insert(id, (key, region));
    st.grant_of.insert(key, id);
    st.outbox.push_back(Ctl::Grant {
        key,
        id,
        region: remote,
    });
    drop(st);
    sh.cv.notify_all();
}
