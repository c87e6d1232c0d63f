//! Replicas (`PSKV_REPLICAS=2`): a server killed at any point of a
//! dist_sync run (4 workers, 3 servers, SGD with momentum, a key split in
//! parts over every server) loses no round: the final weights equal those
//! of the run without the failure, to the bit, and no worker sees an error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pskv_engine::{Context, Engine, EngineKind};
use pskv_kvstore::{Key, KvStore, Optimizer, Options, Server, Tensor};
use pskv_transport::{Config, Postoffice, Role, VanKind};

mod common;
use common::{engine, values, T};

const SERVERS: u32 = 3;
const WORKERS: u32 = 4;
const STEPS: u64 = 10;

fn config(role: Role, port: u16) -> Config {
    config_van(role, port, VanKind::Tcp)
}

fn config_van(role: Role, port: u16, van: VanKind) -> Config {
    let mut c = Config::new(role, "127.0.0.1", port, SERVERS, WORKERS)
        .van(van)
        .heartbeat(
            Some(Duration::from_millis(200)),
            Some(Duration::from_secs(2)),
        )
        .connect_timeout(Duration::from_secs(20));
    c.replicas = 2;
    c
}

fn keys() -> Vec<(Key, usize)> {
    vec![
        (Key::Int(0), 10),
        (Key::Int(1), 5000),
        (Key::from("fc_weight"), 300),
        (Key::Int(7), 1),
    ]
}

/// How a server dies.
#[derive(Clone, Copy)]
enum Death {
    /// Killed (as a crash: its connections close) once worker 0 finished
    /// this step.
    AfterStep(u64),
    /// Dies once its backup holds this round of a key, before answering
    /// it: the workers' retries at the backup find the round there.
    AfterCopying(u64),
}

/// The van, and the engine the servers run.
#[derive(Clone, Copy)]
struct Setup {
    van: VanKind,
    servers: EngineKind,
}

const TCP: Setup = Setup {
    van: VanKind::Tcp,
    servers: EngineKind::Threaded,
};

/// Trains `STEPS` steps over TCP; with `kill = Some((server, death))`,
/// server rank `server` dies so. Returns rank 0's final weights, as bits.
fn run(kill: Option<(u32, Death)>) -> Vec<Vec<u32>> {
    run_on(kill, TCP)
}

/// As [`run`], with this setup.
fn run_on(kill: Option<(u32, Death)>, setup: Setup) -> Vec<Vec<u32>> {
    let config = move |role, port| config_van(role, port, setup.van);
    if let Ok(f) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .with_test_writer()
            .try_init();
    }
    let sched = Postoffice::start(config(Role::Scheduler, 0), None).unwrap();
    let port = sched.local_addr().port();
    let offices: Arc<Mutex<Vec<(u32, Postoffice)>>> = Arc::default();
    let servers: Vec<_> = (0..SERVERS)
        .map(|_| {
            let offices = offices.clone();
            std::thread::spawn(move || {
                let e = pskv_engine::Engine::builder()
                    .kind(setup.servers)
                    .cpu_threads(2)
                    // A wait that needs a frame nobody reads shows as a
                    // timeout here, not as a 600 s hang.
                    .wait_timeout(Some(Duration::from_secs(5)))
                    .build()
                    .unwrap();
                let s = Server::start(config(Role::Server, port), e).unwrap();
                if let Some((r, Death::AfterCopying(round))) = kill {
                    if s.rank() == r {
                        s.die_after_copying(round);
                    }
                }
                offices
                    .lock()
                    .unwrap()
                    .push((s.rank(), s.postoffice().clone()));
                let end = std::time::Instant::now() + T * 2;
                while std::time::Instant::now() < end {
                    if s.wait(Some(Duration::from_millis(50))).is_ok() {
                        break;
                    }
                    if s.postoffice().is_shut_down() {
                        return;
                    }
                }
                s.shutdown();
            })
        })
        .collect();
    let step0 = Arc::new(AtomicU64::new(0));
    let killer = kill.and_then(|(rank, d)| match d {
        Death::AfterStep(at) => Some((rank, at)),
        Death::AfterCopying(_) => None,
    });
    let killer = killer.map(|(rank, at)| {
        let (offices, step0) = (offices.clone(), step0.clone());
        std::thread::spawn(move || {
            while step0.load(Ordering::Acquire) < at {
                std::thread::sleep(Duration::from_millis(2));
            }
            let po = offices
                .lock()
                .unwrap()
                .iter()
                .find(|(r, _)| *r == rank)
                .map(|(_, p)| p.clone())
                .unwrap();
            po.kill();
        })
    });
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let step0 = step0.clone();
            std::thread::spawn(move || {
                let e = engine();
                let opts = Options {
                    bigarray_bound: 1000,
                    partition_bytes: 4096,
                    timeout: Duration::from_secs(30),
                    transport: Some(config(Role::Worker, port)),
                    ..Options::default()
                };
                let kv = KvStore::create_with("dist_sync", &e, opts).unwrap();
                let rank = kv.rank() as u64;
                let ws: Vec<(Key, Tensor)> = keys()
                    .into_iter()
                    .map(|(k, n)| (k, tensor(&e, &values(99, n))))
                    .collect();
                for (k, w) in &ws {
                    kv.init(k.clone(), w).unwrap();
                }
                kv.set_optimizer(Optimizer::sgd(0.1).momentum(0.9)).unwrap();
                let mut slowest = Duration::ZERO;
                for step in 0..STEPS {
                    let t = std::time::Instant::now();
                    for (i, (k, w)) in ws.iter().enumerate() {
                        let g = tensor(&e, &values(rank * 1000 + step * 10 + i as u64, w.len()));
                        kv.pushpull(k.clone(), &[g], std::slice::from_ref(w), 0)
                            .unwrap();
                    }
                    for (_, w) in &ws {
                        w.to_vec::<f32>().unwrap();
                    }
                    slowest = slowest.max(t.elapsed());
                    if rank == 0 {
                        step0.store(step + 1, Ordering::Release);
                    }
                }
                if rank == 0 {
                    eprintln!("the slowest step took {slowest:?}");
                }
                let out: Vec<Vec<u32>> = ws
                    .iter()
                    .map(|(k, w)| {
                        kv.pull(k.clone(), std::slice::from_ref(w), 0).unwrap();
                        w.to_vec::<f32>()
                            .unwrap()
                            .iter()
                            .map(|x| x.to_bits())
                            .collect()
                    })
                    .collect();
                kv.close().unwrap();
                (rank, out)
            })
        })
        .collect();
    let mut outs: Vec<(u64, Vec<Vec<u32>>)> =
        workers.into_iter().map(|h| h.join().unwrap()).collect();
    if let Some(k) = killer {
        k.join().unwrap();
    }
    for s in servers {
        s.join().unwrap();
    }
    sched.shutdown();
    outs.sort_by_key(|(r, _)| *r);
    for (_, o) in &outs[1..] {
        assert_eq!(o, &outs[0].1, "the workers disagree");
    }
    outs.remove(0).1
}

fn tensor(e: &Engine, v: &[f32]) -> Tensor {
    Tensor::from_slice(e, &[v.len()], v, Context::Cpu).unwrap()
}

#[test]
fn a_killed_server_loses_no_round_with_replicas() {
    let reference = run(None);
    for (server, death) in [
        (1, Death::AfterStep(3)),
        (0, Death::AfterStep(6)),
        (2, Death::AfterStep(1)),
        (1, Death::AfterCopying(4)),
        (2, Death::AfterCopying(1)),
    ] {
        let got = run(Some((server, death)));
        let how = match death {
            Death::AfterStep(s) => format!("killed after step {s}"),
            Death::AfterCopying(r) => format!("dead after copying round {r}"),
        };
        assert!(
            got == reference,
            "server {server} {how}: the weights differ from the run without a failure"
        );
    }
}

/// Under the naive engine a server's op on a replicated key waits, inside
/// the request's handling, for the backup's answer: over shared memory
/// that answer comes on another link of the same node, which must still be
/// read (each link gets its own reader thread then). Every round is served,
/// with the same weights as over TCP with the threaded engine.
#[test]
fn naive_servers_with_their_backups_on_shared_memory_serve_every_round() {
    let reference = run(None);
    let t = std::time::Instant::now();
    let got = run_on(
        None,
        Setup {
            van: VanKind::Shm,
            servers: EngineKind::Naive,
        },
    );
    assert!(
        got == reference,
        "the weights differ from the reference run"
    );
    // Each stalled round would wait for the servers' 5 s wait timeout.
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn dist_async_refuses_replicas() {
    let sched = Postoffice::start(config(Role::Scheduler, 0), None).unwrap();
    let e = engine();
    let opts = Options {
        transport: Some(config(Role::Worker, sched.local_addr().port())),
        ..Options::default()
    };
    match KvStore::create_with("dist_async", &e, opts) {
        Ok(_) => panic!("dist_async accepted replicas"),
        Err(err) => assert!(err.to_string().contains("dist_sync"), "{err}"),
    }
}
