//! Rounds this worker sums with the others at a part's gate (`gate/mod.rs`),
//! and pulls read from the value slot, while the part's server has opened
//! the gate.
//!
//! A part of a push that went through its slot arrives at the gate: if it
//! came last it sums the slots into the value slot and the part is done
//! at once; if not, the part waits in `Waits` until the round ends. Every
//! thread that waits for an op polls the waits between its spins (the
//! store's progress hook), so a caller waiting for its push-pull finishes
//! it itself the moment the last worker lets it go; a watcher thread
//! finishes the waits nobody polls (it looks every `NAP`, and sleeps on the
//! gate of a wait it found, so the summer wakes it, unless a thread polls
//! the waits: then on its condvar, which the last poller to stop wakes;
//! `waits/pollers.rs`), and fails those that pass the store's timeout,
//! taking their arrival back (but for a round of late copies: below).
//!
//! A part going to its server by message while its gate is open (a
//! compressed or row-sparse push, or one whose slot is held by a push
//! buffer or in doubt) closes the gate first: the round then goes to the
//! server whole, the workers that already arrived handing their pushes
//! over (each withdraws and sends its push, still in its slot, by
//! message). The server closes a part's gate the same way (an optimizer
//! set, a worker died), and so does a worker that learns a node died or
//! its server restarted (the old process's gates). Closing never waits: a
//! round being summed ends at the gate, which closes as it ends (unless it
//! never ends: below).
//!
//! A part of at least two chunks (`gate/chunks.rs`) is summed by the
//! summer and the waiters together: a thread that polls its waits, or the
//! watcher (awake for up to `SHARED_SPIN` while such a round gathers),
//! claims chunks of each round it finds being summed and sums them beside
//! the summer (`Helper`: one thread of this worker at a time), which ends
//! the round once every chunk is summed: at once, or, if a helper holds
//! the last chunks for longer than a moment (`chunks_summed_soon`), by a
//! wait of its own in `Waits` (`Wait::finishing`), so that it never
//! blocks. A thread that sums a chunk of a push-pull's part of 1 MiB or
//! more copies it into its own worker's output at once, while the chunk is
//! in its cache (`ChunkOut`); the part's other chunks are copied out of the
//! value slot when its round ends.
//!
//! A part of 1 MiB to 47 MiB with 2 to 8 workers goes instead to a round
//! whose workers arrive before they copy (`gate/late.rs`), and so does one
//! of 256 KiB or more in a round after one whose workers arrived close
//! together (`LATE` in `gate/mod.rs`, which every worker of a round finds
//! the same: a push prepared for the other kind, its gate closed then, is
//! prepared again before it arrives): its push carries its values
//! (`DistStore::dense_payload` did not copy them into the slot), and this
//! worker walks the round at its arrival (copies its
//! values of the others' shares of the chunks into its slot, claims its
//! own share), then sums each claimed chunk once supplied, from its own
//! values, into the value slot and its output, and copies the others' out
//! as they are summed (`late.rs`): the arriving thread while that moves,
//! then its wait, which the pollers and the watcher move on and which
//! ends once the round ended and its output is whole. Such a part never
//! withdraws its arrival but from a round handed over (it supplied chunks
//! others may be summing): one that times out while the round gathers, or
//! whose store closes, fails in doubt, closing the gate (its next push
//! goes by message); the server takes the arrival back when it sums that
//! round (nobody sums a round that never filled), and opens the gate again
//! after a round through every worker's slot. A round handed over
//! is left whole: the worker fills its slot with its own share before it
//! sends its push to the server.
//!
//! A round whose summer, or a helper holding a chunk, died or stalls
//! never ends. A wait that fails while its round is being summed (its
//! summer or a busy helper known dead, or twice the timeout) leaves its
//! arrival counted; a summer whose helper holds a chunk past the timeout,
//! or is known dead, fails its own part without ending the round. Either
//! part is then in doubt (`parts::Unsure`), and its pushes go by message, closing
//! the gate. If the round does end there after all, the server counts it
//! while this worker's count of the key's rounds (`DistKey::seen`) does
//! not: the push it sends again is answered as a push of a round done, as
//! on the message path after such a failure. If it has not ended when the
//! server sums the part's next round, the server shuts the gate and keeps
//! the value itself for good (a stalled summer or helper may still write
//! the value slot: `server/entry/segment.rs`); the part's rounds then go
//! through the server, their values back by message.
//!
//! # Waits: states
//!
//! A wait is in `Inner::list` from its arrival until it is finished, by
//! exactly one thread: the one that takes it out of the list under the
//! lock (a poller, the watcher, or `close`). Callbacks run after the lock
//! is let go (they complete engine ops, which may run the next op of a key
//! inline, which may arrive at a gate and add a wait; or send a push
//! handed over).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use pskv_gpu::cpu::CpuKernels;
use pskv_transport::copy::copy;
use pskv_transport::{KvResponse, Region};
use smallvec::SmallVec;

use super::inflight::{Inflight, OutPtr};
use super::parts::{OnAnswer, PartSend, Round};
use super::{DistKey, DistStore};
use crate::dtype::DType;
use crate::error::Fault;
use crate::gate::{Arrival, Gate, Shared};
use crate::wire::Op;

mod late;
#[cfg(test)]
mod tests;
mod waits;

use late::LatePart;
pub(in crate::kinds::dist) use waits::Waits;
use waits::{Outcome, Then, Wait, SETTLE};

/// Whether every chunk of the summer's round `sh` is summed within a
/// moment (its helpers hold the last ones for a chunk's time, unless one is
/// not running).
fn chunks_summed_soon(sh: &Shared<'_, '_>) -> bool {
    let t = Instant::now();
    let mut spins = 0u32;
    while !sh.all_summed() {
        spins = spins.wrapping_add(1);
        if spins <= 128 {
            std::hint::spin_loop();
        } else if t.elapsed() < SETTLE {
            std::thread::yield_now();
        } else {
            return false;
        }
    }
    true
}

/// Sums the byte range `range` of the slots of `seg`'s workers into the
/// value slot, in rank order.
fn sum_slots(k: &CpuKernels, seg: &Region, dtype: DType, range: Range<usize>) -> Result<(), Fault> {
    let workers = Gate::of(seg).workers();
    // SAFETY: every worker wrote its slot before it arrived, and nobody but
    // the round's summers, each its own chunks, reads a slot or writes the
    // value slot until the round ends (G2 of `gate/mod.rs`, S1 and S2 of
    // `gate/chunks.rs`).
    let ins: SmallVec<[&[u8]; 4]> = (0..workers)
        .map(|r| unsafe { seg.slot_range(r, range.clone()) })
        .collect();
    let out = unsafe { seg.slot_range_mut(workers, range) };
    crate::comm::sum_dense(k, dtype, out, &ins)
}

/// Part `i` of `inf` done through the value slot: its answer carries no
/// values (`cb` copies them out of the slot, unless `landed`: in the
/// output already), or `r`'s error.
fn slot_done(inf: &Inflight, cb: OnAnswer, i: usize, r: Result<(), Fault>, landed: bool) {
    inf.part_done(Ok(KvResponse::default()), move |resp| {
        r.and_then(|()| cb(i, resp, landed))
    });
}

/// How part `p` came out of its round at the gate, but for a hand-over to
/// a live store: done (counted in `summed`), or failed; a part failed in
/// doubt is noted so before its op completes (its next push goes by
/// message, leaving the slot alone).
fn part_result(o: Outcome, p: &PartSend, summed: &AtomicU64) -> Result<(), Fault> {
    match o {
        Outcome::Ended => {
            summed.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Outcome::HandedOver => Err(Fault::Unavailable("the kvstore was closed".into())),
        Outcome::Failed(f, doubt) => {
            if let (true, Some(u)) = (doubt, &p.unsure) {
                u.note(p.i, (p.head.shm_tag, p.seg.as_ref()), false);
            }
            Err(f)
        }
    }
}

/// The values of push `p` when they travel with it rather than in its
/// slot (a part of a round of late copies: `DistStore::dense_payload`).
fn late_input(p: &PartSend) -> Option<Bytes> {
    (p.head.shm && p.payload.len() > 8).then(|| p.payload.clone())
}

/// A push through a slot says only its values' count.
fn count_payload(n: usize) -> Bytes {
    Bytes::copy_from_slice(&(n as u64).to_le_bytes())
}

/// Push `p`, whose values traveled with it, through worker `rank`'s slot
/// of `seg` (a round of late copies that went to the server: the slot is
/// this worker's until its push is sent).
fn to_slot(p: &mut PartSend, seg: &Region, rank: usize) {
    if let Some(input) = late_input(p) {
        // SAFETY: this worker's own slot, read by the server only after
        // this push.
        copy(unsafe { seg.slot_range_mut(rank, 0..input.len()) }, &input);
        p.payload = count_payload(input.len());
    }
}

/// Part `p`, to be sent to its server: a push of a round of late copies
/// whose segment is gone or another now (its server restarted) fails
/// instead, as such a push through its slot would at the server (its op's
/// answers expect the slot: the caller pushes again).
fn late_elsewhere(p: PartSend, answer: impl FnOnce(Result<(), Fault>)) -> Option<PartSend> {
    if late_input(&p).is_none() {
        return Some(p);
    }
    answer(Err(Fault::Unavailable(
        "the part's shared segment is gone or was replaced (its server restarted?): push again"
            .into(),
    )));
    None
}

/// The smallest part whose chunks a thread copies into its output as it
/// sums them (a smaller part's value slot is still in cache when the round
/// ends, and the copy would only delay the round's end).
const FUSED_COPY_BYTES: usize = 1 << 20;

/// This worker's output for a push-pull's part (of `FUSED_COPY_BYTES` or
/// more) summed at its gate in chunks: a thread of this worker that sums a
/// chunk (the summer, or a helper) copies it into the output at once,
/// while its lines are in the thread's cache, rather than with the rest out
/// of the value slot once the round ends (`finish`; so do chunks from the
/// 64th on). A part that fails may leave chunks of the round in the output
/// (as an answer that lands in place may over TCP); nothing is copied
/// after `close`.
pub(super) struct ChunkOut {
    seg: Arc<Region>,
    out: OutPtr,
    /// The part's first byte in the output.
    at: usize,
    /// The part's chunk length (`gate::chunk_bytes`).
    chunk: usize,
    /// Whether chunks may still be copied (false once the part is
    /// finished: the output may be its caller's then), and which are in
    /// the output (bit k: chunk k; chunks from the 64th on are left to
    /// `finish`).
    state: Mutex<(bool, u64)>,
}

impl ChunkOut {
    /// For part `p` of a push-pull whose answers may land in the output,
    /// if its round is shared in chunks at `seg`'s gate.
    fn of(p: &PartSend, round: &Round, seg: &Arc<Region>) -> Option<Arc<ChunkOut>> {
        let land = round.land.as_ref().filter(|_| p.head.op == Op::PushPull)?;
        if Gate::of(seg).workers() < 2 || seg.slot_len() < FUSED_COPY_BYTES {
            return None;
        }
        let chunk = crate::gate::chunk_bytes(seg.slot_len())?;
        Some(Arc::new(ChunkOut {
            seg: seg.clone(),
            out: land.out,
            at: p.part.start * land.unit_bytes,
            chunk,
            state: Mutex::new((true, 0)),
        }))
    }

    /// Copies the value slot's byte range `c`, a chunk this thread just
    /// summed, into the output (unless the part is finished).
    pub(super) fn copy(&self, c: Range<usize>) {
        let k = c.start / self.chunk;
        let mut st = self.state.lock();
        if !st.0 || k >= 64 {
            return;
        }
        let seg = &self.seg;
        let workers = Gate::of(seg).workers();
        if c.end > seg.slot_len() {
            return;
        }
        // SAFETY: a chunk this thread summed: nobody writes it until its
        // round ends, which needs this chunk counted summed, after this
        // (S2 of `gate/chunks.rs`); the value slot's other chunks others
        // may be writing meanwhile.
        let src = unsafe { seg.slot_range(workers, c.clone()) };
        if self.out.write(self.at + c.start, src).is_ok() {
            st.1 |= 1 << k;
        }
    }

    /// No more chunks are copied into the output (the part failed, or went
    /// to the server).
    fn close(&self) {
        self.state.lock().0 = false;
    }

    /// Closes, then copies the chunks not copied yet out of the value
    /// slot, which holds the ended round's sum.
    fn finish(&self) -> Result<(), Fault> {
        let copied = {
            let mut st = self.state.lock();
            st.0 = false;
            st.1
        };
        let seg = &self.seg;
        let workers = Gate::of(seg).workers();
        // SAFETY: the round ended; the value slot is written again only in
        // a round this worker has not pushed to yet (see
        // `kinds/dist/segments.rs`).
        let value = unsafe { seg.slot(workers) };
        let mut k = 0;
        while k * self.chunk < value.len() {
            if k < 64 && copied & (1 << k) != 0 {
                k += 1;
                continue;
            }
            // A run of chunks not copied, in one copy.
            let from = k;
            while k * self.chunk < value.len() && !(k < 64 && copied & (1 << k) != 0) {
                k += 1;
            }
            let range = from * self.chunk..(k * self.chunk).min(value.len());
            self.out.write(self.at + range.start, &value[range])?;
        }
        Ok(())
    }
}

impl DistStore {
    /// Part `p` of an op at its segment's gate. None if it was handled
    /// here: summed at the gate (or waiting there), read from the value
    /// slot, or failed; else the part, to be sent to its server (having
    /// closed the gate, if it is a push).
    pub(super) fn at_gate(
        &self,
        dk: &DistKey,
        inf: &Arc<Inflight>,
        round: &Round,
        mut p: PartSend,
    ) -> Option<PartSend> {
        let op = p.head.op;
        let pushes = matches!(op, Op::Push | Op::PushPull | Op::RowPush);
        if !p.head.sync || !(pushes || op == Op::Pull) {
            return Some(p);
        }
        let i = p.i;
        let answer = |r| slot_done(inf, round.on_answer.clone(), i, r, false);
        let Some(seg) = dk.segs.read().get(p.i).cloned().flatten() else {
            return late_elsewhere(p, answer);
        };
        let gate = Gate::of(&seg);
        if !p.head.shm || seg.tag() != p.head.shm_tag {
            // By message: a push closes the gate first (G1 of `gate/mod.rs`);
            // a round gathering there is handed over to the server.
            if pushes {
                gate.close();
            }
            return late_elsewhere(p, answer);
        }
        if op == Op::Pull {
            // The value slot holds the last round's value while the gate is
            // open (the next round needs this worker's push, which comes
            // after this pull).
            if !gate.is_open() {
                return Some(p);
            }
            answer(Ok(()));
            return None;
        }
        let rank = self.po.my_rank() as usize;
        // The kind of the round gathering, as `dense_payload` read it to
        // prepare the push (it holds until this arrival, G4); a push it
        // prepared for the other kind (the gate was closed then, or its
        // values lie in a push buffer's slot) is prepared again here, or
        // needs nothing (a round of late copies takes values in the slot).
        let mut late = gate.late_now();
        let arrival = loop {
            if late.is_none() {
                // A shared round sums the slots: this one's must hold its
                // push before it arrives.
                to_slot(&mut p, &seg, rank);
            }
            match gate.arrive(rank, late.is_some()) {
                Arrival::OtherKind => late = gate.late_now(),
                a => break a,
            }
        };
        match (arrival, late) {
            (Arrival::Closed, _) => {
                to_slot(&mut p, &seg, rank);
                Some(p)
            }
            (Arrival::Last(e) | Arrival::Waiting(e), Some(chunk)) => {
                self.at_gate_late(dk, inf, round, p, seg, (e, chunk))
            }
            (Arrival::OtherKind, _) => unreachable!("arrived again above"),
            (Arrival::Last(epoch), None) => {
                let (dtype, len) = (dk.local.meta.dtype, seg.slot_len());
                let k = &self.comm.kernels;
                let mut out = None;
                let summed = match gate.share(epoch, len) {
                    None => sum_slots(k, &seg, dtype, 0..len),
                    Some(sh) => {
                        out = ChunkOut::of(&p, round, &seg);
                        let mut r = Ok(());
                        sh.sum_chunks(None, |c| {
                            let s = sum_slots(k, &seg, dtype, c.clone());
                            if let (Ok(()), Some(o)) = (&s, &out) {
                                o.copy(c);
                            }
                            r = r.clone().and(s);
                        });
                        if !chunks_summed_soon(&sh) {
                            // A helper holds a chunk and is not running: the
                            // round ends once it is summed, by whoever polls
                            // the waits (this thread must not block here).
                            let w = Wait {
                                finishing: true,
                                out: out.clone(),
                                ..Wait::new(
                                    seg.clone(),
                                    epoch,
                                    dtype,
                                    self.then_of(p, inf, round, out),
                                )
                            };
                            self.waits.enter(w);
                            return None;
                        }
                        r
                    }
                };
                // The others are let go even if the sum failed (it cannot for
                // slots of one size): they must not wait for the timeout.
                gate.finish();
                if summed.is_ok() {
                    self.waits.summed.fetch_add(1, Ordering::Relaxed);
                }
                match out {
                    Some(o) => {
                        let r = match summed {
                            Ok(()) => o.finish(),
                            Err(e) => {
                                o.close();
                                Err(e)
                            }
                        };
                        slot_done(inf, round.on_answer.clone(), i, r, true)
                    }
                    None => answer(summed),
                }
                None
            }
            (Arrival::Waiting(epoch), None) => {
                let out = ChunkOut::of(&p, round, &seg);
                let dtype = dk.local.meta.dtype;
                let w = Wait {
                    out: out.clone(),
                    ..Wait::new(seg.clone(), epoch, dtype, self.then_of(p, inf, round, out))
                };
                // Often over already (the last worker was just behind).
                self.waits.enter(w);
                None
            }
        }
    }

    /// Part `p`, a push that arrived at its gate in the round of `epoch`,
    /// one whose workers arrive before they copy, in chunks of `chunk`
    /// bytes (`gate/late.rs`, `late.rs`).
    fn at_gate_late(
        &self,
        dk: &DistKey,
        inf: &Arc<Inflight>,
        round: &Round,
        p: PartSend,
        seg: Arc<Region>,
        (epoch, chunk): (u32, usize),
    ) -> Option<PartSend> {
        let rank = self.po.my_rank() as usize;
        // The values themselves when they were not copied into the slot
        // (`DistStore::dense_payload`).
        let input = late_input(&p);
        let out = round
            .land
            .as_ref()
            .filter(|_| p.head.op == Op::PushPull)
            .map(|l| (l.out, p.part.start * l.unit_bytes));
        let kernels = self.comm.kernels.clone();
        let dtype = dk.local.meta.dtype;
        let part = LatePart::arrive(
            seg.clone(),
            (epoch, chunk),
            rank,
            dtype,
            input,
            out,
            kernels,
        );
        part.settle();
        let landed = out.is_some();
        let w = Wait {
            late: Some(part.clone()),
            ..Wait::new(
                seg.clone(),
                epoch,
                dtype,
                self.then_of_late(p, inf, round, part, landed),
            )
        };
        self.waits.enter(w);
        None
    }

    /// `then_of` for a part in a round of late copies.
    fn then_of_late(
        &self,
        mut p: PartSend,
        inf: &Arc<Inflight>,
        round: &Round,
        part: Arc<LatePart>,
        landed: bool,
    ) -> Then {
        let i = p.i;
        let me = self.handle();
        let (inf, cb, land) = (inf.clone(), round.on_answer.clone(), round.land.clone());
        let (summed, late) = (self.waits.summed.clone(), self.waits.late.clone());
        Box::new(move |o| {
            let failed = part.close();
            match (o, me.upgrade()) {
                (Outcome::HandedOver, Some(me)) => {
                    part.fill_slot();
                    p.payload = count_payload(part.seg.slot_len());
                    me.send_part(p, false, false, inf, cb, land)
                }
                (o, _) => {
                    if matches!(o, Outcome::Ended) {
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                    let r = part_result(o, &p, &summed).and(failed.map_or(Ok(()), Err));
                    slot_done(&inf, cb, i, r, landed);
                }
            }
        })
    }

    /// What finishes part `p` of `inf` once its round at the gate comes
    /// out: done (the value slot holds the sum), sent to the server (handed
    /// over), or failed (in doubt if its arrival stays counted).
    fn then_of(
        &self,
        p: PartSend,
        inf: &Arc<Inflight>,
        round: &Round,
        out: Option<Arc<ChunkOut>>,
    ) -> Then {
        let i = p.i;
        let me = self.handle();
        let (inf, cb, land) = (inf.clone(), round.on_answer.clone(), round.land.clone());
        let summed = self.waits.summed.clone();
        Box::new(move |o| {
            // The rest of a part whose chunks went to the output as they
            // were summed (none after this: the output is the caller's once
            // the op completes).
            let landed = match (&o, &out) {
                (Outcome::Ended, Some(out)) => Some(out.finish()),
                (_, Some(out)) => {
                    out.close();
                    None
                }
                (_, None) => None,
            };
            match (o, me.upgrade()) {
                (Outcome::HandedOver, Some(me)) => me.send_part(p, false, false, inf, cb, land),
                (o, _) => {
                    let r = part_result(o, &p, &summed);
                    let (r, landed) = match landed {
                        Some(copied) => (r.and(copied), true),
                        None => (r, false),
                    };
                    slot_done(&inf, cb, i, r, landed);
                }
            }
        })
    }

    /// Closes the gates of `dk`'s parts on server `rank` (None: on every
    /// server): rounds gathering there are handed over to their server,
    /// and the next rounds go to it. After a node died (a worker: the
    /// server fails the rounds, naming it; the server: its parts' pushes
    /// fail) or a server restarted (the new process refuses pushes meant
    /// for the old one's segments: the caller pushes again).
    pub(super) fn close_gates_of(&self, dk: &DistKey, rank: Option<u32>) {
        let segs = dk.segs.read();
        for (s, p) in segs.iter().zip(dk.parts.iter()) {
            if let (Some(seg), true) = (s, rank.is_none_or(|r| p.server == r)) {
                Gate::of(seg).close();
            }
        }
    }
}
