//! Rounds the workers sum in shared memory (`gate/mod.rs`): once a server has
//! summed a round of a part with nothing to add (no optimizer), it opens
//! the part's gate and the workers sum the next rounds themselves (a large
//! part's in chunks, the waiters beside the summer).
//! They must give the server's bits, hand rounds back to the server when
//! an optimizer comes, finish a push nobody waits for, fail (and take
//! back) a push whose round never fills, and refuse to mix a push by
//! message into a round the others sum. Stores in one process over the shm
//! van.

#![allow(clippy::cloned_ref_to_slice_refs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pskv_engine::{Context, Engine};
use pskv_kvstore::{DType, Key, KvStore, Optimizer, Options, Tensor};
use pskv_transport::status::RoundLog;
use pskv_transport::VanKind;

mod common;
use common::*;

/// A one-part key, one of three parts (4 KiB parts), and an f64 key.
fn keys() -> Vec<(Key, usize, DType)> {
    vec![
        (Key::Int(0), 10, DType::F32),
        (Key::Int(1), 2500, DType::F32),
        (Key::from("b"), 300, DType::F64),
    ]
}

fn opts(timeout: Duration) -> Options {
    Options {
        bigarray_bound: 1000,
        partition_bytes: 4096,
        timeout,
        ..Options::default()
    }
}

fn tensor_of(e: &Engine, v: &[f32], dtype: DType) -> Tensor {
    match dtype {
        DType::F64 => {
            let v: Vec<f64> = v.iter().map(|x| *x as f64 * 1.000_000_1).collect();
            tensor(e, &v)
        }
        _ => tensor(e, v),
    }
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    match t.dtype() {
        DType::F64 => t
            .to_vec::<f64>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        _ => t
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    }
}

/// `steps` rounds of every key (push then pull, push-pull, in turn): the
/// values each pull brought, as bytes.
fn rounds(kv: &KvStore, e: &Engine, from: u64, steps: u64) -> Vec<Vec<u8>> {
    rounds_of(&keys(), kv, e, from, steps)
}

/// `rounds` of the keys `keys`.
fn rounds_of(
    keys: &[(Key, usize, DType)],
    kv: &KvStore,
    e: &Engine,
    from: u64,
    steps: u64,
) -> Vec<Vec<u8>> {
    let rank = kv.rank() as u64;
    let mut seen = Vec::new();
    for step in from..from + steps {
        for (i, (k, n, dt)) in keys.iter().enumerate() {
            let g = tensor_of(e, &values(rank * 1000 + step * 10 + i as u64, *n), *dt);
            let out = Tensor::zeros(e, &[*n], *dt, Context::Cpu).unwrap();
            if step % 2 == 0 {
                kv.push(k, &[g], -(i as i32)).unwrap();
                kv.pull(k, &[out.clone()], -(i as i32)).unwrap();
            } else {
                kv.pushpull(k, &[g], &[out.clone()], 0).unwrap();
            }
            seen.push(bytes_of(&out));
        }
    }
    seen
}

/// A cluster of one server and `workers` workers over shm, its server's
/// `set_worker_sum_bytes` given (None: its default).
fn summing(workers: u32, sum_bytes: Option<usize>) -> Cluster {
    let mut c = cluster_van(1, workers, VanKind::Shm);
    c.worker_sum_bytes = sum_bytes;
    c
}

fn init(kv: &KvStore, e: &Engine) {
    init_of(&keys(), kv, e)
}

fn init_of(keys: &[(Key, usize, DType)], kv: &KvStore, e: &Engine) {
    let inits: Vec<(Key, Tensor)> = keys
        .iter()
        .enumerate()
        .map(|(i, (k, n, dt))| (k.clone(), tensor_of(e, &values(77 + i as u64, *n), *dt)))
        .collect();
    kv.init_many(&inits).unwrap();
}

/// Three workers: the rounds they sum give the bits of the rounds the
/// server sums (rank order, the same kernel), with parts summed by the
/// workers in the first run and none in the second.
#[test]
fn rounds_the_workers_sum_give_the_servers_bits() {
    let run = |sum_bytes| {
        summing(3, sum_bytes).run("dist_sync", opts(T), |kv, e| {
            init(kv, e);
            let seen = rounds(kv, e, 0, 6);
            (seen, kv.worker_summed_parts(), kv.shared_memory_parts())
        })
    };
    let summed = run(None);
    let served = run(Some(0));
    for (rank, ((a, wa, sa), (b, wb, _))) in summed.iter().zip(&served).enumerate() {
        assert_eq!(*sa, 5, "worker {rank}: every part in shared memory");
        // The first round of every part goes to the server (which then
        // opens the gate): 5 parts, 5 rounds after it.
        assert_eq!(*wa, 25, "worker {rank} summed parts");
        assert_eq!(*wb, 0, "worker {rank}: no gate opens at 0 bytes");
        assert_eq!(
            a, b,
            "worker {rank}: the workers' sums differ from the server's"
        );
    }
    assert_eq!(summed[0].0, summed[2].0);
    // And the sums are the plain rank-order sums of the pushes.
    let v = |rank: u64, step: u64| values(rank * 1000 + step * 10, 10);
    let want: Vec<u8> = (0..10)
        .flat_map(|j| ((v(0, 5)[j] + v(1, 5)[j]) + v(2, 5)[j]).to_le_bytes())
        .collect();
    assert_eq!(summed[0].0[5 * 3], want);
}

/// The one server's round log, once its thread has put it in `logs` (it
/// does so after `Server::start` returns, which the workers need not wait
/// for).
fn server_log(logs: &Arc<std::sync::Mutex<Vec<Arc<RoundLog>>>>) -> Arc<RoundLog> {
    let deadline = Instant::now() + T;
    loop {
        if let Some(l) = logs.lock().unwrap().first() {
            return l.clone();
        }
        assert!(Instant::now() < deadline, "the server never started");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The rounds the workers sum at the gates reach no op on their server,
/// yet its round log (what `pskv status` shows of it) counts them, at the
/// look: every part's six rounds, the first summed by the server, the
/// others at the gate.
#[test]
fn the_servers_round_log_counts_the_rounds_summed_at_its_gates() {
    let c = summing(3, None);
    let logs = c.server_rounds.clone();
    let out = c.run("dist_sync", opts(T), move |kv, e| {
        init(kv, e);
        rounds(kv, e, 0, 6);
        kv.barrier().unwrap();
        (server_log(&logs).latest().0, kv.worker_summed_parts())
    });
    for (rank, (server_round, summed)) in out.iter().enumerate() {
        assert_eq!(*summed, 25, "worker {rank} summed parts");
        assert_eq!(*server_round, 6, "worker {rank}: the server's round");
    }
}

/// Gate rounds that a key's next op on the server counts (here, once an
/// optimizer closed the gates) reach its round log too, with the rounds
/// the server then sums itself: 4 + 2. (A heartbeat's look in between
/// would count them first; the total is the same.)
#[test]
fn gate_rounds_a_keys_next_op_counts_reach_the_round_log() {
    let c = summing(2, None);
    let logs = c.server_rounds.clone();
    let out = c.run("dist_sync", opts(T), move |kv, e| {
        init(kv, e);
        rounds(kv, e, 0, 4);
        let summed = kv.worker_summed_parts();
        kv.set_optimizer(Optimizer::sgd(0.1)).unwrap();
        rounds(kv, e, 4, 2);
        kv.barrier().unwrap();
        (server_log(&logs).latest().0, summed)
    });
    for (rank, (server_round, summed)) in out.iter().enumerate() {
        assert_eq!(*summed, 15, "worker {rank}: rounds 2 to 4 of 5 parts");
        assert_eq!(*server_round, 6, "worker {rank}: the server's round");
    }
}

/// Keys of parts large enough to be shared in chunks: an f32 key of two
/// parts (of 1 MiB parts), an f64 key of one.
fn wide_keys() -> Vec<(Key, usize, DType)> {
    vec![
        (Key::Int(7), 300_000, DType::F32),
        (Key::from("wide"), 70_000, DType::F64),
    ]
}

/// Per worker: the values its pulls brought, the parts it summed at a
/// gate and the chunks it helped sum.
type Seen = Vec<(Vec<Vec<u8>>, u64, u64)>;

/// `steps` rounds of `keys`, cut into parts of at most `partition` bytes,
/// with `workers` workers over shm, twice: summed at the gates (the
/// servers' default), then by the server alone.
fn gated_and_served(
    workers: u32,
    keys: &[(Key, usize, DType)],
    partition: usize,
    steps: u64,
) -> (Seen, Seen) {
    let opts = Options {
        partition_bytes: partition,
        ..opts(T)
    };
    let run = |sum_bytes| {
        let keys = keys.to_vec();
        summing(workers, sum_bytes).run("dist_sync", opts.clone(), move |kv, e| {
            init_of(&keys, kv, e);
            let seen = rounds_of(&keys, kv, e, 0, steps);
            (seen, kv.worker_summed_parts(), kv.worker_helped_chunks())
        })
    };
    (run(None), run(Some(0)))
}

/// Parts large enough to be shared in chunks (`gate/chunks.rs`), and
/// below 256 KiB (larger ones may go to rounds of late copies): three
/// workers, the summer and the waiters each summing chunks, give the
/// server's bits too.
#[test]
fn rounds_shared_in_chunks_give_the_servers_bits() {
    let (summed, served) = gated_and_served(3, &wide_keys(), 200 << 10, 8);
    let helped: u64 = summed.iter().map(|s| s.2).sum();
    // 63 rounds of parts of about 200 KB, in 32 KiB chunks: some summed
    // by the waiters.
    assert!(helped > 0, "no worker helped a summer");
    for (rank, ((a, wa, _), (b, _, _))) in summed.iter().zip(&served).enumerate() {
        // 1.2 MB in six parts, 560 KB in three: 9 parts, 7 rounds after
        // the first.
        assert_eq!(*wa, 63, "worker {rank} summed parts");
        assert!(
            a == b,
            "worker {rank}: the workers' sums differ from the server's"
        );
    }
}

/// Parts of 1 MiB and more (of 2 MiB parts: an f32 key of two, the second
/// starting past the key's first byte, an f64 key of one): their rounds'
/// workers arrive before they copy (`gate/late.rs`), each summing its
/// share of the chunks from its own input into the value slot and its
/// output and copying the others' out; pushes and push-pulls give the
/// server's bits, with three workers.
#[test]
fn rounds_of_late_copies_give_the_servers_bits() {
    let keys = [
        (Key::Int(8), 700_000, DType::F32),
        (Key::from("big"), 200_000, DType::F64),
    ];
    let (summed, served) = gated_and_served(3, &keys, 2 << 20, 6);
    for (rank, ((a, wa, _), (b, _, _))) in summed.iter().zip(&served).enumerate() {
        // 3 parts, 5 rounds after the first.
        assert_eq!(*wa, 15, "worker {rank} summed parts");
        assert!(
            a == b,
            "worker {rank}: the workers' sums differ from the server's"
        );
    }
}

/// Parts of 256 KiB to 1 MiB: a round after one whose workers arrived
/// close together is one of late copies, after one whose last worker came
/// far behind a shared one (`LATE` in `gate/mod.rs`). Worker 1 comes 3 ms
/// late every third step, so the kinds change from round to round; every
/// round is summed at the gate, and the bits are the server's.
#[test]
fn rounds_of_either_kind_as_the_workers_arrive_give_the_servers_bits() {
    let keys = vec![
        (Key::Int(5), 150_000, DType::F32),
        (Key::from("mid"), 40_000, DType::F64),
    ];
    let opts = Options {
        partition_bytes: 1 << 20,
        ..opts(T)
    };
    let run = |sum_bytes| {
        let keys = keys.clone();
        // Both workers start each step together (a loaded machine can
        // otherwise keep every arrival far apart, and no round of late
        // copies comes).
        let together = Arc::new(std::sync::Barrier::new(2));
        summing(2, sum_bytes).run("dist_sync", opts.clone(), move |kv, e| {
            init_of(&keys, kv, e);
            let mut seen = Vec::new();
            for step in 0..12 {
                together.wait();
                if kv.rank() == 1 && step % 3 == 0 {
                    std::thread::sleep(Duration::from_millis(3));
                }
                seen.extend(rounds_of(&keys, kv, e, step, 1));
            }
            (seen, kv.worker_summed_parts(), kv.worker_late_parts())
        })
    };
    // Up to five jobs, until one has rounds of late copies on both workers:
    // on a loaded machine (the other tests of this binary beside it) a job
    // can keep every arrival far apart, one in five or so here, whatever
    // the barrier does. Every job's bits and counts are checked.
    let mut late_seen = false;
    for _ in 0..5 {
        let (summed, served) = (run(None), run(Some(0)));
        let mut late_here = true;
        for (rank, ((a, wa, late), (b, _, _))) in summed.iter().zip(&served).enumerate() {
            // 600 KB and 320 KB, a part each: 11 rounds after the first.
            assert_eq!(*wa, 22, "worker {rank} summed parts");
            // The gate's first round and those after worker 1's 3 ms
            // (steps 4, 7 and 10) are shared ones: at most 7 of each
            // part's 11 late.
            assert!(*late <= 14, "worker {rank}: {late} of late copies");
            late_here &= *late >= 1;
            assert!(
                a == b,
                "worker {rank}: the workers' sums differ from the server's"
            );
        }
        if late_here {
            late_seen = true;
            break;
        }
    }
    assert!(late_seen, "no round of late copies in five jobs");
}

/// Nine workers, more than a round of late copies takes (`gate/late.rs`):
/// their 1 MiB parts are shared in chunks, and each thread that sums a
/// chunk of a push-pull copies it into its own output at once
/// (`worker_sum::ChunkOut`), the rest coming out of the value slot at the
/// round's end. Pushes and push-pulls give the server's bits.
#[test]
fn nine_workers_sharing_chunks_give_the_servers_bits() {
    // Parts of exactly 1 MiB (the least `ChunkOut` takes): two of an f32
    // key, one of an f64 key.
    let keys = [
        (Key::Int(9), 1 << 19, DType::F32),
        (Key::from("nine"), 1 << 17, DType::F64),
    ];
    let (summed, served) = gated_and_served(9, &keys, 1 << 20, 4);
    let helped: u64 = summed.iter().map(|s| s.2).sum();
    assert!(helped > 0, "no worker helped a summer");
    for (rank, ((a, wa, _), (b, wb, _))) in summed.iter().zip(&served).enumerate() {
        // 3 parts, 3 rounds after the first.
        assert_eq!(*wa, 9, "worker {rank} summed parts");
        assert_eq!(*wb, 0, "worker {rank}: no gate opens at 0 bytes");
        assert!(
            a == b,
            "worker {rank}: the workers' sums differ from the server's"
        );
    }
}

/// Rounds summed by the workers, then `set_optimizer`: the server runs the
/// optimizer on every later round (its gates closed), as it does in a job
/// whose server summed every round.
#[test]
fn an_optimizer_set_later_takes_the_rounds_back_to_the_server() {
    let run = |sum_bytes| {
        summing(2, sum_bytes).run("dist_sync", opts(T), |kv, e| {
            init(kv, e);
            let mut seen = rounds(kv, e, 0, 3);
            let summed = kv.worker_summed_parts();
            kv.set_optimizer(Optimizer::sgd(0.1).momentum(0.9)).unwrap();
            seen.extend(rounds(kv, e, 3, 4));
            (seen, summed, kv.worker_summed_parts())
        })
    };
    let summed = run(None);
    let served = run(Some(0));
    for (rank, ((a, before, after), (b, _, none))) in summed.iter().zip(&served).enumerate() {
        assert_eq!(*before, 10, "worker {rank}: rounds 2 and 3 of 5 parts");
        assert_eq!(
            after, before,
            "worker {rank}: no gate open with an optimizer"
        );
        assert_eq!(*none, 0);
        assert_eq!(a, b, "worker {rank}");
    }
}

/// A push-pull that nobody waits for completes all the same: the store's
/// watcher finishes it once the last worker summed the round. (The
/// stores share this process, and a waiting thread polls every store's
/// gates: the other worker waits for nothing until this one saw its op
/// done.)
#[test]
fn a_push_nobody_waits_for_is_finished_by_the_watcher() {
    let seen = Arc::new(AtomicBool::new(false));
    let got = cluster_van(1, 2, VanKind::Shm).run("dist_sync", opts(T), move |kv, e| {
        init(kv, e);
        rounds(kv, e, 0, 1);
        kv.barrier().unwrap();
        let out = Tensor::zeros(e, &[10], DType::F32, Context::Cpu).unwrap();
        let g = tensor(e, &[kv.rank() as f32 + 1.0; 10]);
        if kv.rank() == 0 {
            let v = out.var().version();
            kv.pushpull(Key::Int(0), &[g], &[out.clone()], 0).unwrap();
            // No wait: nothing here polls the gate.
            let t = Instant::now();
            while out.var().version() == v && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_ne!(out.var().version(), v, "the push-pull was not finished");
            seen.store(true, Ordering::Release);
        } else {
            // The other comes later, sums, and waits for nothing.
            std::thread::sleep(Duration::from_millis(200));
            kv.pushpull(Key::Int(0), &[g], &[out.clone()], 0).unwrap();
            let t = Instant::now();
            while !seen.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(15) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        (out.to_vec::<f32>().unwrap(), kv.worker_summed_parts())
    });
    for (v, summed) in got {
        assert_eq!(v, vec![3.0; 10]);
        assert_eq!(summed, 1, "the first round of each part is the server's");
    }
}

/// A worker whose round the other never joins fails within the store's
/// timeout, with an error saying so, and its push is taken back: its push
/// sent again then completes the round with the other's, each counted
/// once.
#[test]
fn a_round_that_never_fills_times_out_and_its_push_is_taken_back() {
    let timeout = Duration::from_millis(1500);
    let first_failed = Arc::new(AtomicBool::new(false));
    let got = cluster_van(1, 2, VanKind::Shm).run("dist_sync", opts(timeout), move |kv, e| {
        init(kv, e);
        rounds(kv, e, 0, 1);
        kv.barrier().unwrap();
        first_push_fails_then_both_push(kv, e, &Key::Int(0), 10, timeout, &first_failed)
    });
    let (err, took) = got[0].1.clone().expect("worker 0's first push failed");
    assert!(
        err.contains("did not end within") && err.contains("taken back"),
        "{err}"
    );
    assert!(took < timeout * 4, "failed after {took:?}");
    for (v, _) in &got {
        assert_eq!(*v, vec![3.0; 10], "the first push was not taken back");
    }
}

/// A push that goes to the server by message (here: from another tensor
/// than the key's push buffer) closes the gate, and the round is the
/// server's: when it comes first, and when the other worker has already
/// arrived at the gate (that one hands its push over to the server). The
/// sums are whole either way, and the gate opens again after a round of
/// pushes through the slots.
#[test]
fn a_push_by_message_closes_the_gate_and_the_round_is_the_servers() {
    let got = cluster_van(1, 2, VanKind::Shm).run("dist_sync", opts(T), move |kv, e| {
        init(kv, e);
        rounds(kv, e, 0, 1);
        let key = Key::Int(0);
        let buf = kv.push_buffer(key.clone()).unwrap();
        let out = Tensor::zeros(e, &[10], DType::F32, Context::Cpu).unwrap();
        let rank = kv.rank();
        let mut sums = Vec::new();
        let mut summed = Vec::new();
        // 0: worker 0 pushes by message first. 1: both from their buffers
        // (to the server, which opens the gate again). 2: both at the
        // gate. 3: worker 1 arrives at the gate first, then worker 0 pushes
        // by message. 4: both from their buffers (the server's). 5: at the
        // gate.
        for step in 0..6 {
            kv.barrier().unwrap();
            buf.copy_from_slice(&[(rank + 1) as f32 * 10.0; 10])
                .unwrap();
            let by_message = rank == 0 && (step == 0 || step == 3);
            let from = if by_message {
                tensor(e, &[7.0f32; 10])
            } else {
                buf.clone()
            };
            let late = match step {
                0 => rank == 1,
                3 => rank == 0,
                _ => false,
            };
            if late {
                std::thread::sleep(Duration::from_millis(300));
            }
            kv.pushpull(&key, &[from], &[out.clone()], 0).unwrap();
            sums.push(out.to_vec::<f32>().unwrap()[0]);
            summed.push(kv.worker_summed_parts());
        }
        (sums, summed)
    });
    for (rank, (sums, summed)) in got.iter().enumerate() {
        assert_eq!(
            sums,
            &vec![27.0, 30.0, 30.0, 27.0, 30.0, 30.0],
            "worker {rank}"
        );
        assert_eq!(
            summed,
            &vec![0, 0, 1, 1, 1, 2],
            "worker {rank}: rounds at the gate"
        );
    }
}

/// A round of late copies (a part of 1.2 MB) gathering when a push by
/// message closes the gate: the worker that arrived (from its push buffer,
/// its own share claimed, the other's supplied) hands its push over whole,
/// and the server's sum is right; the gate opens again after a round of
/// pushes through the slots, and the rounds after are summed there.
#[test]
fn a_round_of_late_copies_gathering_is_handed_over_whole() {
    const N: usize = 300_000;
    let keys = vec![(Key::Int(9), N, DType::F32)];
    let opts = Options {
        partition_bytes: 2 << 20,
        ..opts(T)
    };
    let got = cluster_van(1, 2, VanKind::Shm).run("dist_sync", opts, move |kv, e| {
        init_of(&keys, kv, e);
        let key = Key::Int(9);
        let buf = kv.push_buffer(key.clone()).unwrap();
        let out = Tensor::zeros(e, &[N], DType::F32, Context::Cpu).unwrap();
        let rank = kv.rank();
        let mut sums = Vec::new();
        let mut summed = Vec::new();
        // 0: from the buffers, to the server (it opens the gate). 1: at the
        // gate. 2: worker 1 arrives at the gate first, then worker 0 pushes
        // by message. 3: the server's again. 4: at the gate.
        for step in 0..5 {
            kv.barrier().unwrap();
            buf.copy_from_slice(&vec![(rank + 1) as f32 * 10.0; N])
                .unwrap();
            let from = if rank == 0 && step == 2 {
                std::thread::sleep(Duration::from_millis(300));
                tensor(e, &vec![7.0f32; N])
            } else {
                buf.clone()
            };
            kv.pushpull(&key, &[from], &[out.clone()], 0).unwrap();
            let v = out.to_vec::<f32>().unwrap();
            assert!(
                v.iter().all(|x| *x == v[0]),
                "worker {rank} step {step}: one value"
            );
            sums.push(v[0]);
            summed.push(kv.worker_summed_parts());
        }
        (sums, summed)
    });
    for (rank, (sums, summed)) in got.iter().enumerate() {
        assert_eq!(sums, &vec![30.0, 30.0, 27.0, 30.0, 30.0], "worker {rank}");
        assert_eq!(
            summed,
            &vec![0, 1, 1, 1, 2],
            "worker {rank}: rounds at the gate"
        );
    }
}

/// A worker whose round of late copies (a part of 1.2 MB) the other never
/// joins fails within twice the store's timeout, in doubt (it supplied
/// chunks: it does not take its push back, L2 of `gate/late.rs`); its push
/// sent again goes to the server by message, closing the gate, and
/// completes the round with the other's. The server, finding the arrival
/// still counted, takes it back (nobody sums a round that never filled:
/// `clear_arrivals`) and opens the gate again: the next rounds, pushes,
/// push-pulls and pulls are right, and summed at the gate.
#[test]
fn a_round_of_late_copies_that_never_fills_fails_in_doubt() {
    const N: usize = 300_000;
    let timeout = Duration::from_millis(1500);
    let keys = vec![(Key::Int(9), N, DType::F32)];
    let opts = Options {
        partition_bytes: 2 << 20,
        ..opts(timeout)
    };
    let first_failed = Arc::new(AtomicBool::new(false));
    let got = cluster_van(1, 2, VanKind::Shm).run("dist_sync", opts, move |kv, e| {
        init_of(&keys, kv, e);
        let key = Key::Int(9);
        let out = Tensor::zeros(e, &[N], DType::F32, Context::Cpu).unwrap();
        // A round through the server, which opens the gate.
        kv.pushpull(&key, &[tensor(e, &vec![1.0f32; N])], &[out.clone()], 0)
            .unwrap();
        out.to_vec::<f32>().unwrap();
        kv.barrier().unwrap();
        let got = first_push_fails_then_both_push(kv, e, &key, N, timeout, &first_failed);
        let summed = kv.worker_summed_parts();
        let rank = kv.rank() as f32;
        for step in 0..3 {
            let v = vec![rank + 1.0 + step as f32; N];
            kv.pushpull(&key, &[tensor(e, &v)], &[out.clone()], 0)
                .unwrap();
            let want = 3.0 + 2.0 * step as f32;
            assert!(out.to_vec::<f32>().unwrap().iter().all(|x| *x == want));
            kv.push(&key, &[tensor(e, &v)], 0).unwrap();
            kv.pull(&key, &[out.clone()], 0).unwrap();
            assert!(out.to_vec::<f32>().unwrap().iter().all(|x| *x == want));
        }
        assert!(kv.worker_summed_parts() > summed, "the gate opens again");
        got
    });
    let (err, took) = got[0].1.clone().expect("worker 0's first push failed");
    assert!(
        err.contains("did not end within") && err.contains("in doubt"),
        "{err}"
    );
    assert!(took < timeout * 4, "failed after {took:?}");
    for (v, _) in &got {
        assert!(
            v.iter().all(|x| *x == 3.0),
            "not the sum of the second pushes: {}",
            v[0]
        );
    }
}

/// Worker 0 pushes to `key` (of `n` f32) alone, which fails (the other
/// worker pushes only once `first_failed` says so), then pushes again
/// (once more if the first try only reports the failure); worker 1 then
/// pushes too. Each worker's output, and worker 0's first failure with how
/// long it took.
fn first_push_fails_then_both_push(
    kv: &KvStore,
    e: &Engine,
    key: &Key,
    n: usize,
    timeout: Duration,
    first_failed: &AtomicBool,
) -> (Vec<f32>, Option<(String, Duration)>) {
    let out = Tensor::zeros(e, &[n], DType::F32, Context::Cpu).unwrap();
    let mut failed = None;
    if kv.rank() == 0 {
        let t = Instant::now();
        kv.pushpull(key, &[tensor(e, &vec![100.0f32; n])], &[out.clone()], 0)
            .unwrap();
        let err = out.to_vec::<f32>().unwrap_err().to_string();
        failed = Some((err, t.elapsed()));
        first_failed.store(true, Ordering::Release);
        // The failure is the key's until told once; then the push again.
        let again = tensor(e, &vec![1.0f32; n]);
        if kv
            .pushpull(key, &[again.clone()], &[out.clone()], 0)
            .is_err()
        {
            kv.pushpull(key, &[again], &[out.clone()], 0).unwrap();
        }
    } else {
        // Only once the other's first push failed (its retry then waits
        // for this one).
        let t = Instant::now();
        while !first_failed.load(Ordering::Acquire) && t.elapsed() < timeout * 20 {
            std::thread::sleep(Duration::from_millis(5));
        }
        kv.pushpull(key, &[tensor(e, &vec![2.0f32; n])], &[out.clone()], 0)
            .unwrap();
    }
    (out.to_vec::<f32>().unwrap(), failed)
}
