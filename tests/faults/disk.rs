//! A server whose disk is full (writes fail past a few bytes): the
//! checkpoint that `barrier()` asks for cannot be written, and the barrier
//! fails on every worker at once with that cause (rank 0 used to fail
//! alone, leaving the others blocked at the barrier until the timeout).

use std::time::{Duration, Instant};

use crate::common::cluster::{Faults, Job};
use pskv::engine::{Context, Engine};
use pskv::kvstore::{DType, KvStore, Optimizer, Tensor};

fn worker() {
    let engine = Engine::new().unwrap();
    let kv = KvStore::create("dist_sync", &engine).unwrap();
    let w = Tensor::zeros(&engine, &[100], DType::F32, Context::Cpu).unwrap();
    kv.init(0, &w).unwrap();
    kv.set_optimizer(Optimizer::sgd(0.1)).unwrap();
    let g = Tensor::full(&engine, &[100], 1.0f32, Context::Cpu).unwrap();
    kv.pushpull(0, std::slice::from_ref(&g), std::slice::from_ref(&w), 0)
        .unwrap();
    w.to_vec::<f32>().unwrap();
    let t = Instant::now();
    match kv.barrier() {
        Ok(()) => println!("BARRIER OK"),
        Err(e) => println!("BARRIER {:.1} ERR {e}", t.elapsed().as_secs_f64()),
    }
    let _ = kv.close();
}

#[test]
fn disk_worker_entry() {
    if std::env::var("PSKV_DISK_WORKER").is_ok() {
        worker();
    }
}

#[test]
fn a_checkpoint_that_cannot_be_written_fails_the_barrier_on_every_worker() {
    let dir = std::env::temp_dir().join(format!("pskv-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.display().to_string();
    let mut job = Job::new(3, 1, 5, &[("PSKV_CHECKPOINT_DIR", &d), ("PSKV_VAN", "tcp")]);
    job.start_role("scheduler", &Faults::default());
    job.start_role(
        "server",
        &Faults {
            disk_bytes: Some(16),
            ..Faults::default()
        },
    );
    let workers: Vec<usize> = (0..3)
        .map(|_| {
            job.start_worker(
                "disk::disk_worker_entry",
                "PSKV_DISK_WORKER",
                &Faults::default(),
            )
        })
        .collect();
    let mut causes = Vec::new();
    for &w in &workers {
        let (_, line) = job.wait_line(Some(w), "BARRIER", Duration::from_secs(60));
        let line = line[line.find("BARRIER").unwrap()..].to_string();
        assert!(line.contains("ERR"), "{line}");
        let secs: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(secs < 10.0, "the barrier failed after {secs} s: {line}");
        assert!(
            line.contains("File too large") && line.contains("checkpoint"),
            "{line}"
        );
        causes.push(line[line.find("ERR").unwrap()..].to_string());
    }
    assert!(causes.iter().all(|c| c == &causes[0]), "{causes:?}");
    drop(job);
    let _ = std::fs::remove_dir_all(&dir);
}
