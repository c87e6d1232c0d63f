//! The engine against the baseline pool, run by run: each workload of
//! `dispatch.rs` runs on the engine and on the plain channel pool in turn
//! (the order swapped every pair), and the ratio of each pair is kept. On
//! a shared VM whose speed moves by half within a minute, a ratio of two
//! runs a moment apart holds where criterion's (the engine's samples, then
//! the pool's) may not.
//!
//! Run: `cargo bench -p pskv-engine --bench paired`
//! (`PSKV_BENCH_THREADS`: both pools' threads, default 2;
//! `PSKV_BENCH_PAIRS`: pairs per workload, default 15;
//! `PSKV_BENCH_POOL_BOXES=2`: the baseline as it was until 2026-12-07,
//! two allocations per job.)

use std::time::Instant;

mod common;

use common::{engine, threads, ChannelPool, Workload};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a filter, if any, names workloads.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let t = threads();
    let pairs = env_usize("PSKV_BENCH_PAIRS", 15).max(1);
    let boxes = env_usize("PSKV_BENCH_POOL_BOXES", 1);
    println!("threads {t}, pairs {pairs}, baseline boxes per job {boxes}");
    println!("workload | engine ms (M ops/s) | pool ms | engine/pool: median (min to max)");
    for w in Workload::ALL {
        if !filter.is_empty() && !filter.iter().any(|f| w.name().contains(f.as_str())) {
            continue;
        }
        let vars = w.vars();
        let e = engine(t);
        let pool = ChannelPool::new(t);
        let engine_run = || {
            let start = Instant::now();
            w.run(&e, &vars);
            start.elapsed().as_secs_f64()
        };
        let pool_run = || {
            let start = Instant::now();
            pool.run_noops(w.ops(), boxes);
            start.elapsed().as_secs_f64()
        };
        // Warm both (first allocations, threads' first wake-ups).
        engine_run();
        pool_run();
        let (mut te, mut tp, mut ratio) = (vec![], vec![], vec![]);
        for i in 0..pairs {
            let (a, b) = if i % 2 == 0 {
                let a = engine_run();
                (a, pool_run())
            } else {
                let b = pool_run();
                (engine_run(), b)
            };
            te.push(a);
            tp.push(b);
            ratio.push(a / b);
        }
        let (me, mp, mr) = (median(&mut te), median(&mut tp), median(&mut ratio));
        println!(
            "{} | {:.2} ({:.2}) | {:.2} | {:.2} ({:.2} to {:.2})",
            w.name(),
            me * 1e3,
            w.ops() as f64 / me / 1e6,
            mp * 1e3,
            mr,
            ratio[0],
            ratio[ratio.len() - 1],
        );
    }
}
