//! The watchdog: a process of its own group that SIGKILLs a job's members
//! (and removes its checkpoint directory) when the launcher dies without a
//! goodbye (module docs of `launch`).

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::cli::error::{CliError, CliResult};

/// The launcher's end of the watchdog (module docs).
pub(super) struct Watchdog {
    child: Child,
    pipe: std::process::ChildStdin,
}

impl Watchdog {
    pub(super) fn start(exe: &Path) -> CliResult<Watchdog> {
        let mut c = Command::new(exe);
        c.arg("launch-watchdog")
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        // SAFETY: only setpgid(2) between fork and exec. A group of its own:
        // a Ctrl-C at the terminal is the launcher's to handle, not its.
        unsafe {
            c.pre_exec(|| {
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = c
            .spawn()
            .map_err(CliError::io("starting the launch watchdog"))?;
        let pipe = child
            .stdin
            .take()
            .ok_or_else(|| CliError::Failed("the launch watchdog has no stdin".into()))?;
        Ok(Watchdog { child, pipe })
    }

    /// The pipe's write end, through which a member about to start names
    /// its process group (`+PGID`, `spawn.rs`): before it runs anything, so
    /// that no instant exists where it runs unwatched.
    pub(super) fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.pipe)
    }

    /// Tells the watchdog about a directory of the job's own (removed if
    /// the launcher dies without a goodbye).
    pub(super) fn watch_dir(&mut self, dir: &Path) {
        let _ = io::Write::write_all(&mut self.pipe, format!("d{}\n", dir.display()).as_bytes());
    }

    /// The job ended under the launcher's control: the watchdog leaves
    /// without killing anything.
    pub(super) fn dismiss(mut self) {
        let _ = io::Write::write_all(&mut self.pipe, b"q\n");
        drop(self.pipe);
        let _ = self.child.wait();
    }
}

/// `pskv launch-watchdog`: reads `+PGID` and `dPATH` lines and a final `q`
/// from stdin; at EOF without `q`, SIGKILLs every group it read and removes
/// every directory (the job's own checkpoints: the model's weights).
pub fn watchdog_main() {
    // SAFETY: setting signal dispositions to ignore; no handler runs.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let mut groups = Vec::new();
    let mut dirs = Vec::new();
    for line in io::BufRead::lines(io::stdin().lock()) {
        let Ok(line) = line else { break };
        if line == "q" {
            return;
        }
        if let Some(d) = line.strip_prefix('d') {
            dirs.push(PathBuf::from(d));
            continue;
        }
        if let Some(p) = line
            .strip_prefix('+')
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        {
            if p > 1 {
                groups.push(p);
            }
        }
    }
    for g in groups {
        // SAFETY: plain kill(2) on a group; a group that is gone answers ESRCH.
        unsafe {
            libc::kill(-g, libc::SIGKILL);
        }
    }
    for d in dirs {
        // Only a directory the launcher made: its name says so.
        if d.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("pskv-checkpoints-"))
        {
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}
