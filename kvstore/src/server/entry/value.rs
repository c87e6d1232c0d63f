//! The stored value of a ps key: its own buffer, shared with answers in
//! flight (replaced, never changed in place, while shared), or, once the
//! key has a shared segment, the segment's value slot (who writes it
//! when: `kinds/dist/segments.rs`, `crate::gate`), until a round at the
//! gate never ended (`segment.rs`, `leave_stuck_slot`): its own buffer
//! again then, for good.

use std::sync::Arc;

use bytes::Bytes;
use pskv_transport::copy::to_vec;
use pskv_transport::Region;

use super::EntryState;
use crate::tensor::{share, Buf};

impl EntryState {
    /// The stored value (inside an op on the entry).
    pub(crate) fn value_bytes(&self) -> &[u8] {
        match self.value_slot() {
            // SAFETY: the value slot is written by this entry's ops, or,
            // while the gate is open, by the workers that sum a round
            // (`crate::gate`), which needs the next push of every worker;
            // a request that reads the value (a pull, a round's answer)
            // comes before its worker's next push. Workers read it only
            // between rounds (see `kinds/dist/segments.rs`).
            Some(seg) => unsafe { seg.slot(self.workers) },
            None => self.value.bytes(),
        }
    }

    /// The stored value, shared without a copy (copied out of a segment).
    pub(crate) fn snapshot(&self) -> Bytes {
        match self.value_slot() {
            // Out of a page-aligned slot: through `to_vec` (its doc).
            Some(_) => Bytes::from(to_vec(self.value_bytes())),
            None => share(&self.value, 0..self.value.len()),
        }
    }

    /// The segment whose value slot holds the stored value, if one does.
    pub(super) fn value_slot(&self) -> Option<&Arc<Region>> {
        self.shm.as_ref().filter(|_| !self.value_left_slot)
    }

    /// Replaces the stored value (a copy from the primary, replicas).
    pub(crate) fn set_value(&mut self, value: &[u8]) {
        self.value_mut(false).copy_from_slice(value);
    }

    /// The stored value's bytes, to overwrite or change (a copy first if
    /// an answer in flight shares them).
    pub(super) fn value_mut(&mut self, keep: bool) -> &mut [u8] {
        // (The fields apart, not `value_slot`: `value` is written below.)
        if let (Some(seg), false) = (&self.shm, self.value_left_slot) {
            // SAFETY: as in `value_bytes`; this entry's ops write it only
            // while the gate is closed (a round the server completes, a
            // copy from the primary: no workers' sums with replicas).
            return unsafe { seg.slot_mut(self.workers) };
        }
        if Arc::get_mut(&mut self.value).is_none() {
            self.value = Arc::new(if keep {
                Buf::from_bytes(self.value.bytes())
            } else {
                Buf::zeroed(self.value.len())
            });
        }
        Arc::get_mut(&mut self.value)
            .expect("made unique above")
            .bytes_mut()
    }
}
