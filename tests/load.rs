//! Load: 16 worker processes x 1,000 keys x 100 dist_sync rounds on this
//! host, 2 servers. No error, the sums right (after the first round, every
//! round of every key is summed by the workers at its gate), and memory
//! bounded: each server's resident set at the end is within a bound of
//! what it was after the first rounds (no growth per round), and so is
//! each worker's private memory.
//!
//! The workers are this test binary started again with `PSKV_LOAD_WORKER`
//! set; the scheduler and servers are `pskv` processes.

mod common;

use std::time::{Duration, Instant};

use common::{private_rss_kib, rss_kib, spawn_infra, spawn_workers};
use pskv::engine::{Context, Engine};
use pskv::kvstore::{DType, Key, KvStore, Tensor};

const WORKERS: u32 = 16;
/// Rounds, overridable for investigation (`PSKV_LOAD_ROUNDS`).
fn rounds() -> usize {
    std::env::var("PSKV_LOAD_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS)
}
/// Workers, overridable for investigation (`PSKV_LOAD_WORKERS`).
fn num_workers() -> u32 {
    std::env::var("PSKV_LOAD_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(WORKERS)
}
const SERVERS: u32 = 2;
const KEYS: usize = 1000;
const ROUNDS: usize = 100;
/// Floats per key.
const LEN: usize = 16;
/// Rounds after which the "start" resident sets are read.
const WARM: usize = 5;

fn worker() {
    let engine = Engine::new().unwrap();
    let kv = KvStore::create("dist_sync", &engine).unwrap();
    let rank = kv.rank();
    let keys: Vec<Key> = (0..KEYS as u32).map(Key::Int).collect();
    let zeros = || Tensor::zeros(&engine, &[LEN], DType::F32, Context::Cpu).unwrap();
    let init: Vec<(Key, Tensor)> = keys.iter().map(|k| (k.clone(), zeros())).collect();
    kv.init_many(&init).unwrap();
    let grads: Vec<Tensor> = (0..KEYS)
        .map(|i| {
            Tensor::full(
                &engine,
                &[LEN],
                (rank as usize + i % 3) as f32,
                Context::Cpu,
            )
            .unwrap()
        })
        .collect();
    let outs: Vec<Tensor> = (0..KEYS).map(|_| zeros()).collect();
    let items: Vec<(Key, Vec<Tensor>, Vec<Tensor>)> = keys
        .iter()
        .zip(grads.iter().zip(&outs))
        .map(|(k, (g, o))| (k.clone(), vec![g.clone()], vec![o.clone()]))
        .collect();
    let me = std::process::id();
    let w = kv.num_workers() as usize;
    let t0 = Instant::now();
    for round in 0..rounds() {
        kv.pushpull_many(&items, 0).unwrap();
        // No optimizer: the stored value is the round's sum.
        for (i, o) in outs.iter().enumerate() {
            let v = o.to_vec::<f32>().unwrap();
            let want = (w * (w - 1) / 2 + w * (i % 3)) as f32;
            assert!(
                v.iter().all(|x| *x == want),
                "round {round} key {i}: {} where {want} was due",
                v[0]
            );
        }
        if round + 1 == WARM {
            println!("RSS-START {}", private_rss_kib(me).unwrap_or(0));
        }
        if std::env::var_os("PSKV_LOAD_VERBOSE").is_some() && (round + 1) % 10 == 0 {
            eprintln!(
                "rank {rank} round {} RSS {} private {}",
                round + 1,
                rss_kib(me).unwrap_or(0),
                private_rss_kib(me).unwrap_or(0)
            );
        }
    }
    println!(
        "RSS-END {} ROUNDS {} SECS {:.3} SUMMED {}",
        private_rss_kib(me).unwrap_or(0),
        rounds(),
        t0.elapsed().as_secs_f64(),
        kv.worker_summed_parts()
    );
    kv.close().unwrap();
}

#[test]
fn load_worker_entry() {
    if std::env::var("PSKV_LOAD_WORKER").is_ok() {
        worker();
    }
}

fn field(text: &str, name: &str) -> f64 {
    text.split_whitespace()
        .skip_while(|w| *w != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[test]
fn sixteen_workers_a_thousand_keys_a_hundred_rounds() {
    let mut env: Vec<(&str, String)> = vec![
        ("DMLC_PS_ROOT_URI", "127.0.0.1".into()),
        ("DMLC_NUM_WORKER", num_workers().to_string()),
        ("DMLC_NUM_SERVER", SERVERS.to_string()),
        ("DMLC_NODE_HOST", "127.0.0.1".into()),
        ("PSKV_TOKEN", format!("load-{}", std::process::id())),
        ("PSKV_KVSTORE_TIMEOUT", "300".into()),
        ("PSKV_CONNECT_TIMEOUT", "120".into()),
        ("PSKV_CPU_WORKER_NTHREADS", "1".into()),
        ("PSKV_CPU_PRIORITY_NTHREADS", "1".into()),
        ("PSKV_IO_THREADS", "1".into()),
        // Peers on one host talk through shared-memory rings, whose pages
        // count in the resident set as the ring's write position first
        // reaches them (16 MiB per direction by default: a slow climb,
        // then flat). Small rings wrap within the first rounds, so growth
        // after them would be a leak.
        ("PSKV_SHM_BYTES", (1 << 20).to_string()),
    ];
    let infra = spawn_infra(env!("CARGO_BIN_EXE_pskv"), &mut env, SERVERS);
    let server_pids: Vec<u32> = infra.0[1..].iter().map(|c| c.id()).collect();
    let mut workers = spawn_workers(num_workers(), "load_worker_entry", "PSKV_LOAD_WORKER", &env);
    let readers = workers.read_stdouts();
    // The servers' resident sets, sampled while the rounds run.
    let mut server_rss: Vec<Vec<u64>> = vec![Vec::new(); server_pids.len()];
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        for (i, p) in server_pids.iter().enumerate() {
            if let Some(r) = rss_kib(*p) {
                server_rss[i].push(r);
            }
        }
        let mut running = 0;
        for c in &mut workers.0 {
            match c.try_wait().unwrap() {
                Some(st) => assert!(st.success(), "a worker failed: {st}"),
                None => running += 1,
            }
        }
        if running == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the load did not finish in time");
        std::thread::sleep(Duration::from_millis(100));
    }
    let outs: Vec<String> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let mut secs = 0.0f64;
    for o in &outs {
        let (start, end) = (field(o, "RSS-START"), field(o, "RSS-END"));
        assert_eq!(field(o, "ROUNDS") as usize, rounds());
        secs = secs.max(field(o, "SECS"));
        // Private memory: the shared segments' pages count in a worker's
        // resident set as it first touches them (every slot of a part, once
        // it summed that part's round: bounded by the segments' size), and
        // a leak would be private.
        assert!(
            end <= start * 1.25 + 8192.0,
            "a worker's private memory grew from {start} KiB to {end} KiB over the rounds"
        );
        // Every round but the first of every key (one part each, 64 bytes)
        // is summed by the workers (the servers have no optimizer).
        assert_eq!(field(o, "SUMMED") as usize, KEYS * (rounds() - 1), "{o}");
    }
    for (i, samples) in server_rss.iter().enumerate() {
        assert!(samples.len() >= 4, "too few samples of server {i}");
        // After the first quarter (keys initialized, buffers allocated),
        // the resident set must stay flat.
        let early = samples[samples.len() / 4];
        let peak = *samples.iter().max().unwrap();
        let last = *samples.last().unwrap();
        eprintln!(
            "server {i}: RSS {early} KiB after a quarter of the run, peak {peak}, last {last}"
        );
        assert!(
            peak <= early + early / 4 + 16384,
            "server {i} grew from {early} KiB to {peak} KiB"
        );
    }
    eprintln!(
        "{} workers x {KEYS} keys x {} rounds in {secs:.1} s ({:.0} key-rounds/s per worker)",
        num_workers(),
        rounds(),
        (KEYS * rounds()) as f64 / secs
    );
}
