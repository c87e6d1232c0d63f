//! The gate of a key part's shared segment: rounds the workers sum there
//! themselves, without their server.
//!
//! A sync round of a part whose workers all share memory with its server
//! goes through the part's segment (`kinds/dist/segments.rs`): each worker
//! writes its slot, and the server sums the slots into the value slot once
//! every push has arrived. For small parts the server's turn is most of the
//! round: two hand-offs between processes, each a wait for a thread that
//! may share a core with another; for large ones the workers, which wait
//! idle meanwhile, can sum the round together (`chunks.rs`) where the
//! server's threads share cores with them. So once a round has shown that the
//! server has nothing to add (no optimizer, no checkpoints, no replicas,
//! every worker's push plain and through its slot), the server *opens* the
//! part's gate: from the next round on, each worker writes its slot and
//! arrives at the gate, and the last to arrive sums the slots into the
//! value slot, in rank order with the server's kernel, so the bits are the
//! server's (`comm::sum_dense`), with the others' help for a large part
//! (`chunks.rs`), and lets the others go. The server counts
//! those rounds from the gate when it next looks (`done`).
//!
//! # Words (the region's header words; zero at creation)
//!
//! - `GATE`: `OPEN` (bit 31) | epoch (bits 16..31, 15 bits) | `CLOSING`
//!   (bit 15: close once the round being summed ends) | `LATE` (bit 14:
//!   the round gathering, or the next, is one of late copies if its part
//!   is of `late::CLOSE_LATE_BYTES` or more; set or cleared by the last
//!   arrival of the round before, as its workers arrived close together or
//!   not) | arrived (bits 0..14: workers that arrived in the round now
//!   gathering).
//! - `DONE`: rounds the workers summed (wrapping).
//! - `SLEEPERS`: threads sleeping on `GATE` for a round's end.
//! - `SUMMER`: who sums the round being summed: its epoch (bits 16..31) |
//!   the summer's rank + 1 (written just after its arrival; read only to
//!   tell a dead summer's waiters).
//! - `CLAIM`, `SUMMED`, `BUSY`: a round being summed, shared in chunks
//!   with the workers that wait for it (`chunks.rs`).
//! - `FIRST`: when the first worker arrived in the round gathering (a
//!   monotonic clock's microseconds, wrapping; written only for parts that
//!   `LATE` concerns).
//! - `COUNT`, and a word per chunk: a large part's round, whose workers
//!   arrive before they copy (`late.rs`).
//!
//! # States
//!
//! ```text
//!   closed (OPEN = 0, arrived = 0) --server, at the end of a round it summed: epoch + 1--> open
//!   open (arrived = 0) --a worker arrives--> gathering (0 < arrived < W)
//!   gathering --the W-th arrives--> summing (arrived = W; that worker sums)
//!   summing --the summer: arrived = 0, epoch + 1, DONE + 1--> open
//!   gathering --a waiter that gave up (`withdraw`; in a round of late
//!               copies, `late.rs`, only when handed over)--> arrived - 1
//!   open --`close` (the server, or a worker that must push by message)--> closed
//!   gathering --`close`--> handing over (OPEN = 0, arrived > 0)
//!   handing over --each waiter withdraws and sends its push to the server--> closed
//!   summing --`close`--> summing, CLOSING --the summer: epoch + 1, DONE + 1--> closed
//!   handing over, never filled, while the server sums a round itself --`clear_arrivals`--> closed
//!   summing, while the server sums a round itself --`shut`--> shut (OPEN = 0 for good)
//! ```
//!
//! So `close` never waits: a round being summed ends at the gate, and the
//! next goes to the server. A summer that dies while it sums leaves its
//! round unended: its waiters fail once their worker learns it died
//! (`SUMMER` names it), else at twice their timeout (the first deadline
//! finds the round being summed, and gives it the time again: a slow
//! summer must not find its round taken from under it). Their arrivals
//! stay counted, and their slots are in doubt (`kinds/dist/parts.rs`,
//! `Unsure`): the part's pushes go by message, closing the gate. The
//! server, which then sums a round with arrivals still counted (by G1 none
//! can be, but for such a round), shuts the gate for good and keeps the
//! part's value in its own memory from then on (`server/entry/segment.rs`,
//! `leave_stuck_slot`): a summer or helper that only stalled may write the
//! value slot whenever it runs on, and nobody reads that slot any more.
//! (A round of late copies whose worker timed out or died before all
//! arrived keeps that arrival, `late.rs`, but nobody sums it: the server
//! takes the arrivals back, `clear_arrivals`, and the gate opens again.)
//!
//! Invariants:
//! - G1. A round is summed by the workers or by the server, never partly
//!   each. A worker arrives only at an open gate, and a round can be
//!   summed at the gate only while it stays open; a round that a `close`
//!   finds gathering is handed over whole: every worker that arrived
//!   withdraws and sends its push to the server (its slot still holds it),
//!   as every later one does on finding the gate closed (but a worker of
//!   a round of late copies that failed in doubt keeps its arrival,
//!   `late.rs`: the server takes such arrivals back, `clear_arrivals`,
//!   when it sums that round, before any `open`). The server opens the
//!   gate only while it completes a round, before it answers it, and only
//!   with nobody arrived: no worker can have a push of the next round
//!   under way then (each waits for its answer). (So no thread of an
//!   earlier round is left to `withdraw` or look at its `round` once the
//!   epoch moved on: it would read `Ended`.)
//! - G2. Only the summer changes `GATE` while `arrived = W`, but for
//!   `close` setting `CLOSING`: arrivals need `arrived < W`, a withdrawal
//!   refuses. So nobody but the round's summers (the summer, and the
//!   waiters it shares the round with: `chunks.rs`, S2) reads a slot or
//!   writes the value slot meanwhile, and the round ends at the gate.
//! - G3. A worker arrives in round `e + 1` only after it saw round `e`
//!   end (the epoch move), and every round needs all `W`: so the epoch a
//!   worker reads when it arrives is the one its round ends by moving, and
//!   the epoch does not move while a round is handed over.
//! - G4. Every worker of a round arrives with the same kind (`LATE`): an
//!   arrival is a compare-exchange that needs the kind its worker prepared
//!   its push for (else it prepares again), and only the round's last
//!   arrival changes the bit, for the next round. (So a push is prepared
//!   from the bit as read before the arrival, `late_now`, and the bit does
//!   not move before every worker of the round arrived.)
//!
//! # Orderings
//!
//! A worker's slot writes happen before its arrival (an AcqRel
//! read-modify-write of `GATE`); the W-th arrival reads the value the one
//! before wrote, so every earlier arrival is in its release sequence and
//! it sees every slot. The summer writes the value slot, then stores
//! `GATE` with Release (SeqCst, for the sleepers' handshake); a waiter that
//! sees the epoch move with Acquire sees the value slot. A close is a
//! read-modify-write that finds `arrived < W`, which only an arrival, a
//! withdrawal or a summer's store (after its sum) left: the closer sees
//! the last sum. A push handed over is ordered for the server by its
//! message, as any push through a slot.
//!
//! Sleeping without lost wake-ups: a sleeper adds itself to `SLEEPERS`,
//! then reads `GATE` and sleeps on it with the value read (all SeqCst);
//! whoever ends a round or closes the gate stores `GATE`, then reads
//! `SLEEPERS` and wakes the word if any. Either the sleeper's read sees the
//! new `GATE`, or the waker's read sees the sleeper (and a wake after the
//! store ends a sleep on the old value; a changed word fails the sleep at
//! once).
//!
//! A worker that gives up waiting withdraws its arrival while the round
//! is still gathering (or handing over); if the round ended meanwhile, or
//! is being summed, it did not give up in time, and its round is done (or
//! soon). The epoch in `GATE` keeps a withdrawal from taking an arrival of
//! a later round (the word would have to come back to the same value:
//! 32,768 rounds within one compare-exchange).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pskv_transport::Region;

mod chunks;
mod late;
pub(crate) use chunks::{chunk_bytes, Shared, MAX_HELPER_RANK};
pub(crate) use late::late_chunk;

/// The arrivals of a round whose first and last came within this many
/// microseconds per MiB of its part came close together: 256 us for a
/// 256 KiB part. Measured on this project's VMs (BENCHMARKS.md, "Rounds
/// of late copies from 256 KiB, chosen round by round"): the arrivals of a
/// model's parts are mostly milliseconds apart, those of one key pushed in
/// a loop tens of microseconds (256 per MiB gave the same figures).
const CLOSE_US_PER_MIB: u64 = 1024;

#[cfg(test)]
thread_local! {
    /// Tests: what `now_us` answers on this thread (None: the clock).
    static FAKE_NOW: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// A monotonic clock's microseconds, wrapping, the same in every process
/// of the host.
#[allow(unsafe_code)] // clock_gettime
fn now_us() -> u32 {
    #[cfg(test)]
    if let Some(t) = FAKE_NOW.with(|c| c.get()) {
        return t;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec; CLOCK_MONOTONIC exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000)
        .wrapping_add(ts.tv_nsec as u64 / 1000) as u32
}

const GATE: usize = 0;
const DONE: usize = 1;
const SLEEPERS: usize = 2;
const SUMMER: usize = 3;
const FIRST: usize = 8;

const OPEN: u32 = 1 << 31;
const CLOSING: u32 = 1 << 15;
const LATE: u32 = 1 << 14;
const ARRIVED: u32 = 0x3fff;
const EPOCH_SHIFT: u32 = 16;
const EPOCH: u32 = 0x7fff << EPOCH_SHIFT;

/// The most workers a gate counts.
pub(crate) const MAX_WORKERS: usize = ARRIVED as usize;

/// A part's gate, in its segment's header.
#[derive(Clone, Copy)]
pub(crate) struct Gate<'a> {
    seg: &'a Region,
    /// W: the segment's slots but the value slot.
    workers: usize,
}

/// What a worker's arrival found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// The gate is closed: push to the server.
    Closed,
    /// This worker came last: it sums the round of this epoch (sharing it
    /// with the waiters: `chunks.rs`), then calls `finish`.
    Last(u32),
    /// Others are still to come: the round ends when the epoch moves from
    /// this one (`round`).
    Waiting(u32),
    /// The round gathering is of the other kind (`LATE`) than the push was
    /// prepared for: prepare it for that kind and arrive again.
    OtherKind,
}

/// Where the round of a waiting worker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Round {
    /// Still gathering (or being summed).
    Gathering,
    /// Ended: the value slot holds its sum.
    Ended,
    /// The gate closed under it: withdraw, and push to the server.
    HandedOver,
}

/// What a withdrawal found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Withdrawal {
    /// The arrival is taken back: the round goes on without this worker
    /// (or goes to the server, if the gate closed).
    Left,
    /// The round ended.
    Ended,
    /// The last worker arrived and is summing: it ends soon.
    Summing,
}

fn epoch(g: u32) -> u32 {
    (g & EPOCH) >> EPOCH_SHIFT
}

impl<'a> Gate<'a> {
    pub(crate) fn of(seg: &'a Region) -> Gate<'a> {
        Gate {
            seg,
            workers: seg.slots().saturating_sub(1),
        }
    }

    /// W, the workers that sum a round (the value slot is slot W).
    pub(crate) fn workers(&self) -> usize {
        self.workers
    }

    fn word(&self, i: usize) -> &AtomicU32 {
        self.seg.word(i)
    }

    /// Wakes the threads asleep on the gate, if any (after a store to it).
    fn wake(&self) {
        if self.word(SLEEPERS).load(Ordering::SeqCst) != 0 {
            self.seg.wake_word(GATE);
        }
    }

    /// Whether the gate is open (Acquire: a worker that finds it open
    /// after its own round sees that round's value in the value slot).
    pub(crate) fn is_open(&self) -> bool {
        self.word(GATE).load(Ordering::Acquire) & OPEN != 0
    }

    /// The chunk length of the round a push of this part would arrive in
    /// now, if the gate is open and that round is one of late copies
    /// (`late.rs`; the kind holds until the push arrives: G4).
    pub(crate) fn late_now(&self) -> Option<usize> {
        let len = self.seg.slot_len();
        // A part never summed so (most) reads no word: the gate's line is
        // the one every arrival and every round's end writes.
        late_chunk(self.workers, len, true)?;
        let g = self.word(GATE).load(Ordering::Acquire);
        if g & OPEN == 0 {
            return None;
        }
        late_chunk(self.workers, len, g & LATE != 0)
    }

    /// Whether a round of this part may be one of late copies only after
    /// one whose workers arrived close together (`LATE` concerns it).
    fn late_if_close(&self) -> bool {
        let len = self.seg.slot_len();
        late_chunk(self.workers, len, true).is_some()
            && late_chunk(self.workers, len, false).is_none()
    }

    /// Rounds the workers summed, as a wrapping count.
    pub(crate) fn done(&self) -> u32 {
        self.word(DONE).load(Ordering::Acquire)
    }

    /// The server opens the gate, while it completes a round it summed
    /// (before answering it: see G1). A gate with arrivals (a round still
    /// handed over) is left as it is. The epoch moves (nobody waits at a
    /// gate with no arrivals): a round handed over ended without `finish`,
    /// and the words it left (`late.rs`) must not count for the next; nor
    /// may words left by a round of either kind many rounds ago, whose
    /// epoch the 15 bits may have come back to (`forget`).
    pub(crate) fn open(&self) {
        let g = self.word(GATE).load(Ordering::Acquire);
        if g & (ARRIVED | CLOSING | OPEN) == 0 {
            // Nobody is at the gate (G1): the words are nobody's. (Only
            // those of the kinds this part's rounds may take: a late
            // round's are a line each.)
            let len = self.seg.slot_len();
            if late_chunk(self.workers, len, true).is_some() {
                self.forget(true);
            }
            if chunk_bytes(len).is_some() {
                self.forget(false);
            }
        }
        let _ = self
            .word(GATE)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                let next = ((epoch(g) + 1) << EPOCH_SHIFT) & EPOCH;
                (g & (ARRIVED | CLOSING) == 0 && g & OPEN == 0)
                    .then_some((g & !EPOCH) | next | OPEN)
            });
    }

    /// The server takes back the arrivals of a round that gathered and
    /// never filled, while it sums a round itself (so the gate is closed
    /// and nobody arrives: G1): arrivals of workers that timed out or died
    /// in a round of late copies, which keep theirs (`late.rs`). Nobody
    /// sums such a round (chunks are summed only once all arrived: L2 of
    /// `late.rs`, S1 of `chunks.rs`), so the gate may open again. False,
    /// and nothing changed, if the gate is open or every worker arrived
    /// (`shut` is for that).
    pub(crate) fn clear_arrivals(&self) -> bool {
        let workers = self.workers;
        self.word(GATE)
            .fetch_update(Ordering::SeqCst, Ordering::Acquire, |g| {
                let n = (g & ARRIVED) as usize;
                (g & OPEN == 0 && n < workers).then_some(g & !(ARRIVED | CLOSING))
            })
            .is_ok()
    }

    /// The server shuts the gate for good, as its round never ended
    /// (`server/entry/segment.rs`, `leave_stuck_slot`): `OPEN` off, so no
    /// worker arrives or reads the value slot here again; the server opens
    /// it no more, and a late `finish` leaves it off.
    pub(crate) fn shut(&self) {
        self.word(GATE).fetch_and(!OPEN, Ordering::SeqCst);
        self.wake();
    }

    /// Closes the gate: its next rounds go to the server. A round gathering
    /// is handed over (its waiters withdraw and push to the server); a
    /// round being summed ends at the gate, which closes then. Closed
    /// already is fine.
    pub(crate) fn close(&self) {
        let workers = self.workers;
        let r = self
            .word(GATE)
            .fetch_update(Ordering::SeqCst, Ordering::Acquire, |g| {
                if g & OPEN == 0 {
                    None
                } else if (g & ARRIVED) as usize >= workers {
                    Some(g | CLOSING)
                } else {
                    Some(g & !OPEN)
                }
            });
        if matches!(r, Ok(g) if g & ARRIVED != 0) {
            self.wake();
        }
    }

    /// Clears the words of the rounds of late copies (`late`: `late.rs`)
    /// or of shared rounds (`chunks.rs`), so that no value an earlier
    /// round left counts for a later one whose epoch has the same 15 bits
    /// (Relaxed: the caller's next change of `GATE` publishes them).
    fn forget(&self, late: bool) {
        if late {
            self.forget_late_words();
        } else {
            self.forget_shared_words();
        }
    }

    /// Worker `rank` arrives, its push prepared for a round of late
    /// copies (`late`: `late_now` said so) or not (its slot holds it).
    pub(crate) fn arrive(&self, rank: usize, late: bool) -> Arrival {
        let (gate, workers) = (self.word(GATE), self.workers);
        let timed = self.late_if_close();
        let mut g = gate.load(Ordering::Acquire);
        loop {
            if g & OPEN == 0 {
                return Arrival::Closed;
            }
            let n = (g & ARRIVED) as usize;
            if n >= workers {
                // Not by this protocol (G2, G3): a round summing while this
                // worker arrives again. Treated as closed: the server's
                // round then fails on time rather than a sum being wrong.
                return Arrival::Closed;
            }
            let is_late = late_chunk(workers, self.seg.slot_len(), g & LATE != 0).is_some();
            if is_late != late {
                return Arrival::OtherKind;
            }
            let mut next = g + 1;
            if timed && n == 0 {
                // Before the arrival: the last one reads it after its own
                // load of `GATE` (Acquire), which follows this one's
                // arrival in the word's order.
                self.word(FIRST).store(now_us(), Ordering::Relaxed);
            }
            if timed && n + 1 == workers {
                // The next round's kind (G4: the bit moves only here).
                let took =
                    u64::from(now_us().wrapping_sub(self.word(FIRST).load(Ordering::Relaxed)));
                let close = took * (1 << 20) <= CLOSE_US_PER_MIB * self.seg.slot_len() as u64;
                next = if close { next | LATE } else { next & !LATE };
                if close != is_late {
                    // The words of the next round's kind were last used
                    // rounds ago, maybe by an epoch the 15 bits have come
                    // back to; this round uses the other kind's, and the
                    // rounds before it are over (every worker arrived).
                    self.forget(close);
                }
            }
            match gate.compare_exchange_weak(g, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) if n + 1 == workers => {
                    let who = (epoch(g) << 16) | (rank as u32 + 1);
                    self.word(SUMMER).store(who, Ordering::Release);
                    return Arrival::Last(epoch(g));
                }
                Ok(_) => return Arrival::Waiting(epoch(g)),
                Err(now) => g = now,
            }
        }
    }

    /// The summer, once the value slot holds the round's sum: lets the
    /// others go, and wakes those asleep.
    pub(crate) fn finish(&self) {
        self.word(DONE).fetch_add(1, Ordering::Relaxed);
        let gate = self.word(GATE);
        // Only the summer changes the word now, but for `close` setting
        // `CLOSING` (G2): then the gate closes as the round ends.
        let _ = gate.fetch_update(Ordering::SeqCst, Ordering::Acquire, |g| {
            let open = if g & CLOSING != 0 { 0 } else { g & OPEN };
            Some(open | (g & LATE) | (((epoch(g) + 1) << EPOCH_SHIFT) & EPOCH))
        });
        self.wake();
    }

    /// Where the round of a worker that arrived at `epoch0` is (Acquire:
    /// once ended, its value slot holds the sum).
    pub(crate) fn round(&self, epoch0: u32) -> Round {
        let g = self.word(GATE).load(Ordering::Acquire);
        if epoch(g) != epoch0 {
            Round::Ended
        } else if g & OPEN == 0 {
            Round::HandedOver
        } else {
            Round::Gathering
        }
    }

    /// Sleeps until the round of `epoch0` is no longer gathering, or
    /// `timeout` passes (or the word changes for another reason: the
    /// caller looks again).
    pub(crate) fn sleep(&self, epoch0: u32, timeout: Duration) {
        let sleepers = self.word(SLEEPERS);
        sleepers.fetch_add(1, Ordering::SeqCst);
        let g = self.word(GATE).load(Ordering::SeqCst);
        if epoch(g) == epoch0 && g & OPEN != 0 {
            self.seg.wait_word(GATE, g, timeout);
        }
        sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// A worker that arrived at `epoch0` gives up waiting, or leaves a
    /// round handed over.
    pub(crate) fn withdraw(&self, epoch0: u32) -> Withdrawal {
        let (gate, workers) = (self.word(GATE), self.workers);
        let mut g = gate.load(Ordering::Acquire);
        loop {
            if epoch(g) != epoch0 {
                return Withdrawal::Ended;
            }
            let n = (g & ARRIVED) as usize;
            if n >= workers {
                return Withdrawal::Summing;
            }
            if n == 0 {
                // Not by this protocol (an arrival is counted until it
                // leaves or its round ends): nothing to take back.
                return Withdrawal::Left;
            }
            match gate.compare_exchange_weak(g, g - 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Withdrawal::Left,
                Err(now) => g = now,
            }
        }
    }

    /// Workers arrived in the round now gathering (diagnostics).
    pub(crate) fn arrived(&self) -> u32 {
        self.word(GATE).load(Ordering::Acquire) & ARRIVED
    }

    /// The rank of the worker summing the round of `epoch0`, once it said
    /// so (None: not being summed, or not yet said).
    pub(crate) fn summer(&self, epoch0: u32) -> Option<usize> {
        let g = self.word(GATE).load(Ordering::Acquire);
        if epoch(g) != epoch0 || ((g & ARRIVED) as usize) < self.workers {
            return None;
        }
        let who = self.word(SUMMER).load(Ordering::Acquire);
        (who >> 16 == epoch0 && who & 0xffff != 0).then(|| (who & 0xffff) as usize - 1)
    }
}

#[cfg(test)]
mod tests;
