//! Faults across processes: a worker killed with SIGKILL in the middle of
//! dist_sync training. The surviving workers must get an error naming the
//! dead node within the heartbeat timeout (never a hang), and `pskv launch`
//! must end such a job saying which worker died.
//!
//! The workers are this test binary started again with `PSKV_FAULT_WORKER`
//! set; the scheduler and the server are `pskv` processes.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, worker_command, Procs};
use pskv::engine::{Context, Engine};
use pskv::kvstore::{DType, KvStore, Optimizer, Tensor};

/// The rank that kills itself, and the step at which it does.
const VICTIM: u32 = 2;
const FATAL_STEP: u32 = 5;
/// Heartbeat timeout the cluster runs with (seconds).
const HEARTBEAT_TIMEOUT: u64 = 3;

/// The worker: trains until a request fails, then prints `ERROR secs msg`
/// (how long the failing request waited) and exits 0.
fn worker() {
    let engine = Engine::new().unwrap();
    let kv = KvStore::create("dist_sync", &engine).unwrap();
    let rank = kv.rank();
    let n = 1000;
    let w = Tensor::zeros(&engine, &[n], DType::F32, Context::Cpu).unwrap();
    kv.init(0, &w).unwrap();
    kv.set_optimizer(Optimizer::sgd(0.1)).unwrap();
    let g = Tensor::full(&engine, &[n], 1.0f32, Context::Cpu).unwrap();
    for step in 0..1000 {
        if rank == VICTIM && step == FATAL_STEP {
            println!("DYING {rank}");
            // SAFETY: kill(2) on this very process: the crash under test.
            unsafe {
                libc::kill(std::process::id() as i32, libc::SIGKILL);
            }
        }
        let t0 = Instant::now();
        let r = kv
            .pushpull(0, std::slice::from_ref(&g), std::slice::from_ref(&w), 0)
            .and_then(|()| w.to_vec::<f32>().map(|_| ()));
        if let Err(e) = r {
            println!("ERROR {:.3} {e}", t0.elapsed().as_secs_f64());
            // A second push fails at once, with the same news.
            let t1 = Instant::now();
            let again = kv
                .pushpull(0, std::slice::from_ref(&g), std::slice::from_ref(&w), 0)
                .and_then(|()| w.to_vec::<f32>().map(|_| ()));
            match again {
                Err(e) => println!("AGAIN {:.3} {e}", t1.elapsed().as_secs_f64()),
                Ok(()) => println!("AGAIN-OK"),
            }
            std::process::exit(0);
        }
    }
    println!("NO-ERROR");
    std::process::exit(0);
}

#[test]
fn fault_worker_entry() {
    if std::env::var("PSKV_FAULT_WORKER").is_ok() {
        worker();
    }
}

fn cluster_env(workers: u32) -> Vec<(String, String)> {
    let port = free_port();
    [
        ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
        ("DMLC_PS_ROOT_PORT", port.to_string()),
        ("DMLC_NUM_WORKER", workers.to_string()),
        ("DMLC_NUM_SERVER", "1".to_string()),
        ("DMLC_NODE_HOST", "127.0.0.1".to_string()),
        ("PSKV_TOKEN", format!("faults-{}", std::process::id())),
        ("PS_HEARTBEAT_INTERVAL", "1".to_string()),
        ("PS_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT.to_string()),
        ("PSKV_KVSTORE_TIMEOUT", "60".to_string()),
        ("PSKV_CPU_WORKER_NTHREADS", "1".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[test]
fn survivors_of_a_killed_worker_get_an_error_naming_it() {
    let env = cluster_env(3);
    let pskv = env!("CARGO_BIN_EXE_pskv");
    let mut infra = Procs(Vec::new());
    for role in ["scheduler", "server"] {
        infra.0.push(
            Command::new(pskv)
                .arg(role)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("DMLC_ROLE", role)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let mut workers = Procs(Vec::new());
    for _ in 0..3 {
        workers.0.push(
            worker_command("fault_worker_entry", "PSKV_FAULT_WORKER")
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("DMLC_ROLE", "worker")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    let readers = workers.read_stdouts();
    // No hang: every worker ends (the victim killed, the others on their
    // error) well within the limit.
    let deadline = Instant::now() + Duration::from_secs(60);
    for c in &mut workers.0 {
        while c.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "a worker hung after the crash");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let outs: Vec<String> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let victim = 9 + 2 * VICTIM;
    let name = format!("worker {VICTIM} (id {victim})");
    let mut survivors = 0;
    for out in &outs {
        if out.contains("DYING") {
            continue;
        }
        survivors += 1;
        // (libtest may print its own prefix on the same line.)
        let line = out
            .lines()
            .find_map(|l| l.find("ERROR ").map(|i| &l[i..]))
            .unwrap_or_else(|| panic!("a survivor saw no error: {out}"));
        let secs: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(
            secs < HEARTBEAT_TIMEOUT as f64 + 2.0,
            "the error took {secs} s (heartbeat timeout {HEARTBEAT_TIMEOUT} s): {line}"
        );
        assert!(line.contains(&name) && line.contains("died"), "{line}");
        let again = out
            .lines()
            .find_map(|l| l.find("AGAIN").map(|i| &l[i..]))
            .unwrap();
        assert!(again.contains(&name), "{again}");
        let secs: f64 = again.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(secs < 1.0, "a push after the death waited {secs} s");
    }
    assert_eq!(survivors, 2, "{outs:?}");
}

#[test]
fn pskv_launch_ends_a_job_whose_worker_was_killed() {
    let me = std::env::current_exe().unwrap();
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_pskv"))
        .args(["launch", "-n", "3", "-s", "1", "--timeout", "60"])
        .args(["--env", "PSKV_FAULT_WORKER=1", "--"])
        .arg(&me)
        .args([
            "--exact",
            "fault_worker_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 9), "{err}");
    assert!(err.contains("exited with signal: 9"), "{err}");
    assert!(err.contains("the job was stopped"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
}

/// Rounds of the recovery test, and the checkpoint interval.
const RECOVERY_STEPS: u32 = 60;
const CHECKPOINT_ROUNDS: u32 = 4;
const RECOVERY_KEYS: u32 = 4;

/// The recovery worker: SGD (learning rate 0.1, no optimizer state to
/// speak of) on 4 keys, a gradient of 1 from each worker every step. A
/// key's push that fails (its server died) is pushed again until it
/// succeeds; each key gets exactly `RECOVERY_STEPS` successful pushes.
/// Prints `STEP n` as it goes and `FINAL key value` at the end.
fn recovery_worker() {
    let engine = Engine::new().unwrap();
    let kv = KvStore::create("dist_sync", &engine).unwrap();
    let n = 8;
    let ws: Vec<Tensor> = (0..RECOVERY_KEYS)
        .map(|_| Tensor::zeros(&engine, &[n], DType::F32, Context::Cpu).unwrap())
        .collect();
    for (k, w) in ws.iter().enumerate() {
        kv.init(k as i64, w).unwrap();
    }
    kv.set_optimizer(Optimizer::sgd(0.1)).unwrap();
    let g = Tensor::full(&engine, &[n], 1.0f32, Context::Cpu).unwrap();
    let give_up = Instant::now() + Duration::from_secs(90);
    let mut retries = 0;
    for step in 0..RECOVERY_STEPS {
        for (k, w) in ws.iter().enumerate() {
            loop {
                let r = kv
                    .pushpull(
                        k as i64,
                        std::slice::from_ref(&g),
                        std::slice::from_ref(w),
                        0,
                    )
                    .and_then(|()| w.to_vec::<f32>().map(|_| ()));
                match r {
                    Ok(()) => break,
                    Err(e) => {
                        retries += 1;
                        println!("RETRY step {step} key {k}: {e}");
                        assert!(Instant::now() < give_up, "no recovery: {e}");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        }
        println!("STEP {step}");
        std::thread::sleep(Duration::from_millis(20));
    }
    kv.barrier().unwrap();
    for (k, w) in ws.iter().enumerate() {
        kv.pull(k as i64, std::slice::from_ref(w), 0).unwrap();
        println!("FINAL {k} {}", w.to_vec::<f32>().unwrap()[0]);
    }
    println!("RETRIES {retries}");
    // Over shared memory, the restarted server's segments are mapped again
    // in the background: give that a moment before reporting.
    if std::env::var("PSKV_VAN").as_deref() == Ok("shm") {
        let until = Instant::now() + Duration::from_secs(10);
        while kv.shared_memory_parts() < RECOVERY_KEYS as usize && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    println!("SHM_PARTS {}", kv.shared_memory_parts());
    kv.close().unwrap();
}

#[test]
fn recovery_worker_entry() {
    if std::env::var("PSKV_RECOVERY_WORKER").is_ok() {
        recovery_worker();
    }
}

/// The weight after `r` rounds of w -= 0.1 * (1 + 1), in f32 as the
/// server computes it.
fn after_rounds(r: u32) -> f32 {
    let mut w = 0.0f32;
    for _ in 0..r {
        w -= 0.1f32 * 2.0f32;
    }
    w
}

#[test]
fn a_killed_server_restarts_from_its_checkpoint_and_training_resumes() {
    recovery("tcp");
}

#[test]
fn recovery_over_shared_memory_maps_the_restarted_servers_segments_again() {
    recovery("shm");
}

/// The `FINAL key value` lines of a recovery worker's output, by key (the
/// first of each: with several workers on one stream, any one will do, as
/// they agree).
fn finals(o: &str) -> Vec<f32> {
    (0..RECOVERY_KEYS)
        .map(|k| {
            o.lines()
                .find_map(|l| {
                    l.find(&format!("FINAL {k} "))
                        .map(|i| l[i..].split_whitespace().nth(2).unwrap().parse().unwrap())
                })
                .unwrap_or_else(|| panic!("no FINAL {k} in {o}"))
        })
        .collect()
}

/// Rounds a key's final weight says it lost (a whole number, fewer than
/// two checkpoint intervals), or a panic.
fn rounds_lost(k: usize, w: f32) -> u32 {
    (0..2 * CHECKPOINT_ROUNDS)
        .find(|l| after_rounds(RECOVERY_STEPS - l) == w)
        .unwrap_or_else(|| panic!("key {k}: {w} is not the weight of any allowed number of rounds"))
}

/// Reads `out` line by line on a thread, sending each line to `tx`; the
/// thread returns the whole text.
fn follow(
    out: impl std::io::Read + Send + 'static,
    tx: std::sync::mpsc::Sender<String>,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    })
}

/// Waits for a line containing `what`, or panics at `deadline`.
fn wait_for_line(rx: &std::sync::mpsc::Receiver<String>, what: &str, deadline: Instant) {
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no line with '{what}' in time"));
        if line.contains(what) {
            return;
        }
    }
}

fn recovery(van: &str) {
    let dir = std::env::temp_dir().join(format!("pskv-recovery-{van}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut env = cluster_env(2);
    for (k, v) in &mut env {
        if k == "DMLC_NUM_SERVER" {
            *v = "2".into();
        }
    }
    env.push(("PSKV_CHECKPOINT_DIR".into(), dir.display().to_string()));
    env.push((
        "PSKV_CHECKPOINT_ROUNDS".into(),
        CHECKPOINT_ROUNDS.to_string(),
    ));
    env.push(("PSKV_VAN".into(), van.into()));
    let pskv = env!("CARGO_BIN_EXE_pskv");
    let start = |role: &str| {
        Command::new(pskv)
            .arg(role)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("DMLC_ROLE", role)
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut infra = Procs(vec![start("scheduler"), start("server"), start("server")]);
    let mut workers = Procs(Vec::new());
    for _ in 0..2 {
        workers.0.push(
            worker_command("recovery_worker_entry", "PSKV_RECOVERY_WORKER")
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("DMLC_ROLE", "worker")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    // Follow the workers' lines as they come.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let readers: Vec<_> = workers
        .0
        .iter_mut()
        .map(|c| follow(c.stdout.take().unwrap(), tx.clone()))
        .collect();
    drop(tx);
    // Kill server "b" (the second started) with SIGKILL mid-training and
    // start it again at once, as a supervisor would.
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_for_line(&rx, "STEP 21", deadline);
    infra.0[2].kill().unwrap();
    infra.0[2].wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    infra.0[2] = start("server");
    for c in &mut workers.0 {
        while c.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "training did not resume");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let outs: Vec<String> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    for (c, o) in workers.0.iter_mut().zip(&outs) {
        assert!(c.wait().unwrap().success(), "a worker failed:\n{o}");
    }
    // Both workers see the same weights; each key lost at most what the
    // checkpoint interval allows (rounds after the last record, which the
    // writer may not have put on disk yet: under two intervals), whole
    // rounds only, and the keys of the surviving server lost nothing.
    let (a, b) = (finals(&outs[0]), finals(&outs[1]));
    assert_eq!(a, b, "the workers disagree");
    let retried = outs.iter().any(|o| o.contains("RETRY"));
    assert!(retried, "nothing failed: did the server die?\n{}", outs[0]);
    let mut lost_total = 0;
    let mut untouched = 0;
    for (k, w) in a.iter().enumerate() {
        let lost = rounds_lost(k, *w);
        lost_total += lost;
        untouched += usize::from(lost == 0);
        eprintln!("key {k}: {lost} rounds lost");
    }
    // 4 keys hash over 2 servers: the survivor's keys lost nothing. (A key
    // of the killed server may lose nothing too, if it had just been
    // recorded.)
    assert!(untouched >= 1, "every key lost rounds");
    eprintln!("rounds lost over all keys: {lost_total}");
    assert!(dir.join("server-1.ckpt").exists() && dir.join("server-0.ckpt").exists());
    // Over shared memory every key's part has its segment at the end, the
    // restarted server's included (mapped again after the restart).
    let want = if van == "shm" { RECOVERY_KEYS } else { 0 };
    for o in &outs {
        assert!(o.contains(&format!("SHM_PARTS {want}\n")), "{o}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pskv launch --restart-servers 1`: a server killed mid-training is
/// started again by the launcher from the checkpoints of a directory the
/// launcher made, the workers' retried pushes go through, the job succeeds
/// with whole rounds lost, and the directory is gone afterwards.
#[test]
fn pskv_launch_restarts_a_killed_server_from_its_checkpoint() {
    let me = std::env::current_exe().unwrap();
    let mut job = Procs(vec![Command::new(env!("CARGO_BIN_EXE_pskv"))
        .args(["launch", "-n", "2", "-s", "2", "--timeout", "120"])
        .args(["--restart-servers", "1"])
        .args(["--env", "PSKV_RECOVERY_WORKER=1"])
        .args([
            "--env",
            &format!("PSKV_CHECKPOINT_ROUNDS={CHECKPOINT_ROUNDS}"),
        ])
        .arg("--")
        .arg(&me)
        .args([
            "--exact",
            "recovery_worker_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()]);
    let pid = job.0[0].id();
    let (out, err) = (
        job.0[0].stdout.take().unwrap(),
        job.0[0].stderr.take().unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = follow(out, tx);
    // All members write to this pipe: drain it as it comes.
    let errs = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(err), &mut all);
        all
    });
    wait_for_line(&rx, "STEP 21", Instant::now() + Duration::from_secs(120));
    // The launcher made its checkpoint directory.
    let prefix = format!("pskv-checkpoints-{pid}-");
    let dirs = || -> Vec<String> {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix))
            .collect()
    };
    assert_eq!(dirs().len(), 1, "no checkpoint directory of the job");
    // The launcher's server children.
    let servers: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // The parent pid is the 2nd field after the ")" of the name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            ppid == Some(pid) && cmd.split(|&b| b == 0).any(|a| a == b"server")
        })
        .collect();
    assert_eq!(servers.len(), 2, "{servers:?}");
    // SAFETY: kill(2) on a child process of the launcher we started.
    unsafe { libc::kill(servers[1] as i32, libc::SIGKILL) };
    let status = job.0[0].wait().unwrap();
    let outs = reader.join().unwrap();
    let err = errs.join().unwrap();
    assert!(status.success(), "{err}\n{outs}");
    assert!(
        err.contains("starting it again from its checkpoint"),
        "{err}"
    );
    assert!(
        outs.contains("RETRY"),
        "nothing failed: did the server die?\n{outs}"
    );
    // Both workers finished, with whole rounds lost on at most the killed
    // server's keys.
    assert_eq!(outs.matches("FINAL 3 ").count(), 2, "{outs}");
    let lost: Vec<u32> = finals(&outs)
        .iter()
        .enumerate()
        .map(|(k, w)| rounds_lost(k, *w))
        .collect();
    assert!(lost.contains(&0), "every key lost rounds: {lost:?}");
    assert!(
        dirs().is_empty(),
        "the launcher left its checkpoint directory behind"
    );
}
