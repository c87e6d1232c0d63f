//! Integration tests of pskv-engine: one binary, many tests (build once).

mod errors;
mod held_reads;
mod ordering;
mod pools;
mod profile;
mod run_now;
mod shutdown;
mod stress;

use std::time::Duration;

use pskv_engine::{Engine, EngineKind};

/// Both engines, small and with a short wait limit so a bug fails instead of
/// hanging.
pub fn engines() -> Vec<Engine> {
    vec![
        engine(EngineKind::Threaded, 2),
        engine(EngineKind::Naive, 1),
    ]
}

pub fn engine(kind: EngineKind, cpu: usize) -> Engine {
    Engine::builder()
        .kind(kind)
        .cpu_threads(cpu)
        .cpu_priority_threads(1)
        .wait_timeout(Some(Duration::from_secs(60)))
        .shutdown_timeout(Duration::from_secs(10))
        .build()
        .expect("engine starts")
}
