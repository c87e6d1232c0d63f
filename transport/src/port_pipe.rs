//! `PSKV_PORT_FD`, both ends: how a launcher learns the port of a
//! scheduler it starts on any free port (`DMLC_PS_ROOT_PORT=0`). The
//! launcher makes a [`PortPipe`], hands its write end to the scheduler's
//! process ([`PortPipe::attach`]), and reads the port back
//! ([`PortPipe::read`]); the scheduler writes the port it bound and a
//! newline there once it listens (`report_port`, from `Postoffice::start`),
//! then closes it. A port the launcher found free and released instead
//! could be taken by another process before the scheduler bound it (CI saw
//! "Address already in use").

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::TransportError;

/// The launcher's end of `PSKV_PORT_FD` (see the module docs).
#[derive(Debug)]
pub struct PortPipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl PortPipe {
    /// A fresh pipe, both ends close-on-exec (no child but the one it is
    /// attached to inherits it).
    pub fn new() -> Result<PortPipe, TransportError> {
        let mut fds = [0; 2];
        // SAFETY: pipe2(2) into a two-int array; the fds are owned below.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(TransportError::io(
                "making a pipe for the scheduler's port",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: two fresh descriptors of ours, each owned once.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(PortPipe { r, w })
    }

    /// Makes `c` (a scheduler, spawned next and once) listen on any free
    /// port and write it into this pipe: `DMLC_PS_ROOT_PORT=0`,
    /// `PSKV_PORT_FD`, and the write end kept open across its exec.
    pub fn attach(&self, c: &mut Command) {
        let fd = self.w.as_raw_fd();
        c.env("DMLC_PS_ROOT_PORT", "0")
            .env("PSKV_PORT_FD", fd.to_string());
        // SAFETY: only fcntl(2) between fork and exec, on a descriptor this
        // pipe owns until `read` (after the spawn): this one child keeps
        // the close-on-exec write end across its exec.
        unsafe {
            c.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// The port, once the scheduler spawned since `attach` listens: closes
    /// this end's write end (so the scheduler's exit ends the read), then
    /// waits at most `timeout`. An error if the scheduler closes the pipe
    /// first (it exited: its own error is on its stderr) or writes
    /// something else, or if `stop` is raised meanwhile (looked at every
    /// 100 ms).
    pub fn read(self, timeout: Duration, stop: Option<&AtomicBool>) -> Result<u16, TransportError> {
        let PortPipe { r, w } = self;
        drop(w);
        let what = "waiting for the scheduler's port";
        let failed = |m: &str| TransportError::io(what, m);
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut f = std::fs::File::from(r);
        while !got.ends_with(b"\n") && got.len() < 16 {
            if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                return Err(failed(
                    "stopped by a signal while waiting for the scheduler to listen",
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(failed(&format!(
                    "the scheduler did not report the port it listens on within {timeout:?}"
                )));
            }
            let mut p = libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 100) as i32;
            // SAFETY: one pollfd of ours.
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(TransportError::io(what, e));
            }
            if n == 0 {
                continue;
            }
            let mut buf = [0u8; 16];
            match f.read(&mut buf) {
                Ok(0) => {
                    return Err(failed(
                        "the scheduler exited before it listened (its error is above)",
                    ))
                }
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TransportError::io(what, e)),
            }
        }
        std::str::from_utf8(&got)
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                failed(&format!(
                    "the scheduler reported {:?} as its port",
                    String::from_utf8_lossy(&got)
                ))
            })
    }
}

/// Writes `port` and a newline to the inherited descriptor `fd`
/// (`PSKV_PORT_FD`), then closes it: how `pskv launch` learns the port of a
/// scheduler it started with `DMLC_PS_ROOT_PORT=0`. (A port the launcher
/// picked and released could be taken by another process before the
/// scheduler bound it: CI saw "Address already in use".) Once per process,
/// and only into a pipe: a second call (a `Config` cloned and started
/// twice), or a number that names anything else, is an error, so no
/// descriptor this process uses otherwise is written to or closed.
pub(crate) fn report_port(fd: i32, port: u16) -> Result<(), TransportError> {
    static REPORTED: AtomicBool = AtomicBool::new(false);
    let what = || format!("writing the port to PSKV_PORT_FD={fd}");
    // SAFETY: fstat(2) into a zeroed stat of ours; it only reads the fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(TransportError::io(what(), std::io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(TransportError::io(
            what(),
            "the descriptor is not a pipe (PSKV_PORT_FD is for a launcher's pipe)",
        ));
    }
    if REPORTED.swap(true, Ordering::AcqRel) {
        return Err(TransportError::io(
            what(),
            "this process reported its port once already (the descriptor is closed)",
        ));
    }
    // SAFETY: an open pipe this process inherited for this one use (the
    // configuration takes the number from a scheduler's environment,
    // never a standard stream), taken here once per process (`REPORTED`):
    // owning and closing it takes it from nobody.
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    std::io::Write::write_all(&mut f, format!("{port}\n").as_bytes())
        .map_err(|e| TransportError::io(what(), e))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd};

    use super::*;

    /// A pipe with the scheduler's end as a `File` (the test writes it).
    fn pipe() -> (PortPipe, std::fs::File) {
        let p = PortPipe::new().unwrap();
        // SAFETY: a duplicate of the write end, owned by the `File` alone.
        let w = unsafe { std::fs::File::from_raw_fd(libc::dup(p.w.as_raw_fd())) };
        (p, w)
    }

    #[test]
    fn the_port_from_the_pipe() {
        let (p, mut w) = pipe();
        w.write_all(b"41").unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            w.write_all(b"23\n").unwrap();
        });
        assert_eq!(p.read(Duration::from_secs(10), None).unwrap(), 4123);
        t.join().unwrap();
    }

    #[test]
    fn a_scheduler_that_exits_silent_or_says_nonsense_or_nothing() {
        let (p, w) = pipe();
        drop(w);
        let e = p.read(Duration::from_secs(10), None).unwrap_err();
        assert!(e.to_string().contains("exited before it listened"), "{e}");
        let (p, mut w) = pipe();
        w.write_all(b"0\n").unwrap();
        let e = p.read(Duration::from_secs(10), None).unwrap_err();
        assert!(e.to_string().contains("as its port"), "{e}");
        let (p, _w) = pipe();
        let t = Instant::now();
        let e = p.read(Duration::from_millis(100), None).unwrap_err();
        assert!(e.to_string().contains("did not report"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // A raised stop flag ends the wait within its 100 ms look.
        let (p, _w) = pipe();
        let stop = AtomicBool::new(true);
        let e = p.read(Duration::from_secs(60), Some(&stop)).unwrap_err();
        assert!(e.to_string().contains("stopped by a signal"), "{e}");
    }

    /// The port goes into a pipe, once per process; a descriptor that is
    /// not a pipe is refused and left open.
    #[test]
    fn the_port_goes_into_a_pipe_once() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let e = report_port(file.as_raw_fd(), 1234).unwrap_err();
        assert!(e.to_string().contains("not a pipe"), "{e}");
        // SAFETY: fcntl(F_GETFD) only asks whether the fd is open.
        assert!(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFD) } >= 0);
        let mut fds = [0; 2];
        // SAFETY: pipe2(2) into a two-int array; the read end is owned below,
        // the write end by `report_port`.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let mut r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        report_port(fds[1], 4321).unwrap();
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "4321\n");
        // SAFETY: as above; both ends owned here this time.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let (_r, _w) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        let e = report_port(fds[1], 4321).unwrap_err();
        assert!(e.to_string().contains("once already"), "{e}");
    }
}
