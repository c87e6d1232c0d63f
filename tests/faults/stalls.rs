//! Stopped processes (SIGSTOP, then SIGCONT), and the end of a job whose
//! workers are gone:
//! - a server stopped beyond the heartbeat timeout is declared dead; when
//!   it runs again it is fenced and exits with a message saying so, and
//!   `pskv launch --restart-servers` replaces it: training completes (it
//!   used to run on as a ghost that never rejoined nor exited);
//! - a scheduler stopped beyond the heartbeat timeout does not declare
//!   everyone dead when it runs again: training goes on, with no round
//!   lost, and every process exits 0 (it used to exit 0 at once, leaving
//!   every push failing "server 0 died");
//! - a scheduler and servers started by hand, whose workers all died,
//!   exit on their own, with an error naming the dead (they used to run
//!   forever).

use std::time::{Duration, Instant};

use crate::common::cluster::{Faults, Job};
use crate::recovery::{children_running, launch_recovery, RECOVERY_STEPS};

#[test]
fn a_stopped_server_is_fenced_and_the_launcher_replaces_it() {
    let mut job = Job::new(0, 0, 2, &[]);
    let l = launch_recovery(&mut job, &["--env", "PS_HEARTBEAT_TIMEOUT=2"]);
    job.wait_line(Some(l), "STEP 10", Duration::from_secs(120));
    let servers = children_running(job.pid(l), b"server");
    assert_eq!(servers.len(), 2, "{servers:?}");
    let stopped = servers[1] as libc::pid_t;
    // SAFETY: kill(2) on a child of the launcher we started.
    unsafe { libc::kill(stopped, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(5));
    unsafe { libc::kill(stopped, libc::SIGCONT) };
    let status = job.wait_exit(l, Duration::from_secs(120));
    let out = job.output(l);
    assert!(status.success(), "{out}");
    assert!(
        out.contains("this node was fenced") && out.contains("declared"),
        "the stopped server did not say it was fenced:\n{out}"
    );
    assert!(
        out.contains("starting it again from its checkpoint"),
        "{out}"
    );
    assert_eq!(out.matches("FINAL 3 ").count(), 2, "{out}");
}

/// A job of 2 recovery workers and 1 server (heartbeat timeout 2 s), once
/// a worker said `STEP step`; its worker nodes.
fn training(step: u32) -> (Job, Vec<usize>) {
    let mut job = Job::new(2, 1, 2, &[]);
    job.start_infra(1);
    let workers: Vec<usize> = (0..2)
        .map(|_| {
            job.start_worker(
                crate::recovery::ENTRY,
                "PSKV_RECOVERY_WORKER",
                &Faults::default(),
            )
        })
        .collect();
    job.wait_line(None, &format!("STEP {step}"), Duration::from_secs(120));
    (job, workers)
}

#[test]
fn a_stopped_scheduler_is_survived_and_nothing_is_lost() {
    let (mut job, workers) = training(5);
    job.signal(0, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(6));
    job.signal(0, libc::SIGCONT);
    let statuses = job.wait_all(Duration::from_secs(120));
    for (i, st) in statuses.iter().enumerate() {
        assert!(st.success(), "node {i} failed:\n{}", job.outputs());
    }
    // No round was lost or retried: every key took every step.
    let want = crate::recovery::after_rounds(RECOVERY_STEPS);
    for &w in &workers {
        let o = job.output(w);
        assert!(!o.contains("RETRY"), "{o}");
        for k in 0..4 {
            assert!(o.contains(&format!("FINAL {k} {want}")), "{o}");
        }
    }
}

#[test]
fn servers_and_scheduler_whose_workers_all_died_exit_naming_them() {
    let (mut job, workers) = training(3);
    let t0 = Instant::now();
    for &w in &workers {
        job.signal(w, libc::SIGKILL);
    }
    let (sched, server) = (
        job.wait_exit(0, Duration::from_secs(30)),
        job.wait_exit(1, Duration::from_secs(30)),
    );
    eprintln!(
        "the scheduler and the server exited {:?} after the workers died",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    assert!(!sched.success() && !server.success(), "{}", job.outputs());
    let (so, vo) = (job.output(0), job.output(1));
    assert!(
        so.contains("dead") && so.contains("worker 0 (id 9)"),
        "{so}"
    );
    assert!(vo.contains("the job ended") && vo.contains("died"), "{vo}");
}
