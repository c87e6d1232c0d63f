//! The gate's tests: its states under racing workers, closers and a
//! stand-in server.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex};

use super::*;

/// How a worker's push of a round went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Gate,
    Server,
}

/// Sums slots `0..w` (a u64 each) into slot `w`, as the summer or the
/// server does.
fn sum_slots(seg: &Region, w: usize) {
    // SAFETY: the caller holds the round (G2, or the stand-in server's
    // lock with every push in).
    let sum: u64 = (0..w)
        .map(|i| u64::from_le_bytes(unsafe { seg.slot(i) }.try_into().unwrap()))
        .sum();
    unsafe { seg.slot_mut(w) }.copy_from_slice(&sum.to_le_bytes());
}

/// A stand-in for the server: a round completes once every worker
/// handed it its push; the one that completes it may open the gate
/// before the others are let go (as the server does before it
/// answers).
struct Server {
    st: Mutex<(u64, usize)>,
    cv: Condvar,
}

impl Server {
    fn push(&self, round: u64, workers: usize, open: impl FnOnce()) {
        let mut st = self.st.lock().unwrap();
        assert_eq!(st.0, round, "a push of another round reached the server");
        st.1 += 1;
        if st.1 == workers {
            open();
            *st = (round + 1, 0);
            self.cv.notify_all();
            return;
        }
        let (st, to) = self
            .cv
            .wait_timeout_while(st, Duration::from_secs(20), |s| s.0 == round)
            .unwrap();
        assert!(
            !to.timed_out(),
            "round {round}: the server waited for a worker that summed at the gate ({st:?})"
        );
    }
}

/// Three workers sum rounds at the gate while a closer closes it at
/// random moments and the stand-in server opens it again now and then:
/// every round is summed either at the gate or by the server, by all
/// three the same way, with every worker's value of that round, and
/// each gate round once.
#[test]
fn every_round_is_summed_at_the_gate_or_by_the_server_whole() {
    const W: usize = 3;
    const ROUNDS: u64 = 3000;
    let seg = Arc::new(Region::create(W + 1, 8).unwrap());
    let server = Arc::new(Server {
        st: Mutex::new((1, 0)),
        cv: Condvar::new(),
    });
    let summed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let paths = Arc::new(Mutex::new(vec![[None; W]; ROUNDS as usize + 1]));
    let closer = {
        let (seg, stop) = (seg.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                if n % 97 == 0 {
                    Gate::of(&seg).close();
                }
                std::thread::yield_now();
            }
        })
    };
    let hs: Vec<_> = (0..W)
        .map(|r| {
            let (seg, summed, server, paths) =
                (seg.clone(), summed.clone(), server.clone(), paths.clone());
            std::thread::spawn(move || {
                let gate = Gate::of(&seg);
                for round in 1..=ROUNDS {
                    let mine = round * 10 + r as u64;
                    // SAFETY: this worker's slot, read by the summer
                    // (or the server) only after this arrival (or
                    // push).
                    unsafe { seg.slot_mut(r) }.copy_from_slice(&mine.to_le_bytes());
                    let path = match gate.arrive(r, false) {
                        Arrival::Last(_) => {
                            sum_slots(&seg, W);
                            summed.fetch_add(1, Ordering::Relaxed);
                            gate.finish();
                            Path::Gate
                        }
                        Arrival::Waiting(e) => loop {
                            match gate.round(e) {
                                Round::Ended => break Path::Gate,
                                Round::HandedOver => match gate.withdraw(e) {
                                    Withdrawal::Left => break Path::Server,
                                    Withdrawal::Ended => break Path::Gate,
                                    Withdrawal::Summing => {}
                                },
                                Round::Gathering if round % 5 == 0 => {
                                    gate.sleep(e, Duration::from_millis(50))
                                }
                                Round::Gathering => std::thread::yield_now(),
                            }
                        },
                        Arrival::Closed => Path::Server,
                        Arrival::OtherKind => unreachable!("a slot of 8 bytes"),
                    };
                    if path == Path::Server {
                        // The server sums the slots (every push of the
                        // round is there, G1) and may open the gate.
                        server.push(round, W, || {
                            sum_slots(&seg, W);
                            if round % 3 != 0 {
                                gate.open();
                            }
                        });
                    } else {
                        // Keep the stand-in's count in step.
                        let mut st = server.st.lock().unwrap();
                        if st.0 == round {
                            st.0 = round + 1;
                        }
                    }
                    paths.lock().unwrap()[round as usize][r] = Some(path);
                    let v = u64::from_le_bytes(unsafe { seg.slot(W) }.try_into().unwrap());
                    let want: u64 = (0..W as u64).map(|i| round * 10 + i).sum();
                    assert_eq!(v, want, "worker {r}, round {round} ({path:?})");
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    stop.store(true, Ordering::Release);
    closer.join().unwrap();
    let paths = paths.lock().unwrap();
    let mut at_gate = 0;
    for (round, p) in paths.iter().enumerate().skip(1) {
        assert!(
            p.iter().all(|x| *x == p[0]),
            "round {round} went both ways: {p:?}"
        );
        at_gate += u64::from(p[0] == Some(Path::Gate));
    }
    assert!(at_gate > ROUNDS / 4, "only {at_gate} rounds at the gate");
    assert!(at_gate < ROUNDS, "the closer never closed it");
    assert_eq!(summed.load(Ordering::Relaxed), at_gate);
    assert_eq!(Gate::of(&seg).done() as u64, at_gate);
}

/// A waiter that gives up takes its arrival back; a close hands a
/// gathering round over (and the gate opens again only once its
/// waiters left), and lets a round being summed end at the gate.
#[test]
fn closing_hands_a_gathering_round_over_and_lets_a_sum_end() {
    let seg = Region::create(3, 8).unwrap();
    let gate = Gate::of(&seg);
    assert_eq!(gate.arrive(0, false), Arrival::Closed, "closed at first");
    gate.close();
    gate.open();
    let Arrival::Waiting(e) = gate.arrive(0, false) else {
        panic!("the first of two waits")
    };
    assert_eq!(gate.round(e), Round::Gathering);
    assert_eq!(gate.withdraw(e), Withdrawal::Left);
    assert_eq!(gate.arrived(), 0);
    // Handed over.
    let Arrival::Waiting(e) = gate.arrive(0, false) else {
        panic!("waits")
    };
    gate.close();
    assert_eq!(gate.round(e), Round::HandedOver);
    assert_eq!(gate.arrive(0, false), Arrival::Closed, "nobody joins it");
    gate.open();
    assert!(!gate.is_open(), "not while a waiter is still to leave");
    assert_eq!(gate.withdraw(e), Withdrawal::Left);
    gate.open();
    assert!(gate.is_open());
    // Too late to withdraw once the last arrived; a close lets the
    // round end at the gate, and the gate closes as it ends.
    let Arrival::Waiting(e) = gate.arrive(0, false) else {
        panic!("waits")
    };
    assert_eq!(gate.summer(e), None, "nobody sums yet");
    assert!(matches!(gate.arrive(1, false), Arrival::Last(_)));
    assert_eq!(gate.summer(e), Some(1), "worker 1 sums");
    assert_eq!(gate.withdraw(e), Withdrawal::Summing);
    gate.close();
    assert_eq!(gate.round(e), Round::Gathering, "still being summed");
    gate.open();
    gate.finish();
    assert_eq!(gate.round(e), Round::Ended);
    assert_eq!(gate.withdraw(e), Withdrawal::Ended);
    assert_eq!(gate.done(), 1);
    assert!(!gate.is_open(), "closed as the round ended");
    assert_eq!(gate.arrive(0, false), Arrival::Closed);
    // And opens again at the server's next round.
    gate.open();
    assert!(gate.is_open());
    let Arrival::Waiting(_) = gate.arrive(0, false) else {
        panic!("waits")
    };
    assert!(matches!(gate.arrive(1, false), Arrival::Last(_)));
    gate.finish();
    assert!(gate.is_open(), "no close asked: stays open");
    assert_eq!(gate.done(), 2);
    // The epoch wraps within its bits and the gate stays open (one
    // worker).
    let seg = Region::create(2, 8).unwrap();
    let gate = Gate::of(&seg);
    gate.open();
    for _ in 0..40_000 {
        assert!(matches!(gate.arrive(0, false), Arrival::Last(_)));
        gate.finish();
    }
    assert!(gate.is_open());
    assert_eq!(gate.done(), 40_000);
}

/// Chunk lengths: none for a part of one chunk; a 32nd, within 32 KiB to
/// 1 MiB, whole pages.
#[test]
fn parts_are_cut_into_chunks_of_whole_pages() {
    assert_eq!(chunks::chunk_bytes(4096), None);
    assert_eq!(chunks::chunk_bytes(32 << 10), None);
    assert_eq!(chunks::chunk_bytes(40 << 10), Some(32 << 10));
    assert_eq!(chunks::chunk_bytes(256 << 10), Some(32 << 10));
    assert_eq!(chunks::chunk_bytes(4 << 20), Some(128 << 10));
    assert_eq!(chunks::chunk_bytes((4 << 20) + (64 << 10)), Some(132 << 10));
    assert_eq!(chunks::chunk_bytes(64 << 20), Some(1 << 20));
}

/// Sums slots `0..w` of `seg` (f32 each) into slot `w` over `range`, as
/// the kernel does: element by element, in rank order.
fn sum_f32(seg: &Region, w: usize, range: std::ops::Range<usize>) {
    // SAFETY: the caller holds the chunk (S1).
    let out = unsafe { seg.slot_mut(w) };
    for at in range.step_by(4) {
        let x = (0..w)
            .map(|r| f32::from_le_bytes(unsafe { seg.slot(r) }[at..at + 4].try_into().unwrap()))
            .fold(0.0f32, |a, b| a + b);
        out[at..at + 4].copy_from_slice(&x.to_le_bytes());
    }
}

/// A round of two workers shared in chunks: the waiter claims chunks while
/// the summer sums its own (each holds its first until the other claimed
/// one); every chunk is summed once, by one of
/// them, and the value is the rank-order sum; the waiter's bit in `BUSY`
/// is clear once it claims nothing more. A waiter that kept the round's
/// `Shared` claims nothing of the next round.
#[test]
fn a_round_is_shared_in_chunks_and_every_chunk_summed_once() {
    const LEN: usize = 256 << 10;
    let seg = Arc::new(Region::create(3, LEN).unwrap());
    let gate = Gate::of(&seg);
    gate.open();
    let fill = |r: usize, round: u32| {
        // SAFETY: this worker's slot, before its arrival.
        let s = unsafe { seg.slot_mut(r) };
        for (i, b) in s.chunks_exact_mut(4).enumerate() {
            let x = (i as f32) * 0.1 + (r as f32) * 1.3 + round as f32;
            b.copy_from_slice(&x.to_le_bytes());
        }
    };
    let check = |round: u32| {
        // SAFETY: the round ended.
        let v = unsafe { seg.slot(2) };
        for i in (0..LEN / 4).step_by(997) {
            let want = ((i as f32) * 0.1 + round as f32) + ((i as f32) * 0.1 + 1.3 + round as f32);
            let got = f32::from_le_bytes(v[i * 4..i * 4 + 4].try_into().unwrap());
            assert_eq!(got.to_bits(), want.to_bits(), "element {i}, round {round}");
        }
    };
    fill(0, 1);
    fill(1, 1);
    FAKE_NOW.with(|c| c.set(Some(0)));
    let Arrival::Waiting(e) = gate.arrive(0, false) else {
        panic!("the first of two waits")
    };
    assert!(gate.shared(e, LEN).is_none(), "not yet being summed");
    let both = Arc::new(std::sync::Barrier::new(2));
    let first = |both: &std::sync::Barrier, done: &mut bool| {
        if !*done {
            *done = true;
            both.wait();
        }
    };
    let helper = {
        let (seg, both) = (seg.clone(), both.clone());
        std::thread::spawn(move || {
            let gate = Gate::of(&seg);
            let t = std::time::Instant::now();
            let sh = loop {
                if let Some(sh) = gate.shared(e, LEN) {
                    break sh;
                }
                assert!(t.elapsed() < Duration::from_secs(20), "never shared");
                std::thread::yield_now();
            };
            let mut done = false;
            sh.sum_chunks(Some(0), |c| {
                first(&both, &mut done);
                sum_f32(&seg, 2, c)
            })
        })
    };
    // Far behind: the next round is a shared one too (`LATE`).
    FAKE_NOW.with(|c| c.set(Some(1 << 20)));
    let Arrival::Last(e1) = gate.arrive(1, false) else {
        panic!("the last")
    };
    assert_eq!(e1, e);
    // The segment's first round (`open` moved the epoch from 0): `CLAIM`
    // is still zero, an earlier round's word.
    assert_eq!(e, 1, "the segment's first round");
    assert!(
        gate.shared(e, LEN).is_none(),
        "not before the summer shares it"
    );
    let sh = gate.share(e, LEN).expect("256 KiB is shared");
    assert_eq!(sh.chunks(), 8);
    let mut done = false;
    let mine = sh.sum_chunks(None, |c| {
        first(&both, &mut done);
        sum_f32(&seg, 2, c)
    });
    let theirs = helper.join().unwrap();
    assert_eq!(mine + theirs, 8, "each chunk once");
    assert!(mine >= 1 && theirs >= 1, "mine {mine}, theirs {theirs}");
    assert!(sh.all_summed());
    assert_eq!(sh.busy(), 0, "the helper is done");
    gate.finish();
    check(1);
    // A waiter late from round 1 claims nothing of round 2.
    fill(0, 2);
    fill(1, 2);
    let Arrival::Waiting(e2) = gate.arrive(1, false) else {
        panic!("waits")
    };
    let Arrival::Last(_) = gate.arrive(0, false) else {
        panic!("the last")
    };
    let sh2 = gate.share(e2, LEN).unwrap();
    // It read `CLAIM` with chunk 3 of round 1 next, long ago; the word now
    // has chunk 0 of round 2 next: its claim fails, and it claims nothing.
    let nothing = |_| panic!("a chunk of another round");
    assert_eq!(
        sh.sum_chunks_from(chunks::Shared::claim_word(e, 3), Some(1), nothing),
        0
    );
    assert_eq!(gate.helpers_busy(e2, LEN), 0, "its bit cleared");
    assert_eq!(sh2.sum_chunks(None, |c| sum_f32(&seg, 2, c)), 8);
    assert!(sh2.all_summed());
    gate.finish();
    check(2);
}

/// The kind of a 256 KiB part's round (`LATE`): one of late copies after a
/// round whose workers arrived close together, a shared one after one
/// whose last came far behind; an arrival prepared for the other kind is
/// told so (G4). A part of 1 MiB or more always has late copies, a part
/// below 256 KiB never.
#[test]
fn a_round_after_close_arrivals_is_one_of_late_copies() {
    // This thread's clock: arrivals at once, unless moved on.
    let at = |t: u32| FAKE_NOW.with(|c| c.set(Some(t)));
    at(1000);
    let seg = Region::create(3, 256 << 10).unwrap();
    let gate = Gate::of(&seg);
    assert_eq!(gate.late_now(), None, "closed");
    gate.open();
    assert_eq!(gate.late_now(), None, "a shared round first");
    // Words of a round of late copies of epoch 2 left long ago (its
    // epoch's 15 bits come back every 32,768 rounds).
    let stale = gate.late(2, 256 << 10, 32 << 10);
    stale.walk(0, |_| {});
    stale.sum_done(0);
    assert!(stale.summed(0));
    assert!(matches!(gate.arrive(0, false), Arrival::Waiting(_)));
    assert!(matches!(gate.arrive(1, false), Arrival::Last(e) if e == 1));
    gate.finish();
    let chunk = gate.late_now().expect("close together: late copies");
    assert_eq!(chunk, 32 << 10);
    assert!(!stale.summed(0), "the next kind's words forgotten");
    assert_eq!(gate.arrive(0, false), Arrival::OtherKind);
    assert!(matches!(gate.arrive(0, true), Arrival::Waiting(_)));
    // 257 µs after the first: just past 1,024 µs per MiB.
    at(1257);
    assert!(matches!(gate.arrive(1, true), Arrival::Last(_)));
    gate.finish();
    assert_eq!(gate.late_now(), None, "far apart: a shared round");
    assert_eq!(gate.arrive(1, true), Arrival::OtherKind);
    // The kind holds across a close and the server's open.
    gate.close();
    gate.open();
    assert_eq!(gate.late_now(), None);
    for (len, late) in [(1 << 20, true), (128 << 10, false)] {
        let seg = Region::create(3, len).unwrap();
        let gate = Gate::of(&seg);
        gate.open();
        for _ in 0..2 {
            assert_eq!(gate.late_now().is_some(), late, "{len}");
            at(5000);
            assert!(matches!(gate.arrive(0, late), Arrival::Waiting(_)));
            at(9000);
            assert!(matches!(gate.arrive(1, late), Arrival::Last(_)));
            gate.finish();
        }
    }
}

/// The server takes back the arrivals of a round that never filled (the
/// gate closed, fewer than W arrived, `clear_arrivals`): the gate may open
/// again, at a new epoch, where a waiter of the old round would read its
/// round ended (G1 leaves none). Not on an open gate, nor once every
/// worker arrived (`shut` is for that).
#[test]
fn arrivals_of_a_round_that_never_filled_are_taken_back() {
    let seg = Region::create(4, 64).unwrap();
    let gate = Gate::of(&seg);
    gate.open();
    let Arrival::Waiting(e) = gate.arrive(0, false) else {
        panic!("the first of three")
    };
    assert!(!gate.clear_arrivals(), "open");
    assert_eq!(gate.arrived(), 1);
    gate.close();
    assert!(gate.clear_arrivals());
    assert_eq!(gate.arrived(), 0);
    assert_eq!(gate.withdraw(e), Withdrawal::Left, "nothing to take back");
    assert!(!gate.is_open());
    gate.open();
    assert!(gate.is_open());
    assert_eq!(gate.round(e), Round::Ended, "a new epoch");
    for r in 0..3 {
        assert!(!matches!(gate.arrive(r, false), Arrival::Closed));
    }
    gate.close();
    assert!(!gate.clear_arrivals(), "every worker arrived");
    assert_eq!(gate.arrived(), 3);
}
