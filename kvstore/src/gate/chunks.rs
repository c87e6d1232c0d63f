//! A round being summed at the gate, shared: the summer and the workers
//! that wait for the round sum it chunk by chunk.
//!
//! The last worker to arrive sums the round (`mod.rs`); the others, which
//! arrived before it, have nothing to do but wait, on cores the summer
//! could use. So a part of at least two chunks (`chunk_bytes`) is cut into
//! chunks, and the summer and every waiting worker that finds the round
//! being summed (`kinds/dist/worker_sum/`: a thread polling its wait, or
//! its watcher) claim chunks one at a time and sum each into the value
//! slot with the same kernel. The kernel adds element by element, in rank
//! order, so the bits do not depend on who sums which chunk. The summer
//! ends the round once every chunk is summed.
//!
//! # Words (more of the region's header words; zero at creation)
//!
//! - `CLAIM`: the epoch of the round shared (bits 16..31) | `SHARED`
//!   (bit 15: set by `share`, so the word's first value, zero, matches no
//!   round) | the next chunk to claim (bits 0..15).
//! - `SUMMED`: chunks of that round summed.
//! - `BUSY`: the ranks (below 32) of the workers helping with that round,
//!   one bit each (S3).
//!
//! # States (of a round being summed: arrived = W, epoch e)
//!
//! ```text
//!   the summer arrived --`share`: SUMMED = 0, BUSY = 0, then CLAIM = e | SHARED | 0--> shared
//!   shared --`sum_chunks` (the summer, helpers): CLAIM + 1 while below n--> chunk claimed
//!   chunk claimed --its claimer, after its writes: SUMMED + 1--> chunk summed
//!   SUMMED = n --the summer: `Gate::finish`--> the round ends
//! ```
//!
//! Invariants:
//! - S1. Each chunk of a round is claimed once, and only after the summer
//!   shared the round: a claim is a compare-exchange on `CLAIM` that needs
//!   the round's epoch and `SHARED` in it. Between the last arrival and
//!   `share` the word holds an earlier round's epoch (or zero); a helper
//!   late from a round that ended claims nothing of a later one.
//! - S2. No helper writes the value slot after its round ends: the summer
//!   ends it only once `SUMMED = n`. A helper that dies holding a chunk
//!   leaves the round unended: the summer and the waiters fail it, in
//!   doubt, once they learn of the death, as for a dead summer. (Summing
//!   the part again would not be safe: a worker declared dead may only be
//!   stopped, and the kernel adds into the value slot in place.) One that
//!   stalls holding a chunk past the timeout fails it the same way, and
//!   may write its chunk whenever it runs on: the server moves the value
//!   out of the value slot before it sums the part's next round (`shut`
//!   in `mod.rs`).
//! - S3. A worker helps with at most one thread at a time (its helper in
//!   `kinds/dist/worker_sum/waits/mod.rs` takes a lock), whose rank's bit in `BUSY`
//!   is set from after it read `CLAIM` at the round's epoch (so after
//!   `share` cleared the word) until after its last claim. So the rank of
//!   a worker holding a chunk has its bit set. (A thread late from an
//!   earlier round may set its bit in a later one for a moment: its claim
//!   then fails, and it clears the bit.)
//!
//! # Orderings
//!
//! `share` clears `SUMMED` and `BUSY` before its Release store of
//! `CLAIM`; a claim is a compare-exchange (AcqRel) that reads that store
//! or a later claim, so the claimer sees the cleared words, and every slot
//! (the summer saw every arrival before `share`). A claimer's writes of a
//! chunk happen before its `SUMMED` increment (Release); the summer reads
//! `SUMMED = n` with Acquire before `finish` stores `GATE`: whoever sees
//! the round end sees every chunk.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::{epoch, Gate, ARRIVED, EPOCH_SHIFT, GATE};

const CLAIM: usize = 4;
const SUMMED: usize = 5;
const BUSY: usize = 6;

const SHARED: u32 = 1 << 15;
const INDEX: u32 = SHARED - 1;
/// The smallest chunk: small enough that a 256 KiB part is shared eight
/// ways, large enough that a claim (a cache line's trip) is a small part
/// of a chunk's time.
const MIN_CHUNK: usize = 32 << 10;
/// The largest chunk: the rest of a round waits for the last one.
const MAX_CHUNK: usize = 1 << 20;
/// The most chunks a round is cut into (`CLAIM`'s index bits).
const MAX_CHUNKS: usize = 1 << 14;
/// Workers at and above this rank do not help (`BUSY` has a bit each).
pub(crate) const MAX_HELPER_RANK: usize = 32;

/// The chunk length of a part of `len` bytes: about a 32nd of it, within
/// 32 KiB to 1 MiB, a whole number of pages (so of every element type).
/// None: the part is summed whole, by the summer.
pub(crate) fn chunk_bytes(len: usize) -> Option<usize> {
    let c = (len / 32)
        .clamp(MIN_CHUNK, MAX_CHUNK)
        .next_multiple_of(4096);
    (len > c && len.div_ceil(c) <= MAX_CHUNKS).then_some(c)
}

/// The round of one epoch at a gate, shared in chunks.
pub(crate) struct Shared<'g, 'a> {
    gate: &'g Gate<'a>,
    epoch: u32,
    len: usize,
    chunk: usize,
    n: u32,
}

impl<'a> Gate<'a> {
    /// The summer shares its round of `epoch`, of a part of `len` bytes
    /// (None: too small to share, or nobody to share it with; it sums it
    /// whole).
    pub(crate) fn share(&self, epoch: u32, len: usize) -> Option<Shared<'_, 'a>> {
        if self.workers < 2 {
            return None;
        }
        let chunk = chunk_bytes(len)?;
        self.word(SUMMED).store(0, Ordering::Relaxed);
        self.word(BUSY).store(0, Ordering::Relaxed);
        self.word(CLAIM)
            .store(epoch << EPOCH_SHIFT | SHARED, Ordering::Release);
        // Waiters asleep on this gate (a worker's watcher) wake to help: a
        // hint only (a watcher about to sleep misses it, and looks again
        // within its nap).
        self.wake();
        Some(self.shared_round(epoch, len, chunk))
    }

    /// A waiter's round of `epoch`, of a part of `len` bytes, if it is
    /// being summed, shared, with chunks left to claim.
    pub(crate) fn shared(&self, epoch0: u32, len: usize) -> Option<Shared<'_, 'a>> {
        let chunk = chunk_bytes(len)?;
        let g = self.word(GATE).load(Ordering::Acquire);
        if epoch(g) != epoch0 || ((g & ARRIVED) as usize) < self.workers {
            return None;
        }
        let sh = self.shared_round(epoch0, len, chunk);
        sh.claimable(self.word(CLAIM).load(Ordering::Acquire))
            .then_some(sh)
    }

    /// The ranks that may hold a chunk of the round of `epoch0`, of a part
    /// of `len` bytes, as bits (none if that round is not shared, or every
    /// chunk of it is summed).
    pub(crate) fn helpers_busy(&self, epoch0: u32, len: usize) -> u32 {
        let c = self.word(CLAIM).load(Ordering::Acquire);
        let summed = self
            .summed_round(epoch0, len)
            .is_none_or(|sh| sh.all_summed());
        if c >> EPOCH_SHIFT != epoch0 || c & SHARED == 0 || summed {
            return 0;
        }
        self.word(BUSY).load(Ordering::Acquire)
    }

    /// The summer's round of `epoch`, of a part of `len` bytes, as it
    /// shared it (None: not shared).
    pub(crate) fn summed_round(&self, epoch: u32, len: usize) -> Option<Shared<'_, 'a>> {
        let chunk = chunk_bytes(len).filter(|_| self.workers >= 2)?;
        Some(self.shared_round(epoch, len, chunk))
    }

    fn shared_round(&self, epoch: u32, len: usize, chunk: usize) -> Shared<'_, 'a> {
        Shared {
            gate: self,
            epoch,
            len,
            chunk,
            n: len.div_ceil(chunk) as u32,
        }
    }
}

impl Gate<'_> {
    /// Zeroes `CLAIM`: no round's `SHARED` claim is left in it
    /// (`Gate::forget`).
    pub(super) fn forget_shared_words(&self) {
        self.word(CLAIM).store(0, Ordering::Relaxed);
    }
}

impl Shared<'_, '_> {
    /// Claims chunks and sums each with `sum` (given the chunk's byte range
    /// in the part) until none is left; how many it summed. `helper`: the
    /// rank of a waiter that helps (None: the summer).
    pub(crate) fn sum_chunks(&self, helper: Option<usize>, sum: impl FnMut(Range<usize>)) -> usize {
        let c = self.gate.word(CLAIM).load(Ordering::Acquire);
        self.claim_from(c, helper, sum)
    }

    /// Whether `CLAIM`'s value `c` leaves a chunk of this round to claim.
    fn claimable(&self, c: u32) -> bool {
        c >> EPOCH_SHIFT == self.epoch && c & SHARED != 0 && c & INDEX < self.n
    }

    /// `sum_chunks`, from `CLAIM`'s value `c`, read before.
    fn claim_from(
        &self,
        mut c: u32,
        helper: Option<usize>,
        mut sum: impl FnMut(Range<usize>),
    ) -> usize {
        let (claim, busy) = (self.gate.word(CLAIM), self.gate.word(BUSY));
        let bit = match helper {
            None => 0,
            Some(r) if r < MAX_HELPER_RANK => 1u32 << r,
            Some(_) => return 0,
        };
        let mut joined = false;
        let mut done = 0;
        while self.claimable(c) {
            if !joined && bit != 0 {
                // S3: after reading `CLAIM` at this epoch, before a claim.
                busy.fetch_or(bit, Ordering::AcqRel);
                joined = true;
            }
            match claim.compare_exchange_weak(c, c + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    let at = (c & INDEX) as usize * self.chunk;
                    sum(at..(at + self.chunk).min(self.len));
                    self.gate.word(SUMMED).fetch_add(1, Ordering::Release);
                    done += 1;
                    c = claim.load(Ordering::Acquire);
                }
                Err(now) => c = now,
            }
        }
        if joined {
            busy.fetch_and(!bit, Ordering::Release);
        }
        done
    }

    /// Whether every chunk is summed (Acquire: the chunks' writes are
    /// seen).
    pub(crate) fn all_summed(&self) -> bool {
        self.gate.word(SUMMED).load(Ordering::Acquire) >= self.n
    }

    /// The ranks that may still hold a chunk, as bits.
    #[cfg(test)]
    pub(crate) fn busy(&self) -> u32 {
        self.gate.word(BUSY).load(Ordering::Acquire)
    }

    /// The chunks of the round.
    #[cfg(test)]
    pub(crate) fn chunks(&self) -> u32 {
        self.n
    }

    /// `sum_chunks` by a thread that read `CLAIM` long ago, as `c`.
    #[cfg(test)]
    pub(crate) fn sum_chunks_from(
        &self,
        c: u32,
        helper: Option<usize>,
        sum: impl FnMut(Range<usize>),
    ) -> usize {
        self.claim_from(c, helper, sum)
    }

    /// `CLAIM`'s value while chunk `i` of the round of `epoch` is next.
    #[cfg(test)]
    pub(crate) fn claim_word(epoch: u32, i: u32) -> u32 {
        epoch << EPOCH_SHIFT | SHARED | i
    }
}
