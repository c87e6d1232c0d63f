//! The `pskv` program, run as a user would.

use std::process::Command;

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
fn commands_not_built_yet_say_so_and_fail() {
    let out = pskv().arg("demo").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not available yet"));
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
