//! A key's push buffer (`KvStore::push_buffer`): a tensor whose bytes are
//! this worker's slots of the key's shared segments, so that a push or
//! push-pull from it copies nothing into them.
//!
//! A segment's slot `r` is where worker `r` puts its push
//! (`segments.rs`); here the slots of all the key's parts are mapped once
//! more, side by side in one span of memory (`pskv_transport::SlotSpan`),
//! and a host tensor is made over the span. A push from it finds each
//! part's bytes already in the part's slot (`DistStore::dense_payload`),
//! and sends only the message.
//!
//! What keeps the slot protocol (`segments.rs`) true with the slots in a
//! caller's tensor:
//!
//! - **L1.** Only the buffer writes the slots it holds: while it lives,
//!   the key's pushes from other tensors send those parts by message
//!   (`DistStore::mask_lent`); one buffer per key per worker.
//! - **L2.** The server reads worker `r`'s slot only between its push and
//!   the push's answer; the push's op reads the tensor until the answer,
//!   so writes to the tensor (ops that write its var) wait.
//! - **L3.** A push from the slots that failed may still be read later
//!   (the round it belongs to completes when the others push): its answer
//!   detaches the buffer before the op completes (`SlotSpan::detach`: the
//!   same bytes at the same addresses, on private pages), so later writes
//!   to it, through the tensor or through its address, never reach the
//!   slots; a write through the tensor then also moves it to the heap (in
//!   case the detach failed). Its later pushes copy into the slots as any
//!   tensor's do, once the doubt is over (`parts.rs`, `Unsure`).
//! - **L4.** The buffer is zeroed by an op after the key's ops so far, so
//!   a push still being read is not overwritten; none is made while a
//!   part is in doubt, and if one of those earlier pushes fails after the
//!   buffer was made, its answer detaches the buffer (before the zeroing
//!   op can run), as L3's does.
//!
//! A part whose slot cannot hold it in place (no segment: another host,
//! TCP, async mode; a part boundary inside a page) lies in ordinary memory
//! of the span and travels as it would from any tensor (the whole buffer
//! is ordinary memory if the span cannot be mapped at all). A server restart
//! gives the key new segments: the buffer's slots are the old process's
//! then (still mapped, read by no one), and pushes from it copy into the
//! new slots, as from any tensor.

use std::sync::Arc;

use pskv_engine::{OpSpec, RunContext};
use pskv_transport::{Piece, Region, SlotSpan};

use super::parts::Refused;
use super::{DistKey, DistStore};
use crate::error::{KvError, Result};
use crate::key::Key;
use crate::tensor::Tensor;

impl DistStore {
    /// `key`'s push buffer (a dense key: `KvStore::push_buffer` checked),
    /// or None if none of its parts can lie in a slot now (the caller then
    /// makes an ordinary tensor).
    pub(super) fn push_buffer(&self, key: &Key) -> Result<Option<Tensor>> {
        let dk = self.dist_key(key)?;
        let meta = &dk.local.meta;
        let segs = self.shm_parts(&dk);
        if segs.iter().all(Option::is_none) {
            return Ok(None);
        }
        let ub = dk.unit * meta.dtype.size();
        let me = self.po.my_rank() as usize;
        let pieces: Vec<Piece<'_>> = dk
            .parts
            .iter()
            .zip(&segs)
            .map(|(p, s)| Piece {
                offset: p.start * ub,
                len: p.len * ub,
                slot: s.as_ref().map(|r| (r, me)),
            })
            .collect();
        let span = match SlotSpan::new(meta.bytes(), &pieces) {
            Ok(s) => s,
            // It cannot be mapped (out of mappings, address space, ...):
            // ordinary memory will do.
            Err(e) => {
                tracing::warn!("key {key}'s push buffer is ordinary memory: {e}");
                return Ok(None);
            }
        };
        if span.placed_count() == 0 {
            return Ok(None);
        }
        let span = match dk.unsure.lend(|| Arc::new(span)) {
            Ok(s) => s,
            // Its next successful push ends the doubt; an ordinary tensor
            // meanwhile.
            Err(Refused::InDoubt) => return Ok(None),
            Err(Refused::Lent) => {
                return Err(KvError::invalid(format!(
                    "push_buffer: key {key} has a push buffer on this worker already \
                     (one per key): push from that one, or drop it first"
                )))
            }
        };
        let t = Tensor::over_span(&self.engine, &meta.shape, meta.dtype, span);
        // L4: after the key's ops so far (they write its var).
        let t2 = t.clone();
        let spec = OpSpec::new("kvstore_push_buffer")
            .write(&dk.var)
            .write(t.var());
        self.engine.push_sync(spec, move |rc| {
            t2.write(&rc)?.overwrite().fill(0);
            Ok(())
        })?;
        Ok(Some(t))
    }

    /// L1: leaves out of `segs` (a push's parts that travel through their
    /// slots) those whose slot the key's push buffer `lent` holds, unless
    /// `grad`'s part lies there (the tensor over the buffer, or a view of
    /// its memory, as the C ABI makes): they go by message, both ways
    /// (inside the push's op, which reads `grad`).
    ///
    /// Subtle: a push that runs while the buffer is being made may miss
    /// it; that push's op comes before the op that zeroes the buffer (both
    /// write the key's var), so its copy into the slot is overwritten, not
    /// read by the buffer's holder.
    pub(super) fn mask_lent(
        &self,
        dk: &DistKey,
        grad: &Tensor,
        lent: &SlotSpan,
        segs: &mut [Option<Arc<Region>>],
        rc: &RunContext<'_>,
    ) {
        let ub = dk.unit * dk.local.meta.dtype.size();
        let me = self.po.my_rank() as usize;
        let base = grad
            .read(rc)
            .ok()
            .filter(|d| d.dev.is_none())
            .map(|d| d.bytes().as_ptr());
        for (i, s) in segs.iter_mut().enumerate() {
            let Some(seg) = s.as_ref() else { continue };
            let p = dk.parts[i];
            let held = lent.placed(i).is_some_and(|(r, _)| Arc::ptr_eq(r, seg));
            // SAFETY (of the `add`): an address inside `grad`'s bytes.
            let from_it = base.is_some_and(|b| {
                lent.is_slot_at(b.wrapping_add(p.start * ub), p.len * ub, seg, me)
            });
            if held && !from_it {
                *s = None;
            }
        }
    }
}
