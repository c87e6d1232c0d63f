//! Clusters of processes on 127.0.0.1 (the `pskv-net` node binary): random
//! traffic checked byte for byte over tcp and over shared memory, barriers,
//! kill -9 and SIGSTOP of a worker detected within the heartbeat timeout,
//! a wrong token refused. Every test kills what it started, and is bounded.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pskv_test_support::{port_of, PortPipe, Procs};

const BIN: &str = env!("CARGO_BIN_EXE_pskv-net");

fn node(role: &str, port: u16, s: u32, w: u32, env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("node")
        .args(args)
        .env("DMLC_ROLE", role)
        .env("DMLC_PS_ROOT_URI", "127.0.0.1")
        .env("DMLC_PS_ROOT_PORT", port.to_string())
        .env("DMLC_NUM_SERVER", s.to_string())
        .env("DMLC_NUM_WORKER", w.to_string())
        .env("PSKV_CONNECT_TIMEOUT", "30")
        .env_remove("PSKV_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Starts the scheduler on a port it finds free itself: the child and
/// that port.
fn scheduler(s: u32, w: u32, env: &[(&str, &str)]) -> (Child, u16) {
    let mut c = node("scheduler", 0, s, w, env, &[]);
    let pipe = PortPipe::new().unwrap();
    pipe.attach(&mut c);
    let child = c.spawn().unwrap();
    (child, port_of(pipe))
}

/// Waits for `child` to exit within `limit`; its status and output.
fn finish(child: &mut Child, limit: Duration) -> (Option<i32>, String, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            let mut err = String::new();
            use std::io::Read;
            if let Some(o) = child.stdout.as_mut() {
                let _ = o.read_to_string(&mut out);
            }
            if let Some(e) = child.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            return (status.code(), out, err);
        }
        assert!(
            Instant::now() < deadline,
            "a process did not finish within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs 1 scheduler, `s` servers and `w` workers of the random workload;
/// returns the workers' digests, sorted.
fn random_run(van: &str, s: u32, w: u32) -> Vec<String> {
    let env = [("PSKV_VAN", van)];
    let mut procs = Procs(Vec::new());
    let (sched, port) = scheduler(s, w, &env);
    procs.0.push(sched);
    for _ in 0..s {
        procs
            .0
            .push(node("server", port, s, w, &env, &[]).spawn().unwrap());
    }
    for _ in 0..w {
        procs.0.push(
            node(
                "worker",
                port,
                s,
                w,
                &env,
                &["--rounds", "25", "--seed", "11"],
            )
            .spawn()
            .unwrap(),
        );
    }
    let mut digests = Vec::new();
    for c in procs.0.iter_mut().skip(1 + s as usize) {
        let (code, out, err) = finish(c, Duration::from_secs(120));
        assert_eq!(code, Some(0), "a worker failed ({van}): {err}");
        digests.extend(
            out.lines()
                .filter(|l| l.starts_with("digest="))
                .map(str::to_string),
        );
    }
    for c in procs.0.iter_mut().take(1 + s as usize) {
        let (code, _, err) = finish(c, Duration::from_secs(30));
        assert_eq!(code, Some(0), "scheduler or server failed ({van}): {err}");
    }
    digests.sort();
    assert_eq!(digests.len(), w as usize);
    digests
}

#[test]
fn random_traffic_checks_out_and_tcp_and_shm_agree() {
    let tcp = random_run("tcp", 2, 4);
    let shm = random_run("shm", 2, 4);
    assert_eq!(tcp, shm);
}

/// Starts a cluster of idle workers that report the dead nodes they see;
/// returns the processes, each worker's id, and line receivers.
fn idle_cluster(w: u32) -> (Procs, Vec<u32>, Vec<mpsc::Receiver<String>>) {
    let env = [
        ("PS_HEARTBEAT_INTERVAL", "0.2"),
        ("PS_HEARTBEAT_TIMEOUT", "2"),
        ("PSKV_VAN", "tcp"),
    ];
    let mut procs = Procs(Vec::new());
    let (sched, port) = scheduler(1, w, &env);
    procs.0.push(sched);
    procs
        .0
        .push(node("server", port, 1, w, &env, &[]).spawn().unwrap());
    let mut ids = Vec::new();
    let mut lines = Vec::new();
    for _ in 0..w {
        let mut c = node(
            "worker",
            port,
            1,
            w,
            &env,
            &["--mode", "idle", "--no-stop", "1"],
        )
        .spawn()
        .unwrap();
        let out = c.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        procs.0.push(c);
        lines.push(rx);
    }
    for rx in &lines {
        let l = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a worker started");
        let id: u32 = l
            .strip_prefix("ready id=")
            .expect("ready line")
            .parse()
            .unwrap();
        ids.push(id);
    }
    (procs, ids, lines)
}

fn wait_dead(rx: &mpsc::Receiver<String>, id: u32, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let left = limit
            .checked_sub(start.elapsed())
            .expect("death not reported in time");
        let l = rx.recv_timeout(left).expect("death not reported in time");
        if l.starts_with(&format!("dead={id} ")) {
            return start.elapsed();
        }
    }
}

#[test]
fn kill_9_of_a_worker_is_reported_to_the_others_at_once() {
    let (mut procs, ids, lines) = idle_cluster(3);
    // SIGKILL: the kernel closes its sockets; the scheduler learns at once.
    procs.0[2].kill().unwrap();
    let took = wait_dead(&lines[1], ids[0], Duration::from_secs(5));
    assert!(took < Duration::from_secs(2), "took {took:?}");
    wait_dead(&lines[2], ids[0], Duration::from_secs(5));
}

#[test]
fn a_stopped_worker_is_declared_dead_within_the_heartbeat_timeout() {
    let (procs, ids, lines) = idle_cluster(2);
    // SIGSTOP: no FIN, no heartbeats; only the timeout (2 s) can tell.
    let pid = procs.0[2].id() as libc::pid_t;
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let took = wait_dead(&lines[1], ids[0], Duration::from_secs(8));
    // SAFETY: as above; let it die normally when dropped.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        took >= Duration::from_millis(1500),
        "declared dead too early: {took:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "took {took:?} for a 2 s timeout"
    );
}

#[test]
fn a_wrong_token_is_refused_and_the_cluster_carries_on() {
    let good = [("PSKV_TOKEN", "right"), ("PSKV_VAN", "tcp")];
    let mut procs = Procs(Vec::new());
    let (sched, port) = scheduler(1, 1, &good);
    procs.0.push(sched);
    procs
        .0
        .push(node("server", port, 1, 1, &good, &[]).spawn().unwrap());
    let bad = [
        ("PSKV_TOKEN", "wrong"),
        ("PSKV_VAN", "tcp"),
        ("PSKV_CONNECT_TIMEOUT", "3"),
    ];
    let mut intruder = node("worker", port, 1, 1, &bad, &["--rounds", "1"])
        .spawn()
        .unwrap();
    let (code, _, err) = finish(&mut intruder, Duration::from_secs(30));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("authentication failed") && err.contains("wrong cluster token"),
        "{err}"
    );
    let mut worker = node("worker", port, 1, 1, &good, &["--rounds", "5"])
        .spawn()
        .unwrap();
    let (code, out, err) = finish(&mut worker, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("digest="));
}
