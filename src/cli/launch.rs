//! `pskv launch`: starts a job's scheduler, servers and workers and watches
//! them until the workers are done.
//!
//! Launchers:
//! - `local`: every process a child of this one, on this host.
//! - `ssh`: the scheduler here; servers and workers round-robin over the
//!   hosts of a hostfile, each through `ssh HOST sh -c 'cd DIR && exec env
//!   ... CMD'` (the same paths must exist there, as with MXNet's
//!   launch.py). The cluster token travels on ssh's stdin, never on a
//!   command line.
//! - `mpi`, `slurm`: this process is one rank of `mpirun`/`srun`; it takes
//!   its role from the rank variables (rank 0 the scheduler, ranks 1..=S
//!   servers, the rest workers) and replaces itself with that role.
//!
//! States of a supervised job (`Job`): *running* until (a) every worker
//! exits 0: the scheduler and servers get a grace period to leave, then the
//! job is *done*; (b) a worker exits non-zero, a server or the scheduler
//! fails, the deadline passes or a stop signal arrives: the job is *torn
//! down* (SIGTERM to every member's process group, SIGKILL after a grace
//! period). Dropping a `Job` tears it down too. With `--restart-servers N`,
//! a server that fails while workers run is first started again (same
//! role, host and environment; it recovers its rank and checkpoint), up to
//! N times in all; the job stays *running*. With replicas
//! (`--replicas 2`, `PSKV_REPLICAS=2`), the death of one server is survived
//! without a restart: its backup serves its keys, and the job stays
//! *running*.
//!
//! Children never outlive the launcher: each child starts its own process
//! group (so the job is stopped as a whole, grandchildren included) and asks
//! the kernel to SIGKILL it when its parent dies (`PR_SET_PDEATHSIG`), so a
//! launcher killed with SIGKILL takes its children with it.
//!
//! `PR_SET_PDEATHSIG` reaches the direct children only; a worker command
//! such as `sh -c 'python train.py'` has grandchildren. So a job also starts
//! a watchdog process (`pskv launch-watchdog`, in a group of its own) and
//! tells it every member's group through a pipe; when the pipe reaches EOF
//! without a goodbye (the launcher died, however), the watchdog SIGKILLs
//! every group it was told of and exits.
//!
//! Subtle: `PR_SET_PDEATHSIG` fires when the *thread* that forked the child
//! exits, not the process. Jobs are started and supervised from the thread
//! that owns the `Job` (the main thread in `pskv`), which outlives them.
//!
//! Subtle: the watchdog sees EOF only when no process holds the pipe's write
//! end. The write end is the launcher's alone because `Command` opens its
//! pipes close-on-exec, so members never inherit it.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::error::{CliError, CliResult};

/// How long the scheduler and servers may take to leave after the workers.
const LEAVE_GRACE: Duration = Duration::from_secs(10);
/// How long members get between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(3);
/// The supervision loop's period.
const POLL: Duration = Duration::from_millis(20);
/// Deaths seen within this of the first failure count as at once when the
/// launcher picks whom to blame (`Job::whom_to_blame`).
const BLAME_WINDOW: Duration = Duration::from_millis(300);
/// How long a dead server stays dead before it is started again.
const RESTART_DELAY: Duration = Duration::from_millis(500);
/// The most workers, and the most servers, of a cluster (as
/// `DMLC_NUM_WORKER` and `DMLC_NUM_SERVER` allow).
const MAX_NODES: u32 = 4096;
/// The most servers and workers a local job starts on this host.
const MAX_LOCAL: u32 = 1024;

/// Which launcher starts the processes (`--launcher`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Launcher {
    /// Child processes on this host.
    Local,
    /// Remote processes through ssh.
    Ssh,
    /// A rank of `mpirun`.
    Mpi,
    /// A task of `srun`.
    Slurm,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// Workers.
    pub workers: u32,
    /// Servers.
    pub servers: u32,
    /// Added to every process's environment (after the DMLC_* variables, so
    /// these win).
    pub env: Vec<(String, String)>,
    /// Each worker's command and arguments.
    pub command: Vec<OsString>,
    /// Pipe the workers' stdout to the launcher (`Job::take_stdout`)
    /// instead of inheriting it.
    pub capture_stdout: bool,
    /// ssh: the hosts, in order.
    pub hosts: Vec<String>,
    /// The scheduler's address as the other nodes reach it (ssh, mpi,
    /// slurm; `local` uses 127.0.0.1).
    pub root_uri: Option<String>,
    /// How many times a dead server is started again (from its checkpoint)
    /// before its death ends the job.
    pub server_restarts: u32,
}

impl JobSpec {
    /// A local job running `command` as each worker.
    pub fn local(workers: u32, servers: u32, command: Vec<OsString>) -> JobSpec {
        JobSpec {
            workers,
            servers,
            env: Vec::new(),
            command,
            capture_stdout: false,
            hosts: Vec::new(),
            root_uri: None,
            server_restarts: 0,
        }
    }
}

/// Why a job did not succeed, and the exit status `pskv launch` gives.
#[derive(Debug)]
pub struct Failure {
    /// What happened.
    pub message: String,
    /// The launcher's exit status.
    pub code: u8,
}

impl Failure {
    fn new(message: impl Into<String>, code: u8) -> Failure {
        Failure {
            message: message.into(),
            code,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The exit status a launcher reports for a member's status (a shell's
/// convention: 128 + signal for a killed process).
fn code_of(st: ExitStatus) -> u8 {
    match (st.code(), st.signal()) {
        (Some(c), _) => c.clamp(1, 255) as u8,
        (None, Some(s)) => (128 + s).clamp(1, 255) as u8,
        _ => 1,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Scheduler,
    Server(u32),
    Worker(u32),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Scheduler => write!(f, "the scheduler"),
            Role::Server(i) => write!(f, "server {i}"),
            Role::Worker(i) => write!(f, "worker {i}"),
        }
    }
}

struct Member {
    role: Role,
    child: Child,
    status: Option<ExitStatus>,
    /// When the launcher saw it exit (the order of deaths says who failed
    /// first: the others often fail because of it).
    died_at: Option<Instant>,
    /// A descriptor that becomes readable when the process exits (Linux
    /// 5.3+), so that the launcher wakes at a death instead of at its
    /// next poll.
    pidfd: Option<std::os::fd::OwnedFd>,
    /// A dead server that was started again (its failure is handled).
    replaced: bool,
}

/// A pidfd of `pid` (None where the kernel has none).
fn pidfd_of(pid: u32) -> Option<std::os::fd::OwnedFd> {
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

/// A running job (see the module docs for its states).
pub struct Job {
    members: Vec<Member>,
    torn_down: bool,
    watchdog: Option<Watchdog>,
    spawner: Spawner,
    /// Server restarts left.
    restarts_left: u32,
    /// Server deaths the job survives without a restart (replicas - 1).
    deaths_allowed: u32,
    /// A checkpoint directory the launcher made for this job (removed with
    /// it).
    checkpoint_dir: Option<PathBuf>,
    /// Where `pskv status` finds the job (removed with it).
    _job_file: Option<super::status::JobFile>,
}

/// The launcher's end of the watchdog (module docs).
struct Watchdog {
    child: Child,
    pipe: std::process::ChildStdin,
}

impl Watchdog {
    fn start(exe: &Path) -> CliResult<Watchdog> {
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

    /// Tells the watchdog about a member's process group.
    fn watch(&mut self, pgid: u32) {
        let _ = io::Write::write_all(&mut self.pipe, format!("+{pgid}\n").as_bytes());
    }

    /// Tells the watchdog about a directory of the job's own (removed if
    /// the launcher dies without a goodbye).
    fn watch_dir(&mut self, dir: &Path) {
        let _ = io::Write::write_all(&mut self.pipe, format!("d{}\n", dir.display()).as_bytes());
    }

    /// The job ended under the launcher's control: the watchdog leaves
    /// without killing anything.
    fn dismiss(mut self) {
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

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> CliResult<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(CliError::io("finding a port"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(CliError::io("finding a port"))
}

/// A fresh random cluster token (hex of 16 bytes from the OS).
fn random_token() -> CliResult<String> {
    let mut b = [0u8; 16];
    let mut f =
        std::fs::File::open("/dev/urandom").map_err(CliError::io("reading /dev/urandom"))?;
    io::Read::read_exact(&mut f, &mut b).map_err(CliError::io("reading /dev/urandom"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn pskv_exe() -> CliResult<PathBuf> {
    std::env::current_exe().map_err(CliError::io("locating the pskv program"))
}

/// Makes `c` start in its own process group and die with its parent.
fn detach_and_tie(c: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (setpgid, prctl, getppid, _exit).
    unsafe {
        c.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
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
fn address_towards(host: &str) -> CliResult<String> {
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
struct Spawner {
    env: Vec<(String, String)>,
    /// The token remote members read from stdin (see `spawn`).
    secret: Option<String>,
    exe: OsString,
    command: Vec<OsString>,
    capture_stdout: bool,
    /// ssh hosts (empty: local).
    hosts: Vec<String>,
    servers: u32,
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

    /// Starts one member process.
    fn spawn(&self, role: Role) -> CliResult<Child> {
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
        detach_and_tie(&mut c);
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

impl Job {
    /// Starts a `local` or `ssh` job.
    pub fn start(spec: &JobSpec, launcher: Launcher) -> CliResult<Job> {
        if spec.workers == 0 || spec.servers == 0 {
            return Err(CliError::Usage(
                "a job needs at least one worker (-n) and one server (-s)".into(),
            ));
        }
        if spec.workers > MAX_NODES || spec.servers > MAX_NODES {
            return Err(CliError::Usage(format!(
                "-n {} -s {}: a cluster has at most {MAX_NODES} workers and {MAX_NODES} servers",
                spec.workers, spec.servers
            )));
        }
        if launcher == Launcher::Local && spec.workers + spec.servers > MAX_LOCAL {
            return Err(CliError::Usage(format!(
                "-n {} -s {}: {} processes on this one host; a local job has at most {MAX_LOCAL} (spread larger jobs over hosts with --launcher ssh, mpi or slurm)",
                spec.workers,
                spec.servers,
                spec.workers + spec.servers + 1
            )));
        }
        if spec.command.is_empty() {
            return Err(CliError::Usage(
                "no worker command given (pskv launch ... -- CMD ARGS)".into(),
            ));
        }
        let exe = pskv_exe()?;
        let port = free_port()?;
        let remote = launcher == Launcher::Ssh;
        if remote && spec.hosts.is_empty() {
            return Err(CliError::Usage(
                "the ssh launcher needs a hostfile (-H FILE)".into(),
            ));
        }
        let root = match (&spec.root_uri, remote) {
            (Some(r), _) => r.clone(),
            (None, false) => "127.0.0.1".to_string(),
            (None, true) => address_towards(&spec.hosts[0])?,
        };
        let mut env: Vec<(String, String)> = vec![
            ("DMLC_PS_ROOT_URI".into(), root.clone()),
            ("DMLC_PS_ROOT_PORT".into(), port.to_string()),
            ("DMLC_NUM_WORKER".into(), spec.workers.to_string()),
            ("DMLC_NUM_SERVER".into(), spec.servers.to_string()),
        ];
        if !remote {
            env.push(("DMLC_NODE_HOST".into(), "127.0.0.1".into()));
        }
        // A job-wide token unless the caller set one: other users of this
        // host cannot join or read the job.
        let has_token = std::env::var_os("PSKV_TOKEN").is_some()
            || spec.env.iter().any(|(k, _)| k == "PSKV_TOKEN");
        if !has_token {
            env.push(("PSKV_TOKEN".into(), random_token()?));
        }
        env.extend(spec.env.iter().cloned());
        // The token in force for remote nodes (the last one set wins, as
        // with `env`), which travels on stdin.
        let secret: Option<String> = match env.iter().rev().find(|(k, _)| k == "PSKV_TOKEN") {
            Some((_, v)) => Some(v.clone()),
            None => std::env::var("PSKV_TOKEN").ok(),
        };
        if remote
            && secret
                .as_deref()
                .is_some_and(|t| t.contains('\n') || t.contains('\0') || t.len() > 4096)
        {
            return Err(CliError::Usage(
                "PSKV_TOKEN must be one line of at most 4096 bytes for the ssh launcher".into(),
            ));
        }
        // Replicas: the setting in force (as for the token, the last one
        // set wins).
        let replicas = match env.iter().rev().find(|(k, _)| k == "PSKV_REPLICAS") {
            Some((_, v)) => Some(v.clone()),
            None => std::env::var("PSKV_REPLICAS").ok(),
        };
        let replicas: u32 = match replicas.as_deref().map(str::trim) {
            None | Some("") => 1,
            Some(v) => match v.parse() {
                Ok(n @ 1..=2) => n,
                _ => {
                    return Err(CliError::Usage(format!(
                        "PSKV_REPLICAS={v}: expected 1 or 2"
                    )))
                }
            },
        };
        if replicas > 1 && spec.server_restarts > 0 {
            return Err(CliError::Usage("--restart-servers and replicas (PSKV_REPLICAS=2) do not mix: with replicas a dead server's backup serves its keys, and a restarted server could not take them back".into()));
        }
        if replicas > 1 && spec.servers < 2 {
            return Err(CliError::Usage(
                "replicas (PSKV_REPLICAS=2) need at least two servers (-s 2)".into(),
            ));
        }
        // A restarted server needs its checkpoint: one directory per job
        // unless the caller named one.
        // (An empty value means none, as the servers read it; remote
        // servers see only what `env` forwards, not this process's
        // environment.)
        let mut checkpoint_dir = None;
        let given = |v: &str| !v.is_empty();
        let has_dir = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PSKV_CHECKPOINT_DIR")
            .map(|(_, v)| given(v))
            .unwrap_or_else(|| {
                !remote && std::env::var("PSKV_CHECKPOINT_DIR").is_ok_and(|v| given(&v))
            });
        if spec.server_restarts > 0 && !has_dir {
            if remote {
                return Err(CliError::Usage("--restart-servers with the ssh launcher needs --env PSKV_CHECKPOINT_DIR=DIR (a directory on each server's host)".into()));
            }
            // A fresh directory only this user can read (checkpoints hold
            // the model), with an unguessable name; an existing path is an
            // error, never reused.
            let dir = std::env::temp_dir().join(format!(
                "pskv-checkpoints-{}-{}",
                std::process::id(),
                &random_token()?[..16]
            ));
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(CliError::io(format!(
                    "creating the checkpoint directory {}",
                    dir.display()
                )))?;
            env.push(("PSKV_CHECKPOINT_DIR".into(), dir.display().to_string()));
            checkpoint_dir = Some(dir);
        }

        // For `pskv status`: the scheduler and the token, readable by this
        // user only. A job runs without it if it cannot be written.
        let job_file = super::status::JobFile::create(&super::status::JobInfo {
            pid: std::process::id(),
            started: super::status::start_time(std::process::id()).unwrap_or(0),
            scheduler: format!("{root}:{port}"),
            token: secret.clone(),
            workers: spec.workers,
            servers: spec.servers,
            command: spec
                .command
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
        })
        .map_err(|e| tracing::warn!("pskv status will not find this job: {e}"))
        .ok();
        let spawner = Spawner {
            env,
            secret,
            exe: OsString::from(&exe),
            command: spec.command.clone(),
            capture_stdout: spec.capture_stdout,
            hosts: if remote {
                spec.hosts.clone()
            } else {
                Vec::new()
            },
            servers: spec.servers,
        };
        let mut watchdog = match Watchdog::start(&exe) {
            Ok(w) => w,
            Err(e) => {
                if let Some(d) = &checkpoint_dir {
                    let _ = std::fs::remove_dir_all(d);
                }
                return Err(e);
            }
        };
        if let Some(d) = &checkpoint_dir {
            watchdog.watch_dir(d);
        }
        let mut job = Job {
            members: Vec::new(),
            torn_down: false,
            watchdog: Some(watchdog),
            spawner,
            restarts_left: spec.server_restarts,
            deaths_allowed: replicas - 1,
            checkpoint_dir,
            _job_file: job_file,
        };
        job.start_member(Role::Scheduler)?;
        for i in 0..spec.servers {
            job.start_member(Role::Server(i))?;
        }
        for i in 0..spec.workers {
            job.start_member(Role::Worker(i))?;
        }
        Ok(job)
    }

    /// Starts a member and tells the watchdog of it.
    fn start_member(&mut self, role: Role) -> CliResult {
        let child = self.spawner.spawn(role)?;
        let pidfd = pidfd_of(child.id());
        if let Some(w) = self.watchdog.as_mut() {
            w.watch(child.id());
        }
        self.members.push(Member {
            role,
            child,
            status: None,
            died_at: None,
            pidfd,
            replaced: false,
        });
        Ok(())
    }

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

/// The rank and size of this process under `mpirun` or `srun`.
fn rank_and_size(
    launcher: Launcher,
    get: &dyn Fn(&str) -> Option<String>,
) -> CliResult<(u32, u32)> {
    let pairs: &[(&str, &str)] = match launcher {
        Launcher::Slurm => &[
            ("SLURM_PROCID", "SLURM_NTASKS"),
            ("SLURM_PROCID", "SLURM_NPROCS"),
        ],
        _ => &[
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
            ("PMI_RANK", "PMI_SIZE"),
            ("PMIX_RANK", "PMIX_SIZE"),
            ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
        ],
    };
    for (r, s) in pairs {
        if let (Some(rv), Some(sv)) = (get(r), get(s)) {
            let parse = |name: &str, v: &str| {
                v.trim()
                    .parse::<u32>()
                    .map_err(|_| CliError::Usage(format!("{name}={v}: not a number")))
            };
            return Ok((parse(r, &rv)?, parse(s, &sv)?));
        }
    }
    let names: Vec<String> = pairs.iter().map(|(r, s)| format!("{r}/{s}")).collect();
    Err(CliError::Usage(format!(
        "the {launcher:?} launcher runs as one rank of mpirun/srun, but none of {} is set",
        names.join(", ")
    )))
}

/// The first host of a Slurm node list (`node[01-04,7],gpu2` → `node01`).
pub fn first_slurm_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list
        .char_indices()
        .scan(0i32, |depth, (i, c)| {
            match c {
                '[' => *depth += 1,
                ']' => *depth -= 1,
                _ => {}
            }
            Some((i, c, *depth))
        })
        .find(|&(_, c, d)| c == ',' && d == 0)
        .map(|(i, _, _)| i)
        .unwrap_or(list.len());
    let first = &list[..end];
    if first.is_empty() {
        return None;
    }
    match first.find('[') {
        None => Some(first.to_string()),
        Some(b) => {
            let inner = first[b + 1..].trim_end_matches(']');
            let lo = inner.split([',', '-']).next()?;
            if lo.is_empty() {
                return None;
            }
            Some(format!("{}{}", &first[..b], lo))
        }
    }
}

/// A rank's program (with its arguments) and the environment to run it with.
pub type RankPlan = (Vec<OsString>, Vec<(String, String)>);

/// What one rank under `mpirun`/`srun` runs: its role's program and the
/// environment to run it with.
pub fn rank_plan(
    spec: &JobSpec,
    launcher: Launcher,
    get: &dyn Fn(&str) -> Option<String>,
) -> CliResult<RankPlan> {
    let (rank, size) = rank_and_size(launcher, get)?;
    let want = 1 + spec.servers + spec.workers;
    if size != want {
        return Err(CliError::Usage(format!(
            "{size} ranks were started, but 1 scheduler + {} servers + {} workers need {want}",
            spec.servers, spec.workers
        )));
    }
    if rank >= size {
        return Err(CliError::Usage(format!(
            "rank {rank} is not below the size {size}"
        )));
    }
    let root = match spec.root_uri.clone().or_else(|| get("DMLC_PS_ROOT_URI")) {
        Some(r) => r,
        None => {
            let local_size = get("OMPI_COMM_WORLD_LOCAL_SIZE")
                .or_else(|| get("MPI_LOCALNRANKS"))
                .or_else(|| get("SLURM_NTASKS_PER_NODE"));
            let nodelist = get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST"));
            match (launcher, nodelist, local_size) {
                (Launcher::Slurm, Some(l), _) => first_slurm_host(&l).ok_or_else(|| {
                    CliError::Usage(format!(
                        "cannot read the first host of SLURM_JOB_NODELIST={l}"
                    ))
                })?,
                (_, _, Some(n)) if n.trim() == size.to_string() => "127.0.0.1".to_string(),
                _ => {
                    return Err(CliError::Usage(
                        "set DMLC_PS_ROOT_URI (or --root-uri) to rank 0's host: \
                         the ranks span several hosts"
                            .into(),
                    ))
                }
            }
        }
    };
    // Every rank must agree on the port without talking: the environment's,
    // or one derived from the job id, or 9091.
    let port = match get("DMLC_PS_ROOT_PORT") {
        Some(p) => p,
        None => {
            let job = get("SLURM_JOB_ID")
                .or_else(|| get("OMPI_MCA_ess_base_jobid"))
                .and_then(|j| j.trim().parse::<u64>().ok());
            (9091 + job.map(|j| j % 20000).unwrap_or(0)).to_string()
        }
    };
    let mut env: Vec<(String, String)> = vec![
        ("DMLC_PS_ROOT_URI".into(), root),
        ("DMLC_PS_ROOT_PORT".into(), port),
        ("DMLC_NUM_WORKER".into(), spec.workers.to_string()),
        ("DMLC_NUM_SERVER".into(), spec.servers.to_string()),
    ];
    let exe = OsString::from(pskv_exe()?);
    let program = if rank == 0 {
        env.push(("DMLC_ROLE".into(), "scheduler".into()));
        vec![exe, "scheduler".into()]
    } else if rank <= spec.servers {
        env.push(("DMLC_ROLE".into(), "server".into()));
        env.push(("DMLC_SERVER_ID".into(), (rank - 1).to_string()));
        vec![exe, "server".into()]
    } else {
        env.push(("DMLC_ROLE".into(), "worker".into()));
        env.push((
            "DMLC_WORKER_ID".into(),
            (rank - 1 - spec.servers).to_string(),
        ));
        spec.command.clone()
    };
    env.extend(spec.env.iter().cloned());
    Ok((program, env))
}

/// Under `mpirun`/`srun`: becomes this rank's role (does not return unless
/// it cannot).
pub fn exec_rank(spec: &JobSpec, launcher: Launcher) -> Failure {
    if spec.command.is_empty() {
        return Failure::new("no worker command given (pskv launch ... -- CMD ARGS)", 2);
    }
    match rank_plan(spec, launcher, &|k| std::env::var(k).ok()) {
        Err(e) => Failure::new(e.to_string(), 2),
        Ok((program, env)) => {
            let err = Command::new(&program[0])
                .args(&program[1..])
                .envs(env.iter().map(|(k, v)| (k, v)))
                .exec();
            Failure::new(format!("running {:?}: {err}", program[0]), 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_node_lists() {
        assert_eq!(
            first_slurm_host("node[01-04,7],gpu2").as_deref(),
            Some("node01")
        );
        assert_eq!(first_slurm_host("a1,b2").as_deref(), Some("a1"));
        assert_eq!(first_slurm_host("gpu[3]").as_deref(), Some("gpu3"));
        assert_eq!(first_slurm_host("x[2,5-6]").as_deref(), Some("x2"));
        assert_eq!(first_slurm_host(""), None);
    }

    #[test]
    fn quoting_for_the_remote_shell() {
        assert_eq!(sh_quote("abc-1.2"), "abc-1.2");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let v: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| v.iter().find(|(kk, _)| kk == k).map(|(_, vv)| vv.clone())
    }

    #[test]
    fn ranks_take_their_roles() {
        let spec = JobSpec::local(2, 1, vec!["prog".into(), "arg".into()]);
        let env = |r: &str| {
            lookup(&[
                ("OMPI_COMM_WORLD_RANK", r),
                ("OMPI_COMM_WORLD_SIZE", "4"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
            ])
        };
        let role = |e: &[(String, String)]| {
            e.iter()
                .find(|(k, _)| k == "DMLC_ROLE")
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let (p, e) = rank_plan(&spec, Launcher::Mpi, &env("0")).unwrap();
        assert_eq!(role(&e), "scheduler");
        assert_eq!(p[1], "scheduler");
        let (_, e) = rank_plan(&spec, Launcher::Mpi, &env("1")).unwrap();
        assert_eq!(role(&e), "server");
        let (p, e) = rank_plan(&spec, Launcher::Mpi, &env("3")).unwrap();
        assert_eq!(role(&e), "worker");
        assert_eq!(p, vec![OsString::from("prog"), OsString::from("arg")]);
        assert!(e.contains(&("DMLC_WORKER_ID".into(), "1".into())));
        assert!(e.contains(&("DMLC_PS_ROOT_URI".into(), "127.0.0.1".into())));

        // Wrong size, no rank variables, several hosts without a root.
        let bad = lookup(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "3")]);
        assert!(rank_plan(&spec, Launcher::Mpi, &bad)
            .unwrap_err()
            .to_string()
            .contains("need 4"));
        assert!(rank_plan(&spec, Launcher::Mpi, &lookup(&[]))
            .unwrap_err()
            .to_string()
            .contains("OMPI_COMM_WORLD_RANK"));
        let multi = lookup(&[("PMI_RANK", "2"), ("PMI_SIZE", "4")]);
        assert!(rank_plan(&spec, Launcher::Mpi, &multi)
            .unwrap_err()
            .to_string()
            .contains("DMLC_PS_ROOT_URI"));
        let slurm = lookup(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_JOB_NODELIST", "n[07-09]"),
            ("SLURM_JOB_ID", "12"),
        ]);
        let (_, e) = rank_plan(&spec, Launcher::Slurm, &slurm).unwrap();
        assert!(e.contains(&("DMLC_PS_ROOT_URI".into(), "n07".into())));
        assert!(e.contains(&("DMLC_PS_ROOT_PORT".into(), "9103".into())));
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
