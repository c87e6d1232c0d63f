//! A cluster of `pskv` processes on this host: a scheduler, servers and
//! workers, each a child process that is killed if the cluster is dropped
//! before it ends (children never outlive their parent's cluster).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> Result<u16, String> {
    let l =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("finding a port: {e}"))
}

/// The processes of a local cluster.
pub struct LocalCluster {
    exe: PathBuf,
    env: Vec<(String, String)>,
    others: Vec<Child>,
    workers: Vec<Child>,
}

impl LocalCluster {
    /// A cluster of `w` workers and `s` servers; `env` is added to every
    /// process's environment.
    pub fn new(w: u32, s: u32, env: &[(String, String)]) -> Result<LocalCluster, String> {
        let exe = std::env::current_exe().map_err(|e| format!("locating pskv: {e}"))?;
        let port = free_port()?;
        let mut all = vec![
            ("DMLC_PS_ROOT_URI".to_string(), "127.0.0.1".to_string()),
            ("DMLC_PS_ROOT_PORT".to_string(), port.to_string()),
            ("DMLC_NUM_WORKER".to_string(), w.to_string()),
            ("DMLC_NUM_SERVER".to_string(), s.to_string()),
            ("DMLC_NODE_HOST".to_string(), "127.0.0.1".to_string()),
        ];
        all.extend(env.iter().cloned());
        Ok(LocalCluster {
            exe,
            env: all,
            others: Vec::new(),
            workers: Vec::new(),
        })
    }

    fn command(&self, role: &str, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("DMLC_ROLE", role)
            .stdin(Stdio::null());
        c
    }

    /// Starts the scheduler and the servers.
    pub fn start_infrastructure(&mut self, s: u32) -> Result<(), String> {
        let mut c = self.command("scheduler", &["scheduler"]);
        c.stdout(Stdio::null());
        self.others.push(
            c.spawn()
                .map_err(|e| format!("starting the scheduler: {e}"))?,
        );
        for i in 0..s {
            let mut c = self.command("server", &["server"]);
            c.stdout(Stdio::null());
            self.others
                .push(c.spawn().map_err(|e| format!("starting server {i}: {e}"))?);
        }
        Ok(())
    }

    /// Starts a worker running `pskv ARGS`, its stdout piped to the caller.
    pub fn start_worker(&mut self, args: &[&str]) -> Result<(), String> {
        let mut c = self.command("worker", args);
        c.stdout(Stdio::piped());
        self.workers
            .push(c.spawn().map_err(|e| format!("starting a worker: {e}"))?);
        Ok(())
    }

    /// Waits for every worker (at most `timeout`), returning their stdouts;
    /// a worker that fails or outlives the timeout fails the cluster. Then
    /// waits a little for the scheduler and servers to leave.
    pub fn wait_workers(&mut self, timeout: Duration) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + timeout;
        let mut outs = Vec::new();
        let workers = std::mem::take(&mut self.workers);
        // Read every worker's stdout on its own thread so that none blocks.
        let readers: Vec<_> = workers
            .into_iter()
            .map(|mut ch| {
                let mut so = ch.stdout.take();
                let t = std::thread::spawn(move || {
                    let mut s = String::new();
                    if let Some(o) = so.as_mut() {
                        let _ = std::io::Read::read_to_string(o, &mut s);
                    }
                    s
                });
                (ch, t)
            })
            .collect();
        let mut failed = None;
        for (i, (mut ch, t)) in readers.into_iter().enumerate() {
            loop {
                match ch.try_wait() {
                    Ok(Some(st)) => {
                        if !st.success() && failed.is_none() {
                            failed = Some(format!("worker {i} exited with {st}"));
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = ch.kill();
                        let _ = ch.wait();
                        failed
                            .get_or_insert(format!("worker {i} did not finish within {timeout:?}"));
                        break;
                    }
                }
            }
            outs.push(t.join().unwrap_or_default());
        }
        if let Some(f) = failed {
            return Err(f);
        }
        let until = Instant::now() + Duration::from_secs(10);
        for ch in &mut self.others {
            while Instant::now() < until {
                if let Ok(Some(_)) = ch.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(outs)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for ch in self.workers.iter_mut().chain(self.others.iter_mut()) {
            if let Ok(None) = ch.try_wait() {
                let _ = ch.kill();
            }
            let _ = ch.wait();
        }
    }
}
