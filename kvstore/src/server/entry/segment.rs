//! The shared segment of a key's co-located fast path: made when a worker
//! that will map it checks the part (the stored value moves into its value
//! slot), read for a shared-memory push (the worker's slot), and its file
//! removed once no worker will map it any more (the mappings stay); its
//! gate (`crate::gate`) closed, and the rounds the workers summed there
//! counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pskv_transport::Region;

use super::EntryState;
use crate::error::Fault;
use crate::gate::Gate;
use crate::wire::Head;

/// How long a worker that took a key's segment has to map it before a
/// completed round may take the file away (a worker that failed to map it
/// pushes by message meanwhile).
const SHM_GRACE: Duration = Duration::from_secs(10);

impl EntryState {
    /// A worker's check of the part after its init ([`Op::Check`](crate::wire::Op::Check)): an
    /// error if it holds another type or size than this server's record;
    /// else, if it will map the segment, the segment (made on the first
    /// such check; the value moves into it) as the transport's descriptor
    /// of the region.
    pub(crate) fn check(
        &mut self,
        head: &Head,
        c: &crate::wire::Check,
        rank: usize,
    ) -> Result<Option<Bytes>, Fault> {
        if rank >= self.workers {
            return Err(Fault::Mismatch(format!(
                "{}: no worker rank {rank}",
                self.name()
            )));
        }
        if head.dtype != self.dtype || c.part_bytes != self.nbytes as u64 {
            let theirs = c.part_bytes / head.dtype.size() as u64;
            return Err(Fault::Mismatch(format!(
                "{}: worker {rank} holds {theirs} {} elements of it (its key has shape {:?}), but the server holds {} {} elements (from worker 0's init): every worker must init a key with the same shape and type",
                self.name(),
                head.dtype,
                c.shape,
                self.elems,
                self.dtype
            )));
        }
        self.checked[rank] = true;
        let answer = if c.wants_shm {
            if self.shm.is_none() {
                let seg = Region::create(self.workers + 1, self.nbytes).map_err(|e| {
                    Fault::Failed(format!(
                        "{}: cannot make a shared segment: {e}",
                        self.name()
                    ))
                })?;
                // SAFETY: a fresh segment no one else has mapped yet.
                unsafe { seg.slot_mut(self.workers) }.copy_from_slice(self.value.bytes());
                self.shm = Some(Arc::new(seg));
            }
            self.shm_pending[rank] = Some(Instant::now());
            let seg = self.shm.as_ref().expect("made above");
            Some(seg.descriptor())
        } else {
            None
        };
        self.maybe_unlink(false);
        Ok(answer)
    }

    /// Worker `rank` used the segment (or will not): once nobody will map
    /// it any more, the file goes (the mappings stay).
    pub(crate) fn shm_used(&mut self, rank: usize) {
        if let Some(p) = self.shm_pending.get_mut(rank) {
            *p = None;
        }
        self.maybe_unlink(false);
    }

    /// Removes the segment's file when no worker will map it any more:
    /// every pending one used it, or (`round_done`) took it `SHM_GRACE`
    /// ago and has pushed by message since.
    ///
    /// Subtle: a round completing soon after a check says nothing of the
    /// checking worker. After a server restart, a worker's recheck thread
    /// maps the new segment while its training pushes by message; a round
    /// can complete between the check's answer and the worker's mapping,
    /// and an unlink then would leave that part on messages for good.
    pub(super) fn maybe_unlink(&mut self, round_done: bool) {
        let Some(seg) = &self.shm else { return };
        // Once gone, for good (a load: this runs every round).
        if seg.is_retired() || !self.checked.iter().all(|c| *c) {
            return;
        }
        let gone = |p: &Option<Instant>| match p {
            None => true,
            Some(t) => round_done && t.elapsed() >= SHM_GRACE,
        };
        if self.shm_pending.iter().all(gone) {
            seg.retire();
        }
    }

    /// Removes the segment's file now (the server is stopping).
    pub(crate) fn unlink_segment(&self) {
        if let Some(seg) = &self.shm {
            seg.retire();
        }
    }

    /// A worker died: it will not map the segment.
    pub(crate) fn worker_gone(&mut self, rank: usize) {
        if let Some(c) = self.checked.get_mut(rank) {
            *c = true;
        }
        self.shm_used(rank);
    }

    /// Whether a shared-memory request names this entry's segment: a
    /// request prepared for the segment of a server process that has since
    /// been restarted must fail (the worker maps the new one and sends
    /// again), not read this one's slot.
    pub(crate) fn check_shm(&self, head: &Head) -> Result<(), Fault> {
        match &self.shm {
            Some(seg) if seg.tag() == head.shm_tag => Ok(()),
            Some(_) => Err(Fault::Unavailable(format!(
                "{}: a shared-memory request for another segment of this key (this server restarted since the worker mapped it); sending again",
                self.name()
            ))),
            None => Err(Fault::Unavailable(format!(
                "{}: a shared-memory request, but the key has no segment (open it first)",
                self.name()
            ))),
        }
    }

    /// A pull through the segment by worker `rank`: word that the value is
    /// in the value slot, or the value, once it left the slot.
    pub(crate) fn pull_shm(&mut self, head: &Head, rank: usize) -> Result<Option<Bytes>, Fault> {
        self.check_shm(head)?;
        self.shm_used(rank);
        Ok(Some(match self.value_slot() {
            Some(_) => Bytes::new(),
            None => self.snapshot(),
        }))
    }

    /// The push of worker `rank` in its slot, as bytes; `vals` is the
    /// request's body, the byte count the worker wrote there.
    pub(crate) fn shm_input(&self, head: &Head, vals: &[u8], rank: usize) -> Result<Bytes, Fault> {
        self.check_shm(head)?;
        let wrote = <[u8; 8]>::try_from(vals).map(u64::from_le_bytes).ok();
        if wrote != Some(self.nbytes as u64) {
            return Err(Fault::Mismatch(format!(
                "{}: a shared-memory push of {} but the key holds {} bytes ({} elements)",
                self.name(),
                match wrote {
                    Some(n) => format!("{n} bytes"),
                    None => format!("a malformed {}-byte count", vals.len()),
                },
                self.nbytes,
                self.elems
            )));
        }
        match &self.shm {
            Some(seg) if rank < self.workers => {
                // SAFETY: the view lives while the server sums the round;
                // the worker does not write its slot until the round is
                // answered (the protocol in `kinds/dist/segments.rs`).
                Ok(unsafe { seg.lease(rank) })
            }
            _ => Err(Fault::Mismatch(format!(
                "{}: a shared-memory request, but the key has no segment (open it first)",
                self.name()
            ))),
        }
    }
}

impl EntryState {
    /// Counts into `rounds` the rounds the workers summed at the gate
    /// since the last look (inside an op on the entry, or under its lock
    /// between ops: `Server`'s round log refresh); how many.
    pub(crate) fn count_gate_rounds(&mut self) -> u64 {
        let Some(seg) = &self.shm else {
            return 0;
        };
        let done = Gate::of(seg).done();
        let n = u64::from(done.wrapping_sub(self.gate_seen));
        self.gate_seen = done;
        if self.value_left_slot {
            // A round that ended there after the value left the slot ended
            // in a slot nobody reads: no round of this key.
            return 0;
        }
        self.rounds += n;
        n
    }

    /// Before the server sums a sync round (every worker's push is here):
    /// if the segment's gate still counts arrivals, a round there never
    /// ended (G1 of `crate::gate`: none can be left now by the protocol).
    /// If not every worker arrived there, a worker timed out or died in a
    /// round of late copies (which never takes its arrival back): nobody
    /// sums such a round, and the arrivals are taken back, so that the
    /// gate can open again. Else its summer, or a worker helping it with a
    /// chunk, stalled past its waiters' timeout or died while summing; such
    /// a thread, if it runs on, writes the value slot when it will, over
    /// any later value. So the
    /// value leaves the slot for this entry's own buffer, for good: the
    /// gate is shut (no worker arrives there or reads the value slot
    /// again, and the server opens it no more), and the answers that would
    /// say "in the value slot" carry the value by message (`want`). The
    /// workers' slots still carry their pushes (such a thread only reads
    /// them). The part's rounds go through the server from then on.
    pub(super) fn leave_stuck_slot(&mut self) {
        let Some(seg) = self.value_slot() else {
            return;
        };
        let gate = Gate::of(seg);
        let arrived = gate.arrived();
        if arrived == 0 {
            return;
        }
        if gate.clear_arrivals() {
            // Not all arrived: nobody sums that round (L2 of `gate/late.rs`,
            // S1 of `gate/chunks.rs`), and the slot is the server's.
            tracing::warn!(
                "{}: {arrived} arrival(s) of a round at the part's gate that never filled taken back (a worker timed out or died in a round of late copies, which keeps its arrival); the gate may open again",
                self.name()
            );
            return;
        }
        gate.shut();
        // SAFETY: a copy out of memory another process may be writing at
        // this moment (a stalled summer or helper that runs on): the value
        // is in doubt already, as the round that never ended failed so.
        // With no optimizer (gates open only then) the round summed now
        // replaces it whole; an optimizer set since the gate closed starts
        // from it, as it would have from the slot.
        let value = crate::tensor::Buf::from_bytes(unsafe { seg.slot(self.workers) });
        self.value = Arc::new(value);
        self.value_left_slot = true;
        tracing::warn!(
            "{}: a round at the part's gate never ended (every worker arrived: one stalled or died while summing it); its value, in doubt since, now lives in the server, and the part's rounds go through the server",
            self.name()
        );
    }

    /// Closes the segment's gate: rounds come to the server again (a round
    /// gathering there handed over by its workers, one being summed ended
    /// there first). Never waits.
    pub(crate) fn close_gate(&self) {
        if let Some(seg) = &self.shm {
            Gate::of(seg).close();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::SHM_GRACE;

    /// A completed round takes a segment's file away only from workers
    /// that took it `SHM_GRACE` ago (a restarted server's workers map it
    /// from a thread while their training pushes by message); a worker
    /// that used it lets it go at once.
    #[test]
    fn a_round_does_not_unlink_a_segment_a_worker_has_just_taken() {
        let mut st = crate::server::entry::tests::shared_entry();
        let path = st.shm.as_ref().unwrap().path().to_path_buf();
        st.shm_used(0);
        st.maybe_unlink(true);
        assert!(path.exists(), "worker 1 took the segment just now");
        // Worker 1 took it long ago and pushed by message since: it goes.
        st.shm_pending[1] = Some(Instant::now() - SHM_GRACE - Duration::from_secs(1));
        st.maybe_unlink(false);
        assert!(path.exists(), "only a completed round lets it go");
        st.maybe_unlink(true);
        assert!(!path.exists());
    }
}
