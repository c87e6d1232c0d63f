//! What the engine's two dispatch benches share: the three workloads, the
//! baseline pool, and the engine they run on.
//!
//! `dispatch.rs` times each with criterion, the engine's runs first and the
//! baselines' after; `paired.rs` alternates the engine and the pool run by
//! run and reports the ratio of each pair, so that a phase of a shared VM
//! that slows everything for a minute falls on both sides of a ratio.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, Sender};
use pskv_engine::{Engine, OpSpec, Var};

type Job = Box<dyn FnOnce() + Send>;

/// The baseline: N threads taking boxed closures from one channel, as a
/// plain thread pool does: one allocation per job (two with `two_boxes`),
/// holding the closure and the batch's completion count.
pub struct ChannelPool {
    tx: Option<Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ChannelPool {
    pub fn new(n: usize) -> ChannelPool {
        let (tx, rx): (Sender<Job>, Receiver<Job>) = unbounded();
        let threads = (0..n)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || {
                    for job in rx {
                        job();
                    }
                })
            })
            .collect();
        ChannelPool {
            tx: Some(tx),
            threads,
        }
    }

    /// Runs `n` no-op jobs (`black_box(i)`, as the engine's ops) and waits
    /// until all have run. `two_boxes` boxes each closure twice, as this
    /// baseline did until 2026-12-07 (a job made apart, then wrapped with
    /// the count): kept to compare with figures measured against it.
    pub fn run_noops(&self, n: usize, two_boxes: bool) {
        let left = Arc::new(AtomicUsize::new(n));
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let tx = self.tx.as_ref().expect("pool running");
        for i in 0..n {
            let left = left.clone();
            let done_tx = done_tx.clone();
            let finish = move || {
                if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let _ = done_tx.send(());
                }
            };
            let job: Job = if two_boxes {
                let inner: Job = Box::new(move || {
                    black_box(i);
                });
                Box::new(move || {
                    inner();
                    finish();
                })
            } else {
                Box::new(move || {
                    black_box(i);
                    finish();
                })
            };
            tx.send(job).expect("pool running");
        }
        done_rx
            .recv_timeout(Duration::from_secs(300))
            .expect("baseline pool finished within 300 s");
    }
}

impl Drop for ChannelPool {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The number in the environment variable `name`, or `default` when it is
/// unset; a value that is not a number ends the bench with a message.
pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("{name}={v} is not a number");
            std::process::exit(2)
        }),
    }
}

/// `PSKV_BENCH_THREADS`: the worker count of both pools (default 2).
pub fn threads() -> usize {
    env_usize("PSKV_BENCH_THREADS", 2)
}

/// An engine with `n` CPU workers and one priority worker.
pub fn engine(n: usize) -> Engine {
    Engine::builder()
        .cpu_threads(n)
        .cpu_priority_threads(1)
        .build()
        .expect("engine starts")
}

/// Pushes an op of `spec` whose closure only touches `x`.
fn push_noop(e: &Engine, spec: OpSpec, x: usize) {
    e.push_sync(spec, move |_| {
        black_box(x);
        Ok(())
    })
    .unwrap();
}

/// The three workloads; every closure is a no-op (`black_box(i)`).
#[derive(Copy, Clone, Debug)]
pub enum Workload {
    /// (a) one million ops over 1,000 vars: op i writes var i % 1000.
    Independent,
    /// (b) a chain of 100,000 ops on one var.
    Chain,
    /// (c) fan-out/fan-in: a root writes r; 1,000 ops read r and each
    /// writes its own var; a sink reads all 1,000 and writes s (which the
    /// next root reads). 100 rounds (100,200 ops).
    Fan,
}

const FAN_WIDTH: usize = 1000;
const FAN_ROUNDS: usize = 100;

impl Workload {
    pub const ALL: [Workload; 3] = [Workload::Independent, Workload::Chain, Workload::Fan];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Independent => "independent_1m_ops_1000_vars",
            Workload::Chain => "chain_100k_ops_1_var",
            Workload::Fan => "fan_out_in_100x1000",
        }
    }

    /// How many ops one run pushes (and jobs the baseline runs).
    pub fn ops(self) -> usize {
        match self {
            Workload::Independent => 1_000_000,
            Workload::Chain => 100_000,
            Workload::Fan => FAN_ROUNDS * (FAN_WIDTH + 2),
        }
    }

    /// The vars one run names, made once and reused by every run.
    pub fn vars(self) -> Vec<Var> {
        let n = match self {
            Workload::Independent => 1000,
            Workload::Chain => 1,
            // The mids, then r and s.
            Workload::Fan => FAN_WIDTH + 2,
        };
        (0..n).map(|_| Var::new()).collect()
    }

    /// One run on `e`: pushes every op and waits until all have run.
    pub fn run(self, e: &Engine, vars: &[Var]) {
        match self {
            Workload::Independent => {
                for i in 0..self.ops() {
                    push_noop(e, OpSpec::new("noop").write(&vars[i % 1000]), i);
                }
                e.wait_for_all().unwrap();
            }
            Workload::Chain => {
                for i in 0..self.ops() {
                    push_noop(e, OpSpec::new("link").write(&vars[0]), i);
                }
                e.wait_for_var(&vars[0]).unwrap();
            }
            Workload::Fan => {
                let (mids, rest) = vars.split_at(FAN_WIDTH);
                let (r, s) = (&rest[0], &rest[1]);
                for round in 0..FAN_ROUNDS {
                    push_noop(e, OpSpec::new("root").read(s).write(r), round);
                    for (k, m) in mids.iter().enumerate() {
                        push_noop(e, OpSpec::new("mid").read(r).write(m), k);
                    }
                    push_noop(e, OpSpec::new("sink").reads(mids).write(s), round);
                }
                e.wait_for_all().unwrap();
            }
        }
    }
}
