//! Distributed kvstores in one process: a scheduler, servers and workers on
//! 127.0.0.1, each with its own engine and sockets. The results are
//! compared with a local kvstore fed the same gradients, bit for bit.

#![allow(clippy::cloned_ref_to_slice_refs, clippy::needless_range_loop)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use half::f16;
use pskv_engine::{Context, Engine, OpSpec};
use pskv_gpu::cpu::CpuKernels;
use pskv_gpu::Kernels;
use pskv_kvstore::{
    Compression, DType, GradRef, Key, KvStore, LrScheduler, Optimizer, Options, Tensor, WeightMut,
};
use pskv_transport::{KvWorker, Postoffice, RequestOptions, Role, VanKind};

mod common;
use common::*;

/// Small keys, a big key split over the servers into 4 KiB parts, a
/// string key.
fn keys() -> Vec<(Key, usize)> {
    vec![
        (Key::Int(0), 10),
        (Key::Int(1), 5000),
        (Key::from("fc_weight"), 300),
    ]
}

fn small_parts() -> Options {
    Options {
        bigarray_bound: 1000,
        partition_bytes: 4096,
        ..opts()
    }
}

/// Options with a test-sized timeout.
fn opts() -> Options {
    Options {
        timeout: Duration::from_secs(20),
        ..Options::default()
    }
}

const STEPS: u64 = 4;

/// Sets `opt` and initializes the row-sparse tests' 40 x 30 key "emb".
fn init_emb(kv: &KvStore, e: &Engine, opt: Optimizer) {
    kv.set_optimizer(opt).unwrap();
    let w = Tensor::from_slice(e, &[40, 30], &values(1, 1200), Context::Cpu).unwrap();
    kv.init("emb", &w).unwrap();
}

fn grad_seed(rank: u64, step: u64, key: usize) -> u64 {
    rank * 1000 + step * 10 + key as u64
}

/// Trains every key for STEPS steps (push+pull on even steps, pushpull on
/// odd ones) and returns the weights seen after each step.
fn train(kv: &KvStore, e: &Engine, opt: Option<Optimizer>, on_workers: bool) -> Vec<Vec<f32>> {
    let inits: Vec<(Key, Tensor)> = keys()
        .iter()
        .enumerate()
        .map(|(i, (k, n))| (k.clone(), tensor(e, &values(77 + i as u64, *n))))
        .collect();
    if let Some(o) = &opt {
        if on_workers {
            kv.set_optimizer_on_workers(o.clone()).unwrap();
        } else {
            kv.set_optimizer(o.clone()).unwrap();
        }
    }
    kv.init_many(&inits).unwrap();
    let rank = kv.rank() as u64;
    let mut seen = Vec::new();
    for step in 0..STEPS {
        for (i, (k, n)) in keys().iter().enumerate() {
            let g = tensor(e, &values(grad_seed(rank, step, i), *n));
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
    seen
}

/// The same training on a local store, the workers' gradients as devices.
fn train_local(workers: u64, opt: Option<Optimizer>) -> Vec<Vec<f32>> {
    let e = engine();
    let kv = KvStore::create("local", &e).unwrap();
    if let Some(o) = opt {
        kv.set_optimizer(o).unwrap();
    }
    for (i, (k, n)) in keys().iter().enumerate() {
        kv.init(k, &tensor(&e, &values(77 + i as u64, *n))).unwrap();
    }
    let mut seen = Vec::new();
    for step in 0..STEPS {
        for (i, (k, n)) in keys().iter().enumerate() {
            let gs: Vec<Tensor> = (0..workers)
                .map(|r| {
                    Tensor::from_slice(
                        &e,
                        &[*n],
                        &values(grad_seed(r, step, i), *n),
                        Context::Gpu(r as u32),
                    )
                    .unwrap()
                })
                .collect();
            kv.push(k, &gs, 0).unwrap();
            let out = Tensor::zeros(&e, &[*n], DType::F32, Context::Cpu).unwrap();
            kv.pull(k, &[out.clone()], 0).unwrap();
            seen.push(out.to_vec::<f32>().unwrap());
        }
    }
    seen
}

#[test]
fn dist_sync_matches_local_bit_for_bit() {
    let opt = Optimizer::sgd(0.1)
        .momentum(0.9)
        .wd(1e-3)
        .clip_gradient(0.9);
    let o2 = opt.clone();
    let got = cluster(2, 3).run("dist_sync", small_parts(), move |kv, e| {
        train(kv, e, Some(o2.clone()), false)
    });
    let want = train_local(3, Some(opt));
    for (rank, g) in got.iter().enumerate() {
        assert_eq!(g.len(), want.len());
        for (i, (a, b)) in g.iter().zip(&want).enumerate() {
            assert!(
                a == b,
                "worker {rank}, pull {i}: differs from the local store"
            );
        }
    }
}

#[test]
fn shared_memory_parts_match_local_bit_for_bit() {
    let opt = Optimizer::sgd(0.1)
        .momentum(0.9)
        .wd(1e-3)
        .clip_gradient(0.9);
    let o2 = opt.clone();
    let got = cluster_van(2, 3, VanKind::Shm).run("dist_sync", small_parts(), move |kv, e| {
        let seen = train(kv, e, Some(o2.clone()), false);
        (seen, kv.shared_memory_parts())
    });
    let want = train_local(3, Some(opt));
    for (rank, (g, parts)) in got.iter().enumerate() {
        // Every part of every key is on a co-located server.
        assert!(
            *parts >= 3,
            "worker {rank} used shared memory for {parts} parts"
        );
        for (i, (a, b)) in g.iter().zip(&want).enumerate() {
            assert!(
                a == b,
                "worker {rank}, pull {i}: differs from the local store"
            );
        }
    }
    // Summation only, and the message path (PSKV_KVSTORE_SHM=0), give the
    // same sums.
    let sums = cluster_van(1, 2, VanKind::Shm).run("dist_sync", small_parts(), |kv, e| {
        train(kv, e, None, false)
    });
    let plain = Options {
        shm_direct: false,
        ..small_parts()
    };
    let msgs = cluster_van(1, 2, VanKind::Shm).run("dist_sync", plain, |kv, e| {
        assert_eq!(kv.shared_memory_parts(), 0);
        train(kv, e, None, false)
    });
    assert_eq!(sums, msgs);
    assert_eq!(sums[0], train_local(2, None));
}

#[test]
fn summation_only_servers_add_in_rank_order() {
    let got = cluster(2, 3).run("dist_sync", small_parts(), |kv, e| {
        train(kv, e, None, false)
    });
    let want = train_local(3, None);
    assert_eq!(got[0], want);
    assert_eq!(got[1], want);
    assert_eq!(got[2], want);
}

#[test]
fn worker_side_optimizer_matches_the_server_side_one() {
    let opt = Optimizer::adam(0.01).wd(0.01);
    let o2 = opt.clone();
    let got = cluster(2, 2).run("dist_sync", small_parts(), move |kv, e| {
        train(kv, e, Some(o2.clone()), true)
    });
    let want = train_local(2, Some(opt));
    assert_eq!(got[0], want);
    assert_eq!(got[1], want);
}

/// A scheduled optimizer on a server counts `num_update` over the keys (and
/// key parts) it holds, as a local store's does over its keys.
#[test]
fn a_scheduled_optimizer_on_the_server_matches_a_local_one() {
    let opt = Optimizer::sgd(0.2)
        .momentum(0.5)
        .lr_scheduler(LrScheduler::factor(1, 0.5).warmup(1, 0.05).base_lr(0.1));
    let o2 = opt.clone();
    let got = cluster(1, 2).run("dist_sync", small_parts(), move |kv, e| {
        train(kv, e, Some(o2.clone()), false)
    });
    let want = train_local(2, Some(opt.clone()));
    assert_eq!(got[0], want);
    assert_eq!(got[1], want);
    // And the schedule mattered: a constant rate gives other weights.
    let constant = train_local(2, Some(Optimizer::sgd(0.2).momentum(0.5)));
    assert_ne!(constant, want);
}

#[test]
fn every_dtype_is_summed_and_multi_precision_keeps_f32_masters() {
    let got = cluster(1, 2).run("dist_sync", opts(), |kv, e| {
        let rank = kv.rank();
        kv.init(10, &tensor(e, &[0i32; 3])).unwrap();
        kv.init(11, &tensor(e, &[0i64; 3])).unwrap();
        kv.init(12, &tensor(e, &[0.0f64; 3])).unwrap();
        let i32s = Tensor::zeros(e, &[3], DType::I32, Context::Cpu).unwrap();
        let i64s = Tensor::zeros(e, &[3], DType::I64, Context::Cpu).unwrap();
        let f64s = Tensor::zeros(e, &[3], DType::F64, Context::Cpu).unwrap();
        let r = rank as i64 + 1;
        kv.pushpull(
            10,
            &[tensor(e, &[r as i32, -(r as i32), i32::MAX])],
            &[i32s.clone()],
            0,
        )
        .unwrap();
        kv.pushpull(11, &[tensor(e, &[r, -r, 1 << 40])], &[i64s.clone()], 0)
            .unwrap();
        kv.pushpull(
            12,
            &[tensor(e, &[r as f64 * 0.1, 1e300, -1.5])],
            &[f64s.clone()],
            0,
        )
        .unwrap();
        // f16 with multi-precision SGD on the servers.
        kv.set_optimizer(Optimizer::sgd(0.01).momentum(0.9).multi_precision(true))
            .unwrap();
        let w0: Vec<f16> = values(5, 64).iter().map(|x| f16::from_f32(*x)).collect();
        kv.init(13, &tensor(e, &w0)).unwrap();
        let out = Tensor::zeros(e, &[64], DType::F16, Context::Cpu).unwrap();
        for step in 0..3 {
            let g: Vec<f16> = values(step * 10 + rank as u64, 64)
                .iter()
                .map(|x| f16::from_f32(*x))
                .collect();
            kv.push(13, &[tensor(e, &g)], 0).unwrap();
        }
        kv.pull(13, &[out.clone()], 0).unwrap();
        (
            i32s.to_vec::<i32>().unwrap(),
            i64s.to_vec::<i64>().unwrap(),
            f64s.to_vec::<f64>().unwrap(),
            out.to_vec::<f16>().unwrap(),
        )
    });
    assert_eq!(got[0].0, vec![3, -3, i32::MAX.wrapping_add(i32::MAX)]);
    assert_eq!(got[0].1, vec![3, -3, 2 << 40]);
    assert_eq!(got[0].2, vec![0.1 + 0.2, 2e300, -3.0]);
    // Reference: f16 gradients summed in f32 in rank order, an f32 master
    // updated with the sum, rounded to f16.
    let opt = Optimizer::sgd(0.01).momentum(0.9).multi_precision(true);
    let mut master: Vec<f32> = values(5, 64)
        .iter()
        .map(|x| f16::from_f32(*x).to_f32())
        .collect();
    let mut st = None;
    for step in 0..3 {
        let mut sum = vec![0.0f32; 64];
        for rank in 0..2u64 {
            for (s, x) in sum.iter_mut().zip(values(step * 10 + rank, 64)) {
                let v = f16::from_f32(x).to_f32();
                *s = if rank == 0 { v } else { *s + v };
            }
        }
        opt.update(13, WeightMut::F32(&mut master), GradRef::F32(&sum), &mut st)
            .unwrap();
    }
    let want: Vec<f16> = master.iter().map(|x| f16::from_f32(*x)).collect();
    assert_eq!(got[0].3, want);
    assert_eq!(got[1].3, want);
}

#[test]
fn many_keys_in_one_call() {
    let keys: Vec<Key> = (0..60u32)
        .map(|i| {
            if i % 3 == 0 {
                Key::from(format!("k{i}"))
            } else {
                Key::Int(i)
            }
        })
        .collect();
    let k2 = keys.clone();
    let got = cluster(2, 2).run("dist_sync", small_parts(), move |kv, e| {
        let inits: Vec<(Key, Tensor)> = k2
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), tensor(e, &vec![0.0f32; 10 + i * 50])))
            .collect();
        kv.init_many(&inits).unwrap();
        let rank = kv.rank() as u64;
        let pushes: Vec<(Key, Vec<Tensor>)> = k2
            .iter()
            .enumerate()
            .map(|(i, k)| {
                (
                    k.clone(),
                    vec![tensor(e, &values(rank * 100 + i as u64, 10 + i * 50))],
                )
            })
            .collect();
        kv.push_many(&pushes, 0).unwrap();
        let outs: Vec<(Key, Vec<Tensor>)> = k2
            .iter()
            .enumerate()
            .map(|(i, k)| {
                (
                    k.clone(),
                    vec![Tensor::zeros(e, &[10 + i * 50], DType::F32, Context::Cpu).unwrap()],
                )
            })
            .collect();
        kv.pull_many(&outs, 0).unwrap();
        // And push-pull of all of them at once.
        let pp: Vec<(Key, Vec<Tensor>, Vec<Tensor>)> = pushes
            .iter()
            .zip(&outs)
            .map(|((k, v), (_, o))| (k.clone(), v.clone(), o.clone()))
            .collect();
        let first: Vec<Vec<f32>> = outs
            .iter()
            .map(|(_, o)| o[0].to_vec::<f32>().unwrap())
            .collect();
        kv.pushpull_many(&pp, 0).unwrap();
        let second: Vec<Vec<f32>> = outs
            .iter()
            .map(|(_, o)| o[0].to_vec::<f32>().unwrap())
            .collect();
        (first, second)
    });
    for (i, _) in keys.iter().enumerate() {
        let n = 10 + i * 50;
        let (a, b) = (values(i as u64, n), values(100 + i as u64, n));
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        for (first, second) in &got {
            assert_eq!(first[i], want, "key {i}");
            assert_eq!(second[i], want, "key {i} (pushpull)");
        }
    }
}

#[test]
fn dist_async_converges() {
    let target: Vec<f32> = values(3, 100);
    let t2 = target.clone();
    let got = cluster(1, 2).run("dist_async", opts(), move |kv, e| {
        kv.set_optimizer(Optimizer::sgd(0.2)).unwrap();
        kv.init(0, &tensor(e, &vec![0.0f32; 100])).unwrap();
        let w = Tensor::zeros(e, &[100], DType::F32, Context::Cpu).unwrap();
        for _ in 0..60 {
            kv.pull(0, &[w.clone()], 0).unwrap();
            let cur = w.to_vec::<f32>().unwrap();
            let g: Vec<f32> = cur.iter().zip(&t2).map(|(w, t)| w - t).collect();
            kv.push(0, &[tensor(e, &g)], 0).unwrap();
        }
        kv.barrier().unwrap();
        kv.pull(0, &[w.clone()], 0).unwrap();
        w.to_vec::<f32>().unwrap()
    });
    for w in got {
        let err = w
            .iter()
            .zip(&target)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 1e-3, "async SGD did not converge: max error {err}");
    }
}

#[test]
fn compressed_pushes_match_quantize_sum_dequantize() {
    for c in [Compression::two_bit(0.5), Compression::one_bit(0.0)] {
        let n = 3000;
        let got = cluster(2, 2).run("dist_sync", small_parts(), move |kv, e| {
            kv.set_gradient_compression(c).unwrap();
            kv.init(4, &tensor(e, &vec![0.0f32; n])).unwrap();
            let out = Tensor::zeros(e, &[n], DType::F32, Context::Cpu).unwrap();
            let mut seen = Vec::new();
            for step in 0..4 {
                let g = tensor(e, &values(step * 100 + kv.rank() as u64, n));
                kv.push(4, &[g], 0).unwrap();
                kv.pull(4, &[out.clone()], 0).unwrap();
                seen.push(out.to_vec::<f32>().unwrap());
            }
            seen
        });
        let k = CpuKernels::single_threaded();
        let mut res = vec![vec![0.0f32; n]; 2];
        for step in 0..4u64 {
            let mut sum = vec![0.0f32; n];
            for r in 0..2 {
                let g = values(step * 100 + r as u64, n);
                let mut deq = vec![0.0f32; n];
                match c {
                    Compression::TwoBit { threshold } => {
                        let mut codes = vec![0u32; pskv_gpu::layout::words_2bit(n)];
                        k.quantize_2bit(&g, &mut res[r], &mut codes, threshold)
                            .unwrap();
                        k.dequantize_2bit(&codes, &mut deq, threshold).unwrap();
                    }
                    Compression::OneBit { threshold } => {
                        let mut codes = vec![0u32; pskv_gpu::layout::words_1bit(n)];
                        k.quantize_1bit(&g, &mut res[r], &mut codes, threshold)
                            .unwrap();
                        k.dequantize_1bit(&codes, &mut deq).unwrap();
                    }
                    Compression::None => unreachable!(),
                }
                if r == 0 {
                    sum = deq;
                } else {
                    sum.iter_mut().zip(&deq).for_each(|(a, b)| *a += *b);
                }
            }
            assert_eq!(got[0][step as usize], sum, "{c:?} step {step}");
            assert_eq!(got[1][step as usize], sum, "{c:?} step {step}");
        }
    }
}

#[test]
fn row_sparse_keys_match_local() {
    // 40 rows of 30: 1200 elements, above the bound, so rows split over
    // both servers and into parts of 4 KiB (34 rows).
    let rows_of = |rank: u64, step: u64| -> Vec<i64> {
        (0..40i64)
            .filter(|r| (*r as u64 * 7 + rank * 3 + step) % 5 < 2)
            .collect()
    };
    let opt = Optimizer::adam(0.05).wd(0.01);
    let o2 = opt.clone();
    let got = cluster(2, 2).run("dist_sync", small_parts(), move |kv, e| {
        init_emb(kv, e, o2.clone());
        for step in 0..3 {
            let rows = rows_of(kv.rank() as u64, step);
            let g = values(step + 10 * kv.rank() as u64, rows.len() * 30);
            let t = Tensor::row_sparse(e, &[40, 30], rows, &g, Context::Cpu).unwrap();
            kv.push("emb", &[t], 0).unwrap();
        }
        let dense = Tensor::zeros(e, &[40, 30], DType::F32, Context::Cpu).unwrap();
        kv.pull("emb", &[dense.clone()], 0).unwrap();
        let rs = Tensor::zeros_row_sparse(e, &[40, 30], DType::F32, Context::Cpu).unwrap();
        let ids = tensor(e, &[39i64, 0, 17, 17, 33, 34]);
        kv.pull_row_sparse("emb", &[rs.clone()], &[ids], 0).unwrap();
        (
            dense.to_vec::<f32>().unwrap(),
            rs.to_row_sparse::<f32>().unwrap(),
        )
    });
    let e = engine();
    let kv = KvStore::create("local", &e).unwrap();
    init_emb(&kv, &e, opt);
    for step in 0..3 {
        let gs: Vec<Tensor> = (0..2u64)
            .map(|r| {
                let rows = rows_of(r, step);
                let g = values(step + 10 * r, rows.len() * 30);
                Tensor::row_sparse(&e, &[40, 30], rows, &g, Context::Gpu(r as u32)).unwrap()
            })
            .collect();
        kv.push("emb", &gs, 0).unwrap();
    }
    let dense = Tensor::zeros(&e, &[40, 30], DType::F32, Context::Cpu).unwrap();
    kv.pull("emb", &[dense.clone()], 0).unwrap();
    let want = dense.to_vec::<f32>().unwrap();
    for (d, (rows, vals)) in &got {
        assert_eq!(d, &want);
        assert_eq!(rows, &vec![0, 17, 33, 34, 39]);
        let mut exp = Vec::new();
        for r in rows {
            exp.extend_from_slice(&want[*r as usize * 30..(*r as usize + 1) * 30]);
        }
        assert_eq!(vals, &exp);
    }
}

/// A push that touches no row of a server's range (or no row at all)
/// leaves those rows alone; the servers keep working.
#[test]
fn row_sparse_pushes_without_rows_in_a_part() {
    let opt = Optimizer::sgd(0.5).wd(0.1);
    let o2 = opt.clone();
    let w0 = values(1, 1200);
    let got = cluster(2, 2).run("dist_sync", small_parts(), move |kv, e| {
        init_emb(kv, e, o2.clone());
        // Rows of the first part only (rows 0..34), then no rows at all.
        for rows in [vec![2i64, 5], vec![]] {
            let g = vec![1.0f32; rows.len() * 30];
            let t = Tensor::row_sparse(e, &[40, 30], rows, &g, Context::Cpu).unwrap();
            kv.push("emb", &[t], 0).unwrap();
        }
        let dense = Tensor::zeros(e, &[40, 30], DType::F32, Context::Cpu).unwrap();
        kv.pull("emb", &[dense.clone()], 0).unwrap();
        dense.to_vec::<f32>().unwrap()
    });
    let upd = |w: f32, g: f32| (1.0f32 - 0.5 * 0.1) * w - (0.5f32 * 1.0) * g;
    for d in got {
        for (i, (x, w)) in d.iter().zip(&w0).enumerate() {
            let want = if i / 30 == 2 || i / 30 == 5 {
                upd(*w, 2.0)
            } else {
                *w
            };
            assert_eq!(x.to_bits(), want.to_bits(), "element {i}");
        }
    }
}

#[test]
fn errors_name_the_key_and_the_store_keeps_working() {
    let got = cluster(1, 1).run("dist_sync", opts(), |kv, e| {
        let mut msgs = Vec::new();
        let v = tensor(e, &[1.0f32; 4]);
        msgs.push(kv.push(5, &[v.clone()], 0).unwrap_err().to_string());
        kv.init(5, &v).unwrap();
        msgs.push(kv.init(5, &v).unwrap_err().to_string());
        msgs.push(
            kv.push(5, &[tensor(e, &[1.0f32; 3])], 0)
                .unwrap_err()
                .to_string(),
        );
        msgs.push(
            kv.push(5, &[tensor(e, &[1.0f64; 4])], 0)
                .unwrap_err()
                .to_string(),
        );
        kv.set_gradient_compression(Compression::two_bit(0.5))
            .unwrap();
        kv.init(6, &tensor(e, &[1i32; 4])).unwrap();
        msgs.push(
            kv.push(6, &[tensor(e, &[1i32; 4])], 0)
                .unwrap_err()
                .to_string(),
        );
        kv.set_gradient_compression(Compression::None).unwrap();
        msgs.push(
            kv.send_command_to_servers(77, "hello")
                .unwrap_err()
                .to_string(),
        );
        // Still serving.
        let out = Tensor::zeros(e, &[4], DType::F32, Context::Cpu).unwrap();
        kv.pushpull(5, &[tensor(e, &[2.0f32; 4])], &[out.clone()], 0)
            .unwrap();
        (msgs, out.to_vec::<f32>().unwrap())
    });
    let (msgs, out) = &got[0];
    assert!(
        msgs[0].contains("key 5") && msgs[0].contains("never initialized"),
        "{}",
        msgs[0]
    );
    assert!(msgs[1].contains("already initialized"), "{}", msgs[1]);
    assert!(
        msgs[2].contains("3 elements") && msgs[2].contains("4 elements"),
        "{}",
        msgs[2]
    );
    assert!(
        msgs[3].contains("f64") && msgs[3].contains("f32"),
        "{}",
        msgs[3]
    );
    assert!(msgs[4].contains("f32"), "{}", msgs[4]);
    assert!(msgs[5].contains("command 77"), "{}", msgs[5]);
    assert_eq!(out, &vec![2.0; 4]);
}

#[test]
fn the_server_answers_bad_requests_with_errors() {
    // A raw transport worker talks to a server directly.
    let c = cluster(1, 1);
    let servers = c.servers();
    let w = Postoffice::start(config(Role::Worker, c.port, 1, 1), None).unwrap();
    let kv = KvWorker::new(&w);
    let range = w.server_key_ranges()[0].0;
    let key = range + (3 << 16);
    let head = |op: i32, dtype: i32, comp: i32| RequestOptions {
        cmd: op | (dtype << 4) | (comp << 8) | (1 << 10),
        priority: 0,
        ..Default::default()
    };
    let err = |r: Result<pskv_transport::KvResponse, pskv_transport::TransportError>| {
        r.unwrap_err().to_string()
    };
    let f4 = Bytes::from(vec![0u8; 16]);
    // Pull before init; garbage head; unknown op.
    let e = err(kv.pull(&[key], head(3, 0, 0)).unwrap().wait(T));
    assert!(
        e.contains("never initialized") && e.contains("key id 3"),
        "{e}"
    );
    assert!(err(kv
        .push(
            &[key],
            &[16],
            f4.clone(),
            RequestOptions {
                cmd: -5,
                priority: 0,
                ..Default::default()
            }
        )
        .unwrap()
        .wait(T))
    .contains("unknown bits"));
    assert!(err(kv
        .push(&[key], &[16], f4.clone(), head(9, 0, 0))
        .unwrap()
        .wait(T))
    .contains("unknown op"));
    // Init, then a second init, a wrong size, a wrong type, bad codes.
    kv.push(&[key], &[16], f4.clone(), head(1, 0, 0))
        .unwrap()
        .wait(T)
        .unwrap();
    assert!(err(kv
        .push(&[key], &[16], f4.clone(), head(1, 0, 0))
        .unwrap()
        .wait(T))
    .contains("already"));
    let e = err(kv
        .push(&[key], &[12], Bytes::from(vec![0u8; 12]), head(2, 0, 0))
        .unwrap()
        .wait(T));
    assert!(e.contains("12 bytes") && e.contains("16 bytes"), "{e}");
    assert!(err(kv
        .push(&[key], &[16], f4.clone(), head(2, 1, 0))
        .unwrap()
        .wait(T))
    .contains("f64"));
    assert!(err(kv
        .push(&[key], &[3], Bytes::from(vec![1u8; 3]), head(2, 0, 1))
        .unwrap()
        .wait(T))
    .contains("header"));
    let e = err(kv
        .push(&[key], &[8], Bytes::from(vec![0u8; 8]), head(5, 0, 0))
        .unwrap()
        .wait(T));
    assert!(e.contains("row"), "{e}");
    // The key still works.
    let ok = Bytes::from(bytemuck::cast_slice::<f32, u8>(&[1.0, 2.0, 3.0, 4.0]).to_vec());
    let r = kv
        .push_pull(&[key], &[16], ok.clone(), head(4, 0, 0))
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(r.to_bytes(), ok);
    kv.request(2, Bytes::new(), pskv_transport::Group::SERVERS)
        .unwrap()
        .wait(T)
        .unwrap();
    w.shutdown();
    for s in servers {
        s.join().unwrap();
    }
    c.sched.shutdown();
}

#[test]
fn urgent_keys_overtake_bulk_keys() {
    let got = cluster(1, 1).run("dist_sync", opts(), |kv, e| {
        let big = 8 << 20;
        kv.init(
            0,
            &Tensor::zeros(e, &[big], DType::F32, Context::Cpu).unwrap(),
        )
        .unwrap();
        kv.init(1, &tensor(e, &[0.0f32])).unwrap();
        let bulk = Tensor::zeros(e, &[big], DType::F32, Context::Cpu).unwrap();
        let small = tensor(e, &[0.0f32]);
        let order = Arc::new(Mutex::new(Vec::new()));
        let g = Tensor::full(e, &[big], 1.0f32, Context::Cpu).unwrap();
        kv.pushpull(0, &[g], &[bulk.clone()], -100).unwrap();
        kv.pushpull(1, &[tensor(e, &[1.0f32])], &[small.clone()], 100)
            .unwrap();
        for (t, name) in [(bulk, "bulk"), (small, "urgent")] {
            let o = order.clone();
            e.push_sync(OpSpec::new("record").read(t.var()), move |_| {
                o.lock().unwrap().push(name);
                Ok(())
            })
            .unwrap();
        }
        e.wait_for_all().unwrap();
        let v = order.lock().unwrap().clone();
        v
    });
    assert_eq!(got[0], vec!["urgent", "bulk"]);
}

#[test]
fn optimizer_state_of_servers_is_saved_and_loaded() {
    let dir = std::env::temp_dir().join(format!("pskv-dist-states-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s");
    let p2 = path.clone();
    let n = 5000;
    let got = cluster(2, 1).run("dist_sync", small_parts(), move |kv, e| {
        kv.set_optimizer(Optimizer::adam(0.01)).unwrap();
        kv.init(0, &tensor(e, &values(9, n))).unwrap();
        let out = Tensor::zeros(e, &[n], DType::F32, Context::Cpu).unwrap();
        for s in 0..3 {
            kv.push(0, &[tensor(e, &values(s, n))], 0).unwrap();
        }
        kv.pull(0, &[out.clone()], 0).unwrap();
        let mid = out.to_vec::<f32>().unwrap();
        kv.save_optimizer_states(&p2).unwrap();
        for s in 3..5 {
            kv.push(0, &[tensor(e, &values(s, n))], 0).unwrap();
        }
        kv.pull(0, &[out.clone()], 0).unwrap();
        // Put the states of step 3 back, and the weights (through a
        // summation-free trick: a new key), then redo the two steps.
        kv.load_optimizer_states(&p2).unwrap();
        (mid, out.to_vec::<f32>().unwrap())
    });
    // The saved file loads into a local store and continues identically.
    let (mid, end) = &got[0];
    let e = engine();
    let kv = KvStore::create("local", &e).unwrap();
    kv.set_optimizer(Optimizer::adam(0.01)).unwrap();
    kv.init(0, &tensor(&e, mid)).unwrap();
    kv.load_optimizer_states(&path).unwrap();
    for s in 3..5 {
        kv.push(0, &[tensor(&e, &values(s, n))], 0).unwrap();
    }
    let out = Tensor::zeros(&e, &[n], DType::F32, Context::Cpu).unwrap();
    kv.pull(0, &[out.clone()], 0).unwrap();
    assert_eq!(&out.to_vec::<f32>().unwrap(), end);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where the workers of a test meet: a barrier that gives up (panics)
/// after 20 s, so a worker that failed does not leave the others waiting
/// for ever.
#[derive(Default)]
struct Gate {
    /// Arrivals at the current meeting, and how many meetings were held.
    at: Mutex<(usize, u64)>,
    cv: std::sync::Condvar,
}

impl Gate {
    fn meet(&self, n: usize) {
        let mut g = self.at.lock().unwrap();
        let held = g.1;
        g.0 += 1;
        if g.0 == n {
            *g = (0, held + 1);
            self.cv.notify_all();
            return;
        }
        let (g, t) = self
            .cv
            .wait_timeout_while(g, Duration::from_secs(20), |g| g.1 == held)
            .unwrap();
        drop(g);
        assert!(!t.timed_out(), "the other worker did not come in 20 s");
    }
}

/// A worker whose push through its shared slot failed while the server
/// still held that push in its round (the request timed out) must not
/// write the slot again while the server may read it: its next push of the
/// part goes by message, until one succeeds. Before, the push sent again
/// copied its new values into the slot while the round, completed by the
/// other worker's push, was summed from it: a sum of half old and half new
/// values. The push sent again is of the same round (the worker did not
/// see it complete): it takes its first one's place (2 + 3), or, if the
/// round completed with the first (1 + 3), it is answered with that
/// round's value, not applied again; both workers see the same value.
/// Each attempt races the two: worker 0 starts its push a little later
/// each time after worker 1's.
#[test]
fn a_push_sent_again_after_its_shared_slot_timed_out_never_tears_a_round() {
    let n = 1usize << 20; // one 4 MiB part
    let gate = Arc::new(Gate::default());
    let opts = Options {
        timeout: Duration::from_secs(1),
        ..opts()
    };
    let got = cluster_van(1, 2, VanKind::Shm).run("dist_sync", opts, move |kv, e| {
        let full = |v: f32| Tensor::full(e, &[n], v, Context::Cpu).unwrap();
        let mut torn = Vec::new();
        let mut seen = Vec::new();
        for a in 0..12u32 {
            let key = Key::Int(100 + a);
            kv.init(key.clone(), &full(0.0)).unwrap();
            assert_eq!(kv.shared_memory_parts(), a as usize + 1);
            let out = Tensor::zeros(e, &[n], DType::F32, Context::Cpu).unwrap();
            // Waited for longer than the store's timeout: worker 0's op
            // queues behind its push that timed out, until that push's
            // request fails too (both take about the timeout; on a loaded
            // machine the second can come later).
            let pushpull = |v: f32| {
                kv.pushpull(key.clone(), &[full(v)], &[out.clone()], 0)?;
                kv.ticket(std::slice::from_ref(&key), &[out.clone()])?
                    .wait_for(Duration::from_secs(10))?;
                out.to_vec::<f32>()
            };
            if kv.rank() == 0 {
                // Worker 1 holds back: this push times out, still pending
                // in the server's round.
                let g = full(1.0);
                kv.push(key.clone(), &[g.clone()], 0).unwrap();
                let r = kv.ticket(std::slice::from_ref(&key), &[g]).unwrap().wait();
                assert!(r.is_err(), "attempt {a}: the push should time out");
            }
            gate.meet(2);
            let v = if kv.rank() == 0 {
                let t0 = std::time::Instant::now();
                while t0.elapsed() < Duration::from_micros(200 * a as u64) {
                    std::hint::spin_loop();
                }
                pushpull(2.0).unwrap_or_else(|e| {
                    panic!("attempt {a}: worker 0's push sent again was not answered ({e})")
                })
            } else {
                pushpull(3.0).unwrap()
            };
            let fours = v.iter().filter(|x| **x == 4.0).count();
            let fives = v.iter().filter(|x| **x == 5.0).count();
            assert_eq!(fours + fives, n, "attempt {a}: a sum of neither push");
            if fours > 0 && fives > 0 {
                torn.push((a, fours, fives));
            }
            seen.push(v[0]);
            gate.meet(2);
        }
        (torn, seen)
    });
    assert_eq!(got[0].1, got[1].1, "the workers saw different rounds");
    assert!(
        got.iter().all(|(t, _)| t.is_empty()),
        "rounds summed from a slot being written (attempt, elements of the old push, of the new): {got:?}"
    );
}
