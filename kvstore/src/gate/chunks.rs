//! A round being summed at the gate, shared: the summer and the workers
//! that wait for the round sum it chunk by chunk.
//!
//! The last worker to arrive sums the round (`mod.rs`); the others, which
//! arrived before it, have nothing to do but wait, on cores the summer
//! could use. So a part of at least two chunks (`chunk_bytes`) is cut into
//! chunks, and the summer and every waiting worker that finds the round
//! being summed (`kinds/dist/worker_sum.rs`: a thread polling its wait)
//! claim chunks one at a time and sum each into the value slot with the
//! same kernel. The kernel adds element by element, in rank order, so the
//! bits do not depend on who sums which chunk. The summer ends the round
//! once every chunk is summed.
//!
//! # Words (more of the region's header words; zero at creation)
//!
//! - `CLAIM`: the epoch of the round shared (bits 16..31) | the next chunk
//!   to claim (bits 0..16).
//! - `SUMMED`: chunks of that round summed.
//! - `BUSY`: the ranks (below 32) of the workers helping with that round,
//!   one bit each: set before a helper's first claim, cleared once it
//!   claims nothing more (after its last chunk's writes).
//!
//! # States (of a round being summed: arrived = W, epoch e)
//!
//! ```text
//!   the summer arrived --`share`: SUMMED = 0, BUSY = 0, then CLAIM = e | 0--> shared
//!   shared --`sum_chunks` (the summer, helpers): CLAIM + 1 while below n--> chunk claimed
//!   chunk claimed --its claimer, after its writes: SUMMED + 1--> chunk summed
//!   SUMMED = n --the summer: `Gate::finish`--> the round ends
//! ```
//!
//! Invariants:
//! - S1. Each chunk of a round is claimed once: a compare-exchange on
//!   `CLAIM` with the epoch in it, so a helper late from a round that
//!   ended claims nothing of a later one.
//! - S2. No helper writes the value slot after its round ends: the summer
//!   ends it only once `SUMMED = n`. The one exception, a helper that died
//!   holding a chunk: once every chunk is claimed and every worker still
//!   in `BUSY` is known dead, nobody alive can write the slot, and the
//!   summer sums the whole part again itself (the same bits) and ends it.
//! - S3. A helper sets its bit in `BUSY` only after it read `CLAIM` at the
//!   round's epoch (so after `share` cleared the word), and clears it only
//!   after its last claim: a bit clear means its writes are done.
//!
//! # Orderings
//!
//! `share` clears `SUMMED` and `BUSY` before its Release store of
//! `CLAIM`; a claim is a compare-exchange (AcqRel) that reads that store
//! or a later claim, so the claimer sees the cleared words, and every slot
//! (the summer saw every arrival before `share`). A claimer's writes of a
//! chunk happen before its `SUMMED` increment (Release); the summer reads
//! `SUMMED = n` with Acquire before `finish` stores `GATE`: whoever sees
//! the round end sees every chunk. A helper clears its `BUSY` bit with
//! Release; the summer reads it with Acquire before it sums again.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::{epoch, Gate, ARRIVED, EPOCH_SHIFT, GATE};

const CLAIM: usize = 4;
const SUMMED: usize = 5;
const BUSY: usize = 6;

const INDEX: u32 = 0xffff;
/// The smallest chunk: small enough that a 256 KiB part is shared eight
/// ways, large enough that a claim (a cache line's trip) is a small part
/// of a chunk's time.
const MIN_CHUNK: usize = 32 << 10;
/// The largest chunk: the rest of a round waits for the last one.
const MAX_CHUNK: usize = 1 << 20;
/// The most chunks a round is cut into (`CLAIM`'s index bits, with room
/// for the claims that find none left).
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
            .store(epoch << EPOCH_SHIFT, Ordering::Release);
        // Waiters asleep on the gate (a worker's watcher) wake to help.
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
        let c = self.word(CLAIM).load(Ordering::Acquire);
        (c >> EPOCH_SHIFT == epoch0 && c & INDEX < sh.n).then_some(sh)
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

impl Shared<'_, '_> {
    /// Claims chunks and sums each with `sum` (given the chunk's byte range
    /// in the part) until none is left; how many it summed. `helper`: the
    /// rank of a waiter that helps (None: the summer).
    pub(crate) fn sum_chunks(
        &self,
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
        let mut c = claim.load(Ordering::Acquire);
        while c >> EPOCH_SHIFT == self.epoch && c & INDEX < self.n {
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

    /// The ranks that may still write a chunk (every chunk claimed: those
    /// who hold one), as bits; Acquire: a bit clear means that helper's
    /// writes are seen.
    pub(crate) fn busy(&self) -> u32 {
        self.gate.word(BUSY).load(Ordering::Acquire)
    }

    /// The chunks of the round.
    #[cfg(test)]
    pub(crate) fn chunks(&self) -> u32 {
        self.n
    }

    /// The round of `epoch` as a waiter that looked at it long ago holds
    /// it (whatever the gate's state now).
    #[cfg(test)]
    pub(crate) fn late<'g, 'a>(gate: &'g Gate<'a>, epoch: u32, len: usize) -> Shared<'g, 'a> {
        gate.shared_round(epoch, len, chunk_bytes(len).unwrap())
    }
}
