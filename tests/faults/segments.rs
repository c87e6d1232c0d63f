//! The shared segments of the co-located fast path leave nothing in
//! /dev/shm: not when a worker never maps them (on another host, over TCP,
//! or with `PSKV_KVSTORE_SHM=0`: each run used to leave one file per key,
//! workers + 1 times the key's size), not after a successful job, and not
//! when the server is killed once training has begun.

use std::time::Duration;

use crate::common::cluster::{segments_of, Faults, Job};
use pskv::engine::{Context, Engine};
use pskv::kvstore::{DType, KvStore, Optimizer, Tensor};

const KEYS: i64 = 3;

/// Inits 3 keys, runs 3 rounds, says how many parts it has in shared
/// memory and `ROUNDS`, waits a moment (the test looks at /dev/shm), then
/// closes.
fn worker() {
    let engine = Engine::new().unwrap();
    let kv = KvStore::create("dist_sync", &engine).unwrap();
    let ws: Vec<Tensor> = (0..KEYS)
        .map(|_| Tensor::zeros(&engine, &[1000], DType::F32, Context::Cpu).unwrap())
        .collect();
    for (k, w) in ws.iter().enumerate() {
        kv.init(k as i64, w).unwrap();
    }
    kv.set_optimizer(Optimizer::sgd(0.1)).unwrap();
    let g = Tensor::full(&engine, &[1000], 1.0f32, Context::Cpu).unwrap();
    for _ in 0..3 {
        for (k, w) in ws.iter().enumerate() {
            kv.pushpull(
                k as i64,
                std::slice::from_ref(&g),
                std::slice::from_ref(w),
                0,
            )
            .unwrap();
        }
    }
    for w in &ws {
        w.to_vec::<f32>().unwrap();
    }
    println!("SHM_PARTS {}", kv.shared_memory_parts());
    println!("ROUNDS");
    std::thread::sleep(Duration::from_millis(1500));
    kv.close().unwrap();
}

#[test]
fn segments_worker_entry() {
    if std::env::var("PSKV_SEGMENTS_WORKER").is_ok() {
        worker();
    }
}

const ENTRY: &str = "segments::segments_worker_entry";

/// Worker "a" on shared memory, worker "b" as `b_env` says; returns the
/// job after both said ROUNDS, with the server's pid.
fn job(b_env: (&str, &str)) -> (Job, u32, [usize; 2]) {
    let mut job = Job::new(2, 1, 5, &[("PSKV_VAN", "auto")]);
    job.start_infra(1);
    let server = job.pid(1);
    let a = job.start_worker(ENTRY, "PSKV_SEGMENTS_WORKER", &Faults::default());
    let b = job.start_worker(
        ENTRY,
        "PSKV_SEGMENTS_WORKER",
        &Faults {
            env: vec![(b_env.0.into(), b_env.1.into())],
            ..Faults::default()
        },
    );
    job.wait_line(Some(a), "ROUNDS", Duration::from_secs(60));
    job.wait_line(Some(b), "ROUNDS", Duration::from_secs(60));
    (job, server, [a, b])
}

#[test]
fn no_segment_is_left_when_a_worker_never_maps_it() {
    for b_env in [("PSKV_KVSTORE_SHM", "0"), ("PSKV_VAN", "tcp")] {
        let (mut job, server, [a, b]) = job(b_env);
        // Worker a did use shared memory (so the server made segments)...
        assert!(
            job.output(a).contains(&format!("SHM_PARTS {KEYS}")),
            "{}",
            job.outputs()
        );
        assert!(job.output(b).contains("SHM_PARTS 0"), "{}", job.outputs());
        // ... and their files are gone while the job still runs.
        assert_eq!(segments_of(server), Vec::<String>::new(), "{b_env:?}");
        for st in job.wait_all(Duration::from_secs(60)) {
            assert!(st.success(), "{}", job.outputs());
        }
        assert_eq!(segments_of(server), Vec::<String>::new(), "{b_env:?}");
    }
}

#[test]
fn a_server_killed_after_the_first_round_leaves_no_segment() {
    let (mut job, server, [a, _]) = job(("PSKV_KVSTORE_SHM", "1"));
    assert!(
        job.output(a).contains(&format!("SHM_PARTS {KEYS}")),
        "{}",
        job.outputs()
    );
    job.signal(1, libc::SIGKILL);
    job.wait_exit(1, Duration::from_secs(10));
    assert_eq!(segments_of(server), Vec::<String>::new());
}
