//! Every kind of store with its tensors in device memory: the values, the
//! weights and the optimizer states seen equal, bit for bit, those of the
//! same training with host tensors (dense keys, one split over servers, a
//! row-sparse key, 2-bit compression, push, pull, pushpull and
//! pull_row_sparse; the row ids on a device too). On the emulated device
//! everywhere (`PSKV_GPU=emulated` or no CUDA); on CUDA devices where the
//! build has them (`PSKV_GPU=cuda`, the GPU check).

#![allow(clippy::cloned_ref_to_slice_refs)]

use std::time::Duration;

use pskv_engine::{Context, Engine};
use pskv_kvstore::{Compression, DType, Key, KvStore, Optimizer, Options, Tensor};

mod common;
use common::*;

/// How many GPUs the tests spread over (CUDA machines may have one).
fn gpus() -> u32 {
    match std::env::var("PSKV_GPU").as_deref() {
        Ok("cuda") => pskv_gpu::device::cuda_devices().map_or(1, |n| n.max(1) as u32),
        _ => 4,
    }
}

/// Where device `d` of a worker lives: GPU `d` (modulo the GPUs there
/// are), or the host.
fn ctx(gpu: bool, d: u32) -> Context {
    if gpu {
        Context::Gpu(d % gpus())
    } else {
        Context::Cpu
    }
}

const STEPS: u64 = 3;
const EMB: [usize; 2] = [40, 6];

fn dense_keys() -> Vec<(Key, usize)> {
    vec![(Key::Int(3), 7), (Key::Int(9), 3000), (Key::from("w"), 64)]
}

fn rows_of(seed: u64) -> Vec<i64> {
    let mut r: Vec<i64> = (0..5).map(|i| ((seed * 7 + i * 11) % 40) as i64).collect();
    r.sort_unstable();
    r.dedup();
    r
}

fn bits(v: Vec<f32>) -> Vec<u32> {
    v.into_iter().map(f32::to_bits).collect()
}

/// Trains on `kv` (worker `rank`, `devs` devices) and returns every value
/// it read, as bits.
fn train(kv: &KvStore, e: &Engine, rank: u64, devs: u32, gpu: bool, rows: bool) -> Vec<Vec<u32>> {
    let keys = dense_keys();
    let mut inits: Vec<(Key, Tensor)> = keys
        .iter()
        .enumerate()
        .map(|(i, (k, n))| {
            let v = values(5 + i as u64, *n);
            (
                k.clone(),
                Tensor::from_slice(e, &[*n], &v, ctx(gpu, i as u32)).unwrap(),
            )
        })
        .collect();
    if rows {
        let v = values(99, EMB[0] * EMB[1]);
        inits.push((
            Key::from("emb"),
            Tensor::from_slice(e, &EMB, &v, ctx(gpu, 1)).unwrap(),
        ));
    }
    kv.init_many(&inits).unwrap();
    let mut seen = Vec::new();
    for step in 0..STEPS {
        for (i, (k, n)) in keys.iter().enumerate() {
            let grads: Vec<Tensor> = (0..devs)
                .map(|d| {
                    let g = values(rank * 1000 + step * 10 + i as u64 + 100 * d as u64, *n);
                    Tensor::from_slice(e, &[*n], &g, ctx(gpu, d)).unwrap()
                })
                .collect();
            let outs: Vec<Tensor> = (0..devs)
                .map(|d| Tensor::zeros(e, &[*n], DType::F32, ctx(gpu, devs - 1 - d)).unwrap())
                .collect();
            if (step + i as u64) % 2 == 0 {
                kv.push(k, &grads, i as i32).unwrap();
                kv.pull(k, &outs, i as i32).unwrap();
            } else {
                kv.pushpull(k, &grads, &outs, -(i as i32)).unwrap();
            }
            for o in outs {
                seen.push(bits(o.to_vec::<f32>().unwrap()));
            }
        }
        if rows {
            let grads: Vec<Tensor> = (0..devs)
                .map(|d| {
                    let seed = rank * 100 + step * 3 + d as u64;
                    let r = rows_of(seed);
                    let g = values(seed, r.len() * EMB[1]);
                    Tensor::row_sparse(e, &EMB, r, &g, ctx(gpu, d)).unwrap()
                })
                .collect();
            kv.push("emb", &grads, 0).unwrap();
            let out = Tensor::zeros_row_sparse(e, &EMB, DType::F32, ctx(gpu, 0)).unwrap();
            let ids = Tensor::from_slice(e, &[4], &[33i64, 2, 17, 2], ctx(gpu, 1)).unwrap();
            kv.pull_row_sparse("emb", &[out.clone()], &[ids], 0)
                .unwrap();
            let (r, v) = out.to_row_sparse::<f32>().unwrap();
            assert_eq!(r, vec![2, 17, 33]);
            seen.push(bits(v));
        }
    }
    for (k, n) in keys {
        let o = Tensor::zeros(e, &[n], DType::F32, ctx(gpu, 2)).unwrap();
        kv.pull(&k, &[o.clone()], 0).unwrap();
        seen.push(bits(o.to_vec::<f32>().unwrap()));
    }
    seen
}

/// What a training sets on its store.
#[derive(Clone, Copy, Debug)]
enum Setup {
    /// An optimizer on the servers (or the store).
    Optimizer,
    /// 2-bit compression, summation only (dense keys).
    TwoBit,
}

fn configure(kv: &KvStore, setup: Setup) {
    match setup {
        Setup::Optimizer => kv
            .set_optimizer(Optimizer::sgd(0.1).momentum(0.9).wd(1e-3))
            .unwrap(),
        Setup::TwoBit => kv
            .set_gradient_compression(Compression::two_bit(0.25))
            .unwrap(),
    }
}

fn local(kind: &'static str, gpu: bool, setup: Setup) -> Vec<Vec<u32>> {
    let e = engine();
    let kv = KvStore::create(kind, &e).unwrap();
    configure(&kv, setup);
    let seen = train(&kv, &e, 0, 3, gpu, matches!(setup, Setup::Optimizer));
    kv.close().unwrap();
    seen
}

fn dist(kind: &'static str, gpu: bool, setup: Setup) -> Vec<Vec<Vec<u32>>> {
    let opts = Options {
        bigarray_bound: 1000,
        partition_bytes: 4096,
        timeout: Duration::from_secs(30),
        ..Options::default()
    };
    cluster(2, 2).run(kind, opts, move |kv, e| {
        configure(kv, setup);
        // Worker 0 pushes one value per key (no reduction on the worker),
        // worker 1 two.
        let rank = kv.rank();
        let rows = matches!(setup, Setup::Optimizer);
        train(kv, e, rank as u64, rank + 1, gpu, rows)
    })
}

#[test]
fn local_kinds_on_devices_equal_the_host_bit_for_bit() {
    // (A local store does not compress: it has nothing to send.)
    for (kind, setup) in [
        ("local", Setup::Optimizer),
        ("device", Setup::Optimizer),
        ("device", Setup::TwoBit),
    ] {
        {
            let host = local(kind, false, setup);
            let dev = local(kind, true, setup);
            assert_eq!(host.len(), dev.len());
            assert!(
                host == dev,
                "{kind} {setup:?}: device tensors differ from host ones"
            );
        }
    }
}

#[test]
fn dist_kinds_on_devices_equal_the_host_bit_for_bit() {
    for kind in ["dist_sync", "dist_sync_device"] {
        for setup in [Setup::Optimizer, Setup::TwoBit] {
            let host = dist(kind, false, setup);
            let dev = dist(kind, true, setup);
            assert!(
                host == dev,
                "{kind} {setup:?}: device tensors differ from host ones"
            );
            // The workers end with the same weights.
            let last = |v: &Vec<Vec<u32>>| v[v.len() - dense_keys().len()..].to_vec();
            assert!(
                last(&host[0]) == last(&host[1]),
                "{kind} {setup:?}: the workers disagree"
            );
        }
    }
}

#[test]
fn a_missing_gpu_or_a_wrong_size_is_a_clear_error() {
    let e = engine();
    let err = Tensor::zeros(&e, &[4], DType::F32, Context::Gpu(99)).unwrap_err();
    assert!(err.to_string().contains("99"), "{err}");
    let kv = KvStore::create("device", &e).unwrap();
    kv.init(
        1,
        &Tensor::zeros(&e, &[4], DType::F32, Context::Gpu(0)).unwrap(),
    )
    .unwrap();
    let small = Tensor::zeros(&e, &[3], DType::F32, Context::Gpu(0)).unwrap();
    let err = kv.push(1, &[small.clone()], 0).unwrap_err();
    assert!(err.to_string().contains("initialized as f32 [4]"), "{err}");
    let err = kv.pull(1, &[small], 0).unwrap_err();
    assert!(err.to_string().contains("initialized as f32 [4]"), "{err}");
    kv.close().unwrap();
}

#[test]
fn a_pull_onto_several_gpus_crosses_the_host_link_once() {
    if gpus() < 3 {
        eprintln!("skipped: fewer than 3 GPUs");
        return;
    }
    let e = engine();
    let kv = KvStore::create("device", &e).unwrap();
    let v = values(7, 1000);
    kv.init(
        5,
        &Tensor::from_slice(&e, &[1000], &v, Context::Cpu).unwrap(),
    )
    .unwrap();
    let outs: Vec<Tensor> = (0..3)
        .map(|d| Tensor::zeros(&e, &[1000], DType::F32, Context::Gpu(d)).unwrap())
        .collect();
    e.wait_for_all().unwrap();
    e.start_profiling();
    kv.pull(5, &outs, 0).unwrap();
    for o in &outs {
        assert_eq!(bits(o.to_vec::<f32>().unwrap()), bits(v.clone()));
    }
    e.stop_profiling();
    let names: Vec<String> = e.take_profile().into_iter().map(|t| t.name).collect();
    let count = |n: &str| names.iter().filter(|x| *x == n).count();
    // One upload, then device-to-device copies from it (3 downloads to
    // read the outputs back here).
    assert_eq!(count("tensor_peer_copy"), 2, "{names:?}");
    assert_eq!(count("tensor_transfer"), 1 + 3, "{names:?}");
    kv.close().unwrap();
}
