//! What the multi-process tests share: child processes that die with the
//! test, a free port, readers of the children's output, a test binary
//! re-run as a worker, resident-set readings, and the fault-injection
//! harness (`cluster`).

#![allow(dead_code)] // each test file uses its own part of this

pub mod cluster;

use std::io::Read;
use std::process::{Child, Command};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Children killed when dropped: no test leaves a process behind.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Procs {
    /// Reads every child's piped stdout on a thread of its own from now
    /// on, so that none blocks on a full pipe while the others wait for it.
    pub fn read_stdouts(&mut self) -> Vec<JoinHandle<String>> {
        self.0
            .iter_mut()
            .map(|c| {
                let out = c.stdout.take();
                std::thread::spawn(move || {
                    let mut s = String::new();
                    if let Some(mut o) = out {
                        let _ = o.read_to_string(&mut s);
                    }
                    s
                })
            })
            .collect()
    }

    /// Waits for every child to exit 0, at most `limit` in all.
    pub fn wait_success(&mut self, limit: Duration, what: &str) {
        let end = Instant::now() + limit;
        for c in &mut self.0 {
            loop {
                if let Some(st) = c.try_wait().unwrap() {
                    assert!(st.success(), "{what}: a process failed with {st}");
                    break;
                }
                assert!(Instant::now() < end, "{what}: not done within {limit:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// This test binary run again as a worker: only the test `entry` runs, and
/// `flag` is set so that it does its work.
pub fn worker_command(entry: &str, flag: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", entry, "--nocapture", "--test-threads=1"])
        .env(flag, "1");
    c
}

/// The resident set of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}
