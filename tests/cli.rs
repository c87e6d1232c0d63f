//! The `pskv` program, run as a user would.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pskv() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pskv"))
}

#[test]
fn help_lists_the_commands() {
    let out = pskv().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "demo",
        "bench",
        "launch",
        "scheduler",
        "server",
        "engine-config",
    ] {
        assert!(text.contains(cmd), "{text}");
    }
}

#[test]
fn engine_config_reads_the_environment_and_rejects_bad_values() {
    let out = pskv()
        .arg("engine-config")
        .env("PSKV_CPU_WORKER_NTHREADS", "3")
        .env("PSKV_ENGINE", "naive")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cpu_threads: 3") && text.contains("Naive"),
        "{text}"
    );

    let out = pskv()
        .arg("engine-config")
        .env("PSKV_CPU_WORKER_NTHREADS", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PSKV_CPU_WORKER_NTHREADS"));
}

/// The stdout of a command that must have succeeded (else both its
/// outputs in the failure).
fn stdout_ok(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pskv-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pids of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
            }
        }
    }
    out
}

fn read_pids(dir: &Path) -> Vec<u32> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// `pskv demo` with 2 workers and 1 server, for `epochs`.
fn demo_2x1(epochs: u32) -> Command {
    let mut c = pskv();
    c.args(["demo", "-w", "2", "-s", "1", "--timeout", "120", "--epochs"])
        .arg(epochs.to_string());
    c
}

/// `PSKV_PROFILE=DIR/` gives every process of a job its own profile, and
/// `pskv trace merge` puts them on one timeline, one track group each.
#[test]
fn profiles_of_a_job_merge_into_one_timeline() {
    let dir = scratch("profile");
    let spec = format!("{}/", dir.display());
    stdout_ok(&demo_2x1(1).env("PSKV_PROFILE", &spec).output().unwrap());
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let count = |p: &str, t: bool| {
        let of = |n: &&String| n.starts_with(p) && n.ends_with("-transport.json") == t;
        names.iter().filter(of).count()
    };
    // The engine's file and the transport's of every worker and server,
    // and the scheduler's transport file.
    assert_eq!(
        [
            ("worker-", false),
            ("server-", false),
            ("worker-", true),
            ("server-", true),
            ("scheduler-", true)
        ]
        .map(|(p, t)| count(p, t)),
        [2, 1, 2, 1, 1],
        "{names:?}"
    );
    let merged = dir.join("job.json");
    let merge = |out: &Path| {
        let mut c = pskv();
        c.args(["trace", "merge"]).arg(&dir).arg("-o").arg(out);
        c.output().unwrap()
    };
    stdout_ok(&merge(&merged));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&merged).unwrap()).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    let mut processes = Vec::new();
    for e in events {
        if e["name"] == "process_name" {
            processes.push(e["args"]["name"].as_str().unwrap_or_default());
        }
    }
    assert!(
        processes.iter().filter(|p| p.starts_with("worker")).count() == 2
            && processes.iter().any(|p| p.starts_with("server")),
        "{processes:?}"
    );
    let pids_with_ops: std::collections::BTreeSet<u64> = events
        .iter()
        .filter(|e| e["ph"] == "X")
        .filter_map(|e| e["pid"].as_u64())
        .collect();
    assert!(pids_with_ops.len() >= 3, "{pids_with_ops:?}");
    // The server's aggregation and its optimizer's steps (the demo's SGD
    // runs on the server) have slices of their own, inside its key ops.
    let slices = |name: &str| {
        events
            .iter()
            .filter(|e| e["ph"] == "X" && e["name"] == name)
            .count()
    };
    assert!(
        slices("server sum") > 10
            && slices("server optimizer step") > 10
            && slices("server push in") > 0,
        "{} sums, {} steps, {} pushes in",
        slices("server sum"),
        slices("server optimizer step"),
        slices("server push in")
    );
    // A process's engine and transport threads stay apart: one name per
    // (process, thread).
    let mut threads = std::collections::BTreeMap::new();
    for e in events.iter().filter(|e| e["name"] == "thread_name") {
        let key = (e["pid"].as_u64(), e["tid"].as_u64());
        let name = e["args"]["name"].as_str().unwrap_or_default();
        let before = threads.insert(key, name);
        assert!(before.is_none(), "{key:?}: {before:?} and {name}");
    }
    // Flows from a worker's request to the server's handling and back.
    let ends = |ph: &str| -> std::collections::BTreeMap<u64, u64> {
        events
            .iter()
            .filter(|e| e["ph"] == ph)
            .filter_map(|e| Some((e["id"].as_u64()?, e["pid"].as_u64()?)))
            .collect()
    };
    let (starts, finishes) = (ends("s"), ends("f"));
    let crossing = starts
        .iter()
        .filter(|(id, pid)| finishes.get(id).is_some_and(|f| f != *pid))
        .count();
    assert!(
        crossing > 10 && crossing == starts.len(),
        "{crossing} of {}",
        starts.len()
    );
    let out = pskv()
        .args(["trace", "merge", "/no/such/dir"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/dir"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pskv status` finds a running job of `pskv launch` by its job file and
/// lists every node with its counters; a killed launcher's job is not
/// offered.
#[test]
fn status_lists_every_node_of_a_running_job() {
    // pskv makes the directory, closed to others (a test scratch is not).
    let scratch_dir = scratch("status");
    let run = scratch_dir.join("run");
    let status = |args: &[&str]| {
        let mut c = pskv();
        c.arg("status").args(args).env("PSKV_RUN_DIR", &run);
        for v in ["DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "PSKV_TOKEN"] {
            c.env_remove(v);
        }
        c.output().unwrap()
    };
    let none = status(&["--json"]);
    assert!(!none.status.success());
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("no running job"),
        "{none:?}"
    );
    let mut demo = demo_2x1(500)
        .env("PSKV_RUN_DIR", &run)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Counters come with heartbeats (every second); rates need two.
    let mut job = serde_json::Value::Null;
    wait_until("every node's counters", Duration::from_secs(60), || {
        let out = status(&["--json"]);
        if !out.status.success() {
            return false;
        }
        job = serde_json::from_slice(&out.stdout).unwrap();
        let nodes = job["nodes"].as_array().unwrap();
        nodes.len() == 4
            && nodes[1..]
                .iter()
                .all(|n| !n["rates"].is_null() && n["stats"]["rounds"].as_u64() > Some(0))
    });
    let nodes = job["nodes"].as_array().unwrap();
    let roles: Vec<(&str, u64)> = nodes
        .iter()
        .map(|n| (n["role"].as_str().unwrap(), n["rank"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        roles,
        [
            ("scheduler", 0),
            ("server", 0),
            ("worker", 0),
            ("worker", 1)
        ]
    );
    let mut pids: Vec<u64> = nodes
        .iter()
        .map(|n| n["stats"]["pid"].as_u64().unwrap())
        .collect();
    for n in nodes {
        assert_eq!(n["state"], "alive", "{n}");
        assert!(!gone(n["stats"]["pid"].as_u64().unwrap() as u32), "{n}");
        assert!(n["stats"]["traffic"]["bytes_out"].as_u64() > Some(0), "{n}");
    }
    for w in &nodes[2..] {
        assert!(w["heard_ms_ago"].as_u64() < Some(5000), "{w}");
        assert!(w["rates"]["bytes_out"].as_u64() > Some(0), "{w}");
        assert!(w["stats"]["slowest"]["key"].is_string(), "{w}");
    }
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 4, "{job}");
    let table = stdout_ok(&status(&[]));
    for want in ["NODE", "scheduler ", "server 0 ", "worker 0 ", "worker 1 "] {
        assert!(table.contains(want), "{want:?} not in\n{table}");
    }
    let watched = stdout_ok(&status(&["--json", "--watch", "0.2", "--count", "2"]));
    assert_eq!(watched.lines().count(), 2, "{watched}");
    let wrong = status(&["--job", "999999999"]);
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("no running job 999999999"),
        "{wrong:?}"
    );
    // A killed launcher's job file stays behind; it is not a running job,
    // and the next look removes it.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(demo.id() as i32, libc::SIGKILL) };
    let _ = demo.wait();
    assert!(std::fs::read_dir(&run).unwrap().count() == 1);
    let stale = status(&[]);
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("no running job"),
        "{stale:?}"
    );
    assert_eq!(std::fs::read_dir(&run).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&scratch_dir);
}

#[test]
fn the_demo_trains_and_matches_a_single_process_run() {
    let out = pskv()
        .args(["demo", "--epochs", "1", "--timeout", "120"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    assert!(text.contains("final accuracy: "), "{text}");
    assert!(text.contains("samples/s over 4 workers"), "{text}");
    assert!(
        text.contains("equal the single-process run's, bit for bit"),
        "{text}"
    );
    assert!(err.contains("epoch 1/1"), "{err}");
    // The accuracy printed is a real one: above chance (25%) after an epoch.
    let acc: f64 = text
        .split("final accuracy: ")
        .nth(1)
        .and_then(|r| r.split('%').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(acc > 60.0, "{text}");

    // Compressed, over shared memory, another shape: still bit for bit.
    let out = pskv()
        .args([
            "demo",
            "--epochs",
            "1",
            "-w",
            "2",
            "-s",
            "1",
            "--van",
            "shm",
            "--compress",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("bit for bit"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Weights and gradients on GPUs (emulated here), reduced on the device
    // in the reference: still bit for bit.
    let out = pskv()
        .args([
            "demo", "--epochs", "1", "-w", "3", "-s", "2", "--device", "gpu",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("bit for bit"),
        "{text}\n{err}"
    );
    assert!(err.contains("dist_sync_device with tensors on"), "{err}");

    let out = pskv().args(["demo", "--van", "udp"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("udp"));
}

#[test]
fn launch_stops_the_job_when_a_worker_fails() {
    let dir = scratch("fail");
    let script = format!(
        "echo $$ > {}/$DMLC_WORKER_ID; if [ \"$DMLC_WORKER_ID\" = 1 ]; then sleep 0.5; exit 3; fi; exec sleep 60",
        dir.display()
    );
    let t0 = Instant::now();
    let out = pskv()
        .args(["launch", "-n", "3", "-s", "1", "--", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("worker 1 (pid ") && err.contains("exit status: 3"),
        "{err}"
    );
    let pids = read_pids(&dir);
    assert_eq!(pids.len(), 3);
    for p in pids {
        assert!(gone(p), "worker process {p} outlived the launcher");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn start_long_job(dir: &Path) -> (std::process::Child, Vec<u32>) {
    // Each worker is a shell with a grandchild (`sleep`), whose pid goes to
    // a file of its own.
    let script = format!(
        "sleep 60 & echo $! > {d}/g$DMLC_WORKER_ID; echo $$ > {d}/$DMLC_WORKER_ID; wait",
        d = dir.display()
    );
    let launcher = pskv()
        .args(["launch", "-n", "2", "-s", "1", "--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the workers to start", Duration::from_secs(20), || {
        read_pids(dir).len() == 4
    });
    // Watchdog, scheduler, server and the two workers; then the grandchildren.
    let mut kids = Vec::new();
    wait_until("the launcher's 5 children", Duration::from_secs(20), || {
        kids = children(launcher.id());
        kids.len() == 5
    });
    kids.extend(read_pids(dir));
    (launcher, kids)
}

#[test]
fn a_killed_launcher_leaves_no_process_behind() {
    let dir = scratch("kill9");
    let (mut launcher, kids) = start_long_job(&dir);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(launcher.id() as i32, libc::SIGKILL) };
    let _ = launcher.wait();
    wait_until(
        "every child of the killed launcher to die",
        Duration::from_secs(10),
        || kids.iter().all(|&p| gone(p)),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctrl_c_stops_the_job() {
    let dir = scratch("sigint");
    let (mut launcher, kids) = start_long_job(&dir);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(launcher.id() as i32, libc::SIGINT) };
    let mut status = None;
    wait_until("the launcher to stop", Duration::from_secs(15), || {
        status = launcher.try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(status.unwrap().code(), Some(130));
    for p in kids {
        assert!(gone(p), "process {p} outlived the interrupted launcher");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn launch_rejects_bad_arguments() {
    for (args, want) in [
        (
            vec!["launch", "-n", "1", "--launcher", "pbs", "--", "true"],
            "invalid value 'pbs' for '--launcher",
        ),
        (
            vec!["launch", "-n", "1", "--env", "NOEQUALS", "--", "true"],
            "KEY=VALUE",
        ),
        (
            vec!["launch", "-n", "0", "--", "true"],
            "at least one worker",
        ),
        (
            vec!["launch", "-n", "100000", "--", "true"],
            "at most 4096 workers",
        ),
        (
            vec!["launch", "-n", "1000", "-s", "100", "--", "true"],
            "a local job has at most 1024",
        ),
        (
            vec!["launch", "-n", "1", "--launcher", "ssh", "--", "true"],
            "hostfile",
        ),
        (
            vec!["launch", "-n", "1", "--launcher", "mpi", "--", "true"],
            "OMPI_COMM_WORLD_RANK",
        ),
        (
            vec![
                "launch",
                "-n",
                "1",
                "--launcher",
                "slurm",
                "--restart-servers",
                "2",
                "--",
                "true",
            ],
            "the job's manager owns the processes",
        ),
        (
            vec![
                "launch",
                "-n",
                "1",
                "--launcher",
                "mpi",
                "--bind",
                "cores",
                "--",
                "true",
            ],
            "--bind-to core",
        ),
        (
            vec!["bench", "--bind", "sockets"],
            "[possible values: none, cores]",
        ),
        (
            vec!["bench", "--van", "tcp,udp"],
            "invalid value 'udp' for '--van",
        ),
        (
            vec!["bench", "--mode", "pull"],
            "[possible values: pushpull, push-pull]",
        ),
        (
            vec!["demo", "--device", "tpu"],
            "[possible values: cpu, gpu]",
        ),
    ] {
        let out = pskv().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// A list in the kernel's format (`0-3,6`) as CPU numbers.
fn parse_cpu_list(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => out.push(part.parse().unwrap()),
        }
    }
    out
}

/// `--bind cores`: each worker reports CPUs of its own (blocks of the
/// launcher's, or the one CPU there is), and the table says so; without
/// it each may run on all of them.
#[test]
fn bench_binds_workers_to_cores_of_their_own() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let mine = parse_cpu_list(
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap(),
    );
    let dir = scratch("bind");
    for bind in ["cores", "none"] {
        let out = pskv()
            .args([
                "bench", "-w", "2", "-s", "1", "--van", "shm", "--cases", "4B",
            ])
            .args(["--iters-scale", "0.05", "--bind", bind, "--out"])
            .arg(&dir)
            .output()
            .unwrap();
        let text = stdout_ok(&out);
        assert_eq!(
            text.contains("| shm bound | 4B |"),
            bind == "cores",
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json")).unwrap())
                .unwrap();
        let cpus: Vec<Vec<usize>> = json
            .as_array()
            .unwrap()
            .iter()
            .map(|r| parse_cpu_list(r["cpus"].as_str().unwrap()))
            .collect();
        assert_eq!(cpus.len(), 2, "{json}");
        if bind == "none" {
            assert!(cpus.iter().all(|c| *c == mine), "{cpus:?} against {mine:?}");
        } else if mine.len() >= 2 {
            // Two blocks, the first one larger if the count is odd.
            let half = mine.len().div_ceil(2);
            assert_eq!(cpus[0], mine[..half], "{cpus:?} of {mine:?}");
            assert_eq!(cpus[1], mine[half..], "{cpus:?} of {mine:?}");
        } else {
            assert!(cpus.iter().all(|c| *c == mine), "{cpus:?} against {mine:?}");
        }
    }
    // Other hosts' cores are not known here: refused before anything starts.
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "node1\n").unwrap();
    let out = pskv()
        .args([
            "launch",
            "-n",
            "1",
            "--launcher",
            "ssh",
            "--bind",
            "cores",
            "-H",
        ])
        .arg(&hosts)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bind cores places"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pskv bench --push-buffers`: over shm every key is pushed from its push
/// buffer in shared memory (bench.json's `shared_keys`), in place
/// (`in_place_parts`), the check round
/// still gives the right sums; over TCP the buffers are ordinary memory;
/// with GPU tensors the option is refused.
#[test]
fn bench_pushes_from_push_buffers() {
    let dir = scratch("push-buffers");
    for van in ["shm", "tcp"] {
        let out = pskv()
            .args(["bench", "-w", "2", "-s", "1", "--van", van])
            .args(["--cases", "4KiB,100x40KiB", "--iters-scale", "0.05"])
            .args(["--push-buffers", "--out"])
            .arg(&dir)
            .output()
            .unwrap();
        let text = stdout_ok(&out);
        assert!(
            text.contains(&format!("| {van} push-buffers | 4KiB |")),
            "{text}"
        );
        assert!(!text.contains("WRONG"), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json")).unwrap())
                .unwrap();
        for w in json.as_array().unwrap() {
            assert_eq!(w["push_buffers"], true, "{w}");
            let shared: Vec<u64> = w["cases"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["shared_keys"].as_u64().unwrap())
                .collect();
            let want = if van == "shm" {
                vec![1, 100]
            } else {
                vec![0, 0]
            };
            assert_eq!(shared, want, "{van}: {w}");
            // Over shm every key's one part went in place in every round
            // (the check round, warm-up and timed rounds: at least 3).
            for (c, keys) in w["cases"].as_array().unwrap().iter().zip(&want) {
                let in_place = c["in_place_parts"].as_u64().unwrap();
                if van == "shm" {
                    assert!(in_place >= 3 * keys, "{van}: {c}");
                } else {
                    assert_eq!(in_place, 0, "{van}: {c}");
                }
            }
        }
    }
    let out = pskv()
        .args([
            "bench",
            "--push-buffers",
            "--device",
            "gpu",
            "--cases",
            "4B",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--push-buffers"), "{err}");
}

/// `-- pskv demo-worker ...` for a job of 2 workers and 1 server.
fn demo_worker_args() -> Vec<&'static str> {
    let mut args = vec!["--", env!("CARGO_BIN_EXE_pskv")];
    args.extend(common::DEMO_WORKER_2X1);
    args
}

#[test]
fn ranks_under_mpirun_take_their_roles() {
    // mpirun is not needed to test the rank logic: start the 4 ranks as
    // mpirun would, each with its OMPI_COMM_WORLD_* variables. MPI ranks
    // share no pipe, so the scheduler's port is found free here and
    // released; another process may take it first: then the job is
    // started again on another port.
    for attempt in 1..=3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        match mpi_ranks_on(port) {
            Ok(outs) => {
                // The two worker ranks trained (rank 0 of the job wrote
                // the steps).
                assert!(
                    outs[2].contains("DONE") && outs[3].contains("DONE"),
                    "{outs:?}"
                );
                return;
            }
            Err(e) if e.contains("Address already in use") && attempt < 3 => {
                eprintln!("port {port} was taken before the scheduler bound it; again");
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Runs the 4 ranks of `ranks_under_mpirun_take_their_roles` with the
/// scheduler on `port`: their stdouts, or why not (a rank that failed,
/// with its stderr; the others are stopped at once).
fn mpi_ranks_on(port: u16) -> Result<Vec<String>, String> {
    // Each rank's stdout and stderr are read as they come (a rank that
    // printed more than a pipe holds would otherwise block until killed).
    fn drain<R: std::io::Read + Send + 'static>(p: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    }
    let mut ranks: Vec<_> = (0..4)
        .map(|r| {
            let mut args = vec!["launch", "--launcher", "mpi", "-n", "2", "-s", "1"];
            args.extend(demo_worker_args());
            let mut c = pskv()
                .args(&args)
                .env("OMPI_COMM_WORLD_RANK", r.to_string())
                .env("OMPI_COMM_WORLD_SIZE", "4")
                .env("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
                .env("DMLC_PS_ROOT_PORT", port.to_string())
                .env("DMLC_NODE_HOST", "127.0.0.1")
                .env("PSKV_TOKEN", "mpi-test-token")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let (out, err) = (drain(c.stdout.take()), drain(c.stderr.take()));
            (c, out, err)
        })
        .collect();
    let end = Instant::now() + Duration::from_secs(120);
    let mut done = [false; 4];
    let stop_all = |ranks: &mut Vec<(std::process::Child, _, _)>| {
        for (c, _, _) in ranks.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    while !done.iter().all(|d| *d) {
        for r in 0..4 {
            if done[r] {
                continue;
            }
            let Some(st) = ranks[r].0.try_wait().unwrap() else {
                continue;
            };
            done[r] = true;
            if !st.success() {
                stop_all(&mut ranks);
                let (_, _, err) = ranks.remove(r);
                let err = err.join().unwrap_or_default();
                return Err(format!(
                    "rank {r} exited with {st}: {}",
                    String::from_utf8_lossy(&err)
                ));
            }
        }
        if Instant::now() > end {
            stop_all(&mut ranks);
            return Err(format!("ranks still running after 120 s (done: {done:?})"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(ranks
        .into_iter()
        .map(|(_, out, _)| String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned())
        .collect())
}

#[test]
fn the_ssh_launcher_runs_nodes_through_ssh() {
    let dir = scratch("ssh");
    // A stand-in for ssh that runs the remote command here.
    let fake = dir.join("fake-ssh");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"$*\" >> \"$(dirname \"$0\")/argv-used\"\nwhile [ \"$1\" = -o ]; do shift 2; done\necho \"$1\" >> \"$(dirname \"$0\")/hosts-used\"\nshift\nexec sh -c \"$1\"\n",
    )
    .unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&fake)
        .status()
        .unwrap();
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 slots=2\nlocalhost\n").unwrap();
    let mut args = vec![
        "launch".to_string(),
        "--launcher".into(),
        "ssh".into(),
        "-H".into(),
    ];
    args.push(hosts.display().to_string());
    args.extend(
        [
            "-n",
            "2",
            "-s",
            "1",
            "--timeout",
            "120",
            "--env",
            "DMLC_NODE_HOST=127.0.0.1",
            "--env",
            "PSKV_TOKEN=not-on-any-command-line",
        ]
        .map(String::from),
    );
    args.extend(demo_worker_args().into_iter().map(String::from));
    stdout_ok(&pskv().args(&args).env("PSKV_SSH", &fake).output().unwrap());
    // Server 0 on the first host, workers 0 and 1 on the second and first.
    let used = std::fs::read_to_string(dir.join("hosts-used")).unwrap();
    let mut used: Vec<&str> = used.lines().collect();
    used.sort();
    assert_eq!(used, vec!["127.0.0.1", "127.0.0.1", "localhost"]);
    // The token reached the remote nodes (they would be refused without
    // it), but not through ssh's command line.
    let argv = std::fs::read_to_string(dir.join("argv-used")).unwrap();
    assert_eq!(argv.lines().count(), 3, "{argv}");
    assert!(!argv.contains("not-on-any-command-line"), "{argv}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A model's whole gradient set runs as one case: every tensor, checked;
/// its tensors print as JSON for the peers' scripts.
#[test]
fn bench_runs_a_models_gradient_set() {
    let out = pskv()
        .args(["bench", "--model", "inception-v3", "--print-tensors"])
        .output()
        .unwrap();
    let tensors: Vec<serde_json::Value> = serde_json::from_str(&stdout_ok(&out)).unwrap();
    assert_eq!(tensors.len(), 292);
    assert_eq!(tensors[291]["name"], "fc.bias");

    let dir = scratch("bench-model");
    let out = pskv()
        .args([
            "bench",
            "-w",
            "2",
            "-s",
            "1",
            "--van",
            "shm",
            "--model",
            "inception-v3",
        ])
        .args(["--iters-scale", "0.05", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = stdout_ok(&out);
    assert!(
        text.contains("| inception-v3 |") && text.contains("| ok |"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json")).unwrap()).unwrap();
    for r in json.as_array().unwrap() {
        let c = &r["cases"][0];
        assert_eq!(r["cases"].as_array().unwrap().len(), 1, "only the model");
        assert_eq!(c["nkeys"], 292);
        assert_eq!(c["bytes"], 27_161_264 * 4);
        assert_eq!(c["check_ok"], true);
    }

    let out = pskv()
        .args(["bench", "-w", "2", "-s", "1", "--model", "resnet-50"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown model 'resnet-50'"), "{err}");
}

#[test]
fn bench_writes_a_table_json_and_a_chart() {
    let dir = scratch("bench");
    let out = pskv()
        .args([
            "bench", "-w", "2", "-s", "1", "--van", "tcp,shm", "--cases", "4B,4KiB",
        ])
        .args(["--iters-scale", "0.05", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = stdout_ok(&out);
    assert_eq!(
        text.lines().filter(|l| l.ends_with("| ok |")).count(),
        4,
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json")).unwrap()).unwrap();
    let runs = json.as_array().unwrap();
    assert_eq!(runs.len(), 4, "2 runs x 2 workers");
    for r in runs {
        for k in [
            "rank",
            "num_workers",
            "num_servers",
            "compress",
            "mode",
            "van",
            "cases",
        ] {
            assert!(r.get(k).is_some(), "{k} missing in {r}");
        }
        let cases = r["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 2);
        for c in cases {
            for k in [
                "case",
                "bytes",
                "nkeys",
                "iters",
                "check_ok",
                "median_us",
                "mean_us",
                "min_us",
                "p90_us",
                "algbw_gbps_median",
            ] {
                assert!(c.get(k).is_some(), "{k} missing in {c}");
            }
            assert!(c["median_us"].as_f64().unwrap() > 0.0);
            assert_eq!(c["check_ok"], true);
        }
    }
    let svg = std::fs::read_to_string(dir.join("bandwidth.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("bandwidth against message size"));
    assert!(svg.contains("2 workers, 1 servers, shm"), "legend");
    // Sizes ticked where they were measured (powers of two), rates in a
    // unit that reads right.
    let texts = |svg: &str| -> Vec<String> {
        svg.split("</text>")
            .filter_map(|t| t.rsplit('>').next())
            .map(|t| t.trim().to_string())
            .collect()
    };
    let labels = texts(&svg);
    assert!(
        labels.iter().any(|l| l == "4 B") && labels.iter().any(|l| l == "4 KiB"),
        "size ticks: {labels:?}"
    );
    assert!(
        labels.iter().any(|l| l.ends_with("B/s")) && !labels.iter().any(|l| l == "0.000"),
        "rate ticks: {labels:?}"
    );
    let lat = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
    assert!(lat.contains("round time against message size"));
    let labels = texts(&lat);
    assert!(
        labels
            .iter()
            .any(|l| l.ends_with(" µs") || l.ends_with(" ms")),
        "time ticks: {labels:?}"
    );

    // With the tensors on GPUs (the emulated device here): checked rounds.
    let out = pskv()
        .args([
            "bench", "-w", "2", "-s", "1", "--van", "tcp", "--device", "gpu",
        ])
        .args([
            "--cases",
            "4KiB,100x40KiB",
            "--iters-scale",
            "0.05",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let text = stdout_ok(&out);
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("tcp gpu") && l.ends_with("| ok |"))
            .count(),
        2,
        "{text}"
    );
    let json = std::fs::read_to_string(dir.join("bench.json")).unwrap();
    assert!(json.contains("\"device\": \"gpu\""), "{json}");
    let out = pskv().args(["bench", "--device", "xpu"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'xpu' for '--device"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_rust_example_trains_under_pskv_launch() {
    // A filtered `cargo test` may not have built the example: build it (a
    // no-op when it is fresh).
    let exe = Path::new(env!("CARGO_BIN_EXE_pskv"))
        .parent()
        .unwrap()
        .join("examples/dist_train");
    let st = Command::new(env!("CARGO"))
        .args(["build", "--example", "dist_train"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(st.success(), "building examples/dist_train.rs");
    assert!(exe.exists(), "{} was not built", exe.display());
    let out = pskv()
        .args(["launch", "-n", "2", "-s", "1", "--timeout", "120", "--"])
        .arg(&exe)
        .output()
        .unwrap();
    let text = stdout_ok(&out);
    assert_eq!(
        text.matches("w[0] = 3.0000 (target 3)").count(),
        2,
        "{text}"
    );
}

/// A scheduler that cannot listen (an interface with no address) ends
/// the launch at once, naming why, with status 1 (a job that failed to
/// start; 2 is for one asked for wrongly): the launcher waits for the
/// port it reports, not for a port it picked itself.
#[test]
fn a_scheduler_that_cannot_listen_ends_the_launch_at_once() {
    let t = Instant::now();
    let out = pskv()
        .args([
            "launch",
            "-n",
            "1",
            "--env",
            "DMLC_INTERFACE=pskv-none0",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("DMLC_INTERFACE"), "{err}");
    assert!(err.contains("exited before it listened"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30));
}
