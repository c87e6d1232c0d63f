//! Faults across processes: a worker killed with SIGKILL in the middle of
//! dist_sync training. The surviving workers must get an error naming the
//! dead node within the heartbeat timeout (never a hang), and `pskv launch`
//! must end such a job saying which worker died.
//!
//! The workers are this test binary started again with `PSKV_FAULT_WORKER`
//! set; the scheduler and the server are `pskv` processes.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// Children killed when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cluster_env(workers: u32) -> Vec<(String, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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

fn worker_command() -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "fault_worker_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("PSKV_FAULT_WORKER", "1");
    c
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
            worker_command()
                .envs(env.iter().map(|(k, v)| (k, v)))
                .env("DMLC_ROLE", "worker")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    let readers: Vec<_> = workers
        .0
        .iter_mut()
        .map(|c| {
            let mut out = c.stdout.take().unwrap();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = out.read_to_string(&mut s);
                s
            })
        })
        .collect();
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
