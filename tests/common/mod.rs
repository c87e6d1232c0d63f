//! What the multi-process tests share: child processes that die with the
//! test, a free port, readers of the children's output, a test binary
//! re-run as a worker, resident-set readings, and the fault-injection
//! harness (`cluster`).

#![allow(dead_code)] // each test file uses its own part of this

pub mod cluster;

use std::process::Command;

#[allow(unused_imports)] // each test file uses its own part of this
pub use pskv_test_support::{spawn_infra, Procs};

/// `pskv demo-worker`'s arguments for a job of 2 workers and 1 server, one
/// epoch.
pub const DEMO_WORKER_2X1: [&str; 7] = [
    "demo-worker",
    "--workers",
    "2",
    "--servers",
    "1",
    "--epochs",
    "1",
];

/// This test binary run again as a worker: only the test `entry` runs, and
/// `flag` is set so that it does its work.
pub fn worker_command(entry: &str, flag: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", entry, "--nocapture", "--test-threads=1"])
        .env(flag, "1");
    c
}

/// `n` workers of a job: this test binary's `entry` (see
/// [`worker_command`]) with `env`, `DMLC_ROLE=worker` and a piped stdout.
pub fn spawn_workers(n: u32, entry: &str, flag: &str, env: &[(&str, String)]) -> Procs {
    let mut workers = Procs::default();
    for _ in 0..n {
        workers.0.push(
            worker_command(entry, flag)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("DMLC_ROLE", "worker")
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    workers
}

/// The resident set of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, &["VmRSS:"])
}

/// The private resident set of process `pid` (anonymous and file pages:
/// the resident set less the shared memory it touched), in KiB.
pub fn private_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, &["RssAnon:", "RssFile:"])
}

/// The sum of `fields` of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, fields: &[&str]) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    fields
        .iter()
        .map(|f| {
            s.lines()
                .find_map(|l| l.strip_prefix(f))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum()
}
