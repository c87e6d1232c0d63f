//! The C ABI from the outside: the checked-in header is what cbindgen makes
//! of src/capi.rs, and the C example builds with the system compiler and
//! trains under `pskv launch`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_header_is_fresh() {
    let cfg = cbindgen::Config::from_file(root().join("cbindgen.toml")).unwrap();
    let mut text = Vec::new();
    cbindgen::Builder::new()
        .with_crate(root())
        .with_config(cfg)
        .generate()
        .expect("cbindgen could not read src/capi.rs")
        .write(&mut text);
    let path = root().join("include/pskv.h");
    if std::env::var_os("PSKV_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let have = std::fs::read(&path).unwrap_or_default();
    assert!(
        have == text,
        "include/pskv.h is stale: regenerate it with `PSKV_BLESS=1 cargo test --test c_abi`"
    );
}

/// The directory holding the pskv binary and libpskv.a.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_pskv"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds libpskv.a (`cargo test` links the tests against the rlib and
/// leaves the static library alone; a no-op when it is fresh), compiles
/// `examples/c/<name>.c` against it and runs it under `pskv launch` with 2
/// workers and 1 server; its stdout.
fn launch_c_example(name: &str, cflags: &[&str], args: &[&str]) -> String {
    let st = Command::new(env!("CARGO"))
        .args(["build", "--lib", "-p", "pskv"])
        .current_dir(root())
        .status()
        .unwrap();
    assert!(st.success(), "building libpskv.a");
    let dir = target_dir();
    let lib = dir.join("libpskv.a");
    assert!(lib.exists(), "{} was not built", lib.display());
    let exe = dir.join(format!("{name}_c-{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(cflags)
        .arg(root().join(format!("examples/c/{name}.c")))
        .arg("-I")
        .arg(root().join("include"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler {cc}: {e}"));
    assert!(
        out.status.success(),
        "compiling examples/c/{name}.c:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(env!("CARGO_BIN_EXE_pskv"))
        .args(["launch", "-n", "2", "-s", "1", "--timeout", "120", "--"])
        .arg(&exe)
        .args(args)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

#[test]
fn the_c_example_trains_under_pskv_launch() {
    let stdout = launch_c_example("train", &[], &[]);
    for rank in 0..2 {
        assert!(
            stdout.contains(&format!("rank {rank} of 2: 5 rounds")),
            "{stdout}"
        );
    }
    // The bad pull's message names the key.
    assert!(
        stdout.contains("said: ") && stdout.contains("99"),
        "{stdout}"
    );
}

/// The overlap example: requests issued during the backward pass give the
/// same weights, bit for bit, as the blocking way, and the loss falls (the
/// example checks both and fails otherwise); it prints both round times.
#[test]
fn the_overlap_example_matches_the_blocking_way() {
    let stdout = launch_c_example("overlap", &["-O2", "-Wall", "-Werror"], &["6"]);
    assert!(stdout.contains("both ways bit for bit equal"), "{stdout}");
    assert!(
        stdout.contains("overlapped") && stdout.contains("ms/round"),
        "{stdout}"
    );
}
