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

/// Builds libpskv.a and libpskv.so (`cargo test` links the tests against
/// the rlib and leaves the C libraries alone; a no-op when they are fresh),
/// in the profile of the tests' own build (`target_dir`).
fn build_c_library() {
    // The profile's folder is its name, but for `dev`'s.
    let dir = target_dir();
    let profile = match dir.file_name().and_then(|d| d.to_str()) {
        Some("debug") | None => "dev",
        Some(p) => p,
    };
    let st = Command::new(env!("CARGO"))
        .args(["build", "--lib", "-p", "pskv", "--profile", profile])
        .current_dir(root())
        .status()
        .unwrap();
    assert!(st.success(), "building libpskv.a");
}

/// Runs `exe` with `args` under `pskv launch` with 2 workers and 1
/// server (and `env`); its stdout, after checking that it succeeded.
fn launch(exe: &Path, args: &[&str], env: &[(&str, &Path)]) -> String {
    let run = Command::new(env!("CARGO_BIN_EXE_pskv"))
        .args(["launch", "-n", "2", "-s", "1", "--timeout", "120", "--"])
        .arg(exe)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{}: {}\n{}",
        exe.display(),
        stdout,
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

/// Runs a build step, failing with its output.
fn step(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not run it: {e}"));
    assert!(
        out.status.success(),
        "{what}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compiles `examples/c/<name>.c` against libpskv.a and runs it under
/// `pskv launch` with 2 workers and 1 server; its stdout.
fn launch_c_example(name: &str, cflags: &[&str], args: &[&str]) -> String {
    launch_c_example_with(name, cflags, args, &[])
}

/// `launch_c_example` with more environment for the job.
fn launch_c_example_with(
    name: &str,
    cflags: &[&str],
    args: &[&str],
    env: &[(&str, &Path)],
) -> String {
    launch_c_program(&format!("examples/c/{name}.c"), cflags, args, env)
}

/// Builds the C program at `src` (relative to the repository) against the
/// static library and runs it under `launch`.
fn launch_c_program(src: &str, cflags: &[&str], args: &[&str], env: &[(&str, &Path)]) -> String {
    let name = Path::new(src)
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("a C source's name");
    build_c_library();
    let dir = target_dir();
    let lib = dir.join("libpskv.a");
    assert!(lib.exists(), "{} was not built", lib.display());
    let exe = dir.join(format!("{name}_c-{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(cflags)
        .arg(root().join(src))
        .arg("-I")
        .arg(root().join("include"))
        .arg("-I")
        .arg(root().join("examples/c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler {cc}: {e}"));
    assert!(
        out.status.success(),
        "compiling {src}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = launch(&exe, args, env);
    let _ = std::fs::remove_file(&exe);
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

/// The library installed as a C library is (scripts/install-c.sh): a CMake
/// project finds it with `find_package(pskv 0.1)` and links the shared and
/// the static library (examples/c/CMakeLists.txt), pkg-config gives the
/// flags of a plain `cc`, and the programs built both ways train under
/// `pskv launch`.
#[test]
fn the_installed_library_serves_cmake_and_pkg_config() {
    build_c_library();
    let tmp = std::env::temp_dir().join(format!("pskv-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let (prefix, build) = (tmp.join("prefix"), tmp.join("build"));
    let cargo_target = target_dir().parent().unwrap().to_path_buf();
    // The libraries `build_c_library` made: the install script's default is
    // the release build's; a debug test run installs the debug build's.
    let debug = target_dir().file_name().is_some_and(|d| d == "debug");
    step(
        Command::new(root().join("scripts/install-c.sh"))
            .args(debug.then_some("--debug"))
            .args(["--no-build", "--prefix"])
            .arg(&prefix)
            .env("CARGO_TARGET_DIR", &cargo_target),
        "scripts/install-c.sh",
    );
    let soname = prefix.join(format!(
        "lib/libpskv.so.0.{}",
        env!("CARGO_PKG_VERSION_MINOR")
    ));
    assert!(soname.exists(), "{} is missing", soname.display());

    step(
        Command::new("cmake")
            .arg("-S")
            .arg(root().join("examples/c"))
            .arg("-B")
            .arg(&build)
            .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display())),
        "cmake configure of examples/c (find_package(pskv))",
    );
    step(
        Command::new("cmake").arg("--build").arg(&build),
        "cmake --build of examples/c",
    );
    for exe in ["overlap_c", "overlap_c_static"] {
        let out = launch(&build.join(exe), &["3"], &[]);
        assert!(out.contains("both ways bit for bit equal"), "{exe}: {out}");
    }

    let pc = Command::new("pkg-config")
        .args(["--cflags", "--libs", "pskv"])
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output()
        .expect("running pkg-config");
    assert!(pc.status.success(), "pkg-config --cflags --libs pskv");
    let flags = String::from_utf8_lossy(&pc.stdout).into_owned();
    assert!(flags.contains("-lpskv"), "{flags}");
    let exe = tmp.join("train_pc");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    step(
        Command::new(&cc)
            .arg(root().join("examples/c/train.c"))
            .args(flags.split_whitespace())
            .args(["-lm", "-o"])
            .arg(&exe),
        "cc examples/c/train.c $(pkg-config --cflags --libs pskv)",
    );
    let out = launch(&exe, &[], &[("LD_LIBRARY_PATH", &prefix.join("lib"))]);
    assert!(out.contains("rank 1 of 2: 5 rounds"), "{out}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The MPI-style benchmark: every size's result is checked by the program
/// (the sum over the workers), with a size split over several keys in
/// flight, by requests per round, by persistent requests started each
/// round, and from push buffers over shm; rank 0 prints the table.
#[test]
fn the_allreduce_benchmark_checks_every_result() {
    let shm = [("PSKV_VAN", Path::new("shm"))];
    for (way, extra, env) in [
        ("one-shot", None, &[][..]),
        ("persistent", Some("-p"), &[][..]),
        // Push buffers over shm: every key's memory is its shared slots.
        ("one-shot", Some("-s"), &shm[..]),
    ] {
        let mut args = vec![
            "-b", "4", "-e", "1M", "-f", "16", "-n", "3", "-w", "1", "-k", "3",
        ];
        args.extend(extra);
        let flags = ["-O2", "-Wall", "-Werror"];
        let stdout = launch_c_example_with("allreduce_bench", &flags, &args, env);
        assert!(stdout.contains(&format!("{way} requests")), "{stdout}");
        assert_eq!(
            stdout.contains("# push buffers: 15 of 15 keys in shared memory"),
            extra == Some("-s"),
            "{stdout}"
        );
        assert!(stdout.contains("every result checked"), "{stdout}");
        assert!(stdout.contains("busbw"), "{stdout}");
        // 4 B, 64 B, 1 KiB, 16 KiB, 256 KiB: one row each.
        assert_eq!(
            stdout.lines().filter(|l| !l.starts_with('#')).count(),
            5,
            "{stdout}"
        );
    }
}

/// Two threads of each worker asking for the same key's first push buffer
/// at once (over shm, where it is made from the key's slots, once): both
/// get it. (The C registry made it outside its lock, and the thread whose
/// making was refused because the other's had won could find nothing
/// registered yet and fail.)
#[test]
fn two_threads_asking_for_a_keys_first_push_buffer_both_get_it() {
    let shm = [("PSKV_VAN", Path::new("shm"))];
    let flags = ["-O2", "-Wall", "-Werror"];
    let stdout = launch_c_program("tests/c/push_buffer_race.c", &flags, &[], &shm);
    for rank in 0..2 {
        assert!(
            stdout.contains(&format!(
                "push_buffer_race: rank {rank}: 48 keys, one buffer each, 48 in shared memory"
            )),
            "{stdout}"
        );
    }
}
