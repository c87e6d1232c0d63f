//! Watching a started job to its end: deaths noticed at once (pidfds),
//! whom to blame, server restarts, and the teardown (SIGTERM, then SIGKILL
//! to every member's group).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::os::unix::process::ExitStatusExt;
use std::process::{ChildStdout, ExitStatus};

use super::{
    code_of, Failure, Job, JobSpec, Launcher, Member, Role, BLAME_WINDOW, KILL_GRACE, LEAVE_GRACE,
    POLL, RESTART_DELAY,
};
use crate::cli::error::{CliError, CliResult};

/// A pidfd of `pid` (None where the kernel has none).
pub(super) fn pidfd_of(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open(2) with no flags; a returned descriptor is ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Sleeps up to `limit`, or until one of the processes behind `fds` exits.
fn wait_for_exit(fds: &[std::os::fd::BorrowedFd<'_>], limit: Duration) {
    use std::os::fd::AsRawFd;
    if fds.is_empty() {
        std::thread::sleep(limit);
        return;
    }
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll(2) on descriptors the members own, for the call only.
    unsafe {
        libc::poll(
            polls.as_mut_ptr(),
            polls.len() as libc::nfds_t,
            limit.as_millis() as libc::c_int,
        );
    }
}

impl Job {
    /// Worker `i`'s stdout, when the spec captured it (once).
    pub fn take_stdout(&mut self, i: u32) -> Option<ChildStdout> {
        self.members
            .iter_mut()
            .find(|m| m.role == Role::Worker(i))
            .and_then(|m| m.child.stdout.take())
    }

    /// Watches the job until every worker has exited 0 (`Ok`), or a member
    /// fails, `stop` is raised or `timeout` passes (the job is torn down and
    /// the failure says why).
    pub fn supervise(
        &mut self,
        stop: &AtomicBool,
        timeout: Option<Duration>,
    ) -> Result<(), Failure> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut workers_done_at: Option<Instant> = None;
        loop {
            if stop.load(Ordering::Relaxed) {
                self.teardown();
                return Err(Failure::new("interrupted: the job was stopped", 130));
            }
            self.reap()?;
            // A dead server is started again while restarts are left and
            // the workers run; any other failure ends the job.
            let workers_running = self
                .members
                .iter()
                .any(|m| matches!(m.role, Role::Worker(_)) && m.status.is_none());
            let dead_server = self.members.iter().position(|m| {
                !m.replaced
                    && matches!(m.role, Role::Server(_))
                    && m.status.is_some_and(|s| !s.success())
            });
            let others_failed = self.members.iter().any(|m| {
                !m.replaced
                    && !matches!(m.role, Role::Server(_))
                    && m.status.is_some_and(|s| !s.success())
            });
            if let (Some(i), true, true, false) = (
                dead_server,
                self.deaths_allowed > 0,
                workers_running,
                others_failed,
            ) {
                // Replicas: its backup serves its keys.
                self.deaths_allowed -= 1;
                let m = &mut self.members[i];
                m.replaced = true;
                eprintln!(
                    "pskv launch: {} (pid {}) exited with {}; its backup serves its keys (replicas), the job goes on",
                    m.role,
                    m.child.id(),
                    m.status.expect("checked")
                );
                continue;
            }
            if let (Some(i), true, true, false) = (
                dead_server,
                self.restarts_left > 0,
                workers_running,
                others_failed,
            ) {
                let (role, pid, st) = {
                    let m = &mut self.members[i];
                    m.replaced = true;
                    (m.role, m.child.id(), m.status.expect("checked"))
                };
                self.restarts_left -= 1;
                eprintln!(
                    "pskv launch: {role} (pid {pid}) exited with {st}; starting it again from its checkpoint ({} restarts left)",
                    self.restarts_left
                );
                // A short pause; a server that registers while its old
                // self still counts as alive is held by the scheduler
                // until the old one is declared dead (heartbeat timeout).
                std::thread::sleep(RESTART_DELAY);
                if let Err(e) = self.start_member(role) {
                    self.teardown();
                    return Err(Failure::new(format!("restarting {role}: {e}"), 1));
                }
                continue;
            }
            if let Some(i) = self.whom_to_blame()? {
                let m = &self.members[i];
                let st = m.status.expect("checked");
                let msg = format!(
                    "{} (pid {}) exited with {st}; the job was stopped",
                    m.role,
                    m.child.id()
                );
                let code = if matches!(m.role, Role::Worker(_)) {
                    code_of(st)
                } else {
                    1
                };
                self.teardown();
                return Err(Failure::new(msg, code));
            }
            let others_running = self
                .members
                .iter()
                .any(|m| !matches!(m.role, Role::Worker(_)) && m.status.is_none());
            if !workers_running {
                let since = *workers_done_at.get_or_insert_with(Instant::now);
                if !others_running {
                    self.torn_down = true;
                    return Ok(());
                }
                if since.elapsed() > LEAVE_GRACE {
                    // The workers succeeded: servers that linger are
                    // stopped, and the job still counts as done.
                    eprintln!(
                        "pskv launch: servers still running {LEAVE_GRACE:?} after the workers finished; stopping them"
                    );
                    self.teardown();
                    return Ok(());
                }
            } else if let Some(d) = deadline {
                if Instant::now() > d {
                    let t = timeout.unwrap_or_default();
                    self.teardown();
                    return Err(Failure::new(
                        format!("the workers did not finish within {t:?}; the job was stopped"),
                        124,
                    ));
                }
            }
            self.wait_for_a_death(POLL);
        }
    }

    /// Waits up to `timeout` for a member still watched (by its pidfd) to
    /// exit.
    fn wait_for_a_death(&self, timeout: Duration) {
        use std::os::fd::AsFd;
        let fds: Vec<std::os::fd::BorrowedFd<'_>> = self
            .members
            .iter()
            .filter_map(|m| m.pidfd.as_ref().map(|f| f.as_fd()))
            .collect();
        wait_for_exit(&fds, timeout);
    }

    /// Records the exit of every member that has exited since the last
    /// look, and when it was seen.
    fn reap(&mut self) -> Result<(), Failure> {
        let now = Instant::now();
        for m in self.members.iter_mut().filter(|m| m.status.is_none()) {
            match m.child.try_wait() {
                Ok(Some(st)) => {
                    m.status = Some(st);
                    m.died_at = Some(now);
                    m.pidfd = None;
                }
                Ok(None) => {}
                Err(e) => {
                    let msg = format!("watching {}: {e}", m.role);
                    self.teardown();
                    return Err(Failure::new(msg, 1));
                }
            }
        }
        Ok(())
    }

    /// The member to blame for the job's failure, if one failed: the first
    /// to die (the others often fail because of it), except that of deaths
    /// seen within `BLAME_WINDOW` of each other, one by a signal.
    ///
    /// Subtle: a killed process closes its sockets before it can be
    /// reaped, so a peer that fails at once because of it (its first error
    /// ends it) can be seen exiting first, on a loaded host. When the
    /// first failure seen is not a signal's, the others get the window to
    /// be seen too.
    fn whom_to_blame(&mut self) -> Result<Option<usize>, Failure> {
        let failed = |m: &Member| !m.replaced && m.status.is_some_and(|s| !s.success());
        let by_signal = |m: &Member| m.status.and_then(|s| s.signal()).is_some();
        let Some(first) = self
            .members
            .iter()
            .filter(|m| failed(m))
            .filter_map(|m| m.died_at)
            .min()
        else {
            return Ok(None);
        };
        let window_end = first + BLAME_WINDOW;
        if !self.members.iter().any(|m| failed(m) && by_signal(m)) {
            while Instant::now() < window_end && self.members.iter().any(|m| m.status.is_none()) {
                self.wait_for_a_death(window_end.saturating_duration_since(Instant::now()));
                self.reap()?;
            }
        }
        Ok(self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| failed(m) && m.died_at.is_some_and(|t| t <= window_end))
            .min_by_key(|(_, m)| (!by_signal(m), m.died_at))
            .map(|(i, _)| i))
    }

    /// SIGTERM to every live member's process group, then SIGKILL after a
    /// grace period; reaps every member.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        let signal_all = |members: &mut [Member], sig: libc::c_int| {
            for m in members.iter_mut().filter(|m| m.status.is_none()) {
                // SAFETY: plain kill(2) on the group this child leads.
                unsafe {
                    libc::kill(-(m.child.id() as libc::pid_t), sig);
                }
            }
        };
        signal_all(&mut self.members, libc::SIGTERM);
        let until = Instant::now() + KILL_GRACE;
        while Instant::now() < until {
            let mut live = false;
            for m in self.members.iter_mut().filter(|m| m.status.is_none()) {
                match m.child.try_wait() {
                    Ok(Some(st)) => m.status = Some(st),
                    Ok(None) => live = true,
                    Err(_) => m.status = Some(ExitStatus::from_raw(0)),
                }
            }
            if !live {
                return;
            }
            std::thread::sleep(POLL);
        }
        signal_all(&mut self.members, libc::SIGKILL);
        for m in self.members.iter_mut().filter(|m| m.status.is_none()) {
            let _ = m.child.kill();
            m.status = m.child.wait().ok();
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.teardown();
        // Members' groups may hold grandchildren that outlived their
        // leader: stop them as well. (Not the groups of servers replaced
        // long ago: servers leave no grandchildren, and a group id free
        // that long may belong to someone else by now.)
        for m in self.members.iter().filter(|m| !m.replaced) {
            // SAFETY: plain kill(2); a group that is gone answers ESRCH.
            unsafe {
                libc::kill(-(m.child.id() as libc::pid_t), libc::SIGKILL);
            }
        }
        if let Some(w) = self.watchdog.take() {
            w.dismiss();
        }
        if let Some(d) = self.checkpoint_dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Runs a local job whose workers' stdout is collected; returns each
/// worker's output once all of them exited 0. `on_line` sees every
/// worker's lines as they come (ranks are the scheduler's to give, so the
/// launch order says nothing of which worker is rank 0).
pub fn run_collecting(
    spec: &JobSpec,
    timeout: Duration,
    on_line: std::sync::Arc<dyn Fn(&str) + Send + Sync>,
) -> CliResult<Vec<String>> {
    let mut spec = spec.clone();
    spec.capture_stdout = true;
    let mut job = Job::start(&spec, Launcher::Local)?;
    // Read every worker's stdout on its own thread so that none blocks.
    let readers: Vec<_> = (0..spec.workers)
        .map(|i| {
            let out = job.take_stdout(i);
            let on_line = on_line.clone();
            std::thread::spawn(move || {
                let mut s = String::new();
                let Some(o) = out else { return s };
                for line in io::BufRead::lines(io::BufReader::new(o)).map_while(Result::ok) {
                    on_line(&line);
                    s.push_str(&line);
                    s.push('\n');
                }
                s
            })
        })
        .collect();
    let stop = stop_flag()?;
    let result = job.supervise(&stop, Some(timeout));
    drop(job);
    let outs: Vec<String> = readers
        .into_iter()
        .map(|t| t.join().unwrap_or_default())
        .collect();
    result.map_err(|f| CliError::Failed(f.message))?;
    Ok(outs)
}

/// Raises the returned flag on SIGINT, SIGTERM and SIGHUP.
pub fn stop_flag() -> CliResult<std::sync::Arc<AtomicBool>> {
    // Installed once per process: a bench sweep supervises one job per run.
    static FLAG: std::sync::OnceLock<std::sync::Arc<AtomicBool>> = std::sync::OnceLock::new();
    if let Some(f) = FLAG.get() {
        return Ok(f.clone());
    }
    let flag = std::sync::Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, flag.clone())
            .map_err(CliError::io("installing a signal handler"))?;
    }
    Ok(FLAG.get_or_init(|| flag).clone())
}
