//! This worker's part in a round whose workers arrive before they copy
//! (`gate/late.rs`): its walk (the chunks it claims, the others it copies
//! into its slot), then, as the others supply and sum, its claimed chunks
//! summed from its own input into the value slot and its output, and the
//! others' copied out of the value slot into its output.
//!
//! # States
//!
//! A `LatePart` is made at the worker's arrival and walked at once; its
//! `progress` (the arriving thread, then the waits' pollers and watcher)
//! sums each claimed chunk once supplied and copies each other chunk once
//! summed, under its lock (one thread at a time), until nothing is left
//! (`done`). It is closed (`close`: nothing more is written into the
//! output) before its op completes, whichever way.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use pskv_gpu::cpu::CpuKernels;
use pskv_transport::copy::copy;
use pskv_transport::Region;
use smallvec::SmallVec;

use super::super::inflight::OutPtr;
use super::{Gate, SETTLE};
use crate::dtype::DType;
use crate::error::Fault;

/// This worker's part of a round summed by late copies.
pub(in crate::kinds::dist) struct LatePart {
    pub(super) seg: Arc<Region>,
    pub(super) epoch: u32,
    /// The round's chunk length (`gate::late_chunk`, at the arrival).
    chunk: usize,
    rank: usize,
    dtype: DType,
    /// This worker's values of the part (None: its slot holds them
    /// already, a push buffer's).
    input: Option<Bytes>,
    /// The push-pull's output and the part's first byte in it.
    out: Option<(OutPtr, usize)>,
    kernels: Arc<CpuKernels>,
    state: Mutex<State>,
    /// Nothing is left of this worker's part (or it is closed): a look
    /// without the lock.
    finished: AtomicBool,
}

struct State {
    /// False once closed: nothing more is written into the output.
    open: bool,
    /// Claimed chunks not summed yet.
    mine: SmallVec<[u32; 32]>,
    /// Others' chunks not copied out yet (push-pulls only).
    theirs: SmallVec<[u32; 32]>,
    /// A sum failed (it cannot, for slots of one size).
    failed: Option<Fault>,
}

impl LatePart {
    /// Arrived at the round of `epoch`, of chunks of `chunk` bytes: walks
    /// it (claims, and supplies from `input` or the slot as it is).
    pub(super) fn arrive(
        seg: Arc<Region>,
        (epoch, chunk): (u32, usize),
        rank: usize,
        dtype: DType,
        input: Option<Bytes>,
        out: Option<(OutPtr, usize)>,
        kernels: Arc<CpuKernels>,
    ) -> Arc<LatePart> {
        let gate = Gate::of(&seg);
        let late = gate.late(epoch, seg.slot_len(), chunk);
        let mine = late.walk(rank, |r| {
            if let Some(input) = &input {
                // SAFETY: this worker's own slot's chunk, which nobody reads
                // until the bit set after this (L3 of `gate/late.rs`).
                copy(unsafe { seg.slot_range_mut(rank, r.clone()) }, &input[r]);
            }
        });
        let theirs = if out.is_some() {
            (0..late.chunks() as u32)
                .filter(|k| !mine.contains(k))
                .collect()
        } else {
            SmallVec::new()
        };
        Arc::new(LatePart {
            seg,
            epoch,
            chunk,
            rank,
            dtype,
            input,
            out,
            kernels,
            state: Mutex::new(State {
                open: true,
                mine,
                theirs,
                failed: None,
            }),
            finished: AtomicBool::new(false),
        })
    }

    /// `progress` in the arriving thread, while it moves: until nothing is
    /// left and the round ended, or nothing came ready for `SETTLE` (the
    /// others are not there yet, or slow: the waits' pollers and watcher go
    /// on).
    pub(super) fn settle(&self) {
        let gate = Gate::of(&self.seg);
        let mut left = usize::MAX;
        let mut since = Instant::now();
        let mut spins = 0u32;
        loop {
            match self.progress_left() {
                Some(0) if gate.round(self.epoch) == crate::gate::Round::Ended => return,
                Some(0) if left != 0 => {
                    left = 0;
                    since = Instant::now();
                }
                Some(n) if n < left => {
                    left = n;
                    since = Instant::now();
                }
                _ if since.elapsed() >= SETTLE => return,
                _ => {}
            }
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Sums the claimed chunks every other worker supplied, and copies out
    /// the others' chunks they summed; ends the round if this summed its
    /// last chunk. Whether nothing is left of this worker's part (None:
    /// another thread is at it).
    pub(super) fn progress(&self) -> Option<bool> {
        self.progress_left().map(|n| n == 0)
    }

    /// `progress`, counting what is left.
    fn progress_left(&self) -> Option<usize> {
        let mut st = self.state.try_lock()?;
        if !st.open {
            return Some(0);
        }
        let gate = Gate::of(&self.seg);
        let late = gate.late(self.epoch, self.seg.slot_len(), self.chunk);
        let workers = gate.workers();
        let st = &mut *st;
        let mut i = 0;
        while i < st.mine.len() {
            let k = st.mine[i] as usize;
            if !late.supplied(k) {
                i += 1;
                continue;
            }
            let r = late.range(k);
            if let Err(e) = self.sum(workers, r.clone()) {
                st.failed.get_or_insert(e);
            } else if let Some((out, at)) = &self.out {
                // SAFETY: the chunk this thread just summed: nobody writes it
                // until the round ends, which needs it counted summed.
                let v = unsafe { self.seg.slot_range(workers, r.clone()) };
                if let Err(e) = out.write(at + r.start, v) {
                    st.failed.get_or_insert(e);
                }
            }
            if late.sum_done(k) {
                gate.finish();
            }
            st.mine.swap_remove(i);
        }
        // Once the round ended every chunk is summed, and the next round may
        // have taken the chunks' words already (L4 of `gate/late.rs`).
        let ended = gate.round(self.epoch) == crate::gate::Round::Ended;
        let mut i = 0;
        while i < st.theirs.len() {
            let k = st.theirs[i] as usize;
            if !ended && !late.summed(k) {
                i += 1;
                continue;
            }
            if let Some((out, at)) = &self.out {
                let r = late.range(k);
                // SAFETY: summed (Acquire), and the value slot is written
                // again only in a round this worker has not pushed to yet.
                let v = unsafe { self.seg.slot_range(workers, r.clone()) };
                if let Err(e) = out.write(at + r.start, v) {
                    st.failed.get_or_insert(e);
                }
            }
            st.theirs.swap_remove(i);
        }
        let left = st.mine.len() + st.theirs.len();
        if left == 0 {
            self.finished.store(true, Ordering::Release);
        }
        Some(left)
    }

    /// Sums chunk `r` of every worker (this one's from its input) into the
    /// value slot, in rank order.
    fn sum(&self, workers: usize, r: Range<usize>) -> Result<(), Fault> {
        // SAFETY: every other worker supplied the chunk (L3 of
        // `gate/late.rs`), and only this worker, its claimer, writes the
        // value slot's chunk (L2).
        let ins: SmallVec<[&[u8]; 8]> = (0..workers)
            .map(|q| match (&self.input, q == self.rank) {
                (Some(input), true) => &input[r.clone()],
                _ => unsafe { self.seg.slot_range(q, r.clone()) },
            })
            .collect();
        let out = unsafe { self.seg.slot_range_mut(workers, r) };
        crate::comm::sum_dense(&self.kernels, self.dtype, out, &ins)
    }

    /// Whether nothing is left to do but wait for the round's end (or the
    /// part is closed).
    pub(super) fn done(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Ranks holding chunks not summed yet (a dead one's round cannot end).
    pub(super) fn claimers_unsummed(&self) -> u32 {
        Gate::of(&self.seg)
            .late(self.epoch, self.seg.slot_len(), self.chunk)
            .claimers_unsummed()
    }

    /// Closes the part: nothing more is written into the output; a sum that
    /// failed, if any.
    pub(super) fn close(&self) -> Option<Fault> {
        let mut st = self.state.lock();
        st.open = false;
        self.finished.store(true, Ordering::Release);
        st.failed.take()
    }

    /// Fills this worker's slot with its values of the chunks it claimed
    /// (its slot then holds its push whole: the round goes to the server,
    /// which reads it; L2 of `gate/late.rs`), after `close`.
    pub(super) fn fill_slot(&self) {
        let Some(input) = &self.input else {
            return;
        };
        // SAFETY: this worker's own slot: the round was handed over, so no
        // chunk of it is summed, and the server reads the slot only after
        // the push this precedes.
        copy(
            unsafe { self.seg.slot_range_mut(self.rank, 0..input.len()) },
            input,
        );
    }
}
