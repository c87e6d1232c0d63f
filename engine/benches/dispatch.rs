//! Dispatch overhead of the engine against two baselines measured in the same
//! run: the same closures sent through a plain crossbeam-channel thread pool
//! (no dependency tracking), and the same closures run inline.
//!
//! Run: `cargo bench -p pskv-engine --bench dispatch`
//! (`PSKV_BENCH_THREADS` sets the worker count of both pools; default 2.)

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, Bencher, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use crossbeam_channel::{unbounded, Receiver, Sender};
use pskv_engine::{Engine, OpSpec, Var};

type Job = Box<dyn FnOnce() + Send>;

/// The baseline: N threads taking boxed closures from one channel.
struct ChannelPool {
    tx: Option<Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ChannelPool {
    fn new(n: usize) -> ChannelPool {
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

    /// Runs `n` jobs made by `make` and waits until all have run.
    fn run_batch(&self, n: usize, make: impl Fn(usize) -> Job) {
        let left = Arc::new(AtomicUsize::new(n));
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let tx = self.tx.as_ref().expect("pool running");
        for i in 0..n {
            let job = make(i);
            let left = left.clone();
            let done_tx = done_tx.clone();
            tx.send(Box::new(move || {
                job();
                if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let _ = done_tx.send(());
                }
            }))
            .expect("pool running");
        }
        done_rx
            .recv_timeout(Duration::from_secs(300))
            .expect("baseline pool finished");
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

fn threads() -> usize {
    std::env::var("PSKV_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

fn engine(n: usize) -> Engine {
    Engine::builder()
        .cpu_threads(n)
        .cpu_priority_threads(1)
        .build()
        .expect("engine starts")
}

/// Times `iters` runs of `round` (criterion's custom timing).
fn timed(b: &mut Bencher<'_, WallTime>, mut round: impl FnMut()) {
    b.iter_custom(|iters| {
        let start = Instant::now();
        for _ in 0..iters {
            round();
        }
        start.elapsed()
    })
}

/// Pushes an op of `spec` whose closure only touches `x`.
fn push_noop(e: &Engine, spec: OpSpec, x: usize) {
    e.push_sync(spec, move |_| {
        black_box(x);
        Ok(())
    })
    .unwrap();
}

fn noop(i: usize) -> Job {
    Box::new(move || {
        black_box(i);
    })
}

/// The baselines of a workload of `n` ops, after the engine's run: the
/// same closures on the channel pool of `t` threads, and inline.
fn baselines(mut g: BenchmarkGroup<'_, WallTime>, t: usize, n: usize) {
    let pool = ChannelPool::new(t);
    g.bench_function(BenchmarkId::new("channel_pool", t), |b| {
        b.iter(|| pool.run_batch(n, noop))
    });
    drop(pool);
    g.bench_function("inline", |b| {
        b.iter(|| {
            for i in 0..n {
                noop(i)();
            }
        })
    });
    g.finish();
}

/// (a) one million no-op ops over 1,000 vars: op i writes var i % 1000.
fn independent(c: &mut Criterion) {
    const N: usize = 1_000_000;
    let t = threads();
    let mut g = c.benchmark_group("independent_1m_ops_1000_vars");
    g.sample_size(10).throughput(Throughput::Elements(N as u64));
    let vars: Vec<Var> = (0..1000).map(|_| Var::new()).collect();
    let e = engine(t);
    g.bench_function(BenchmarkId::new("engine", t), |b| {
        timed(b, || {
            for i in 0..N {
                push_noop(&e, OpSpec::new("noop").write(&vars[i % 1000]), i);
            }
            e.wait_for_all().unwrap();
        })
    });
    drop(e);
    baselines(g, t, N);
}

/// (b) a chain of 100,000 ops on one var.
fn chain(c: &mut Criterion) {
    const N: usize = 100_000;
    let t = threads();
    let mut g = c.benchmark_group("chain_100k_ops_1_var");
    g.sample_size(10).throughput(Throughput::Elements(N as u64));
    let v = Var::new();
    let e = engine(t);
    g.bench_function(BenchmarkId::new("engine", t), |b| {
        timed(b, || {
            for i in 0..N {
                push_noop(&e, OpSpec::new("link").write(&v), i);
            }
            e.wait_for_var(&v).unwrap();
        })
    });
    drop(e);
    baselines(g, t, N);
}

/// (c) fan-out/fan-in: a root writes r; 1,000 ops read r and each writes its
/// own var; a sink reads all 1,000 and writes s. 100 rounds (100,200 ops).
fn fan(c: &mut Criterion) {
    const WIDTH: usize = 1000;
    const ROUNDS: usize = 100;
    const N: usize = ROUNDS * (WIDTH + 2);
    let t = threads();
    let mut g = c.benchmark_group("fan_out_in_100x1000");
    g.sample_size(10).throughput(Throughput::Elements(N as u64));
    let r = Var::new();
    let s = Var::new();
    let mids: Vec<Var> = (0..WIDTH).map(|_| Var::new()).collect();
    let e = engine(t);
    g.bench_function(BenchmarkId::new("engine", t), |b| {
        timed(b, || {
            for round in 0..ROUNDS {
                push_noop(&e, OpSpec::new("root").read(&s).write(&r), round);
                for (k, m) in mids.iter().enumerate() {
                    push_noop(&e, OpSpec::new("mid").read(&r).write(m), k);
                }
                push_noop(&e, OpSpec::new("sink").reads(&mids).write(&s), round);
            }
            e.wait_for_all().unwrap();
        })
    });
    drop(e);
    baselines(g, t, N);
}

criterion_group!(benches, independent, chain, fan);
criterion_main!(benches);
