//! Rounds whose workers arrive before they copy: a large part's round at
//! the gate, reduced and scattered by the workers chunk by chunk.
//!
//! In a round of `mod.rs` every worker copies its whole push into its slot
//! before it arrives, and the slots are summed (`chunks.rs`) and the sum
//! copied out afterwards: a round of N bytes moves about 20 N through each
//! worker's caches with two workers, and is bound by that on two cores
//! (BENCHMARKS.md, "Chunks copied into the output as they are summed").
//! But a chunk a worker sums itself need not go through its slot: it can
//! read it from its own input. So for a part of `LATE_BYTES` or more (of
//! at most `MAX_LATE_CHUNKS` chunks: 47 MiB; and 2 to `MAX_LATE_WORKERS`
//! workers), or of `CLOSE_LATE_BYTES` or more in a round after one whose
//! workers arrived close together (`LATE` in `mod.rs`: every worker of a
//! round finds the same kind there), a worker arrives first, then walks the
//! part's chunks: those of the other workers' shares (a W-th of the chunks
//! each, by rank) it *supplies*: copies its values of each into its slot
//! and says so in the chunk's word; those of its own share it *claims*: it
//! will sum each, from its own input and the others' slots, into the value
//! slot and its own output, once every other worker supplied it. Then it
//! copies the chunks the others summed out of the value slot as they come.
//! With two workers, each copies half its push in, sums half (writing the
//! value slot and its output) and copies half out: about 16 N. (Shares
//! are fixed so that a worker that arrives early does not take every
//! chunk: each sums its own share once all have arrived, side by side; a
//! worker that arrived supplies the others' chunks at once, before their
//! claimers come.)
//!
//! The summing and copying out are the caller's (`kinds/dist/worker_sum/`);
//! this file is the words that say who claimed, supplied and summed what.
//!
//! # Words (region header words; zero at creation)
//!
//! - `CHUNK0 + k`, per chunk k (below `MAX_LATE_CHUNKS`): `VALID` (bit 31)
//!   | epoch (bits 16..31, 15 bits) | `SUMMED` (bit 15) | claimer's rank +
//!   1 (bits 8..12) | supplied (bits 0..8: a bit per worker rank). A word
//!   that does not hold this round's epoch with `VALID` is unclaimed in
//!   this round (its value is an earlier round's).
//! - `COUNT`: `VALID` | epoch | chunks summed in that round (bits 0..16).
//!
//! # States (of chunk k in the round of epoch e; arrived counts as in
//! `mod.rs`)
//!
//! ```text
//!   empty (not e) --a walk: its bit, or r's claim, with e--> e
//!   e --each other worker's walk: its bit; r's walk: the claim--> claimed by r, supplied by all
//!   claimed by r, supplied by all --r: sums into the value slot, then SUMMED--> summed
//!   every chunk summed --the worker whose COUNT increment made n: `finish`--> round ended
//! ```
//!
//! Invariants:
//! - L1. A chunk is claimed once in a round, by the worker whose share
//!   holds it; a word is changed only by compare-exchange, which counts an
//!   earlier round's value as empty, so no bit or claim of this round is
//!   lost and none of an earlier one counts.
//! - L2. Nobody writes the value slot's chunk k but its claimer, and only
//!   once every other worker supplied it, so after every worker arrived:
//!   the round is being summed (`arrived = W`), and G2 of `mod.rs` holds
//!   (a `close` then lets the round end at the gate). A round handed over
//!   (or withdrawn from) while gathering has no chunk summed: each worker
//!   that arrived fills its slot with the chunks it claimed before it sends
//!   its push to the server (its slot then holds its push whole, as the
//!   server reads it).
//! - L3. A worker writes chunk k of its slot only before it sets its bit in
//!   k's word, once per round; it writes its slot again only in a later
//!   round, after this one ended (its next push waits for this one), or,
//!   after its part failed in doubt, once a round the server completes
//!   has reset the doubt, which needs every worker's next push (each sent
//!   only after its part here closed). So a claimer reads supplied chunks
//!   that nobody writes.
//! - L4. The round ends (`finish`) only once every chunk is summed, by the
//!   one worker whose `COUNT` increment made it n; a worker's part is done
//!   only once the round ended (its slot is not read any more, and the
//!   value slot holds every chunk).
//!
//! # Orderings
//!
//! A supplier's slot writes happen before its bit's `fetch_or` (AcqRel); a
//! claimer that reads every bit with Acquire sees them. A claimer's value
//! slot writes happen before `SUMMED` (AcqRel), and that before its
//! `COUNT` increment; a copier reading `SUMMED` with Acquire sees the
//! chunk; the finisher's increment reads every earlier one (a release
//! sequence), and `finish` stores `GATE` after it: whoever sees the epoch
//! move sees every chunk.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

use smallvec::SmallVec;

use super::Gate;

/// The smallest part summed this way in every round.
pub(crate) const LATE_BYTES: usize = 1 << 20;
/// The smallest part summed this way in a round after one whose workers
/// arrived close together (`LATE` in `mod.rs`): below `LATE_BYTES` an
/// early arriver's share would wait for it to come back from its other
/// parts (a model's many parts in flight), where a shared round of
/// `chunks.rs` lets the last arriver sum everything with whoever waits; but
/// when the workers come together, each copying in and out only the
/// others' shares wins (BENCHMARKS.md, "Rounds of late copies from
/// 256 KiB, chosen round by round").
pub(crate) const CLOSE_LATE_BYTES: usize = 256 << 10;
/// The most workers of a part summed this way (the supplied bits).
pub(crate) const MAX_LATE_WORKERS: usize = 8;
/// The most chunks (the header words left after `mod.rs`'s).
const MAX_LATE_CHUNKS: usize = pskv_transport::REGION_WORDS - CHUNK0;

const COUNT: usize = 7;
const CHUNK0: usize = 9;

const VALID: u32 = 1 << 15;
const SUMMED: u32 = 1 << 15;
const CLAIMER_SHIFT: u32 = 8;
const CLAIMER: u32 = 0xf << CLAIMER_SHIFT;
const SUPPLIED: u32 = 0xff;

/// The chunk length of a part of `len` bytes at a gate of `workers`, if
/// its round is summed this way: one of `LATE_BYTES` or more, or, `close`
/// (the last round's workers arrived close together: `LATE` in `mod.rs`),
/// of `CLOSE_LATE_BYTES` or more.
pub(crate) fn late_chunk(workers: usize, len: usize, close: bool) -> Option<usize> {
    let least = if close { CLOSE_LATE_BYTES } else { LATE_BYTES };
    if !(2..=MAX_LATE_WORKERS).contains(&workers) || len < least {
        return None;
    }
    let c = super::chunk_bytes(len)?;
    (len.div_ceil(c) <= MAX_LATE_CHUNKS).then_some(c)
}

/// The round of epoch `e` of a part summed this way, at its gate.
#[derive(Clone, Copy)]
pub(crate) struct Late<'g, 'a> {
    gate: &'g Gate<'a>,
    /// `VALID | e`, the words' upper half in this round.
    tag: u32,
    len: usize,
    chunk: usize,
    n: usize,
}

impl<'a> Gate<'a> {
    /// The round of `epoch` of this gate's part, of `len` bytes, summed
    /// this way in chunks of `chunk` bytes (`late_chunk`, as its workers
    /// found it when they arrived).
    pub(crate) fn late(&self, epoch: u32, len: usize, chunk: usize) -> Late<'_, 'a> {
        Late {
            gate: self,
            tag: VALID | (epoch & 0x7fff),
            len,
            chunk,
            n: len.div_ceil(chunk),
        }
    }
}

impl Gate<'_> {
    /// Zeroes `COUNT` and every chunk's word: none holds a round's epoch
    /// with `VALID` (`Gate::forget`).
    pub(super) fn forget_late_words(&self) {
        self.word(COUNT).store(0, Ordering::Relaxed);
        for w in CHUNK0..pskv_transport::REGION_WORDS {
            self.word(w).store(0, Ordering::Relaxed);
        }
    }
}

impl Late<'_, '_> {
    fn word(&self, k: usize) -> &AtomicU32 {
        self.gate.word(CHUNK0 + k)
    }

    /// The chunks of the round.
    pub(crate) fn chunks(&self) -> usize {
        self.n
    }

    /// Chunk k's bytes in the part.
    pub(crate) fn range(&self, k: usize) -> Range<usize> {
        k * self.chunk..((k + 1) * self.chunk).min(self.len)
    }

    /// Worker `rank`'s share of the chunks: those it claims.
    fn share(&self, rank: usize) -> Range<usize> {
        let w = self.gate.workers;
        rank * self.n / w..(rank + 1) * self.n / w
    }

    /// Worker `rank`'s walk, after it arrived (L1, L3): claims the chunks
    /// of its share, and supplies the others (`supply` copies its values
    /// of a chunk into its slot; then its bit is set, whether or not the
    /// chunk's claimer arrived yet). The chunks it claimed.
    pub(crate) fn walk(
        &self,
        rank: usize,
        mut supply: impl FnMut(Range<usize>),
    ) -> SmallVec<[u32; 32]> {
        let me = rank as u32 + 1;
        let bit = 1u32 << rank;
        let share = self.share(rank);
        let mut mine = SmallVec::new();
        // Claims first (a few compare-exchanges): a worker that dies while
        // it supplies then holds chunks not summed, which names it.
        for k in share.clone() {
            let v = self.update(k, |v| v | me << CLAIMER_SHIFT);
            let was = (v & CLAIMER) >> CLAIMER_SHIFT;
            debug_assert!(was == 0 || was == me, "chunk {k} claimed by another");
            mine.push(k as u32);
        }
        for k in (share.end..self.n).chain(0..share.start) {
            supply(self.range(k));
            self.update(k, |v| v | bit);
        }
        mine
    }

    /// Applies `f` to chunk k's word in this round; the value before.
    fn update(&self, k: usize, f: impl Fn(u32) -> u32) -> u32 {
        self.update_word(self.word(k), f)
    }

    /// Applies `f` to word `w` (a chunk's, or `COUNT`) in this round (an
    /// earlier round's value counts as empty: the tag alone); the value
    /// before.
    fn update_word(&self, w: &AtomicU32, f: impl Fn(u32) -> u32) -> u32 {
        let mut v = w.load(Ordering::Acquire);
        loop {
            let now = if v >> 16 == self.tag {
                v
            } else {
                self.tag << 16
            };
            match w.compare_exchange_weak(v, f(now), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return now,
                Err(x) => v = x,
            }
        }
    }

    /// Whether every worker but its claimer supplied chunk k.
    pub(crate) fn supplied(&self, k: usize) -> bool {
        let v = self.word(k).load(Ordering::Acquire);
        if v >> 16 != self.tag {
            return false;
        }
        let claimer = ((v & CLAIMER) >> CLAIMER_SHIFT) as usize;
        let all = (1u32 << self.gate.workers) - 1;
        claimer != 0 && (v & SUPPLIED) | (1 << (claimer - 1)) == all
    }

    /// Whether chunk k is summed (Acquire: its value slot bytes are seen).
    pub(crate) fn summed(&self, k: usize) -> bool {
        let v = self.word(k).load(Ordering::Acquire);
        v >> 16 == self.tag && v & SUMMED != 0
    }

    /// The claimer of chunk k, having written its sum into the value slot,
    /// says so; true if that was the round's last chunk (the caller then
    /// ends the round: `Gate::finish`, L4).
    pub(crate) fn sum_done(&self, k: usize) -> bool {
        self.word(k).fetch_or(SUMMED, Ordering::AcqRel);
        let before = self.update_word(self.gate.word(COUNT), |c| c + 1);
        (before & 0xffff) as usize + 1 == self.n
    }

    /// The ranks holding claimed chunks not summed yet, as bits (a dead
    /// one's round cannot end).
    pub(crate) fn claimers_unsummed(&self) -> u32 {
        (0..self.n)
            .map(|k| self.word(k).load(Ordering::Acquire))
            .filter(|v| v >> 16 == self.tag && v & SUMMED == 0 && v & CLAIMER != 0)
            .fold(0, |acc, v| {
                acc | 1 << (((v & CLAIMER) >> CLAIMER_SHIFT) - 1)
            })
    }
}
