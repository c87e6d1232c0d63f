//! Tests of the waits at the gates: the watcher, helpers that die or
//! hold chunks, and the summer's end of a shared round.

use std::sync::mpsc;
use std::time::Duration;

use super::waits::{Outcome, Wait, Waits};
use super::*;
use crate::gate::{self, MAX_HELPER_RANK};

/// An open gate of two workers, worker 0 waiting at it; its epoch.
fn one_waiting() -> (Arc<Region>, u32) {
    let seg = Arc::new(Region::create(3, 8).unwrap());
    let gate = Gate::of(&seg);
    gate.open();
    let Arrival::Waiting(e) = gate.arrive(0, false) else {
        panic!("the first of two waits")
    };
    (seg, e)
}

/// What a wait came to: "ended", "handed over", or the failure with its
/// doubt.
fn outcome_of(o: Outcome) -> (String, bool) {
    match o {
        Outcome::Ended => ("ended".into(), false),
        Outcome::HandedOver => ("handed over".into(), false),
        Outcome::Failed(f, doubt) => (f.to_string(), doubt),
    }
}

/// A wait on a round whose last worker arrived but never finishes (its
/// summer died): failed, in doubt, as soon as the death is known; else
/// at twice the timeout. A wait on a gate closed under it is handed
/// over; one whose round ends, ended.
#[test]
fn the_watcher_fails_a_dead_summers_waiters_and_hands_over_closed_rounds() {
    let timeout = Duration::from_millis(200);
    let waits = Waits::new(timeout, Arc::new(CpuKernels::single_threaded()), 0);
    let (tx, rx) = mpsc::channel();
    let wait_on = |seg: &Arc<Region>, epoch| waits.add(wait(seg, epoch, false, &tx));
    // Summer (worker 1) known dead.
    let (seg, e) = one_waiting();
    let gate = Gate::of(&seg);
    assert!(matches!(gate.arrive(1, false), Arrival::Last(_)));
    let t = Instant::now();
    wait_on(&seg, e);
    waits.worker_died(1);
    let (msg, doubt) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        msg.contains("worker 1") && msg.contains("died") && doubt,
        "{msg}"
    );
    assert!(t.elapsed() < timeout, "took {:?}", t.elapsed());
    // Summer not known dead: twice the timeout.
    let (seg, e) = one_waiting();
    let gate = Gate::of(&seg);
    assert!(matches!(gate.arrive(0, false), Arrival::Last(_)));
    let t = Instant::now();
    wait_on(&seg, e);
    let (msg, doubt) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(msg.contains("did not finish") && doubt, "{msg}");
    assert!(t.elapsed() >= timeout * 2, "took {:?}", t.elapsed());
    // Closed under it: handed over; a round that ends: ended.
    let (seg, e) = one_waiting();
    let gate = Gate::of(&seg);
    wait_on(&seg, e);
    gate.close();
    let (msg, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(msg, "handed over");
    assert_eq!(gate.arrived(), 0, "its arrival taken back");
    gate.open();
    let Arrival::Waiting(e) = gate.arrive(0, false) else {
        panic!("waits")
    };
    wait_on(&seg, e);
    assert!(matches!(gate.arrive(1, false), Arrival::Last(_)));
    gate.finish();
    let (msg, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(msg, "ended");
    // A round nobody joins: timed out, taken back, not in doubt.
    let Arrival::Waiting(e) = gate.arrive(0, false) else {
        panic!("waits")
    };
    wait_on(&seg, e);
    let (msg, doubt) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(msg.contains("did not end within") && !doubt, "{msg}");
    assert_eq!(gate.arrived(), 0);
    waits.close();
}

/// A round of three workers shared in chunks: worker 0 waits, worker 1
/// sums, worker 2 helps. `hold` runs in worker 2's chunk.
fn shared_round_of_three(
    len: usize,
    hold: impl FnOnce() + Send + 'static,
) -> (Arc<Region>, u32, std::thread::JoinHandle<()>) {
    let seg = Arc::new(Region::create(4, len).unwrap());
    let gate = Gate::of(&seg);
    gate.open();
    let Arrival::Waiting(e) = gate.arrive(0, false) else {
        panic!("waits")
    };
    let Arrival::Waiting(_) = gate.arrive(2, false) else {
        panic!("waits")
    };
    let Arrival::Last(_) = gate.arrive(1, false) else {
        panic!("the last")
    };
    gate.share(e, len).unwrap();
    let (tx, rx) = mpsc::channel();
    let helper = {
        let seg = seg.clone();
        std::thread::spawn(move || {
            let gate = Gate::of(&seg);
            let mut hold = Some(hold);
            gate.shared(e, len).unwrap().sum_chunks(Some(2), |_| {
                tx.send(()).unwrap();
                if let Some(h) = hold.take() {
                    h()
                }
            });
        })
    };
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    (seg, e, helper)
}

/// A wait at `seg`'s gate for the round of `epoch` that reports to `tx`.
fn wait(seg: &Arc<Region>, epoch: u32, finishing: bool, tx: &mpsc::Sender<(String, bool)>) -> Wait {
    let tx = tx.clone();
    let then = Box::new(move |o| tx.send(outcome_of(o)).unwrap());
    Wait {
        finishing,
        ..Wait::new(seg.clone(), epoch, DType::F32, then)
    }
}

/// The summer does not end a round while a helper holds a chunk of it:
/// it leaves the ending to its waits, which end it once the chunk is
/// summed.
#[test]
fn the_summer_ends_a_round_only_once_its_helpers_chunks_are_summed() {
    const LEN: usize = 64 << 10;
    let kernels = Arc::new(CpuKernels::single_threaded());
    let summer = Waits::new(Duration::from_secs(20), kernels.clone(), 1);
    let go = Arc::new(std::sync::Barrier::new(2));
    let g = go.clone();
    let (seg, e, helper) = shared_round_of_three(LEN, move || {
        g.wait();
    });
    let gate = Gate::of(&seg);
    let sh = gate.summed_round(e, LEN).unwrap();
    assert_eq!(
        sh.sum_chunks(None, |c| sum_slots(&kernels, &seg, DType::F32, c).unwrap()),
        1
    );
    assert!(!chunks_summed_soon(&sh), "the helper holds its chunk");
    let (tx, rx) = mpsc::channel();
    summer.add(wait(&seg, e, true, &tx));
    std::thread::sleep(Duration::from_millis(20));
    assert!(rx.try_recv().is_err(), "not ended under a helper's chunk");
    assert_eq!(gate.round(e), gate::Round::Gathering);
    go.wait();
    helper.join().unwrap();
    let (msg, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(msg, "ended");
    assert_eq!(gate.round(e), gate::Round::Ended);
    summer.close();
}

/// A helper that dies holding a chunk (here: its sum panics, so it
/// neither counts the chunk nor clears its bit) leaves the round
/// unended: the summer's part and the waiter's fail, in doubt, naming
/// it once it is known dead; while it is not (it might still write),
/// the summer's at the timeout and the waiter's at twice that.
#[test]
fn a_helper_that_died_holding_a_chunk_fails_the_round() {
    const LEN: usize = 64 << 10;
    let timeout = Duration::from_millis(300);
    let kernels = Arc::new(CpuKernels::single_threaded());
    for known_dead in [false, true] {
        // Worker 1 sums; worker 0 waits (and, its rank too high, does
        // not help); worker 2 helps, and dies.
        let summer = Waits::new(timeout, kernels.clone(), 1);
        let waiter = Waits::new(timeout, kernels.clone(), MAX_HELPER_RANK);
        let (seg, e, helper) =
            shared_round_of_three(LEN, || panic!("the helper dies in its chunk"));
        assert!(helper.join().is_err());
        let gate = Gate::of(&seg);
        assert_eq!(gate.helpers_busy(e, LEN), 1 << 2);
        let sh = gate.summed_round(e, LEN).unwrap();
        assert_eq!(
            sh.sum_chunks(None, |c| sum_slots(&kernels, &seg, DType::F32, c).unwrap()),
            1
        );
        assert!(!chunks_summed_soon(&sh));
        let (tx, rx) = mpsc::channel();
        let (wtx, wrx) = mpsc::channel();
        let t = Instant::now();
        summer.add(wait(&seg, e, true, &tx));
        waiter.add(wait(&seg, e, false, &wtx));
        if known_dead {
            summer.worker_died(2);
            waiter.worker_died(2);
        }
        let (msg, doubt) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let (wmsg, wdoubt) = wrx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(doubt && wdoubt);
        if known_dead {
            for m in [&msg, &wmsg] {
                assert!(m.contains("worker 2") && m.contains("helping"), "{m}");
            }
            assert!(t.elapsed() < timeout, "took {:?}", t.elapsed());
        } else {
            assert!(msg.contains("held a chunk"), "{msg}");
            assert!(wmsg.contains("did not finish"), "{wmsg}");
            assert!(t.elapsed() >= timeout * 2, "took {:?}", t.elapsed());
        }
        assert_eq!(gate.round(e), gate::Round::Gathering, "never ended");
        summer.close();
        waiter.close();
    }
}

/// A push-pull's part whose chunks go to the output as they are summed:
/// `finish` copies only the chunks not copied yet (the last one short),
/// each to its place in the output and nothing outside the part; after
/// `close`, nothing more is copied.
#[test]
fn chunks_copied_as_summed_and_the_rest_at_the_end_fill_the_part() {
    const LEN: usize = 200 << 10;
    const AT: usize = 4096;
    let chunk = gate::chunk_bytes(LEN).unwrap();
    assert_eq!((chunk, LEN.div_ceil(chunk)), (32 << 10, 7));
    let seg = Arc::new(Region::create(3, LEN).unwrap());
    let fill = |v: u8| {
        // SAFETY: this test's own segment, no other thread.
        let value = unsafe { seg.slot_mut(2) };
        for (i, b) in value.iter_mut().enumerate() {
            *b = v ^ (i % 251) as u8;
        }
    };
    let mut buf = vec![0xeeu8; AT + LEN + 64];
    let ptr = OutPtr(buf.as_mut_ptr(), buf.len());
    let out = || ChunkOut {
        seg: seg.clone(),
        out: ptr,
        at: AT,
        chunk,
        state: Mutex::new((true, 0)),
    };
    let co = out();
    fill(1);
    co.copy(chunk..2 * chunk);
    co.copy(6 * chunk..LEN);
    // The value slot changes under the chunks copied (as it could not in a
    // job): `finish` must leave them as they were copied.
    fill(2);
    co.finish().unwrap();
    co.copy(0..chunk);
    drop(co);
    let want = |i: usize| {
        let copied_early = (chunk..2 * chunk).contains(&i) || i >= 6 * chunk;
        (if copied_early { 1 } else { 2 }) ^ (i % 251) as u8
    };
    assert!(buf[..AT].iter().chain(&buf[AT + LEN..]).all(|&b| b == 0xee));
    for i in 0..LEN {
        assert_eq!(buf[AT + i], want(i), "byte {i} of the part");
    }
    // Closed (the part failed): no chunk is copied.
    let before = buf.clone();
    let co = out();
    co.close();
    co.copy(0..chunk);
    drop(co);
    assert_eq!(buf, before);
}

/// A round of late copies (`gate/late.rs`) among `W` threads, each a
/// worker that arrives, walks, and makes progress until its part is done
/// and the round ended: every output, and the value slot, hold the
/// rank-order sum.
#[test]
fn a_round_of_late_copies_sums_in_rank_order_into_every_output() {
    const LEN: usize = 4 << 20;
    for workers in [2usize, 3] {
        let seg = Arc::new(Region::create(workers + 1, LEN).unwrap());
        let gate = Gate::of(&seg);
        gate.open();
        let kernels = Arc::new(CpuKernels::single_threaded());
        let vals = |r: usize| -> Vec<f32> {
            (0..LEN / 4)
                .map(|i| (r * 7 + i % 13) as f32 * 0.25 + 1.0)
                .collect()
        };
        let threads: Vec<_> = (0..workers)
            .map(|r| {
                let (seg, kernels) = (seg.clone(), kernels.clone());
                let input = Bytes::from(bytemuck::cast_slice::<f32, u8>(&vals(r)).to_vec());
                std::thread::spawn(move || {
                    let gate = Gate::of(&seg);
                    let chunk = gate.late_now().expect("a part of late copies");
                    let e = match gate.arrive(r, true) {
                        Arrival::Last(e) | Arrival::Waiting(e) => e,
                        a => panic!("{a:?}"),
                    };
                    let mut out = vec![0u8; LEN];
                    let ptr = OutPtr(out.as_mut_ptr(), out.len());
                    let part = LatePart::arrive(
                        seg.clone(),
                        (e, chunk),
                        r,
                        DType::F32,
                        Some(input),
                        Some((ptr, 0)),
                        kernels,
                    );
                    let t = Instant::now();
                    while !(part.done() && gate.round(e) == gate::Round::Ended) {
                        part.progress();
                        assert!(t.elapsed() < Duration::from_secs(20), "worker {r} stuck");
                        std::thread::yield_now();
                    }
                    assert!(part.close().is_none());
                    out
                })
            })
            .collect();
        let outs: Vec<Vec<u8>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let all: Vec<Vec<f32>> = (0..workers).map(vals).collect();
        let want: Vec<u8> = (0..LEN / 4)
            .map(|i| (1..workers).fold(all[0][i], |a, r| a + all[r][i]))
            .flat_map(|x| x.to_le_bytes())
            .collect();
        for (r, o) in outs.iter().enumerate() {
            assert!(
                o == &want,
                "worker {r} of {workers}: its output is not the sum"
            );
        }
        assert!(unsafe { seg.slot(workers) } == &want[..]);
    }
}

/// The waits count the threads that poll them: a poll counts its thread
/// once, its wait's end or its leave uncounts it, and a leave from a
/// thread that never polled changes nothing.
#[test]
fn a_thread_polling_the_waits_is_counted_until_its_wait_ends() {
    let waits = Waits::new(
        Duration::from_secs(20),
        Arc::new(CpuKernels::single_threaded()),
        0,
    );
    assert!(!waits.poll(false));
    assert!(!waits.poll(false));
    assert_eq!(waits.pollers_now(), 1);
    std::thread::scope(|s| {
        s.spawn(|| {
            waits.poll(true);
            assert_eq!(waits.pollers_now(), 1, "a leave without a poll");
            waits.poll(false);
            assert_eq!(waits.pollers_now(), 2);
            waits.poll(true);
        });
    });
    assert_eq!(waits.pollers_now(), 1);
    waits.end();
    assert_eq!(waits.pollers_now(), 0);
    waits.end();
    assert_eq!(waits.pollers_now(), 0);
    waits.close();
}
