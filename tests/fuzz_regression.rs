//! The saved inputs of the config/env fuzz target (`fuzz/regression/
//! config_env/`), run through the same checks as the fuzzer without it:
//! a crash the fuzzer once found stays fixed.

#[path = "../fuzz/common/config_env.rs"]
mod common;

#[test]
fn saved_config_env_inputs_parse_or_fail_cleanly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regression/config_env");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| common::check(&data));
        assert!(r.is_ok(), "{} fails the checks", path.display());
        n += 1;
    }
    assert!(n >= 5, "only {n} saved inputs in {}", dir.display());
}

#[test]
fn the_environment_reader_takes_the_last_assignment() {
    let env = common::environment(b"A=1\nB=2\nA=3\nno equals\n=x\n");
    assert_eq!(
        env,
        vec![
            ("B".to_string(), "2".to_string()),
            ("A".to_string(), "3".to_string()),
            (String::new(), "x".to_string()),
        ]
    );
}
