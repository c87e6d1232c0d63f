//! What the tests and benches of the pskv crates share, written once:
//! deterministic values, child processes that end with their owner, and
//! schedulers that find a free port themselves. A dev-dependency only.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
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
        let pipe = (role == "scheduler").then(|| PortPipe::attach(&mut c));
        infra.0.push(c.spawn().expect("starting a pskv node"));
        if let Some(p) = pipe {
            env.push(("DMLC_PS_ROOT_PORT", p.read().to_string()));
        }
    }
    infra
}

/// How a test learns the port of a `pskv scheduler` that it starts with
/// `DMLC_PS_ROOT_PORT=0`: a pipe the scheduler writes it to once it
/// listens (`PSKV_PORT_FD`). A port found free and released first could
/// be taken by another process before the scheduler binds it.
pub struct PortPipe {
    r: std::fs::File,
    w: OwnedFd,
}

impl PortPipe {
    /// Sets `c`'s port to 0 and hands it the pipe's write end.
    pub fn attach(c: &mut Command) -> PortPipe {
        let mut fds = [0; 2];
        // SAFETY: pipe2(2) into a two-int array; the fds are owned below.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: two fresh descriptors, each owned once.
        let (r, w) = unsafe {
            use std::os::fd::FromRawFd;
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        };
        let fd = w.as_raw_fd();
        c.env("DMLC_PS_ROOT_PORT", "0")
            .env("PSKV_PORT_FD", fd.to_string());
        // SAFETY: only fcntl(2) between fork and exec: this one child keeps
        // the (close-on-exec) write end across its exec.
        unsafe {
            c.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        PortPipe { r, w }
    }

    /// The port, once the scheduler (spawned since `attach`) listens;
    /// panics if it exits first or takes more than a minute.
    pub fn read(self) -> u16 {
        let PortPipe { mut r, w } = self;
        drop(w);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            let _ = tx.send(s);
        });
        let s = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the scheduler did not report its port within 60 s");
        s.trim()
            .parse()
            .unwrap_or_else(|_| panic!("the scheduler exited without its port (it wrote {s:?})"))
    }
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
