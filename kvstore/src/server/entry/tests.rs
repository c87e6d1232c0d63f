use std::sync::mpsc::{channel, Receiver};

use bytes::Bytes;
use pskv_gpu::cpu::CpuKernels;

use super::{Answer, EntryState};
use crate::dtype::DType;
use crate::error::Fault;
use crate::gate::{Arrival, Gate};
use crate::wire::{Head, Op};

/// A sync f32 request head of `op`.
pub(super) fn head(op: Op) -> Head {
    Head {
        op,
        dtype: DType::F32,
        compression: 0,
        sync: true,
        multi_precision: false,
        shm: false,
        shm_tag: 0,
    }
}

fn f32s(v: &[f32]) -> Bytes {
    Bytes::copy_from_slice(bytemuck::cast_slice(v))
}

/// The f32 values of a push-pull's answer.
fn value(r: Result<Option<Bytes>, Fault>) -> Vec<f32> {
    floats(&r.unwrap().expect("a push-pull's value"))
}

/// The f32 values in `b` (of any alignment).
fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn answer() -> (Answer, Receiver<Result<Option<Bytes>, Fault>>) {
    let (tx, rx) = channel();
    (
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
        rx,
    )
}

/// A worker whose push's answer was lost (its request failed on its
/// side, say, while its server restarted) sends the push again in the
/// same round: the later push takes the earlier one's place (the earlier
/// is answered with an error nobody waits for), and the round sums each
/// worker once. Refused instead, the push would land in the next round:
/// that worker one push ahead of the others for good.
#[test]
fn a_push_sent_again_in_its_round_takes_the_first_ones_place() {
    let k = CpuKernels::single_threaded();
    let mut st = EntryState::new(1, 0, DType::F32, &f32s(&[0.0; 4]), 2);
    let (a0, r0) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[1.0; 4]), 0, a0);
    let (a0b, r0b) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[2.0; 4]), 0, a0b);
    let first = r0.try_recv().expect("the first push is answered at once");
    let e = first.expect_err("the first push gives way");
    assert!(e.to_string().contains("again in the same round"), "{e}");
    assert!(r0b.try_recv().is_err(), "the round waits for worker 1");
    let (a1, r1) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[10.0; 4]), 1, a1);
    for r in [r0b, r1] {
        let v = r.try_recv().unwrap().unwrap().expect("a push-pull's value");
        assert_eq!(bytemuck::cast_slice::<u8, f32>(&v), &[12.0; 4]);
    }
    assert_eq!(st.rounds, 1);
    // The next round starts clean.
    let (a0, r0) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[1.0; 4]), 0, a0);
    let (a1, r1) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[1.0; 4]), 1, a1);
    for r in [r0, r1] {
        let v = r.try_recv().unwrap().unwrap().unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, f32>(&v), &[2.0; 4]);
    }
}

/// The same for a key whose pushes are summed as they come (integers,
/// here): the first push is in the sum already, so the one sent again
/// takes its place in the answers only, and its values are not added
/// a second time.
#[test]
fn a_push_sent_again_after_its_first_was_summed_is_counted_once() {
    let k = CpuKernels::single_threaded();
    let i32s = |v: &[i32]| Bytes::copy_from_slice(bytemuck::cast_slice(v));
    let h = Head {
        dtype: DType::I32,
        ..head(Op::PushPull)
    };
    let mut st = EntryState::new(1, 0, DType::I32, &i32s(&[0; 4]), 2);
    let (a0, r0) = answer();
    st.push(&k, None, h, i32s(&[1; 4]), 0, a0);
    let (a0b, r0b) = answer();
    st.push(&k, None, h, i32s(&[1; 4]), 0, a0b);
    let e = r0
        .try_recv()
        .expect("answered at once")
        .expect_err("gives way");
    assert!(e.to_string().contains("again in the same round"), "{e}");
    let (a1, r1) = answer();
    st.push(&k, None, h, i32s(&[10; 4]), 1, a1);
    for r in [r0b, r1] {
        let v = r.try_recv().unwrap().unwrap().expect("a push-pull's value");
        assert_eq!(bytemuck::cast_slice::<u8, i32>(&v), &[11; 4]);
    }
    assert_eq!(st.rounds, 1);
}

/// A restarted server, its count of rounds behind the workers', holds a
/// push of a round that another worker saw complete before the crash:
/// once it learns that (the other worker's check, or its push of a later
/// round), the push is answered with the value, not applied, and the next
/// round sums as usual. Its push would otherwise wait for a push the
/// other worker never sends (`cut_short.rs`).
#[test]
fn a_push_of_a_round_the_workers_saw_complete_is_answered_not_applied() {
    let k = CpuKernels::single_threaded();
    let mut st = EntryState::new(1, 0, DType::F32, &f32s(&[5.0; 4]), 2);
    // Back from a checkpoint of round 20; worker 1 pushes round 22 again.
    st.rounds = 20;
    st.learn_round(21);
    assert_eq!(st.rounds, 21);
    let (a1, r1) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[1.0; 4]), 1, a1);
    assert!(r1.try_recv().is_err(), "the push waits for its round");
    // Worker 0 saw round 22 complete.
    st.learn_round(22);
    assert_eq!(value(r1.try_recv().expect("answered")), [5.0; 4]);
    assert_eq!(st.rounds, 22);
    st.learn_round(7);
    assert_eq!(st.rounds, 22, "a count never goes back");
    let (a0, r0) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[1.0; 4]), 0, a0);
    let (a1, r1) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[2.0; 4]), 1, a1);
    for r in [r0, r1] {
        assert_eq!(value(r.try_recv().unwrap()), [3.0; 4]);
    }
    assert_eq!(st.rounds, 23);
}

/// The same for a push summed as it came (integers): the sum so far is
/// dropped with the round.
#[test]
fn a_summed_push_of_a_round_the_workers_saw_complete_is_dropped_with_it() {
    let k = CpuKernels::single_threaded();
    let i32s = |v: &[i32]| Bytes::copy_from_slice(bytemuck::cast_slice(v));
    let h = Head {
        dtype: DType::I32,
        ..head(Op::PushPull)
    };
    let mut st = EntryState::new(1, 0, DType::I32, &i32s(&[5; 4]), 2);
    let (a0, r0) = answer();
    st.push(&k, None, h, i32s(&[1; 4]), 0, a0);
    assert!(r0.try_recv().is_err());
    st.learn_round(1);
    let v = r0.try_recv().unwrap().unwrap().unwrap();
    assert_eq!(bytemuck::cast_slice::<u8, i32>(&v), &[5; 4]);
    let (a0, r0) = answer();
    st.push(&k, None, h, i32s(&[1; 4]), 0, a0);
    let (a1, r1) = answer();
    st.push(&k, None, h, i32s(&[10; 4]), 1, a1);
    for r in [r0, r1] {
        let v = r.try_recv().unwrap().unwrap().unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, i32>(&v), &[11; 4]);
    }
    assert_eq!(st.rounds, 2);
}

/// The count learned from pushes alone: a restarted server (back at round
/// 20) holds worker 1's push of round 22 sent again; worker 0's push of
/// round 23 says round 22 is complete, so worker 1's is answered with the
/// value, unapplied, and worker 0's waits for worker 1's push of round 23.
/// A push of a round the key holds is answered at once.
#[test]
fn a_push_of_a_later_round_completes_the_count_and_answers_the_stale_one() {
    let k = CpuKernels::single_threaded();
    let mut st = EntryState::new(1, 0, DType::F32, &f32s(&[5.0; 4]), 2);
    st.rounds = 20;
    assert!(!st.round_done(22));
    assert_eq!(st.rounds, 21);
    let (a1, r1) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[1.0; 4]), 1, a1);
    assert!(r1.try_recv().is_err());
    assert!(!st.round_done(23), "round 23 is to be summed");
    assert_eq!(value(r1.try_recv().expect("answered")), [5.0; 4]);
    let (a0, r0) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[1.0; 4]), 0, a0);
    assert!(
        r0.try_recv().is_err(),
        "waits for worker 1's push of round 23"
    );
    assert!(st.round_done(22), "a push of round 22 sent again");
    assert!(st.round_done(5));
    assert!(!st.round_done(0), "an untagged push is taken");
    assert!(!st.round_done(23));
    let (a1, r1) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[2.0; 4]), 1, a1);
    for r in [r0, r1] {
        assert_eq!(value(r.try_recv().unwrap()), [3.0; 4]);
    }
    assert_eq!(st.rounds, 23);
}

/// A push whose length is not the key's (a worker that cuts the key into
/// other parts: another `PSKV_PARTITION_BYTES`, or another `PSKV_VAN`,
/// which sets the default) is refused at once with what to check, and
/// is not counted: the round takes that worker's next push of the right
/// length.
#[test]
fn a_push_of_another_length_names_the_settings_that_cut_keys() {
    let k = CpuKernels::single_threaded();
    let mut st = EntryState::new(1, 0, DType::F32, &f32s(&[0.0; 4]), 2);
    let (a0, r0) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[1.0; 8]), 0, a0);
    let e = r0
        .try_recv()
        .expect("answered at once")
        .expect_err("refused");
    assert!(matches!(e, Fault::Mismatch(_)), "{e:?}");
    let msg = e.to_string();
    for part in [
        "pushed 32 bytes",
        "holds 16 bytes",
        "PSKV_PARTITION_BYTES",
        "PSKV_VAN",
    ] {
        assert!(msg.contains(part), "{part:?} in {msg}");
    }
    let (a1, r1) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[2.0; 4]), 1, a1);
    assert!(r1.try_recv().is_err(), "the round waits for worker 0");
    let (a0, r0) = answer();
    st.push(&k, None, head(Op::PushPull), f32s(&[1.0; 4]), 0, a0);
    for r in [r0, r1] {
        assert_eq!(value(r.try_recv().unwrap()), [3.0; 4]);
    }
    assert_eq!(st.rounds, 1);
}

/// An f32 key of 16 zeros whose two workers checked it, each taking its
/// shared segment.
pub(super) fn shared_entry() -> EntryState {
    let mut st = EntryState::new(1, 0, DType::F32, &f32s(&[0.0; 16]), 2);
    let check = crate::wire::Check {
        part_bytes: 64,
        wants_shm: true,
        seen: 0,
        shape: vec![16],
    };
    for rank in 0..2 {
        st.check(&head(Op::Check), &check, rank)
            .unwrap()
            .expect("a segment");
    }
    st
}

/// `shared_entry`, its gate opened by the server, and worker 0 arrived
/// there; the kernels, the entry and its segment.
fn one_arrived() -> (
    CpuKernels,
    EntryState,
    std::sync::Arc<pskv_transport::Region>,
) {
    let st = shared_entry();
    let seg = st.shm.clone().expect("made at the checks");
    let gate = Gate::of(&seg);
    gate.open();
    assert!(matches!(gate.arrive(0, false), Arrival::Waiting(_)));
    (CpuKernels::single_threaded(), st, seg)
}

/// A round of push-pulls by message of an entry of 16 f32, worker `r`
/// pushing `vals[r]` in every element (the gate said it may open): each
/// answer's values.
fn message_round(st: &mut EntryState, k: &CpuKernels, vals: [f32; 2]) -> Vec<Vec<f32>> {
    let mut answers = Vec::new();
    for (rank, v) in vals.into_iter().enumerate() {
        st.gate_ok = true;
        let (a, r) = answer();
        st.push(k, None, head(Op::PushPull), f32s(&[v; 16]), rank, a);
        answers.push(r);
    }
    answers
        .into_iter()
        .map(|r| value(r.try_recv().unwrap()))
        .collect()
}

/// The same through the slots of `seg`, worker `r`'s holding `vals[r]`:
/// each answer.
#[allow(unsafe_code)] // the workers' slots, written before their pushes
fn slot_round(
    st: &mut EntryState,
    k: &CpuKernels,
    seg: &pskv_transport::Region,
    vals: [f32; 2],
) -> Vec<Option<Bytes>> {
    let mut answers = Vec::new();
    for (rank, v) in vals.into_iter().enumerate() {
        // SAFETY: this test plays every process; nothing else maps it.
        unsafe { seg.slot_mut(rank) }.copy_from_slice(&f32s(&[v; 16]));
        let h = shm_head(Op::PushPull, seg);
        let input = st.shm_input(&h, &64u64.to_le_bytes(), rank).unwrap();
        st.gate_ok = true;
        let (a, r) = answer();
        st.push(k, None, h, input, rank, a);
        answers.push(r);
    }
    answers
        .into_iter()
        .map(|r| r.try_recv().unwrap().unwrap())
        .collect()
}

/// A sync f32 head of `op` through the shared segment `seg`.
fn shm_head(op: Op, seg: &pskv_transport::Region) -> Head {
    Head {
        shm: true,
        shm_tag: seg.tag(),
        ..head(op)
    }
}

/// A round at the part's gate that never ended (its summer, or a helper
/// holding a chunk, stalled past its waiters' timeout or died) leaves a
/// thread that may still write the segment's value slot, at any time. The
/// server, completing its next round, finds that round's arrivals still
/// counted: from then on the value lives in its own buffer, the gate stays
/// closed, and pulls and push-pulls through the segment are answered with
/// the value by message. A late write into the value slot then reaches
/// nothing a worker reads (before, it overwrote the newer value there).
#[test]
#[allow(unsafe_code)] // the test plays the stalled summer on the slots
fn a_round_stuck_at_the_gate_moves_the_value_out_of_its_slot_for_good() {
    let (k, mut st, seg) = one_arrived();
    let gate = Gate::of(&seg);
    // Both workers arrived; the last one's sum never ends. The waits fail
    // in doubt, and the workers push by message.
    assert!(matches!(gate.arrive(1, false), Arrival::Last(_)));
    for v in message_round(&mut st, &k, [1.0, 2.0]) {
        assert_eq!(v, [3.0; 16]);
    }
    // The stalled summer writes the value slot now, and ends its round.
    unsafe { seg.slot_mut(2) }.fill(0xff);
    gate.finish();
    assert!(!gate.is_open(), "shut for good");
    assert_eq!(st.count_gate_rounds(), 0, "no round of the key");
    // A round through the slots, as once the doubt is over.
    for round in 0..2 {
        let r = round as f32;
        let want = [30.0 + 2.0 * r; 16];
        for a in slot_round(&mut st, &k, &seg, [10.0 + r, 20.0 + r]) {
            assert_eq!(floats(&a.expect("a value")), want, "by message");
        }
        assert!(!gate.is_open(), "round {round}: the gate stays closed");
        unsafe { seg.slot_mut(2) }.fill(0xff);
        assert_eq!(value(st.pull_shm(&shm_head(Op::Pull, &seg), 0)), want);
        assert_eq!(floats(&st.snapshot()), want);
    }
    assert_eq!(st.rounds, 3);
}

/// A round at the gate that never filled (a worker of a round of late
/// copies timed out or died before the others came, and keeps its
/// arrival) is summed by nobody: the server, summing that round itself,
/// takes the arrival back and keeps the value in the value slot, and a
/// round through every slot opens the gate again.
#[test]
#[allow(unsafe_code)] // the workers' slots
fn a_round_that_never_filled_at_the_gate_gives_its_arrivals_back() {
    let (k, mut st, seg) = one_arrived();
    let gate = Gate::of(&seg);
    // Worker 0 failed in doubt and pushes by message, closing the gate;
    // worker 1 finds it closed.
    gate.close();
    assert_eq!(gate.arrive(1, false), Arrival::Closed);
    for v in message_round(&mut st, &k, [1.0, 2.0]) {
        assert_eq!(v, [3.0; 16]);
    }
    assert_eq!(gate.arrived(), 0, "taken back");
    assert!(!gate.is_open(), "a round by message does not open it");
    assert!(st.value_slot().is_some(), "the value stays in its slot");
    for a in slot_round(&mut st, &k, &seg, [5.0, 5.0]) {
        assert!(a.expect("an answer").is_empty(), "the value is in its slot");
    }
    assert_eq!(floats(unsafe { seg.slot(2) }), [10.0; 16]);
    assert!(gate.is_open(), "open again");
}
