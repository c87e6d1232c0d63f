//! A worker killed with SIGKILL in the middle of dist_sync training: the
//! surviving workers get an error naming the dead node within the
//! heartbeat timeout (never a hang), and `pskv launch` ends such a job
//! blaming the worker that died first, with its signal, even when the
//! survivors exit with errors of their own right after it.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::cluster::{Faults, Job};
use pskv::engine::{Context, Engine};
use pskv::kvstore::{DType, KvStore, Optimizer, Tensor};

/// The rank that kills itself, and the step at which it does.
const VICTIM: u32 = 2;
const FATAL_STEP: u32 = 5;
/// Heartbeat timeout the cluster runs with (seconds).
const HEARTBEAT_TIMEOUT: u64 = 3;

/// The worker: trains until a request fails, then prints `ERROR secs msg`
/// (how long the failing request waited) and exits: 0, or 3 with
/// `PSKV_EXIT_ON_ERROR` (as a training script that stops on its first
/// error does).
fn worker() {
    let engine = Engine::new().unwrap();
    let kv = KvStore::create("dist_sync", &engine).unwrap();
    let rank = kv.rank();
    println!(
        "RANK {rank} DMLC_WORKER_ID {}",
        std::env::var("DMLC_WORKER_ID").unwrap_or_default()
    );
    let n = 1000;
    let w = Tensor::zeros(&engine, &[n], DType::F32, Context::Cpu).unwrap();
    kv.init(0, &w).unwrap();
    // Without an optimizer (and over shm), the servers hand the rounds to
    // the workers, which sum them at the key's gate.
    if std::env::var("PSKV_FAULT_NO_OPT").is_err() {
        kv.set_optimizer(Optimizer::sgd(0.1)).unwrap();
    }
    let g = Tensor::full(&engine, &[n], 1.0f32, Context::Cpu).unwrap();
    let code = if std::env::var("PSKV_EXIT_ON_ERROR").is_ok() {
        3
    } else {
        0
    };
    for step in 0..1000 {
        if rank == VICTIM && step == FATAL_STEP {
            println!("DYING {rank}");
            // SAFETY: kill(2) on this very process: the crash under test.
            unsafe {
                libc::kill(std::process::id() as i32, libc::SIGKILL);
            }
        }
        let t0 = Instant::now();
        let r = kv
            .pushpull(0, std::slice::from_ref(&g), std::slice::from_ref(&w), 0)
            .and_then(|()| w.to_vec::<f32>().map(|_| ()));
        if let Err(e) = r {
            println!("ERROR {:.3} {e}", t0.elapsed().as_secs_f64());
            // A second push fails at once, with the same news.
            let t1 = Instant::now();
            let again = kv
                .pushpull(0, std::slice::from_ref(&g), std::slice::from_ref(&w), 0)
                .and_then(|()| w.to_vec::<f32>().map(|_| ()));
            match again {
                Err(e) => println!("AGAIN {:.3} {e}", t1.elapsed().as_secs_f64()),
                Ok(()) => println!("AGAIN-OK"),
            }
            println!("SUMMED {}", kv.worker_summed_parts());
            std::process::exit(code);
        }
    }
    println!("NO-ERROR");
    std::process::exit(0);
}

#[test]
fn fault_worker_entry() {
    if std::env::var("PSKV_FAULT_WORKER").is_ok() {
        worker();
    }
}

const ENTRY: &str = "death::fault_worker_entry";

#[test]
fn survivors_of_a_killed_worker_get_an_error_naming_it() {
    survivors_get_an_error_naming_the_dead_worker(&[], false);
}

/// The same where the rounds are summed by the workers at the key's gate
/// (shm, no optimizer): the server, told of the death, closes the gate,
/// and the survivors' pushes waiting there come to it and fail naming the
/// dead worker.
#[test]
fn survivors_of_a_killed_worker_summing_at_the_gate_get_an_error_naming_it() {
    survivors_get_an_error_naming_the_dead_worker(
        &[("PSKV_VAN", "shm"), ("PSKV_FAULT_NO_OPT", "1")],
        true,
    );
}

fn survivors_get_an_error_naming_the_dead_worker(env: &[(&str, &str)], at_gate: bool) {
    let mut job = Job::new(3, 1, HEARTBEAT_TIMEOUT, env);
    job.start_infra(1);
    let workers: Vec<usize> = (0..3)
        .map(|_| job.start_worker(ENTRY, "PSKV_FAULT_WORKER", &Faults::default()))
        .collect();
    // No hang: every worker ends (the victim killed, the others on their
    // error) well within the limit.
    for &w in &workers {
        job.wait_exit(w, Duration::from_secs(60));
    }
    let victim = 9 + 2 * VICTIM;
    let name = format!("worker {VICTIM} (id {victim})");
    let mut survivors = 0;
    for &w in &workers {
        let out = job.output(w);
        if out.contains("DYING") {
            continue;
        }
        survivors += 1;
        // (libtest may print its own prefix on the same line.)
        let line = out
            .lines()
            .find_map(|l| l.find("ERROR ").map(|i| &l[i..]))
            .unwrap_or_else(|| panic!("a survivor saw no error: {out}"));
        let secs: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(
            secs < HEARTBEAT_TIMEOUT as f64 + 2.0,
            "the error took {secs} s (heartbeat timeout {HEARTBEAT_TIMEOUT} s): {line}"
        );
        assert!(line.contains(&name) && line.contains("died"), "{line}");
        let again = out
            .lines()
            .find_map(|l| l.find("AGAIN").map(|i| &l[i..]))
            .unwrap();
        assert!(again.contains(&name), "{again}");
        let secs: f64 = again.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(secs < 1.0, "a push after the death waited {secs} s");
        let summed = out
            .lines()
            .find_map(|l| l.find("SUMMED ").map(|i| &l[i + 7..]))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no SUMMED line: {out}"));
        // Rounds 1 to 4 (of the steps before the death) at the gate.
        if at_gate {
            assert_eq!(summed, FATAL_STEP as u64 - 1, "{out}");
        } else {
            assert_eq!(summed, 0, "{out}");
        }
    }
    assert_eq!(survivors, 2, "{}", job.outputs());
}

/// `pskv launch -n 3` with the worker command of this file.
fn launch(exit_on_error: bool) -> std::process::Output {
    let me = std::env::current_exe().unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_pskv"));
    c.args(["launch", "-n", "3", "-s", "1", "--timeout", "60"])
        .args(["--env", "PSKV_FAULT_WORKER=1"]);
    if exit_on_error {
        c.args(["--env", "PSKV_EXIT_ON_ERROR=1"]);
    }
    c.arg("--")
        .arg(&me)
        .args(["--exact", ENTRY, "--nocapture", "--test-threads=1"])
        .output()
        .unwrap()
}

#[test]
fn pskv_launch_ends_a_job_whose_worker_was_killed() {
    let t0 = Instant::now();
    let out = launch(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 9), "{err}");
    assert!(err.contains("exited with signal: 9"), "{err}");
    assert!(err.contains("the job was stopped"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
}

/// Workers that exit with status 3 on their first error die right after
/// the killed one; the launcher still blames the killed one, by its name
/// in the launcher (which is its rank: the launcher's DMLC_WORKER_ID is
/// honoured), with exit 137. Run three times: the order of the deaths is
/// a race the launcher must not lose.
#[test]
fn pskv_launch_blames_the_first_worker_to_die() {
    for _ in 0..3 {
        let out = launch(true);
        let err = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(128 + 9), "{err}");
        assert!(
            err.contains(&format!("worker {VICTIM} (pid")) && err.contains("exited with signal: 9"),
            "{err}"
        );
        // Ranks are the launcher's worker numbers.
        for r in 0..3 {
            assert!(
                stdout.contains(&format!("RANK {r} DMLC_WORKER_ID {r}")),
                "{stdout}"
            );
        }
    }
}
