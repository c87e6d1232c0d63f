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
//!
//! Rooms: this file holds what a job is (its spec, its members, the
//! failure it ends with); `start.rs` turns a spec into a started job
//! (checks, environment, token, checkpoint directory), `spawn.rs` starts
//! one member here or over ssh, `supervise.rs` watches a job to its end and
//! tears it down (and runs a job collecting its workers' output, and the
//! stop flag of the signals), `watchdog.rs` the process that outlives a
//! dead launcher, `ranks.rs` a rank of `mpirun`/`srun` becoming its role,
//! `bind.rs` the workers' cores (`--bind cores`).

mod bind;
mod ranks;
mod spawn;
mod start;
mod supervise;
mod watchdog;

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

pub use bind::{allowed_cpus, cpu_list, Bind};
pub use ranks::exec_rank;
pub use spawn::read_hostfile;
pub use start::BIND_HERE_ONLY;
pub use supervise::{run_collecting, stop_flag};
pub use watchdog::watchdog_main;

use spawn::Spawner;
use watchdog::Watchdog;

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
    /// How the members started on this host are placed on its cores.
    pub bind: Bind,
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
            bind: Bind::None,
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
