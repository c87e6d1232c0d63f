//! Replicas across processes: `pskv demo` (4 workers, 3 servers, SGD with
//! momentum) with `PSKV_REPLICAS=2`, and one server killed with SIGKILL at
//! a random point of training: the job succeeds without a restart, and the
//! demo's own check holds (the trained weights equal those of the same
//! training in one process, bit for bit), so no round was lost.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::cluster::Job;
use crate::recovery::children_running;

#[test]
fn a_server_killed_at_a_random_point_loses_no_round_with_replicas() {
    // A random server and moment (printed, so that a failure can be rerun
    // with VICTIM and DELAY_MS).
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let victim = std::env::var("VICTIM").map_or((seed % 3) as usize, |v| v.parse().unwrap());
    let delay = Duration::from_millis(
        std::env::var("DELAY_MS").map_or(200 + (seed / 3 % 1500) as u64, |v| v.parse().unwrap()),
    );
    eprintln!("killing server {victim} (of the launcher's order) {delay:?} into epoch 1");
    let mut job = Job::new(0, 0, 2, &[]);
    let mut c = Command::new(env!("CARGO_BIN_EXE_pskv"));
    c.args(["demo", "-w", "4", "-s", "3", "--epochs", "3"])
        .env("PSKV_REPLICAS", "2")
        .env("PS_HEARTBEAT_TIMEOUT", "2");
    let demo = job.start_command("demo", c);
    job.wait_line(Some(demo), "4 workers, 3 servers", Duration::from_secs(60));
    std::thread::sleep(delay);
    let servers = children_running(job.pid(demo), b"server");
    assert_eq!(servers.len(), 3, "{servers:?}");
    // SAFETY: kill(2) on a server of the demo's job.
    unsafe { libc::kill(servers[victim] as i32, libc::SIGKILL) };
    let st = job.wait_exit(demo, Duration::from_secs(240));
    let out = job.output(demo);
    assert!(st.success(), "{out}");
    assert!(
        out.contains("its backup serves its keys"),
        "the server did not die during training:\n{out}"
    );
    assert!(out.contains("bit for bit"), "{out}");
}
