//! `pskv-net floor`, the Rust floor of a parameter-server round over TCP:
//! whole runs on 127.0.0.1 (with and without the servers' sums, sizes and
//! a tensors file), its refusals of bad input, and a worker whose server
//! is not there. Each run is bounded; the floor stops its own processes.

use std::process::{Command, Output};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_pskv-net");

/// Runs `pskv-net ARGS` to its end, killed after `limit` (the floor's
/// children end with it: their pipe from it closes).
fn run(args: &[&str], limit: Duration) -> Output {
    pskv_test_support::run_bounded(Command::new(BIN).args(args), limit)
}

/// The cases of the `RESULT` line: (name, bytes, median µs).
fn cases(out: &Output) -> Vec<(String, u64, f64)> {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in {text}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["case"].as_str().unwrap().to_string(),
                c["bytes"].as_u64().unwrap(),
                c["median_us"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn runs_each_size_with_and_without_sums() {
    for sum in [false, true] {
        let mut args = vec![
            "floor",
            "--workers",
            "3",
            "--servers",
            "2",
            "--sizes",
            "64KiB,300004",
            "--rounds",
            "4",
            "--part",
            "65536",
        ];
        if sum {
            args.push("--sum");
        }
        let out = run(&args, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "sum {sum}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = cases(&out);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].0.as_str(), got[0].1), ("65536B", 65536));
        assert_eq!((got[1].0.as_str(), got[1].1), ("300004B", 300_004));
        assert!(got.iter().all(|c| c.2 > 0.0), "{got:?}");
    }
}

#[test]
fn runs_a_tensors_file_as_one_round() {
    let dir = std::env::temp_dir().join(format!("pskv-floor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tiny.json");
    std::fs::write(
        &file,
        r#"[{"name":"a","shape":[3]},{"name":"b","shape":[64,1024]},{"name":"c","shape":[1]}]"#,
    )
    .unwrap();
    let out = run(
        &[
            "floor",
            "--workers",
            "2",
            "--servers",
            "2",
            "--tensors",
            file.to_str().unwrap(),
            "--rounds",
            "3",
            "--sum",
            "--part",
            "0",
        ],
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = cases(&out);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.as_str(), got[0].1), ("tiny", 4 * (3 + 65536 + 1)));
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    for (args, says) in [
        (&["floor", "--sizes", "6"][..], "multiple of 4"),
        (&["floor", "--workers", "0"][..], "1 or more"),
        (&["floor", "--part", "100"][..], "multiple of 64"),
        (
            &["floor", "--tensors", "/nonexistent/t.json"][..],
            "--tensors",
        ),
        (
            &["floor-worker", "--sizes", "64", "--ports", "1,2"][..],
            "--ports names 2",
        ),
    ] {
        let out = run(args, Duration::from_secs(20));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn a_worker_whose_server_is_not_there_fails_at_once() {
    // A port that was free a moment ago: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let out = run(
        &[
            "floor-worker",
            "--sizes",
            "64",
            "--ports",
            &port,
            "--rank",
            "0",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(!out.stderr.is_empty());
}
