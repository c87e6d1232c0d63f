//! The sending side of an RDMA link: send slots and the peer's credits,
//! frames cut into eager chunks, control messages, and rendezvous writes
//! straight into a buffer the peer granted; the sender thread's loop.

use std::sync::Arc;
use std::time::Duration;

use super::verbs::{Region, RemoteWrite, Span};
use super::{
    rdv_key_bytes, Ctl, RdvKey, Shared, CHUNK_HDR, K_CREDIT, K_DATA, K_DATA_LAST, K_FREE, K_GRANT,
    K_RDV_HEAD, K_WANT, RECV_SLOTS, RENDEZVOUS_MIN, SLOT, WAIT, WR_SEND, WR_WRITE,
};
use crate::link::Link;
use crate::van::VanError;
use crate::wire::{Frame, Kind};

/// Waits for a free send slot and `need` credits; takes the slot, one
/// credit, and the credits owed to the peer (which the chunk carries back).
pub(super) fn reserve(sh: &Shared, link: &Link, need: u32) -> Result<(usize, u32), VanError> {
    let mut st = sh.state.lock();
    loop {
        if st.closed || link.is_closed() {
            return Err(VanError::Closed("RDMA link"));
        }
        if st.credits >= need && !st.free_slots.is_empty() {
            st.credits -= 1;
            let slot = st.free_slots.pop().expect("checked non-empty");
            let owed = std::mem::take(&mut st.owed);
            return Ok((slot, owed));
        }
        sh.cv.wait_for(&mut st, WAIT);
    }
}

/// Waits for `need` credits and takes one (an RDMA write with immediate
/// uses a receive of the peer's but no send slot, and carries no credits).
pub(super) fn take_credit(sh: &Shared, link: &Link, need: u32) -> Result<(), VanError> {
    let mut st = sh.state.lock();
    loop {
        if st.closed || link.is_closed() {
            return Err(VanError::Closed("RDMA link"));
        }
        if st.credits >= need {
            st.credits -= 1;
            return Ok(());
        }
        sh.cv.wait_for(&mut st, WAIT);
    }
}

/// Sends one chunk (`kind`, `body` parts) from a send slot.
pub(super) fn send_chunk(
    sh: &Shared,
    link: &Link,
    kind: u32,
    parts: &[&[u8]],
    need: u32,
) -> Result<(), VanError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    debug_assert!(CHUNK_HDR + len <= SLOT);
    let (slot, owed) = reserve(sh, link, need)?;
    let base = slot * SLOT;
    let mut hdr = [0u8; CHUNK_HDR];
    hdr[0..4].copy_from_slice(&kind.to_le_bytes());
    hdr[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    hdr[8..12].copy_from_slice(&owed.to_le_bytes());
    sh.send.write(base, &hdr);
    let mut at = base + CHUNK_HDR;
    for p in parts {
        sh.send.write(at, p);
        at += p.len();
    }
    sh.qp
        .post_send(
            Span::new(&sh.send, base, CHUNK_HDR + len),
            WR_SEND | slot as u64,
        )
        .map_err(VanError::from)
}

/// Sends `pieces` (head, payload) eagerly, cut into slot-sized chunks.
pub(super) fn send_eager(sh: &Shared, link: &Link, pieces: &[&[u8]]) -> Result<(), VanError> {
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let room = SLOT - CHUNK_HDR;
    let mut sent = 0;
    loop {
        let n = room.min(total - sent);
        let parts = crate::van::slice_parts(pieces, sent, n);
        sent += n;
        let kind = if sent >= total { K_DATA_LAST } else { K_DATA };
        send_chunk(sh, link, kind, &parts, 2)?;
        if sent >= total {
            return Ok(());
        }
    }
}

pub(super) fn send_ctl(sh: &Shared, link: &Link, ctl: Ctl) -> Result<(), VanError> {
    match ctl {
        Ctl::Want { key, len } => send_chunk(
            sh,
            link,
            K_WANT,
            &[&rdv_key_bytes(key), &len.to_le_bytes()],
            2,
        ),
        Ctl::Grant { key, id, region } => send_chunk(
            sh,
            link,
            K_GRANT,
            &[
                &rdv_key_bytes(key),
                &id.to_le_bytes(),
                &region.addr.to_le_bytes(),
                &region.rkey.to_le_bytes(),
                &region.len.to_le_bytes(),
            ],
            2,
        ),
        Ctl::Free { key } => send_chunk(sh, link, K_FREE, &[&rdv_key_bytes(key)], 2),
    }
}

/// The rendezvous key of a frame that may use one.
pub(super) fn rendezvous_key(f: &Frame) -> Option<RdvKey> {
    (matches!(f.kind, Kind::Request | Kind::Response)
        && f.keys.len() == 1
        && f.payload.len() >= RENDEZVOUS_MIN)
        .then(|| (f.kind as u8, f.keys[0]))
}

pub(super) fn send_frame(sh: &Shared, link: &Link, f: &Frame) -> Result<(), VanError> {
    let head = f.encode_head();
    if let (Some(key), true) = (rendezvous_key(f), sh.qp.supports_write_imm()) {
        let len = f.payload.len() as u64;
        // A granted, idle buffer large enough: write there.
        let grant = {
            let mut guard = sh.state.lock();
            let st = &mut *guard;
            // Ok: write into this grant. Err(ask): go eager, and ask for a
            // buffer (none yet, or too small) unless one is in flight.
            let decision = match st.grants_out.get_mut(&key) {
                Some(g) if !g.busy && g.region.len >= len => {
                    g.busy = true;
                    Ok((g.id, g.region))
                }
                Some(g) if g.busy => Err(false),
                _ => Err(true),
            };
            match decision {
                Ok(g) => Some(g),
                Err(ask) => {
                    if ask && st.wanted.insert(key, len).is_none() {
                        st.outbox.push_back(Ctl::Want { key, len });
                    }
                    None
                }
            }
        };
        if let Some((id, region)) = grant {
            let staging = staging_for(sh, key, f.payload.len())?;
            staging.write(0, &f.payload);
            take_credit(sh, link, 2)?;
            sh.qp
                .post_write_imm(
                    Span::new(&staging, 0, f.payload.len()),
                    RemoteWrite {
                        to: region,
                        offset: 0,
                        imm: id,
                    },
                    WR_WRITE,
                )
                .map_err(VanError::from)?;
            return send_chunk(sh, link, K_RDV_HEAD, &[&id.to_le_bytes(), &head], 2);
        }
    }
    send_eager(sh, link, &[&head, &f.payload])
}

/// The registered staging buffer for `key`, at least `len` bytes (kept).
pub(super) fn staging_for(
    sh: &Shared,
    key: RdvKey,
    len: usize,
) -> Result<Arc<dyn Region>, VanError> {
    if let Some(r) = sh.state.lock().staging.get(&key) {
        if r.len() >= len {
            return Ok(r.clone());
        }
    }
    let r = sh.dev.register(len).map_err(VanError::from)?;
    sh.state.lock().staging.insert(key, r.clone());
    Ok(r)
}

pub(super) fn send_loop(sh: &Shared, link: &Link) -> Result<(), VanError> {
    loop {
        // Control chunks first, then credits owed, then frames.
        loop {
            let next = sh.state.lock().outbox.pop_front();
            match next {
                Some(c) => send_ctl(sh, link, c)?,
                None => break,
            }
        }
        let owed = sh.state.lock().owed;
        if owed as usize >= RECV_SLOTS / 2 {
            send_chunk(sh, link, K_CREDIT, &[], 1)?;
        }
        match link.next_batch_blocking(1 << 20, Duration::from_millis(5)) {
            None => return Ok(()),
            Some(batch) => {
                for f in &batch {
                    send_frame(sh, link, f)?;
                }
            }
        }
        if sh.state.lock().closed {
            return Ok(());
        }
    }
}
