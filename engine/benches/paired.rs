//! The engine against the baseline pool, run by run: each workload of
//! `dispatch.rs` runs on the engine and on the plain channel pool in turn
//! (the order swapped every pair), and the ratio of each pair is kept. On
//! a shared VM whose speed moves by half within a minute, a ratio of two
//! runs a moment apart holds where criterion's (the engine's samples, then
//! the pool's) may not.
//!
//! Run: `cargo bench -p pskv-engine --bench paired [-- WORKLOAD...]`
//! (a workload argument keeps the workloads whose name contains it;
//! `PSKV_BENCH_THREADS`: both pools' threads, default 2;
//! `PSKV_BENCH_PAIRS`: pairs per workload, default 15;
//! `PSKV_BENCH_POOL_BOXES=2`: the baseline as it was until 2026-12-07,
//! two allocations per job.)

use std::time::Instant;

mod common;

use common::{engine, env_usize, threads, ChannelPool, Workload};

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 0 {
        (s[m - 1] + s[m]) / 2.0
    } else {
        s[m]
    }
}

fn main() {
    // `cargo bench` passes `--bench`; other arguments name workloads.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let chosen: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|w| filter.is_empty() || filter.iter().any(|f| w.name().contains(f.as_str())))
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
        eprintln!(
            "no workload's name contains any of {filter:?}; the workloads: {}",
            names.join(", ")
        );
        std::process::exit(2);
    }
    let t = threads();
    let pairs = env_usize("PSKV_BENCH_PAIRS", 15).max(1);
    let two_boxes = match env_usize("PSKV_BENCH_POOL_BOXES", 1) {
        1 => false,
        2 => true,
        n => {
            eprintln!("PSKV_BENCH_POOL_BOXES={n}: 1 (the baseline) or 2 (the old one)");
            std::process::exit(2)
        }
    };
    println!(
        "threads {t}, pairs {pairs}, baseline boxes per job {}",
        if two_boxes { 2 } else { 1 }
    );
    println!("workload | engine ms (M ops/s) | pool ms | engine/pool: median (min to max)");
    for w in chosen {
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
            pool.run_noops(w.ops(), two_boxes);
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
        let lo = ratio.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratio.iter().copied().fold(0.0, f64::max);
        let me = median(&te);
        println!(
            "{} | {:.2} ({:.2}) | {:.2} | {:.2} ({lo:.2} to {hi:.2})",
            w.name(),
            me * 1e3,
            w.ops() as f64 / me / 1e6,
            median(&tp) * 1e3,
            median(&ratio),
        );
    }
}
