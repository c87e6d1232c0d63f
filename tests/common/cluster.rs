//! The fault-injection harness of the multi-process tests: a job of real
//! processes (the `pskv` scheduler and servers, workers that are this test
//! binary run again), whose nodes a test can stop (SIGSTOP), continue,
//! kill, or start with a starved disk (writes beyond a size fail, as on a
//! full disk), and whose output lines it can wait for. Every process dies
//! with the `Job`.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::worker_command;
use pskv_test_support::{port_of, PortPipe};

/// How a node is started.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Writes past this many bytes of a file fail (EFBIG), as writes to a
    /// full disk do: RLIMIT_FSIZE with SIGXFSZ ignored.
    pub disk_bytes: Option<u64>,
    /// Extra environment of this node.
    pub env: Vec<(String, String)>,
}

/// One process of the job.
pub struct Node {
    /// "scheduler", "server" or "worker".
    pub role: &'static str,
    /// The process.
    pub child: Child,
    /// Its status, once it exited.
    pub status: Option<ExitStatus>,
    /// Everything it wrote (stdout and stderr, by line).
    pub out: Arc<Mutex<String>>,
    /// Its output streams read to their end (of 2).
    pub closed: Arc<std::sync::atomic::AtomicUsize>,
}

/// A job of processes on 127.0.0.1.
pub struct Job {
    /// The environment every node gets.
    pub env: Vec<(String, String)>,
    /// The nodes, in start order.
    pub nodes: Vec<Node>,
    lines_tx: Sender<(usize, String)>,
    lines: Receiver<(usize, String)>,
    /// Lines seen by `wait_line`, per node.
    seen: BTreeMap<usize, Vec<String>>,
}

impl Job {
    /// A job of `workers` and `servers`, with a heartbeat timeout of
    /// `heartbeat_timeout` seconds, a fresh token, and `env` on top.
    pub fn new(workers: u32, servers: u32, heartbeat_timeout: u64, env: &[(&str, &str)]) -> Job {
        let mut e: Vec<(String, String)> = [
            ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
            ("DMLC_NUM_WORKER", workers.to_string()),
            ("DMLC_NUM_SERVER", servers.to_string()),
            ("DMLC_NODE_HOST", "127.0.0.1".to_string()),
            ("PSKV_TOKEN", format!("job-{}", std::process::id())),
            ("PS_HEARTBEAT_INTERVAL", "1".to_string()),
            ("PS_HEARTBEAT_TIMEOUT", heartbeat_timeout.to_string()),
            ("PSKV_KVSTORE_TIMEOUT", "60".to_string()),
            ("PSKV_CPU_WORKER_NTHREADS", "1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        e.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let (lines_tx, lines) = channel();
        Job {
            env: e,
            nodes: Vec::new(),
            lines_tx,
            lines,
            seen: BTreeMap::new(),
        }
    }

    /// Starts a `pskv scheduler` or `pskv server`; returns its index.
    pub fn start_role(&mut self, role: &'static str, f: &Faults) -> usize {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pskv"));
        c.arg(role);
        self.start(role, c, f)
    }

    /// Starts a worker: this test binary, running only the test `entry`
    /// with `flag` set; returns its index.
    pub fn start_worker(&mut self, entry: &str, flag: &str, f: &Faults) -> usize {
        self.start("worker", worker_command(entry, flag), f)
    }

    /// The scheduler and `servers` servers, without faults.
    pub fn start_infra(&mut self, servers: u32) {
        self.start_role("scheduler", &Faults::default());
        for _ in 0..servers {
            self.start_role("server", &Faults::default());
        }
    }

    /// Starts a command of its own (`pskv launch`, say) as a node, with
    /// none of the job's environment; its output is followed as a node's.
    pub fn start_command(&mut self, name: &'static str, c: Command) -> usize {
        self.spawn(name, c, &Faults::default())
    }

    /// Starts a node with the job's environment. The scheduler finds a
    /// free port itself and says which (`PortPipe`); the nodes started after
    /// it are told that port.
    fn start(&mut self, role: &'static str, mut c: Command, f: &Faults) -> usize {
        c.envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("DMLC_ROLE", role);
        if role != "scheduler" {
            return self.spawn(role, c, f);
        }
        let pipe = PortPipe::new().expect("a pipe for the scheduler's port");
        pipe.attach(&mut c);
        let i = self.spawn(role, c, f);
        let port = port_of(pipe).to_string();
        self.env.retain(|(k, _)| k != "DMLC_PS_ROOT_PORT");
        self.env.push(("DMLC_PS_ROOT_PORT".into(), port));
        i
    }

    fn spawn(&mut self, role: &'static str, mut c: Command, f: &Faults) -> usize {
        c.envs(f.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(bytes) = f.disk_bytes {
            // SAFETY: only setrlimit(2) and signal(2) between fork and exec;
            // an ignored signal stays ignored across exec.
            unsafe {
                c.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: bytes,
                        rlim_max: bytes,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        let mut child = c.spawn().expect("starting a node");
        let i = self.nodes.len();
        let out = Arc::new(Mutex::new(String::new()));
        let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let streams: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stdout.take().expect("piped")),
            Box::new(child.stderr.take().expect("piped")),
        ];
        for s in streams {
            let (tx, out, closed) = (self.lines_tx.clone(), out.clone(), closed.clone());
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(s).lines().map_while(Result::ok) {
                    {
                        let mut o = out.lock().unwrap();
                        o.push_str(&line);
                        o.push('\n');
                    }
                    let _ = tx.send((i, line));
                }
                closed.fetch_add(1, std::sync::atomic::Ordering::Release);
            });
        }
        self.nodes.push(Node {
            role,
            child,
            status: None,
            out,
            closed,
        });
        i
    }

    /// Sends `sig` to node `i` (SIGSTOP, SIGCONT, SIGKILL, ...).
    pub fn signal(&self, i: usize, sig: libc::c_int) {
        // SAFETY: kill(2) on a child this job started.
        unsafe {
            libc::kill(self.nodes[i].child.id() as libc::pid_t, sig);
        }
    }

    /// The pid of node `i`.
    pub fn pid(&self, i: usize) -> u32 {
        self.nodes[i].child.id()
    }

    /// Waits for a line of any node (of node `i`, if given) that contains
    /// `what`; returns the node and the line, or panics at `limit`.
    pub fn wait_line(
        &mut self,
        node: Option<usize>,
        what: &str,
        limit: Duration,
    ) -> (usize, String) {
        let end = Instant::now() + limit;
        // A line already seen counts.
        for (i, lines) in &self.seen {
            if node.is_none_or(|n| n == *i) {
                if let Some(l) = lines.iter().find(|l| l.contains(what)) {
                    return (*i, l.clone());
                }
            }
        }
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let (i, line) = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no line with '{what}' within {limit:?}; output:\n{}",
                    self.outputs()
                )
            });
            self.seen.entry(i).or_default().push(line.clone());
            if line.contains(what) && node.is_none_or(|n| n == i) {
                return (i, line);
            }
        }
    }

    /// Waits for node `i` to exit (panics after `limit`).
    pub fn wait_exit(&mut self, i: usize, limit: Duration) -> ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.nodes[i].status {
                return s;
            }
            if let Some(s) = self.nodes[i].child.try_wait().expect("waiting") {
                self.nodes[i].status = Some(s);
                // What it wrote last may still be on its way from the pipes
                // (a reader thread per stream): wait for their ends, a
                // while (a child process it started may hold them longer).
                let read = Instant::now() + Duration::from_secs(5);
                while self.nodes[i]
                    .closed
                    .load(std::sync::atomic::Ordering::Acquire)
                    < 2
                    && Instant::now() < read
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return s;
            }
            if Instant::now() > end {
                panic!(
                    "{} (node {i}) did not exit within {limit:?}; output:\n{}",
                    self.nodes[i].role,
                    self.outputs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for every node to exit; returns their statuses.
    pub fn wait_all(&mut self, limit: Duration) -> Vec<ExitStatus> {
        let end = Instant::now() + limit;
        (0..self.nodes.len())
            .map(|i| self.wait_exit(i, end.saturating_duration_since(Instant::now())))
            .collect()
    }

    /// What node `i` wrote so far.
    pub fn output(&self, i: usize) -> String {
        self.nodes[i].out.lock().unwrap().clone()
    }

    /// Every node's output, headed by its role and index.
    pub fn outputs(&self) -> String {
        (0..self.nodes.len())
            .map(|i| format!("--- {} {i}:\n{}", self.nodes[i].role, self.output(i)))
            .collect()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            // A stopped process must run again to die of SIGTERM; SIGKILL
            // needs no such care.
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}

/// The `pskv-region-*` files (shared segments) in /dev/shm that process `pid` made.
pub fn segments_of(pid: u32) -> Vec<String> {
    let prefix = format!("pskv-region-{pid}-");
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}
