//! A server killed mid-training and started again from its checkpoint:
//! training resumes, over TCP and over shared memory (where the workers
//! map the new process's segments again); every key's weight is a whole
//! number of rounds (a round applied twice, or half of one, would be
//! silent corruption), and the survivor's keys lose nothing. A stress
//! run repeats the shared-memory case under CPU contention.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::cluster::{Faults, Job};
use pskv::engine::{Context, Engine};
use pskv::kvstore::{DType, KvStore, Optimizer, Tensor};

/// Rounds of the recovery test, and the checkpoint interval.
pub(crate) const RECOVERY_STEPS: u32 = 60;
const CHECKPOINT_ROUNDS: u32 = 4;
const RECOVERY_KEYS: u32 = 4;

/// The recovery worker: SGD (learning rate 0.1, no optimizer state to
/// speak of) on 4 keys, a gradient of 1 from each worker every step. A
/// key's push that fails (its server died) is pushed again until it
/// succeeds; each key gets exactly `RECOVERY_STEPS` successful pushes.
/// Prints `STEP n` as it goes and `FINAL key value` at the end.
fn recovery_worker() {
    // Warnings to stderr, which the harness keeps: a failure then says why
    // (a part that found no shared memory, a check that failed).
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .try_init();
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
    // in the background: give that time before reporting (the wait ends as
    // soon as they are; with every test of this binary running at once, 10 s
    // were sometimes not enough).
    if std::env::var("PSKV_VAN").as_deref() == Ok("shm") {
        let until = Instant::now() + Duration::from_secs(45);
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

pub(crate) const ENTRY: &str = "recovery::recovery_worker_entry";

/// The weight after `r` rounds of w -= 0.1 * (1 + 1), in f32 as the
/// server computes it.
pub(crate) fn after_rounds(r: u32) -> f32 {
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

/// The shared-memory recovery, again and again, with two threads of this
/// process spinning on the machine's cores: CI once saw a weight off the
/// sequence of whole rounds here (it was a checkpoint whose write lagged
/// 18 rounds behind on a loaded disk: whole rounds, more of them lost than
/// the test allowed; the bound is now the rounds done before the kill).
#[test]
fn shared_memory_recovery_under_cpu_contention_stays_whole_rounds() {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    for _ in 0..4 {
        recovery("shm");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
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

/// Rounds a key's final weight says it lost: a whole number, at most
/// `most` (the rounds done before the kill: the restarted server goes back
/// to the key's last record that reached the disk, which a slow disk can
/// hold far behind); else a panic.
fn rounds_lost(k: usize, w: f32, most: u32) -> u32 {
    (0..=most.min(RECOVERY_STEPS))
        .find(|l| after_rounds(RECOVERY_STEPS - l) == w)
        .unwrap_or_else(|| {
            panic!(
                "key {k}: {w} is not the weight of a whole number of rounds (at most {most} lost)"
            )
        })
}

fn recovery(van: &str) {
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("pskv-recovery-{van}-{}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ckpt = dir.display().to_string();
    let every = CHECKPOINT_ROUNDS.to_string();
    let mut job = Job::new(
        2,
        2,
        3,
        &[
            ("PSKV_CHECKPOINT_DIR", &ckpt),
            ("PSKV_CHECKPOINT_ROUNDS", &every),
            ("PSKV_VAN", van),
        ],
    );
    job.start_infra(2);
    let workers: Vec<usize> = (0..2)
        .map(|_| job.start_worker(ENTRY, "PSKV_RECOVERY_WORKER", &Faults::default()))
        .collect();
    // Kill server "b" (the second started) with SIGKILL mid-training and
    // start it again at once, as a supervisor would.
    job.wait_line(None, "STEP 21", Duration::from_secs(120));
    let b = 2;
    job.signal(b, libc::SIGKILL);
    job.wait_exit(b, Duration::from_secs(10));
    // The most rounds a key can have done by now (a worker may be one step
    // ahead of the line seen; the dead server's keys stop at once).
    let most = 23;
    std::thread::sleep(Duration::from_millis(300));
    let again = job.start_role("server", &Faults::default());
    for &w in &workers {
        let st = job.wait_exit(w, Duration::from_secs(120));
        assert!(st.success(), "a worker failed:\n{}", job.outputs());
    }
    // Both workers see the same weights; each key lost whole rounds only,
    // and the keys of the surviving server lost nothing.
    let outs: Vec<String> = workers.iter().map(|&w| job.output(w)).collect();
    let (a, bw) = (finals(&outs[0]), finals(&outs[1]));
    assert_eq!(a, bw, "the workers disagree");
    assert!(
        outs.iter().any(|o| o.contains("RETRY")),
        "nothing failed: did the server die?\n{}",
        outs[0]
    );
    let restored = job.output(again);
    assert!(
        restored.contains("keys back from the checkpoint"),
        "the restarted server did not load its checkpoint:\n{restored}"
    );
    let mut lost_total = 0;
    let mut untouched = 0;
    for (k, w) in a.iter().enumerate() {
        let lost = rounds_lost(k, *w, most);
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

/// `pskv launch --restart-servers 1 ARGS` running the recovery worker, as
/// a node of a fresh harness job.
pub(crate) fn launch_recovery(job: &mut Job, args: &[&str]) -> usize {
    let me = std::env::current_exe().unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_pskv"));
    c.args(["launch", "-n", "2", "-s", "2", "--timeout", "120"])
        .args(["--restart-servers", "1"])
        .args(["--env", "PSKV_RECOVERY_WORKER=1"])
        .args([
            "--env",
            &format!("PSKV_CHECKPOINT_ROUNDS={CHECKPOINT_ROUNDS}"),
        ])
        .args(args)
        .arg("--")
        .arg(&me)
        .args(["--exact", ENTRY, "--nocapture", "--test-threads=1"]);
    job.start_command("launcher", c)
}

/// The checkpoint directories a launcher of pid `pid` made.
pub(crate) fn checkpoint_dirs(pid: u32) -> Vec<String> {
    let prefix = format!("pskv-checkpoints-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// The children of process `pid` whose command line has the word `word`.
pub(crate) fn children_running(pid: u32, word: &[u8]) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // The parent pid is the 2nd field after the ")" of the name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            ppid == Some(pid) && cmd.split(|&b| b == 0).any(|a| a == word)
        })
        .collect()
}

/// `pskv launch --restart-servers 1`: a server killed mid-training is
/// started again by the launcher from the checkpoints of a directory the
/// launcher made, the workers' retried pushes go through, the job succeeds
/// with whole rounds lost, and the directory is gone afterwards.
#[test]
fn pskv_launch_restarts_a_killed_server_from_its_checkpoint() {
    let mut job = Job::new(0, 0, 3, &[]);
    let l = launch_recovery(&mut job, &[]);
    let pid = job.pid(l);
    job.wait_line(Some(l), "STEP 21", Duration::from_secs(120));
    assert_eq!(
        checkpoint_dirs(pid).len(),
        1,
        "no checkpoint directory of the job"
    );
    let servers = children_running(pid, b"server");
    assert_eq!(servers.len(), 2, "{servers:?}");
    // SAFETY: kill(2) on a child process of the launcher we started.
    unsafe { libc::kill(servers[1] as i32, libc::SIGKILL) };
    let status = job.wait_exit(l, Duration::from_secs(120));
    let outs = job.output(l);
    assert!(status.success(), "{outs}");
    assert!(
        outs.contains("starting it again from its checkpoint"),
        "{outs}"
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
        .map(|(k, w)| rounds_lost(k, *w, 23))
        .collect();
    assert!(lost.contains(&0), "every key lost rounds: {lost:?}");
    assert!(
        checkpoint_dirs(pid).is_empty(),
        "the launcher left its checkpoint directory behind"
    );
}

/// A launcher killed with SIGKILL leaves no checkpoint directory of its
/// own behind (the model's weights): its watchdog removes it.
#[test]
fn a_killed_launcher_leaves_no_checkpoint_directory() {
    let mut job = Job::new(0, 0, 3, &[]);
    let l = launch_recovery(&mut job, &[]);
    let pid = job.pid(l);
    job.wait_line(Some(l), "STEP 3", Duration::from_secs(120));
    assert_eq!(checkpoint_dirs(pid).len(), 1);
    job.signal(l, libc::SIGKILL);
    job.wait_exit(l, Duration::from_secs(10));
    let end = Instant::now() + Duration::from_secs(10);
    while !checkpoint_dirs(pid).is_empty() {
        assert!(
            Instant::now() < end,
            "the checkpoint directory outlived the launcher"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
