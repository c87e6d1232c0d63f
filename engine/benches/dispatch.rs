//! Dispatch overhead of the engine against two baselines measured in the same
//! run: the same closures sent through a plain crossbeam-channel thread pool
//! (no dependency tracking), and the same closures run inline.
//!
//! Run: `cargo bench -p pskv-engine --bench dispatch`
//! (`PSKV_BENCH_THREADS` sets the worker count of both pools; default 2.)
//! The engine's runs come first and the baselines' after, a few seconds
//! apart: on a VM whose speed moves by the minute, `paired.rs` gives the
//! ratio that holds.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

mod common;

use common::{engine, threads, ChannelPool, Workload};

/// The engine's runs of `w`, then the pool's, then inline.
fn bench(c: &mut Criterion, w: Workload) {
    let t = threads();
    let n = w.ops();
    let mut g = c.benchmark_group(w.name());
    g.sample_size(10).throughput(Throughput::Elements(n as u64));
    let vars = w.vars();
    let e = engine(t);
    g.bench_function(BenchmarkId::new("engine", t), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                w.run(&e, &vars);
            }
            start.elapsed()
        })
    });
    drop(e);
    let pool = ChannelPool::new(t);
    // Named apart from the two-box pool's `channel_pool` of the runs
    // before 2026-12-07, so that criterion compares like with like.
    g.bench_function(BenchmarkId::new("channel_pool_1box", t), |b| {
        b.iter(|| pool.run_noops(n, false))
    });
    drop(pool);
    g.bench_function("inline", |b| {
        b.iter(|| {
            for i in 0..n {
                // Boxed and called, as a job is.
                let job: Box<dyn FnOnce()> = Box::new(move || {
                    black_box(i);
                });
                job();
            }
        })
    });
    g.finish();
}

/// Every workload, in turn.
fn all(c: &mut Criterion) {
    for w in Workload::ALL {
        bench(c, w);
    }
}

criterion_group!(benches, all);
criterion_main!(benches);
