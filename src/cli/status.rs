//! `pskv status`: a running job's nodes as its scheduler sees them, and the
//! job files through which it finds a job that `pskv launch` started.
//!
//! A launcher writes one job file per job (`job-<launcher pid>-<n>.json`: the
//! scheduler's address and the cluster token) in a directory only its
//! user can enter, and removes it when the job ends; a file whose launcher
//! is gone (killed; or its pid now another process's, told by the start
//! time the file records) is stale, skipped and removed. `pskv status`
//! asks the scheduler through `pskv_transport::status::query`, which never
//! disturbs the job.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pskv_transport::status::{query, JobStatus, NodeStatus};
use pskv_transport::TransportError;
use serde::{Deserialize, Serialize};

use super::chart::{count_rate_label, rate_label, time_label};
use super::error::{CliError, CliResult};

/// What a job file holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobInfo {
    /// The launcher's process id (the job's name for `--job`).
    pub pid: u32,
    /// When that process started (`/proc/<pid>/stat`, clock ticks after
    /// boot): a later process with the same pid is not the launcher.
    pub started: u64,
    /// The scheduler, `host:port`.
    pub scheduler: String,
    /// The cluster token (the file is readable by its owner only).
    pub token: Option<String>,
    /// Workers and servers.
    pub workers: u32,
    /// Servers.
    pub servers: u32,
    /// The workers' command.
    pub command: String,
}

impl JobInfo {
    /// "2 workers, 1 servers: CMD".
    fn shape(&self) -> String {
        format!(
            "{} workers, {} servers: {}",
            self.workers, self.servers, self.command
        )
    }
}

/// A job file, removed when dropped (the job ended).
pub struct JobFile(PathBuf);

impl JobFile {
    /// Writes `info` as this launcher's job file.
    pub fn create(info: &JobInfo) -> CliResult<JobFile> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = run_dir()?;
        // Several jobs of one process (a library caller) each have a file.
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("job-{}-{seq}.json", info.pid));
        // A file of an earlier process with this pid is stale.
        let _ = fs::remove_file(&path);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(CliError::io(format!(
                "creating the job file {}",
                path.display()
            )))?;
        let body = serde_json::to_vec_pretty(info)
            .map_err(|e| CliError::Failed(format!("encoding the job file: {e}")))?;
        f.write_all(&body).map_err(CliError::io(format!(
            "writing the job file {}",
            path.display()
        )))?;
        Ok(JobFile(path))
    }
}

impl Drop for JobFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Where job files are: `PSKV_RUN_DIR`, else `$XDG_RUNTIME_DIR/pskv`, else
/// `<tmp>/pskv-<uid>`; made if missing, and refused unless it is a
/// directory of this user that nobody else may enter.
pub fn run_dir() -> CliResult<PathBuf> {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let dir = match (
        std::env::var_os("PSKV_RUN_DIR"),
        std::env::var_os("XDG_RUNTIME_DIR"),
    ) {
        (Some(d), _) if !d.is_empty() => PathBuf::from(d),
        (_, Some(d)) if !d.is_empty() => PathBuf::from(d).join("pskv"),
        _ => std::env::temp_dir().join(format!("pskv-{uid}")),
    };
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(CliError::io(format!("creating {}", dir.display()))(e)),
    }
    let m =
        fs::symlink_metadata(&dir).map_err(CliError::io(format!("reading {}", dir.display())))?;
    if !m.is_dir() || m.uid() != uid || m.mode() & 0o077 != 0 {
        return Err(CliError::Failed(format!(
            "{} is not a directory of this user closed to others (it holds cluster tokens); remove it or set PSKV_RUN_DIR",
            dir.display()
        )));
    }
    Ok(dir)
}

/// When process `pid` started (clock ticks after boot), if it runs.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the name (field 2) may hold spaces, so count after its ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// The jobs whose launchers still run, from the job files in `dir`; the
/// files of launchers that are gone are removed.
fn live_jobs(dir: &Path) -> CliResult<Vec<JobInfo>> {
    let mut jobs = Vec::new();
    let entries = fs::read_dir(dir).map_err(CliError::io(format!("listing {}", dir.display())))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with("job-") && name.ends_with(".json")) {
            continue;
        }
        let read = fs::read(e.path()).ok();
        let Some(info) = read.and_then(|b| serde_json::from_slice::<JobInfo>(&b).ok()) else {
            continue;
        };
        if start_time(info.pid) == Some(info.started) {
            jobs.push(info);
        } else {
            // Its launcher is gone (killed before it could remove it).
            let _ = fs::remove_file(e.path());
        }
    }
    jobs.sort_by_key(|j| j.pid);
    Ok(jobs)
}

/// Which job `pskv status` asks about.
pub struct Target {
    /// `--scheduler HOST:PORT`.
    pub scheduler: Option<String>,
    /// `--job PID`.
    pub job: Option<u32>,
}

/// The scheduler's address, its token, and a name for the job: from
/// `--scheduler` (token from `PSKV_TOKEN`), `--job`, the `DMLC_PS_ROOT_*`
/// variables of a process inside a job, or the one running job.
fn resolve(t: &Target) -> CliResult<(String, Option<String>, String)> {
    let env_token = std::env::var("PSKV_TOKEN").ok().filter(|t| !t.is_empty());
    if let Some(s) = &t.scheduler {
        return Ok((s.clone(), env_token, format!("the job at {s}")));
    }
    let from_file = |j: JobInfo| {
        let name = format!("job {} ({})", j.pid, j.shape());
        (j.scheduler, j.token, name)
    };
    if t.job.is_none() {
        if let (Ok(host), Ok(port)) = (
            std::env::var("DMLC_PS_ROOT_URI"),
            std::env::var("DMLC_PS_ROOT_PORT"),
        ) {
            let s = format!("{host}:{port}");
            return Ok((s.clone(), env_token, format!("the job at {s}")));
        }
    }
    let dir = run_dir()?;
    let mut jobs = live_jobs(&dir)?;
    match t.job {
        Some(pid) => jobs
            .into_iter()
            .find(|j| j.pid == pid)
            .map(from_file)
            .ok_or_else(|| {
                CliError::Failed(format!(
                    "no running job {pid} in {} (a job is named by its launcher's pid; `pskv status` alone lists them)",
                    dir.display()
                ))
            }),
        None if jobs.len() == 1 => Ok(from_file(jobs.remove(0))),
        None if jobs.is_empty() => Err(CliError::Failed(format!(
            "no running job of this user (no live job file in {}); name a scheduler with --scheduler HOST:PORT (and PSKV_TOKEN)",
            dir.display()
        ))),
        None => Err(CliError::Usage(format!(
            "{} jobs are running; pick one with --job PID:\n{}",
            jobs.len(),
            jobs.iter()
                .map(|j| format!("  {}  {}", j.pid, j.shape()))
                .collect::<Vec<_>>()
                .join("\n")
        ))),
    }
}

/// How `pskv status` reports.
pub struct Report {
    /// JSON, one object per report (one line each).
    pub json: bool,
    /// Report again every this often until the job ends.
    pub every: Option<Duration>,
    /// Stop after this many reports.
    pub count: Option<u64>,
    /// How long one query may take.
    pub timeout: Duration,
}

/// Runs `pskv status`.
pub fn run(target: &Target, report: &Report) -> CliResult {
    let (addr, token, name) = resolve(target)?;
    let mut shown = 0u64;
    loop {
        let began = Instant::now();
        match query(&addr, token.as_deref(), report.timeout) {
            Ok(job) => {
                if report.json {
                    let line = serde_json::to_string(&job)
                        .map_err(|e| CliError::Failed(format!("encoding the status: {e}")))?;
                    println!("{line}");
                } else {
                    if shown > 0 {
                        println!();
                    }
                    print!("{}", render(&name, &addr, &job));
                }
            }
            // Watching: a scheduler that was seen and now refuses or drops
            // the connection has ended with its job; other errors (a
            // timeout, a refused token) are errors.
            Err(e @ TransportError::Io { .. }) if shown > 0 => {
                eprintln!("pskv status: the scheduler at {addr} is gone ({e}): the job ended");
                return Ok(());
            }
            Err(e) => return Err(CliError::Failed(format!("asking {name} at {addr}: {e}"))),
        }
        shown += 1;
        let Some(every) = report.every else {
            return Ok(());
        };
        if report.count.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        std::thread::sleep(every.saturating_sub(began.elapsed()));
    }
}

/// The status as a table.
pub fn render(name: &str, addr: &str, job: &JobStatus) -> String {
    let beat = match job.heartbeat_ms {
        Some(ms) => format!("heartbeats every {}", time_label(ms as f64 / 1e3)),
        None => "heartbeats off: no counters".into(),
    };
    let phase = match (job.started, job.job_ended) {
        (false, _) => "registering",
        (true, false) => "running",
        (true, true) => "every worker gone",
    };
    let mut out = format!(
        "{name}\nscheduler {addr}: {} workers, {} servers, {phase}; {beat}\n",
        job.num_workers, job.num_servers
    );
    let head = [
        "NODE",
        "HOST",
        "PID",
        "STATE",
        "HEARD",
        "IN",
        "OUT",
        "MSG IN",
        "MSG OUT",
        "ROUNDS",
        "SLOWEST KEY OF ITS LAST ROUND",
    ];
    let rows: Vec<Vec<String>> = std::iter::once(head.iter().map(|s| s.to_string()).collect())
        .chain(job.nodes.iter().map(row))
        .collect();
    let widths: Vec<usize> = (0..head.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn row(n: &NodeStatus) -> Vec<String> {
    let dash = || "-".to_string();
    let s = n.stats.as_ref();
    let r = n.rates;
    let node = match n.role.as_str() {
        "scheduler" => "scheduler".to_string(),
        role => format!("{role} {}", n.rank),
    };
    let host = match s.map(|s| s.hostname.as_str()) {
        Some(h) if !h.is_empty() => format!("{h} ({}:{})", n.host, n.port),
        _ => format!("{}:{}", n.host, n.port),
    };
    vec![
        node,
        host,
        s.map_or_else(dash, |s| s.pid.to_string()),
        n.state.clone(),
        n.heard_ms_ago.map_or_else(dash, |ms| match ms {
            0 => "just now".into(),
            ms => format!("{} ago", time_label(ms as f64 / 1e3)),
        }),
        r.map_or_else(dash, |r| rate_label(r.bytes_in as f64)),
        r.map_or_else(dash, |r| rate_label(r.bytes_out as f64)),
        r.map_or_else(dash, |r| count_rate_label(r.frames_in as f64)),
        r.map_or_else(dash, |r| count_rate_label(r.frames_out as f64)),
        s.filter(|_| n.role != "scheduler")
            .map_or_else(dash, |s| s.rounds.to_string()),
        s.and_then(|s| s.slowest.as_ref()).map_or_else(dash, |k| {
            format!("{} ({})", k.key, time_label(k.micros as f64 / 1e6))
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use pskv_transport::status::{NodeStats, Rates, SlowKey};

    #[test]
    fn the_table_names_each_node_and_its_figures() {
        let node = |role: &str, rank, stats: Option<NodeStats>| NodeStatus {
            id: 9,
            role: role.into(),
            rank,
            host: "127.0.0.1".into(),
            port: 4000,
            state: "alive".into(),
            epoch: 0,
            heard_ms_ago: Some(300),
            stats,
            stats_ms_ago: Some(10),
            rates: Some(Rates {
                bytes_in: 2_500_000,
                bytes_out: 100,
                frames_in: 1200,
                frames_out: 3,
            }),
        };
        let job = JobStatus {
            num_servers: 1,
            num_workers: 1,
            started: true,
            job_ended: false,
            heartbeat_ms: Some(1000),
            nodes: vec![
                node("server", 0, None),
                node(
                    "worker",
                    0,
                    Some(NodeStats {
                        pid: 77,
                        hostname: "h1".into(),
                        rounds: 12,
                        slowest: Some(SlowKey {
                            key: "fc1_weight".into(),
                            round: 12,
                            micros: 3400,
                        }),
                        ..NodeStats::default()
                    }),
                ),
            ],
        };
        let t = render("job 5", "127.0.0.1:4000", &job);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[1],
            "scheduler 127.0.0.1:4000: 1 workers, 1 servers, running; heartbeats every 1 s"
        );
        assert!(lines[2].starts_with("NODE "), "{t}");
        assert!(lines[3].starts_with("server 0 "), "{t}");
        let w = lines[4];
        for want in [
            "worker 0",
            "h1 (127.0.0.1:4000)",
            " 77 ",
            "300 ms ago",
            "2.5 MB/s",
            "100 B/s",
            "1.2k/s",
            "3/s",
            " 12 ",
            "fc1_weight (3.4 ms)",
        ] {
            assert!(w.contains(want), "{want:?} not in {w:?}");
        }
        // Columns line up: every row's second column starts at one place.
        let at = lines[2].find("HOST").unwrap();
        assert_eq!(&w[at..at + 2], "h1");
    }
}
