//! A distributed kvstore as separate processes on 127.0.0.1: `pskv
//! scheduler`, `pskv server`s, and workers (this test binary, started again
//! with `PSKV_TEST_WORKER` set). The workers train with dist_sync and print
//! their weights; they must equal, to the bit, a local kvstore fed the same
//! gradients. Over tcp, and over shared memory (segments included).

mod common;

use std::time::{Duration, Instant};

use common::{spawn_infra, spawn_workers};
use pskv::engine::{Context, Engine};
use pskv::kvstore::{DType, Key, KvStore, Optimizer, Tensor};

const WORKERS: u32 = 3;
const SERVERS: u32 = 2;
const STEPS: u64 = 5;

use pskv_test_support::values;

/// A small key, a key split over both servers in several parts, a string key.
fn keys() -> Vec<(Key, usize)> {
    vec![
        (Key::Int(3), 17),
        (Key::Int(4), 20_000),
        (Key::from("conv1_weight"), 999),
    ]
}

fn optimizer() -> Optimizer {
    Optimizer::nag(0.05, 0.9).wd(1e-4).rescale_grad(0.5)
}

fn seed(rank: u64, step: u64, key: usize) -> u64 {
    rank * 7919 + step * 31 + key as u64
}

/// A 64-bit FNV-1a hash of the bits of every weight, key after key, and
/// their count.
fn digest(all: &[Vec<f32>]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut n = 0usize;
    for x in all.iter().flatten() {
        for b in x.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        n += 1;
    }
    format!("{h:016x}/{n}")
}

/// The worker's job: train, print the weights.
fn worker() {
    let engine = Engine::new().unwrap();
    let kv = KvStore::create("dist_sync", &engine).unwrap();
    kv.set_optimizer(optimizer()).unwrap();
    for (i, (k, n)) in keys().iter().enumerate() {
        let w0 =
            Tensor::from_vec(&engine, &[*n], values(1000 + i as u64, *n), Context::Cpu).unwrap();
        kv.init(k, &w0).unwrap();
    }
    let rank = kv.rank() as u64;
    for step in 0..STEPS {
        for (i, (k, n)) in keys().iter().enumerate() {
            let g = Tensor::from_vec(
                &engine,
                &[*n],
                values(seed(rank, step, i), *n),
                Context::Cpu,
            )
            .unwrap();
            kv.push(k, &[g], 0).unwrap();
        }
    }
    let mut all = Vec::new();
    for (k, n) in keys() {
        let out = Tensor::zeros(&engine, &[n], DType::F32, Context::Cpu).unwrap();
        kv.pull(&k, std::slice::from_ref(&out), 0).unwrap();
        all.push(out.to_vec::<f32>().unwrap());
    }
    println!("SHM_PARTS {}", kv.shared_memory_parts());
    println!("WEIGHTS {}", digest(&all));
    kv.close().unwrap();
}

/// The entry point of a worker process (a no-op in the ordinary test run).
#[test]
fn worker_process_entry() {
    if std::env::var("PSKV_TEST_WORKER").is_ok() {
        worker();
    }
}

/// The same training on a local store, the workers as devices.
fn local_digest() -> String {
    let engine = Engine::builder().cpu_threads(2).build().unwrap();
    let kv = KvStore::create("local", &engine).unwrap();
    kv.set_optimizer(optimizer()).unwrap();
    for (i, (k, n)) in keys().iter().enumerate() {
        let w0 =
            Tensor::from_vec(&engine, &[*n], values(1000 + i as u64, *n), Context::Cpu).unwrap();
        kv.init(k, &w0).unwrap();
    }
    for step in 0..STEPS {
        for (i, (k, n)) in keys().iter().enumerate() {
            let gs: Vec<Tensor> = (0..WORKERS as u64)
                .map(|r| {
                    Tensor::from_vec(
                        &engine,
                        &[*n],
                        values(seed(r, step, i), *n),
                        Context::Gpu(r as u32),
                    )
                    .unwrap()
                })
                .collect();
            kv.push(k, &gs, 0).unwrap();
        }
    }
    let mut all = Vec::new();
    for (k, n) in keys() {
        let out = Tensor::zeros(&engine, &[n], DType::F32, Context::Cpu).unwrap();
        kv.pull(&k, std::slice::from_ref(&out), 0).unwrap();
        all.push(out.to_vec::<f32>().unwrap());
    }
    digest(&all)
}

fn run_cluster(van: &str) -> Vec<(String, usize)> {
    let mut env = vec![
        ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
        ("DMLC_NUM_WORKER", WORKERS.to_string()),
        ("DMLC_NUM_SERVER", SERVERS.to_string()),
        ("PSKV_VAN", van.to_string()),
        ("PSKV_TOKEN", format!("test-{}", std::process::id())),
        ("PSKV_KVSTORE_BIGARRAY_BOUND", "10000".to_string()),
        ("PSKV_PARTITION_BYTES", "16384".to_string()),
        ("PSKV_KVSTORE_TIMEOUT", "60".to_string()),
        ("PSKV_CONNECT_TIMEOUT", "60".to_string()),
        ("PSKV_CPU_WORKER_NTHREADS", "1".to_string()),
    ];
    let mut infra = spawn_infra(env!("CARGO_BIN_EXE_pskv"), &mut env, SERVERS);
    let mut workers = spawn_workers(WORKERS, "worker_process_entry", "PSKV_TEST_WORKER", &env);
    let deadline = Instant::now() + Duration::from_secs(120);
    let readers = workers.read_stdouts();
    let mut results = Vec::new();
    for (c, reader) in workers.0.iter_mut().zip(readers) {
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "a worker failed: {st}");
                break;
            }
            assert!(Instant::now() < deadline, "a worker did not finish in time");
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = reader.join().unwrap();
        let w = text
            .lines()
            .find_map(|l| l.split_once("WEIGHTS ").map(|x| x.1))
            .expect("the worker printed its weights")
            .to_string();
        let parts: usize = text
            .lines()
            .find_map(|l| l.split_once("SHM_PARTS ").map(|x| x.1))
            .and_then(|x| x.trim().parse().ok())
            .expect("the worker printed its shared parts");
        results.push((w, parts));
    }
    // The servers and the scheduler leave once the workers are done.
    for c in &mut infra.0 {
        loop {
            if c.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a server or the scheduler did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    results
}

fn segments_in_dev_shm() -> usize {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("pskv-region-"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn dist_sync_processes_equal_a_local_store() {
    let want = local_digest();
    let before = segments_in_dev_shm();
    for van in ["tcp", "shm"] {
        let got = run_cluster(van);
        assert_eq!(got.len(), WORKERS as usize);
        for (i, (w, parts)) in got.iter().enumerate() {
            assert!(
                w == &want,
                "{van}: worker {i}'s weights differ from the local store's"
            );
            if van == "shm" {
                assert!(*parts > 3, "{van}: only {parts} parts used shared memory");
            } else {
                assert_eq!(*parts, 0);
            }
        }
    }
    assert_eq!(
        segments_in_dev_shm(),
        before,
        "shared segments were left in /dev/shm"
    );
}
