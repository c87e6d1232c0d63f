//! What the tests and benches of the pskv crates share, written once:
//! deterministic values, child processes that end with their owner, and
//! schedulers that find a free port themselves. A dev-dependency only.

use std::io::Read;
use std::process::{Child, Command};

pub use pskv_transport::PortPipe;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `n` deterministic pseudo-random values in [-1, 1) from `seed` (an
/// xorshift over 24-bit steps: the same on every machine).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    values_in(seed, n, 1.0)
}

/// `n` deterministic pseudo-random values in [-`half`, `half`) from `seed`.
pub fn values_in(seed: u64, n: usize, half: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * (2.0 * half) - half
        })
        .collect()
}

/// Child processes killed (SIGKILL) and reaped when dropped, so that a
/// failing test leaves none behind.
#[derive(Default)]
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

/// Runs `cmd` to its end with its output piped and read on threads of
/// their own (a grandchild that keeps a pipe open cannot block the
/// caller); killed, and the test failed with what it wrote to stderr, if
/// it runs longer than `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> std::process::Output {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let mut procs = Procs(vec![child]);
    let mut outs = procs.read_stdouts();
    let err = procs.0[0].stderr.take();
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut e) = err {
            let _ = e.read_to_end(&mut s);
        }
        s
    });
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(st) = procs.0[0].try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = procs.0[0].kill();
            let _ = procs.0[0].wait();
            panic!(
                "{cmd:?} ran past {limit:?}; stderr: {}",
                String::from_utf8_lossy(&err.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: outs.remove(0).join().unwrap_or_default().into_bytes(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Starts the scheduler and `servers` servers of a job: `exe scheduler`
/// (on a port it finds free, which goes into `env` as `DMLC_PS_ROOT_PORT`
/// for the servers and the caller's workers) and `exe server` (the pskv
/// binary), each with `env` and its `DMLC_ROLE`, output discarded.
pub fn spawn_infra(exe: &str, env: &mut Vec<(&str, String)>, servers: u32) -> Procs {
    let mut infra = Procs::default();
    env.retain(|(k, _)| *k != "DMLC_PS_ROOT_PORT");
    for role in std::iter::once("scheduler").chain((0..servers).map(|_| "server")) {
        let mut c = Command::new(exe);
        c.arg(role)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("DMLC_ROLE", role)
            .stdout(std::process::Stdio::null());
        let pipe = (role == "scheduler").then(|| {
            let p = PortPipe::new().expect("a pipe for the scheduler's port");
            p.attach(&mut c);
            p
        });
        infra.0.push(c.spawn().expect("starting a pskv node"));
        if let Some(p) = pipe {
            env.push(("DMLC_PS_ROOT_PORT", port_of(p).to_string()));
        }
    }
    infra
}

/// Waits for the port of a scheduler started with `pipe` attached
/// ([`PortPipe::attach`]): at most a minute; panics if it exits first.
pub fn port_of(pipe: PortPipe) -> u16 {
    pipe.read(Duration::from_secs(60), None)
        .expect("the scheduler's port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_fixed_and_in_range() {
        let v = values(7, 1000);
        assert_eq!(v, values(7, 1000));
        assert_ne!(v, values(8, 1000));
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        assert!(values_in(7, 1000, 2.0)
            .iter()
            .all(|x| (-2.0..2.0).contains(x)));
        // Pinned: tests and fixtures depend on these exact values.
        assert_eq!(values(1, 1)[0].to_bits(), values_in(1, 1, 1.0)[0].to_bits());
    }
}
