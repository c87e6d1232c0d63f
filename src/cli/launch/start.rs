//! A job from its spec: the checks, the environment every member gets
//! (the scheduler's address, a job-wide token, replicas, a checkpoint
//! directory for restarts), the file `pskv status` reads, the watchdog,
//! then every member started.

use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::time::Duration;

use super::bind::{allowed_cpus, worker_cpus, Bind};
use super::spawn::{address_towards, pskv_exe, random_token, Spawner};
use super::supervise::pidfd_of;
use super::{Job, JobSpec, Launcher, Member, Role, Watchdog, MAX_LOCAL, MAX_NODES};
use crate::cli::error::{CliError, CliResult};
use pskv::transport::PortPipe;

/// Why `--bind cores` goes with the local launcher only.
pub const BIND_HERE_ONLY: &str = "--bind cores places the members this launcher starts on this host: with --launcher ssh the hosts' cores are not known here, and under mpirun or srun their own options bind the ranks (--bind-to core, --cpu-bind=cores)";

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
        let remote = launcher == Launcher::Ssh;
        let worker_cpus = match spec.bind {
            Bind::None => Vec::new(),
            Bind::Cores if launcher != Launcher::Local => {
                return Err(CliError::Usage(BIND_HERE_ONLY.into()))
            }
            Bind::Cores => {
                let allowed = allowed_cpus()?;
                (0..spec.workers)
                    .map(|i| worker_cpus(&allowed, spec.workers, i))
                    .collect()
            }
        };
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
        // The scheduler's port: the caller's (`--env DMLC_PS_ROOT_PORT=P`),
        // else (none, empty or 0) whichever the scheduler finds free
        // (`start_scheduler`).
        let fixed_port = spec
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "DMLC_PS_ROOT_PORT")
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty() && v != "0");
        let mut env: Vec<(String, String)> = vec![
            ("DMLC_PS_ROOT_URI".into(), root.clone()),
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
            worker_cpus,
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
            _job_file: None,
        };
        let port = match fixed_port {
            Some(p) => {
                job.start_member(Role::Scheduler)?;
                p
            }
            None => {
                let p = job.start_scheduler()?.to_string();
                job.spawner
                    .env
                    .push(("DMLC_PS_ROOT_PORT".into(), p.clone()));
                p
            }
        };
        // For `pskv status`: the scheduler and the token, readable by this
        // user only. A job runs without it if it cannot be written.
        job._job_file = crate::cli::status::JobFile::create(&crate::cli::status::JobInfo {
            pid: std::process::id(),
            started: crate::cli::status::start_time(std::process::id()).unwrap_or(0),
            scheduler: format!("{root}:{port}"),
            token: job.spawner.secret.clone(),
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
        for i in 0..spec.servers {
            job.start_member(Role::Server(i))?;
        }
        for i in 0..spec.workers {
            job.start_member(Role::Worker(i))?;
        }
        Ok(job)
    }

    /// Starts a member, which tells the watchdog of its group itself.
    pub(super) fn start_member(&mut self, role: Role) -> CliResult {
        self.start_member_with(role, None)
    }

    /// Starts the scheduler on a port it finds free itself and returns
    /// that port, which it writes to a pipe once it listens (`PortPipe`).
    fn start_scheduler(&mut self) -> CliResult<u16> {
        let pipe = PortPipe::new()?;
        self.start_member_with(Role::Scheduler, Some(&pipe))?;
        // A signal (Ctrl-C) stops the wait as it stops the job later.
        let stop = super::supervise::stop_flag().ok();
        Ok(pipe.read(SCHEDULER_START_TIMEOUT, stop.as_deref())?)
    }

    fn start_member_with(&mut self, role: Role, port: Option<&PortPipe>) -> CliResult {
        let watch = self.watchdog.as_ref().map(|w| w.fd());
        let child = self.spawner.spawn(role, watch, port)?;
        let pidfd = pidfd_of(child.id());
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
}

/// How long the launcher waits for its scheduler to listen.
const SCHEDULER_START_TIMEOUT: Duration = Duration::from_secs(60);
