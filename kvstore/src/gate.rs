//! The gate of a key part's shared segment: rounds the workers sum there
//! themselves, without their server.
//!
//! A sync round of a part whose workers all share memory with its server
//! goes through the part's segment (`kinds/dist/segments.rs`): each worker
//! writes its slot, and the server sums the slots into the value slot once
//! every push has arrived. For small parts the server's turn is most of the
//! round: two hand-offs between processes, each a wait for a thread that
//! may share a core with another. So once a round has shown that the
//! server has nothing to add (no optimizer, no checkpoints, no replicas,
//! every worker's push plain and through its slot), the server *opens* the
//! part's gate: from the next round on, each worker writes its slot and
//! arrives at the gate, and the last to arrive sums the slots into the
//! value slot, in rank order with the server's kernel, so the bits are the
//! server's (`comm::sum_dense`), and lets the others go. The server counts
//! those rounds from the gate when it next looks (`done`).
//!
//! # Words (the region's header words; zero at creation)
//!
//! - `GATE`: `OPEN` (bit 31) | epoch (bits 16..31, 15 bits) | arrived (bits
//!   0..16: workers that arrived in the round now gathering).
//! - `DONE`: rounds the workers summed (wrapping).
//! - `SLEEPERS`: threads sleeping on `GATE` for a round's end.
//!
//! # States
//!
//! ```text
//!   closed (OPEN = 0, arrived = 0) --server, at the end of a round it summed--> open
//!   open, arrived = 0 --a worker arrives--> gathering (0 < arrived < W)
//!   gathering --the W-th arrives--> summing (arrived = W; that worker sums)
//!   summing --the summer: arrived = 0, epoch + 1, DONE + 1--> open
//!   gathering --a waiter that gave up (`withdraw`)--> arrived - 1
//!   open, arrived = 0 --server or a worker (`try_close`)--> closed
//! ```
//!
//! Invariants:
//! - G1. `arrived > 0` only while `OPEN`: a worker arrives only at an open
//!   gate, and the gate closes only with nobody arrived. So a round is
//!   summed by the workers or by the server, never partly each: a worker
//!   that finds the gate closed pushes to the server, and the gate opens
//!   only while the server completes a round, before it answers it, when
//!   no worker can have a push of the next round under way (each waits for
//!   its answer).
//! - G2. Only the summer changes `GATE` while `arrived = W`: arrivals need
//!   `arrived < W`, closing needs 0, a withdrawal refuses `W`. So nobody
//!   reads a slot the summer reads, or writes the value slot, meanwhile.
//! - G3. A worker arrives in round `e + 1` only after it saw round `e`
//!   end (the epoch move), and every round needs all `W`: so the epoch a
//!   worker reads when it arrives is the one its round ends by moving.
//!
//! # Orderings
//!
//! A worker's slot writes happen before its arrival (an AcqRel
//! read-modify-write of `GATE`); the W-th arrival reads the value the one
//! before wrote, so every earlier arrival is in its release sequence and
//! it sees every slot. The summer writes the value slot, then stores
//! `GATE` with Release (SeqCst, for the sleepers' handshake); a waiter that
//! sees the epoch move with Acquire sees the value slot. A close is a
//! read-modify-write that finds `arrived = 0`, which only a summer's store
//! (after its sum) or a withdrawal left: the closer sees the last sum.
//!
//! Sleeping without lost wake-ups: a sleeper adds itself to `SLEEPERS`,
//! then reads `GATE` and sleeps on it with the value read (all SeqCst);
//! the summer stores `GATE`, then reads `SLEEPERS` and wakes the word if
//! any. Either the sleeper's read sees the new `GATE`, or the summer's
//! read sees the sleeper (and a wake after the store ends a sleep on the
//! old value; a changed word fails the sleep at once).
//!
//! A worker that gives up waiting withdraws its arrival while the round
//! is still gathering; if the round ended meanwhile, or is being summed,
//! it did not give up in time, and its round is done (or soon). The epoch
//! in `GATE` keeps a withdrawal from taking an arrival of a later round
//! (the word would have to come back to the same value: 32,768 rounds
//! within one compare-exchange).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pskv_transport::Region;

const GATE: usize = 0;
const DONE: usize = 1;
const SLEEPERS: usize = 2;

const OPEN: u32 = 1 << 31;
const ARRIVED: u32 = 0xffff;
const EPOCH_SHIFT: u32 = 16;
const EPOCH: u32 = 0x7fff << EPOCH_SHIFT;

/// The most workers a gate counts.
pub(crate) const MAX_WORKERS: usize = ARRIVED as usize;

/// A part's gate, in its segment's header.
#[derive(Clone, Copy)]
pub(crate) struct Gate<'a> {
    seg: &'a Region,
}

/// What a worker's arrival found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// The gate is closed: push to the server.
    Closed,
    /// This worker came last: it sums the round, then calls `finish`.
    Last,
    /// Others are still to come: the round ends when the epoch moves from
    /// this one (`ended`).
    Waiting(u32),
}

/// What a withdrawal found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Withdrawal {
    /// The arrival is taken back: the round goes on without this worker.
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
        Gate { seg }
    }

    fn word(&self, i: usize) -> &AtomicU32 {
        self.seg.word(i)
    }

    /// Whether the gate is open (Acquire: a worker that finds it open
    /// after its own round sees that round's value in the value slot).
    pub(crate) fn is_open(&self) -> bool {
        self.word(GATE).load(Ordering::Acquire) & OPEN != 0
    }

    /// Rounds the workers summed, as a wrapping count.
    pub(crate) fn done(&self) -> u32 {
        self.word(DONE).load(Ordering::Acquire)
    }

    /// The server opens the gate, while it completes a round it summed
    /// (before answering it: see G1). A gate with arrivals is left as it
    /// is (it cannot have any then: G1).
    pub(crate) fn open(&self) {
        let _ = self
            .word(GATE)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                (g & ARRIVED == 0).then_some(g | OPEN)
            });
    }

    /// Closes the gate unless a round is gathering or being summed
    /// (`Err(arrived)`); closed already is fine.
    pub(crate) fn try_close(&self) -> Result<(), u32> {
        self.word(GATE)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                if g & OPEN == 0 {
                    None
                } else if g & ARRIVED == 0 {
                    Some(g & !OPEN)
                } else {
                    None
                }
            })
            .map(|_| ())
            .or_else(|g| match g & ARRIVED {
                0 => Ok(()),
                n => Err(n),
            })
    }

    /// Closes the gate, waiting (at most `timeout`) for a round under way
    /// to end; `Err(arrived)` if it did not.
    pub(crate) fn close_within(&self, timeout: Duration) -> Result<(), u32> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(10);
        loop {
            match self.try_close() {
                Ok(()) => return Ok(()),
                Err(n) if Instant::now() >= deadline => return Err(n),
                Err(_) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(5));
                }
            }
        }
    }

    /// A worker whose slot holds its push arrives (`workers`: W).
    pub(crate) fn arrive(&self, workers: usize) -> Arrival {
        let gate = self.word(GATE);
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
            match gate.compare_exchange_weak(g, g + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) if n + 1 == workers => return Arrival::Last,
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
        // Only the summer changes the word now (G2).
        let g = gate.load(Ordering::Acquire);
        let next = (g & OPEN) | (((epoch(g) + 1) << EPOCH_SHIFT) & EPOCH);
        gate.store(next, Ordering::SeqCst);
        if self.word(SLEEPERS).load(Ordering::SeqCst) != 0 {
            self.seg.wake_word(GATE);
        }
    }

    /// Whether the round of a worker that arrived at `epoch` has ended
    /// (Acquire: then its value slot holds the sum).
    pub(crate) fn ended(&self, epoch0: u32) -> bool {
        epoch(self.word(GATE).load(Ordering::Acquire)) != epoch0
    }

    /// Sleeps until the round of `epoch0` ends, or `timeout` passes (or
    /// the word changes for another reason: the caller looks again).
    pub(crate) fn sleep(&self, epoch0: u32, timeout: Duration) {
        let sleepers = self.word(SLEEPERS);
        sleepers.fetch_add(1, Ordering::SeqCst);
        let g = self.word(GATE).load(Ordering::SeqCst);
        if epoch(g) == epoch0 {
            self.seg.wait_word(GATE, g, timeout);
        }
        sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// A worker that arrived at `epoch0` gives up waiting.
    pub(crate) fn withdraw(&self, epoch0: u32, workers: usize) -> Withdrawal {
        let gate = self.word(GATE);
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
                // Not this worker's arrival to take (it was never counted):
                // nothing to take back.
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
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use super::*;

    /// Rounds summed by three threads at the gate, with random delays:
    /// every round's sum has every worker's value of that round, and no
    /// round is summed twice or skipped.
    #[test]
    fn workers_sum_every_round_once_and_in_step() {
        const W: usize = 3;
        const ROUNDS: u64 = 3000;
        let seg = Arc::new(Region::create(W + 1, 8).unwrap());
        Gate::of(&seg).open();
        let summed = Arc::new(AtomicU64::new(0));
        let hs: Vec<_> = (0..W)
            .map(|r| {
                let (seg, summed) = (seg.clone(), summed.clone());
                std::thread::spawn(move || {
                    let gate = Gate::of(&seg);
                    for round in 1..=ROUNDS {
                        let mine = round * 10 + r as u64;
                        // SAFETY: this worker's slot, read by the summer
                        // only after this arrival.
                        unsafe { seg.slot_mut(r) }.copy_from_slice(&mine.to_le_bytes());
                        if round % 7 == r as u64 {
                            std::thread::yield_now();
                        }
                        match gate.arrive(W) {
                            Arrival::Last => {
                                let sum: u64 = (0..W)
                                    .map(|i| {
                                        let b = unsafe { seg.slot(i) };
                                        u64::from_le_bytes(b.try_into().unwrap())
                                    })
                                    .sum();
                                unsafe { seg.slot_mut(W) }.copy_from_slice(&sum.to_le_bytes());
                                summed.fetch_add(1, Ordering::Relaxed);
                                gate.finish();
                            }
                            Arrival::Waiting(e) => {
                                while !gate.ended(e) {
                                    if round % 3 == 0 {
                                        gate.sleep(e, Duration::from_millis(50));
                                    } else {
                                        std::thread::yield_now();
                                    }
                                }
                            }
                            Arrival::Closed => panic!("the gate closed"),
                        }
                        let v = u64::from_le_bytes(unsafe { seg.slot(W) }.try_into().unwrap());
                        let want: u64 = (0..W as u64).map(|i| round * 10 + i).sum();
                        assert_eq!(v, want, "worker {r}, round {round}");
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(summed.load(Ordering::Relaxed), ROUNDS);
        let gate = Gate::of(&seg);
        assert_eq!(gate.done() as u64, ROUNDS);
        assert_eq!(gate.arrived(), 0);
        assert_eq!(gate.try_close(), Ok(()));
        assert!(!gate.is_open());
        assert_eq!(gate.arrive(W), Arrival::Closed);
    }

    /// A gate closes only with nobody arrived; a waiter that gives up takes
    /// its arrival back unless the round ended or is being summed.
    #[test]
    fn closing_and_withdrawing_respect_a_round_under_way() {
        let seg = Region::create(3, 8).unwrap();
        let gate = Gate::of(&seg);
        assert_eq!(gate.arrive(2), Arrival::Closed, "closed at first");
        assert_eq!(gate.try_close(), Ok(()));
        gate.open();
        let Arrival::Waiting(e) = gate.arrive(2) else {
            panic!("the first of two waits")
        };
        assert_eq!(gate.try_close(), Err(1), "a round is gathering");
        assert_eq!(
            gate.close_within(Duration::from_millis(20)),
            Err(1),
            "and does not end by itself"
        );
        assert_eq!(gate.withdraw(e, 2), Withdrawal::Left);
        assert_eq!(gate.arrived(), 0);
        // Again; now the other comes, and the withdrawal is too late.
        let Arrival::Waiting(e) = gate.arrive(2) else {
            panic!("waits")
        };
        assert_eq!(gate.arrive(2), Arrival::Last);
        assert_eq!(gate.withdraw(e, 2), Withdrawal::Summing);
        assert_eq!(gate.try_close(), Err(2), "a round is being summed");
        gate.finish();
        assert!(gate.ended(e));
        assert_eq!(gate.withdraw(e, 2), Withdrawal::Ended);
        assert_eq!(gate.done(), 1);
        assert_eq!(gate.close_within(Duration::from_millis(20)), Ok(()));
        assert_eq!(gate.arrive(2), Arrival::Closed);
        // The epoch wraps within its bits and the gate stays open.
        gate.open();
        for _ in 0..40_000 {
            assert_eq!(gate.arrive(1), Arrival::Last);
            gate.finish();
        }
        assert!(gate.is_open());
        assert_eq!(gate.done(), 40_001);
    }
}
