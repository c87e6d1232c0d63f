//! Starting one member of a job: here, or on a host of the hostfile
//! through ssh (the token on ssh's stdin), in a process group of its own
//! that dies with the launcher.

use std::ffi::OsString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::Role;
use crate::cli::error::{CliError, CliResult};
use pskv::transport::PortPipe;

/// A fresh random cluster token (hex of 16 bytes from the OS).
pub(super) fn random_token() -> CliResult<String> {
    let mut b = [0u8; 16];
    let mut f =
        std::fs::File::open("/dev/urandom").map_err(CliError::io("reading /dev/urandom"))?;
    io::Read::read_exact(&mut f, &mut b).map_err(CliError::io("reading /dev/urandom"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

pub(super) fn pskv_exe() -> CliResult<PathBuf> {
    std::env::current_exe().map_err(CliError::io("locating the pskv program"))
}

/// `+PID\n` for the watchdog, in a buffer of the stack: between fork and
/// exec nothing may allocate.
fn watch_line(pid: libc::pid_t, buf: &mut [u8; 24]) -> &[u8] {
    let mut digits = [0u8; 20];
    let mut n = 0;
    let mut v = pid.unsigned_abs();
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf[0] = b'+';
    for i in 0..n {
        buf[1 + i] = digits[n - 1 - i];
    }
    buf[1 + n] = b'\n';
    &buf[..n + 2]
}

/// Makes `c` start in its own process group and die with its parent; with
/// `watch`, the watchdog's pipe, the member names its group to the
/// watchdog itself before it runs anything. (Told by the launcher after the
/// spawn instead, a launcher killed in between left the group unwatched:
/// its grandchildren outlived the job, `a_killed_launcher_leaves_no_process_behind`
/// under load.)
fn detach_and_tie(c: &mut Command, watch: Option<RawFd>) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (setpgid, getpid, write, prctl, getppid,
    // _exit); it formats on the stack.
    unsafe {
        c.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = watch {
                // One line of at most 22 bytes: a pipe writes it whole,
                // between the launcher's own lines. Best effort, as the
                // launcher's writes: a watchdog that is gone cannot help.
                let mut buf = [0u8; 24];
                let line = watch_line(libc::getpid(), &mut buf);
                libc::write(fd, line.as_ptr().cast(), line.len());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then nobody will
            // signal us, so leave now.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Reads an MPI-style hostfile: one host per line (`host`, `host slots=N`
/// or `host:N`; the count is ignored), `#` comments.
pub fn read_hostfile(path: &Path) -> CliResult<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(CliError::io(format!(
        "reading the hostfile {}",
        path.display()
    )))?;
    let hosts: Vec<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            let h = l.split_whitespace().next().unwrap_or(l);
            h.split(':').next().unwrap_or(h).to_string()
        })
        .collect();
    if hosts.is_empty() {
        return Err(CliError::Usage(format!(
            "the hostfile {} names no host",
            path.display()
        )));
    }
    Ok(hosts)
}

/// This host's address on the route towards `host` (no packet is sent).
pub(super) fn address_towards(host: &str) -> CliResult<String> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").map_err(CliError::io("opening a UDP socket"))?;
    s.connect((host, 9)).map_err(CliError::io(format!(
        "finding this host's address towards {host}"
    )))?;
    Ok(s.local_addr()
        .map_err(CliError::io("reading a socket's address"))?
        .ip()
        .to_string())
}

/// What starting a member takes, kept for the life of the job so that a
/// dead server can be started again.
pub(super) struct Spawner {
    pub(super) env: Vec<(String, String)>,
    /// The token remote members read from stdin (see `spawn`).
    pub(super) secret: Option<String>,
    pub(super) exe: OsString,
    pub(super) command: Vec<OsString>,
    pub(super) capture_stdout: bool,
    /// ssh hosts (empty: local).
    pub(super) hosts: Vec<String>,
    pub(super) servers: u32,
    /// Each local worker's CPUs (`--bind cores`; empty: unbound).
    pub(super) worker_cpus: Vec<Vec<usize>>,
}

impl Spawner {
    /// The host of a member (None: here): servers, then workers,
    /// round-robin over the hosts; the scheduler here.
    fn host(&self, role: Role) -> Option<&str> {
        let i = match role {
            Role::Scheduler => return None,
            Role::Server(i) => i,
            Role::Worker(i) => self.servers + i,
        };
        (!self.hosts.is_empty()).then(|| self.hosts[i as usize % self.hosts.len()].as_str())
    }

    /// Starts `role`'s member; `watch`: the watchdog's pipe, which the member
    /// names its group to before it runs (`detach_and_tie`); `port`: for
    /// a scheduler here, the pipe it writes its port to once it listens on
    /// any free one (see `start_scheduler`).
    pub(super) fn spawn(
        &self,
        role: Role,
        watch: Option<RawFd>,
        port: Option<&PortPipe>,
    ) -> CliResult<Child> {
        let env = &self.env;
        let secret = &self.secret;
        let spec_capture = self.capture_stdout;
        let host = self.host(role);
        let program: Vec<OsString> = match role {
            Role::Scheduler => vec![self.exe.clone(), "scheduler".into()],
            Role::Server(_) => vec![self.exe.clone(), "server".into()],
            Role::Worker(_) => self.command.clone(),
        };
        let (role_name, extra): (&str, Vec<(String, String)>) = match role {
            Role::Scheduler => ("scheduler", vec![]),
            Role::Server(i) => ("server", vec![("DMLC_SERVER_ID".into(), i.to_string())]),
            Role::Worker(i) => ("worker", vec![("DMLC_WORKER_ID".into(), i.to_string())]),
        };
        if port.is_some() && (host.is_some() || role != Role::Scheduler) {
            return Err(CliError::Failed(format!(
                "internal: a port pipe for {role} on {host:?}"
            )));
        }
        let mut c = match host {
            None => {
                let mut c = Command::new(&program[0]);
                c.args(&program[1..])
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .env("DMLC_ROLE", role_name)
                    .envs(extra.iter().map(|(k, v)| (k, v)));
                c
            }
            Some(h) => {
                let dir = std::env::current_dir()
                    .map_err(CliError::io("reading the working directory"))?;
                // The token goes on ssh's stdin, never on a command line
                // (which any user of either host can read in `ps`): the
                // remote shell reads it into its environment first.
                let mut script = String::new();
                if secret.is_some() {
                    script.push_str("IFS= read -r PSKV_TOKEN && export PSKV_TOKEN && ");
                }
                script.push_str(&format!(
                    "cd {} && exec env",
                    sh_quote(&dir.to_string_lossy())
                ));
                for (k, v) in env
                    .iter()
                    .filter(|(k, _)| k != "PSKV_TOKEN")
                    .chain(std::iter::once(&("DMLC_ROLE".into(), role_name.into())))
                    .chain(extra.iter())
                {
                    script.push(' ');
                    script.push_str(&sh_quote(&format!("{k}={v}")));
                }
                for a in &program {
                    script.push(' ');
                    script.push_str(&sh_quote(&a.to_string_lossy()));
                }
                let ssh = std::env::var("PSKV_SSH").unwrap_or_else(|_| "ssh".into());
                let mut c = Command::new(ssh);
                c.args([
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "StrictHostKeyChecking=no",
                    h,
                    // Through sh: the login shell only has to run one
                    // `sh -c '...'` (any POSIX-like shell can).
                    &format!("sh -c {}", sh_quote(&script)),
                ]);
                c
            }
        };
        let remote_token = host.and(secret.as_deref());
        c.stdin(if remote_token.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        if matches!(role, Role::Worker(_)) && spec_capture {
            c.stdout(Stdio::piped());
        } else if !matches!(role, Role::Worker(_)) {
            c.stdout(Stdio::null());
        }
        detach_and_tie(&mut c, watch);
        if let (Role::Worker(i), None) = (role, host) {
            if let Some(cpus) = self.worker_cpus.get(i as usize) {
                super::bind::bind_child(&mut c, cpus);
            }
        }
        if let Some(p) = port {
            p.attach(&mut c);
        }
        let mut child = c
            .spawn()
            .map_err(CliError::io(format!("starting {role} ({:?})", program[0])))?;
        if let (Some(token), Some(mut stdin)) = (remote_token, child.stdin.take()) {
            // One short line into a fresh pipe: it does not block. The
            // pipe then closes, so the command sees an empty stdin.
            if let Err(e) = io::Write::write_all(&mut stdin, format!("{token}\n").as_bytes()) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CliError::Io {
                    what: format!("passing the token to {role} on {}", host.unwrap_or("?")),
                    source: e,
                });
            }
        }
        Ok(child)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_line_is_the_pid_in_decimal() {
        let mut buf = [0u8; 24];
        assert_eq!(watch_line(7, &mut buf), b"+7\n");
        assert_eq!(watch_line(4_194_304, &mut buf), b"+4194304\n");
        assert_eq!(watch_line(libc::pid_t::MAX, &mut buf), b"+2147483647\n");
    }

    /// A member names its group to the watchdog before it runs: the line is
    /// in the pipe when the spawn returns.
    #[test]
    fn a_member_names_its_group_before_it_runs() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let mut fds = [0; 2];
        // SAFETY: pipe2(2) into a two-int array; the fds are owned below.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh fds of ours, each owned once.
        let (mut r, w) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        };
        let mut c = Command::new("true");
        detach_and_tie(&mut c, Some(w.as_raw_fd()));
        let mut child = c.spawn().unwrap();
        drop(w);
        let pid = child.id();
        child.wait().unwrap();
        let mut got = String::new();
        io::Read::read_to_string(&mut r, &mut got).unwrap();
        assert_eq!(got, format!("+{pid}\n"));
    }

    #[test]
    fn quoting_for_the_remote_shell() {
        assert_eq!(sh_quote("abc-1.2"), "abc-1.2");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn hostfiles() {
        let dir = std::env::temp_dir().join(format!("pskv-hosts-{}", std::process::id()));
        std::fs::write(
            &dir,
            "# cluster\nnode1 slots=4\nnode2:2\n\n  node3  # last\n",
        )
        .unwrap();
        assert_eq!(
            read_hostfile(&dir).unwrap(),
            vec!["node1", "node2", "node3"]
        );
        std::fs::write(&dir, "# nothing\n").unwrap();
        assert!(read_hostfile(&dir)
            .unwrap_err()
            .to_string()
            .contains("names no host"));
        std::fs::remove_file(&dir).unwrap();
        assert!(read_hostfile(&dir).is_err());
    }
}
