//! The configuration parsers' properties, shared by the fuzz target
//! (`fuzz_targets/config_env.rs`) and the regression test over the saved
//! inputs (`tests/fuzz_regression.rs`).
//!
//! The input is an environment: `NAME=value` lines (names of pskv's, of
//! MXNet's and of ps-lite's variables, or anything else). Every parser
//! that reads the environment must answer with a configuration or an
//! error, never panic; and an error must name the variable it rejects.

/// The environment the bytes describe (later lines win).
pub fn environment(data: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(data);
    let mut env: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            env.retain(|(kk, _)| kk != k);
            env.push((k.to_string(), v.to_string()));
        }
    }
    env
}

/// Runs every parser on the environment of `data`.
pub fn check(data: &[u8]) {
    let env = environment(data);
    let get = |k: &str| env.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
    let names = |e: &str| env.iter().any(|(k, _)| e.contains(k.as_str()));
    if let Err(e) = pskv_transport::Config::from_lookup(&get) {
        let msg = e.to_string();
        // A missing required variable is named too (and is not in env).
        assert!(
            names(&msg) || msg.contains("DMLC_"),
            "unhelpful error: {msg}"
        );
    }
    if let Err(e) = pskv_engine::EngineBuilder::from_lookup(&get) {
        let msg = e.to_string();
        assert!(names(&msg), "unhelpful error: {msg}");
    }
    if let Err(e) = pskv_kvstore::Options::from_lookup(&get) {
        let msg = e.to_string();
        assert!(names(&msg), "unhelpful error: {msg}");
    }
}
