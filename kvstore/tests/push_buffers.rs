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

/// What a worker saw: the weights after each step, per key whether its
/// push buffer lies in shared memory, and the parts pushed in place.
type Trained = (Vec<Vec<f32>>, Vec<bool>, u64);

/// Trains every key for 6 steps (push then pull, push-pull into another
/// tensor, push-pull in place, in turn), from push buffers or from fresh
/// tensors.
fn train(kv: &KvStore, e: &Engine, buffers: bool) -> Trained {
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
    for step in 0..6u64 {
        for (i, (k, n)) in keys().iter().enumerate() {
            let v = values(rank * 1000 + step * 10 + i as u64, *n);
            let g = if buffers {
                bufs[i].copy_from_slice(&v).unwrap();
                bufs[i].clone()
            } else {
                tensor(e, &v)
            };
            let out = Tensor::zeros(e, &[*n], DType::F32, Context::Cpu).unwrap();
            match step % 3 {
                0 => {
                    kv.push(k, &[g], -(i as i32)).unwrap();
                    kv.pull(k, &[out.clone()], -(i as i32)).unwrap();
                }
                1 => kv.pushpull(k, &[g], &[out.clone()], 0).unwrap(),
                _ => {
                    kv.pushpull(k, &[g.clone()], &[g.clone()], 0).unwrap();
                    g.copy_to(&out).unwrap();
                }
            }
            seen.push(out.to_vec::<f32>().unwrap());
        }
    }
    let placed = bufs.iter().map(|b| b.in_shared_memory().unwrap()).collect();
    (seen, placed, kv.pushed_in_place())
}

#[test]
fn rounds_from_push_buffers_match_ordinary_tensors_bit_for_bit() {
    let want =
        cluster_van(2, 2, VanKind::Shm).run("dist_sync", opts(), |kv, e| train(kv, e, false));
    let got = cluster_van(2, 2, VanKind::Shm).run("dist_sync", opts(), |kv, e| train(kv, e, true));
    for (rank, ((g, placed, in_place), (w, _, none))) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            placed,
            &[true, true, false],
            "worker {rank}: which push buffers lie in the slots"
        );
        // Per step, key 0's part and key 1's parts held by this worker's
        // co-located servers (every part here): 1 + 4 parts, 6 steps.
        assert_eq!(*in_place, 30, "worker {rank}: parts pushed in place");
        assert_eq!(*none, 0, "worker {rank}: ordinary tensors");
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
    for (rank, (g, placed, in_place)) in tcp.iter().enumerate() {
        assert_eq!(placed, &[false; 3], "worker {rank} over tcp");
        assert_eq!(*in_place, 0, "worker {rank} over tcp");
        assert_eq!(g, &want[rank].0, "worker {rank} over tcp");
    }
}

/// L1: while a key's push buffer lives, a push of the key from another
/// tensor goes by message and leaves the buffer's bytes alone; a second
/// buffer of the key is refused until the first is dropped; a view of the
/// buffer's memory pushes in place as the buffer does.
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
        assert_eq!(kv.pushed_in_place(), 0, "another tensor's push");
        // Then from the buffer: its own bytes, not the other tensor's (its
        // 4 parts of 4 KiB in place).
        kv.pushpull(1, &[buf.clone()], &[out.clone()], 0).unwrap();
        let from_buf = out.to_vec::<f32>().unwrap();
        assert_eq!(kv.pushed_in_place(), 4);
        drop(buf);
        // Made again, and used through a view of its memory (as the C ABI
        // does): the view's pushes are in place too.
        let (remade, addr) = kv.push_buffer_at(1).unwrap();
        assert!(remade.in_shared_memory().unwrap());
        // SAFETY: the push buffer's memory, alive while `remade` is; no
        // other access to it meanwhile.
        let (view, _home) = unsafe { Tensor::from_host_ptr(e, &[n], DType::F32, addr) }.unwrap();
        view.copy_from_slice(&vec![5.0f32; n]).unwrap();
        kv.pushpull(1, &[view], &[out.clone()], 0).unwrap();
        let from_view = out.to_vec::<f32>().unwrap();
        assert_eq!(kv.pushed_in_place(), 8, "a view of the buffer");
        (sum, kept, from_buf, from_view)
    });
    for (rank, (sum, kept, from_buf, from_view)) in got.iter().enumerate() {
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
            from_view.iter().all(|x| *x == 10.0),
            "worker {rank}: {:?}",
            &from_view[..4]
        );
    }
}

/// A push buffer that is also the op's output (an in-place push-pull, as
/// a training step makes) is its caller's alone once the op is done:
/// dropped then, the key's next push buffer is made at once (the store
/// let go of the output before the op completed).
#[test]
fn an_in_place_push_pull_leaves_the_buffer_to_its_caller() {
    let got = cluster_van(1, 1, VanKind::Shm).run("dist_sync", opts(), |kv, e| {
        let n = 2048; // two parts
        kv.init(
            2,
            &Tensor::zeros(e, &[n], DType::F32, Context::Cpu).unwrap(),
        )
        .unwrap();
        let mut refused = 0;
        for round in 1..=200 {
            let t0 = std::time::Instant::now();
            let buf = loop {
                match kv.push_buffer(2) {
                    Ok(b) => break b,
                    Err(e) if t0.elapsed() < Duration::from_secs(5) => {
                        assert!(e.to_string().contains("already"), "{e}");
                        refused += 1;
                        std::thread::yield_now();
                    }
                    Err(e) => panic!("round {round}: {e}"),
                }
            };
            assert!(buf.in_shared_memory().unwrap(), "round {round}");
            buf.copy_from_slice(&vec![round as f32; n]).unwrap();
            kv.pushpull(2, &[buf.clone()], &[buf.clone()], 0).unwrap();
            // One worker: the round's value is its push.
            assert_eq!(buf.to_vec::<f32>().unwrap(), vec![round as f32; n]);
            drop(buf);
        }
        refused
    });
    assert_eq!(
        got,
        vec![0],
        "times a push buffer was refused after its op was done"
    );
}

/// L3: a push from the buffer that timed out may still be read by its
/// server: worker 1's push completes that round afterwards, from worker
/// 0's slot. The failure detaches worker 0's buffer from the slot, so its
/// write after the failure (2), made through the buffer's address as the C
/// ABI and Python make theirs, is not summed: the round is 1 + 3. Worker 0
/// then sends the round again (by message: the part is in doubt) and is
/// answered with that round's value. Its next round is an in-place
/// push-pull from the detached buffer, whose values written through the
/// address must be pushed (the landing replaces the buffer with a copy).
#[test]
fn a_failed_push_from_the_buffer_leaves_its_slot_to_the_server() {
    let opts = Options {
        timeout: Duration::from_secs(1),
        partition_bytes: 4 << 20,
        ..opts()
    };
    let n = 1usize << 20; // one 4 MiB part
    let gates = std::sync::Arc::new([std::sync::Barrier::new(2), std::sync::Barrier::new(2)]);
    let got = cluster_van(1, 2, VanKind::Shm).run("dist_sync", opts, move |kv, e| {
        kv.init(
            5,
            &Tensor::zeros(e, &[n], DType::F32, Context::Cpu).unwrap(),
        )
        .unwrap();
        let (buf, addr) = kv.push_buffer_at(5).unwrap();
        assert!(buf.in_shared_memory().unwrap());
        // SAFETY: the buffer's memory, alive while `buf` is; written only
        // between the requests that use it.
        let view = || {
            unsafe { Tensor::from_host_ptr(e, &[n], DType::F32, addr) }
                .unwrap()
                .0
        };
        // A write through the address, as a C or Python caller makes it:
        // done when the call returns (a view's `copy_from_slice` would be
        // an op on the view's own var, which nothing orders before the
        // key's next push from the buffer).
        // SAFETY: as for `view`.
        let write = |v: f32| unsafe { std::slice::from_raw_parts_mut(addr as *mut f32, n) }.fill(v);
        let key = [Key::Int(5)];
        let out = Tensor::zeros(e, &[n], DType::F32, Context::Cpu).unwrap();
        let mut detached = None;
        if kv.rank() == 0 {
            // Worker 1 holds back: this push times out, still pending in
            // the server's round.
            write(1.0);
            kv.push(5, &[buf.clone()], 0).unwrap();
            let r = kv.ticket(&key, &[buf.clone()]).unwrap().wait();
            assert!(r.is_err(), "the push should time out");
            detached = Some(!buf.in_shared_memory().unwrap());
            write(2.0);
            gates[0].wait();
            gates[1].wait();
            kv.pushpull(5, &[view()], &[out.clone()], 0).unwrap();
        } else {
            buf.copy_from_slice(&vec![3.0f32; n]).unwrap();
            gates[0].wait();
            kv.pushpull(5, &[buf.clone()], &[out.clone()], 0).unwrap();
            out.wait_to_read().unwrap();
            gates[1].wait();
        }
        let first = out.to_vec::<f32>().unwrap();
        // The next round, in place from the buffer (worker 0's written
        // through its address).
        if kv.rank() == 0 {
            write(10.0);
        } else {
            buf.copy_from_slice(&vec![10.0f32; n]).unwrap();
        }
        kv.pushpull(5, &[buf.clone()], &[buf.clone()], 0).unwrap();
        let next = buf.to_vec::<f32>().unwrap();
        (detached, first, next)
    });
    assert_eq!(
        got[0].0,
        Some(true),
        "the failed push left the buffer in the slot"
    );
    for (rank, (_, first, next)) in got.iter().enumerate() {
        assert!(
            first.iter().all(|x| *x == 4.0),
            "worker {rank}: the round summed {:?} (4: 1 + 3; 5: a write after the failure reached the slot)",
            &first[..2]
        );
        assert!(
            next.iter().all(|x| *x == 20.0),
            "worker {rank}: {:?} (10: an in-place push-pull pushed zeroes)",
            &next[..2]
        );
    }
}
