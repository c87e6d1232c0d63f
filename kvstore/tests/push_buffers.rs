//! Push buffers (`KvStore::push_buffer`): tensors whose bytes are the
//! worker's slots of its keys' shared segments. Their rounds must give the
//! bits that ordinary tensors give; nothing else may write their slots
//! (L1); a write while a push from them is in doubt must not reach the
//! slot (L3). Stores in one process over the shm van (and TCP, where a
//! push buffer is ordinary memory).

#![allow(clippy::cloned_ref_to_slice_refs)]

use std::time::Duration;

use pskv_engine::{Context, Engine};
use pskv_kvstore::{DType, Key, KvStore, Optimizer, Options, Tensor};
use pskv_transport::VanKind;

mod common;
use common::*;

/// A small key (one part), a key of four page-sized parts over two
/// servers (every part lies in its slot), and one of 5,000 elements whose
/// parts start inside pages (none can).
fn keys() -> Vec<(Key, usize)> {
    vec![
        (Key::Int(0), 10),
        (Key::Int(1), 4096),
        (Key::from("fc_weight"), 5000),
    ]
}

fn opts() -> Options {
    Options {
        bigarray_bound: 1000,
        partition_bytes: 4096,
        timeout: Duration::from_secs(20),
        ..Options::default()
    }
}

/// Trains every key for 4 steps (push then pull on even steps, push-pull
/// on odd ones), from push buffers or from fresh tensors, and returns the
/// weights after each step and, per key, whether its push buffer lies in
/// shared memory.
fn train(kv: &KvStore, e: &Engine, buffers: bool) -> (Vec<Vec<f32>>, Vec<bool>) {
    kv.set_optimizer(Optimizer::sgd(0.1).momentum(0.9).wd(1e-3))
        .unwrap();
    let inits: Vec<(Key, Tensor)> = keys()
        .iter()
        .enumerate()
        .map(|(i, (k, n))| (k.clone(), tensor(e, &values(77 + i as u64, *n))))
        .collect();
    kv.init_many(&inits).unwrap();
    let bufs: Vec<Tensor> = keys()
        .iter()
        .map(|(k, _)| kv.push_buffer(k.clone()).unwrap())
        .collect();
    let rank = kv.rank() as u64;
    let mut seen = Vec::new();
    for step in 0..4u64 {
        for (i, (k, n)) in keys().iter().enumerate() {
            let v = values(rank * 1000 + step * 10 + i as u64, *n);
            let g = if buffers {
                bufs[i].copy_from_slice(&v).unwrap();
                bufs[i].clone()
            } else {
                tensor(e, &v)
            };
            let out = Tensor::zeros(e, &[*n], DType::F32, Context::Cpu).unwrap();
            if step % 2 == 0 {
                kv.push(k, &[g], -(i as i32)).unwrap();
                kv.pull(k, &[out.clone()], -(i as i32)).unwrap();
            } else {
                kv.pushpull(k, &[g], &[out.clone()], 0).unwrap();
            }
            seen.push(out.to_vec::<f32>().unwrap());
        }
    }
    let placed = bufs.iter().map(|b| b.in_shared_memory().unwrap()).collect();
    (seen, placed)
}

#[test]
fn rounds_from_push_buffers_match_ordinary_tensors_bit_for_bit() {
    let want =
        cluster_van(2, 2, VanKind::Shm).run("dist_sync", opts(), |kv, e| train(kv, e, false));
    let got = cluster_van(2, 2, VanKind::Shm).run("dist_sync", opts(), |kv, e| train(kv, e, true));
    for (rank, ((g, placed), (w, _))) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            placed,
            &[true, true, false],
            "worker {rank}: which push buffers lie in the slots"
        );
        assert_eq!(g.len(), w.len());
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                a == b,
                "worker {rank}, pull {i}: differs from ordinary tensors"
            );
        }
    }
    // Over TCP a push buffer is ordinary memory, and works the same.
    let tcp = cluster_van(2, 2, VanKind::Tcp).run("dist_sync", opts(), |kv, e| train(kv, e, true));
    for (rank, (g, placed)) in tcp.iter().enumerate() {
        assert_eq!(placed, &[false; 3], "worker {rank} over tcp");
        assert_eq!(g, &want[rank].0, "worker {rank} over tcp");
    }
}

/// L1: while a key's push buffer lives, a push of the key from another
/// tensor goes by message and leaves the buffer's bytes alone; a second
/// buffer of the key is refused until the first is dropped.
#[test]
fn a_push_from_another_tensor_leaves_the_push_buffer_alone() {
    let got = cluster_van(1, 2, VanKind::Shm).run("dist_sync", opts(), |kv, e| {
        let n = 4096;
        kv.init(
            1,
            &Tensor::zeros(e, &[n], DType::F32, Context::Cpu).unwrap(),
        )
        .unwrap();
        let buf = kv.push_buffer(1).unwrap();
        assert!(buf.in_shared_memory().unwrap());
        let again = kv.push_buffer(1).map(|_| ()).unwrap_err().to_string();
        assert!(again.contains("already"), "{again}");
        buf.copy_from_slice(&vec![7.0f32; n]).unwrap();
        let out = Tensor::zeros(e, &[n], DType::F32, Context::Cpu).unwrap();
        let one = Tensor::full(e, &[n], 1.0f32, Context::Cpu).unwrap();
        kv.pushpull(1, &[one], &[out.clone()], 0).unwrap();
        let sum = out.to_vec::<f32>().unwrap();
        let kept = buf.to_vec::<f32>().unwrap();
        // Then from the buffer: its own bytes, not the other tensor's.
        kv.pushpull(1, &[buf.clone()], &[out.clone()], 0).unwrap();
        let from_buf = out.to_vec::<f32>().unwrap();
        drop(buf);
        let remade = kv.push_buffer(1).map(|b| b.in_shared_memory().unwrap());
        (sum, kept, from_buf, remade.unwrap())
    });
    for (rank, (sum, kept, from_buf, remade)) in got.iter().enumerate() {
        assert!(
            sum.iter().all(|x| *x == 2.0),
            "worker {rank}: {:?}",
            &sum[..4]
        );
        assert!(
            kept.iter().all(|x| *x == 7.0),
            "worker {rank}: the buffer was written"
        );
        assert!(
            from_buf.iter().all(|x| *x == 14.0),
            "worker {rank}: {:?}",
            &from_buf[..4]
        );
        assert!(
            remade,
            "worker {rank}: a buffer made again after the first was dropped"
        );
    }
}

/// L3: a push from the buffer that timed out may still be read by its
/// server (the round completes when the other worker pushes): its failure
/// detaches the buffer from the slot (ordinary memory from then on, the
/// same values), so the write after it does not reach the slot, and the
/// key's rounds go on with the values written.
#[test]
fn a_write_after_a_failed_push_from_the_buffer_moves_it_off_the_slot() {
    let opts = Options {
        timeout: Duration::from_secs(1),
        ..opts()
    };
    let n = 1usize << 20; // one 4 MiB part
    let gate = std::sync::Arc::new(std::sync::Barrier::new(2));
    let got = cluster_van(1, 2, VanKind::Shm).run("dist_sync", opts, move |kv, e| {
        kv.init(
            5,
            &Tensor::zeros(e, &[n], DType::F32, Context::Cpu).unwrap(),
        )
        .unwrap();
        let buf = kv.push_buffer(5).unwrap();
        let out = Tensor::zeros(e, &[n], DType::F32, Context::Cpu).unwrap();
        let key = [Key::Int(5)];
        let mut moved = None;
        if kv.rank() == 0 {
            // Worker 1 holds back: this push times out, still pending in
            // the server's round.
            buf.copy_from_slice(&vec![1.0f32; n]).unwrap();
            kv.push(5, &[buf.clone()], 0).unwrap();
            let r = kv.ticket(&key, &[buf.clone()]).unwrap().wait();
            assert!(r.is_err(), "the push should time out");
            moved = Some(!buf.in_shared_memory().unwrap());
            assert_eq!(buf.to_vec::<f32>().unwrap()[n - 1], 1.0);
            buf.copy_from_slice(&vec![2.0f32; n]).unwrap();
        } else {
            buf.copy_from_slice(&vec![3.0f32; n]).unwrap();
        }
        gate.wait();
        // Worker 0's push of the same round again: the round sums 1 + 3
        // (its first push, answered with that value) or 2 + 3.
        kv.pushpull(5, &[buf.clone()], &[out.clone()], 0).unwrap();
        kv.ticket(&key, &[out.clone()]).unwrap().wait().unwrap();
        let first = out.to_vec::<f32>().unwrap();
        // A next round, from the buffer wherever it now lies.
        buf.copy_from_slice(&vec![10.0f32; n]).unwrap();
        kv.pushpull(5, &[buf.clone()], &[out.clone()], 0).unwrap();
        let next = out.to_vec::<f32>().unwrap();
        (moved, first, next)
    });
    assert_eq!(
        got[0].0,
        Some(true),
        "the write went into the slot in doubt"
    );
    for (rank, (_, first, next)) in got.iter().enumerate() {
        let v = first[0];
        assert!(v == 4.0 || v == 5.0, "worker {rank}: {v}");
        assert!(first.iter().all(|x| *x == v), "worker {rank}: a torn round");
        assert_eq!(first[0], got[0].1[0], "the workers saw different rounds");
        assert!(
            next.iter().all(|x| *x == 20.0),
            "worker {rank}: {:?}",
            &next[..4]
        );
    }
}
