//! Engine configuration: a builder, and the environment variables it reads.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `PSKV_ENGINE` | `threaded` or `naive` (also MXNet's `ThreadedEnginePerDevice`, `ThreadedEngine`, `NaiveEngine`) | `threaded` |
//! | `PSKV_CPU_WORKER_NTHREADS` | threads of the CPU pool | number of cores |
//! | `PSKV_CPU_PRIORITY_NTHREADS` | threads of the CPU priority lane | 2 |
//! | `PSKV_GPU_WORKER_NTHREADS` | compute threads per GPU | 2 |
//! | `PSKV_GPU_COPY_NTHREADS` | copy threads per GPU | 2 |
//! | `PSKV_PROFILE` | write a Chrome trace of every op at shutdown: to this file; or, for a path ending in `/` or an existing directory, to `<role>-<pid>.json` in it (the role from `DMLC_ROLE`, else `process`); `{role}` and `{pid}` in a path are replaced likewise, so every process of a job writes its own file (`pskv trace merge` joins them) | off |
//! | `PSKV_ENGINE_WAIT_TIMEOUT` | seconds `wait_for_var`/`wait_for_all` wait before an error; 0: no limit | 600 |
//! | `PSKV_ENGINE_SHUTDOWN_TIMEOUT` | seconds dropping the engine waits for pending ops | 60 |
//! | `PSKV_SPIN_US` | microseconds a blocking waiter spins before it sleeps (at most 10,000; 0: never; read once per process; the transport reads it too) | 50 |

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::error::EngineError;

/// This process's profile file for `PSKV_PROFILE=spec`: in a directory
/// (`spec` ends in `/` or names one) `<role>-<pid>.json`; else `spec` with
/// `{role}` and `{pid}` replaced.
pub fn profile_path_for(spec: &str, role: &str, pid: u32) -> PathBuf {
    let role: String = role
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if spec.ends_with('/') || std::path::Path::new(spec).is_dir() {
        return PathBuf::from(spec).join(format!("{role}-{pid}.json"));
    }
    PathBuf::from(
        spec.replace("{role}", &role)
            .replace("{pid}", &pid.to_string()),
    )
}

/// Which engine runs the ops.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// Worker pools per device; ops run as soon as their vars allow.
    #[default]
    Threaded,
    /// Every op runs inline at push, and push returns when it has finished:
    /// for debugging (a failure shows up at the push that caused it).
    Naive,
}

/// The settings of an engine. Build with [`EngineBuilder`].
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Threaded or naive.
    pub kind: EngineKind,
    /// Threads of the CPU pool.
    pub cpu_threads: usize,
    /// Threads of the CPU priority lane.
    pub cpu_priority_threads: usize,
    /// Compute threads per GPU.
    pub gpu_threads: usize,
    /// Copy threads per GPU.
    pub gpu_copy_threads: usize,
    /// Where to write the Chrome trace at shutdown; profiling is on from the
    /// start when set.
    pub profile_path: Option<PathBuf>,
    /// How long `wait_for_var` and `wait_for_all` wait (None: no limit).
    pub wait_timeout: Option<Duration>,
    /// How long dropping the engine waits for pending ops before failing them.
    pub shutdown_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kind: EngineKind::Threaded,
            cpu_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            cpu_priority_threads: 2,
            gpu_threads: 2,
            gpu_copy_threads: 2,
            profile_path: None,
            wait_timeout: Some(Duration::from_secs(600)),
            shutdown_timeout: Duration::from_secs(60),
        }
    }
}

/// Builds an [`crate::Engine`]. Start from [`EngineBuilder::new`] (defaults)
/// or [`EngineBuilder::from_env`] (defaults overridden by `PSKV_*` variables).
///
/// ```
/// use pskv_engine::{Engine, EngineKind};
/// let engine = Engine::builder()
///     .kind(EngineKind::Threaded)
///     .cpu_threads(2)
///     .cpu_priority_threads(1)
///     .build()?;
/// assert_eq!(engine.config().cpu_threads, 2);
/// # Ok::<(), pskv_engine::EngineError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct EngineBuilder {
    config: EngineConfig,
}

fn parse_env<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<String>,
    name: &str,
    expect: &str,
) -> Result<Option<T>, EngineError> {
    match get(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<T>()
            .map(Some)
            .map_err(|_| EngineError::Config {
                name: name.to_string(),
                value: v.clone(),
                reason: format!("expected {expect}"),
            }),
    }
}

fn threads(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>, EngineError> {
    let n: Option<usize> = parse_env(get, name, "a thread count from 1 to 1024")?;
    match n {
        Some(0) | Some(1025..) => Err(EngineError::Config {
            name: name.to_string(),
            value: n.unwrap_or_default().to_string(),
            reason: "expected a thread count from 1 to 1024".into(),
        }),
        n => Ok(n),
    }
}

fn seconds(
    get: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<Duration>, EngineError> {
    let s: Option<f64> = parse_env(get, name, "a number of seconds")?;
    match s {
        Some(s) if !(s.is_finite() && (0.0..1e9).contains(&s)) => Err(EngineError::Config {
            name: name.to_string(),
            value: s.to_string(),
            reason: "expected a number of seconds from 0 to 1e9".into(),
        }),
        s => Ok(s.map(Duration::from_secs_f64)),
    }
}

impl EngineBuilder {
    /// The defaults (see the module docs).
    pub fn new() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// The defaults overridden by the `PSKV_*` environment variables; a
    /// malformed value is an error naming the variable.
    pub fn from_env() -> Result<EngineBuilder, EngineError> {
        EngineBuilder::from_lookup(&|k| std::env::var(k).ok())
    }

    /// As [`EngineBuilder::from_env`], reading variables through `get`.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<EngineBuilder, EngineError> {
        let mut c = EngineConfig::default();
        if let Some(v) = get("PSKV_ENGINE") {
            c.kind = match v.trim() {
                "threaded" | "ThreadedEnginePerDevice" | "ThreadedEngine" => EngineKind::Threaded,
                "naive" | "NaiveEngine" => EngineKind::Naive,
                _ => {
                    return Err(EngineError::Config {
                        name: "PSKV_ENGINE".into(),
                        value: v,
                        reason: "expected 'threaded' or 'naive'".into(),
                    })
                }
            };
        }
        if let Some(n) = threads(get, "PSKV_CPU_WORKER_NTHREADS")? {
            c.cpu_threads = n;
        }
        if let Some(n) = threads(get, "PSKV_CPU_PRIORITY_NTHREADS")? {
            c.cpu_priority_threads = n;
        }
        if let Some(n) = threads(get, "PSKV_GPU_WORKER_NTHREADS")? {
            c.gpu_threads = n;
        }
        if let Some(n) = threads(get, "PSKV_GPU_COPY_NTHREADS")? {
            c.gpu_copy_threads = n;
        }
        if let Some(p) = get("PSKV_PROFILE") {
            if !p.is_empty() {
                let role = get("DMLC_ROLE").filter(|r| !r.trim().is_empty());
                c.profile_path = Some(profile_path_for(
                    &p,
                    role.as_deref().map(str::trim).unwrap_or("process"),
                    std::process::id(),
                ));
            }
        }
        if let Some(t) = seconds(get, "PSKV_ENGINE_WAIT_TIMEOUT")? {
            c.wait_timeout = (!t.is_zero()).then_some(t);
        }
        if let Some(t) = seconds(get, "PSKV_ENGINE_SHUTDOWN_TIMEOUT")? {
            c.shutdown_timeout = t;
        }
        Ok(EngineBuilder { config: c })
    }

    /// Threaded or naive.
    pub fn kind(mut self, kind: EngineKind) -> Self {
        self.config.kind = kind;
        self
    }

    /// Threads of the CPU pool (at least 1).
    pub fn cpu_threads(mut self, n: usize) -> Self {
        self.config.cpu_threads = n.max(1);
        self
    }

    /// Threads of the CPU priority lane (at least 1).
    pub fn cpu_priority_threads(mut self, n: usize) -> Self {
        self.config.cpu_priority_threads = n.max(1);
        self
    }

    /// Compute threads per GPU (at least 1).
    pub fn gpu_threads(mut self, n: usize) -> Self {
        self.config.gpu_threads = n.max(1);
        self
    }

    /// Copy threads per GPU (at least 1).
    pub fn gpu_copy_threads(mut self, n: usize) -> Self {
        self.config.gpu_copy_threads = n.max(1);
        self
    }

    /// Profile every op from the start and write the Chrome trace to `path`
    /// when the engine is dropped.
    pub fn profile_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.profile_path = Some(path.into());
        self
    }

    /// How long waits last before an error (None: no limit).
    pub fn wait_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.wait_timeout = timeout;
        self
    }

    /// How long dropping the engine waits for pending ops.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// The configuration so far.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Starts the engine (and, for the threaded kind, its CPU pools).
    pub fn build(self) -> Result<crate::Engine, EngineError> {
        crate::Engine::from_config(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// Every process of a job gets its own profile file.
    #[test]
    fn profile_paths_are_per_process() {
        let dir = std::env::temp_dir();
        let d = dir.display().to_string();
        let want_in_dir = dir.join("worker-42.json").display().to_string();
        for (spec, role, pid, want) in [
            (d.as_str(), "worker", 42, want_in_dir.as_str()),
            ("/no/such/dir/", "server", 7, "/no/such/dir/server-7.json"),
            (
                "/t/{role}.{pid}.trace",
                "scheduler",
                9,
                "/t/scheduler.9.trace",
            ),
            ("/t/p.json", "worker", 1, "/t/p.json"),
            ("/t/", "a/../b", 1, "/t/a____b-1.json"),
        ] {
            assert_eq!(
                profile_path_for(spec, role, pid),
                PathBuf::from(want),
                "{spec}"
            );
        }
        let b = EngineBuilder::from_lookup(&lookup(&[
            ("PSKV_PROFILE", "/t/"),
            ("DMLC_ROLE", "server"),
        ]))
        .unwrap();
        let want = PathBuf::from(format!("/t/server-{}.json", std::process::id()));
        assert_eq!(b.config().profile_path.as_deref(), Some(want.as_path()));
    }

    #[test]
    fn env_values_are_read() {
        let b = EngineBuilder::from_lookup(&lookup(&[
            ("PSKV_ENGINE", "NaiveEngine"),
            ("PSKV_CPU_WORKER_NTHREADS", "3"),
            ("PSKV_CPU_PRIORITY_NTHREADS", " 1 "),
            ("PSKV_GPU_WORKER_NTHREADS", "4"),
            ("PSKV_GPU_COPY_NTHREADS", "5"),
            ("PSKV_PROFILE", "/tmp/t.json"),
            ("PSKV_ENGINE_WAIT_TIMEOUT", "0"),
            ("PSKV_ENGINE_SHUTDOWN_TIMEOUT", "1.5"),
        ]))
        .unwrap();
        let c = b.config();
        assert_eq!(c.kind, EngineKind::Naive);
        assert_eq!(
            (
                c.cpu_threads,
                c.cpu_priority_threads,
                c.gpu_threads,
                c.gpu_copy_threads
            ),
            (3, 1, 4, 5)
        );
        assert_eq!(
            c.profile_path.as_deref(),
            Some(std::path::Path::new("/tmp/t.json"))
        );
        assert_eq!(c.wait_timeout, None);
        assert_eq!(c.shutdown_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn bad_env_values_are_errors_naming_the_variable() {
        for (k, v) in [
            ("PSKV_ENGINE", "fast"),
            ("PSKV_CPU_WORKER_NTHREADS", "0"),
            ("PSKV_CPU_WORKER_NTHREADS", "-1"),
            ("PSKV_GPU_COPY_NTHREADS", "99999"),
            ("PSKV_ENGINE_WAIT_TIMEOUT", "soon"),
            ("PSKV_ENGINE_WAIT_TIMEOUT", "NaN"),
            ("PSKV_ENGINE_SHUTDOWN_TIMEOUT", "-3"),
        ] {
            let err = EngineBuilder::from_lookup(&lookup(&[(k, v)])).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(k), "{msg}");
            assert!(matches!(err, EngineError::Config { .. }));
        }
    }
}

/// How long a blocking waiter spins before it sleeps: `PSKV_SPIN_US`, read
/// once per process (the engine's waits, and the kvstore's tickets).
pub fn spin_budget() -> Duration {
    static US: OnceLock<u64> = OnceLock::new();
    Duration::from_micros(
        *US.get_or_init(|| spin_us(std::env::var("PSKV_SPIN_US").ok().as_deref())),
    )
}

/// `PSKV_SPIN_US`'s microseconds: default 50, at most 10,000; a value that
/// is not a number is reported and the default taken.
pub(crate) fn spin_us(v: Option<&str>) -> u64 {
    match v.map(str::trim) {
        None | Some("") => 50,
        Some(s) => s.parse::<u64>().map(|n| n.min(10_000)).unwrap_or_else(|_| {
            tracing::warn!("PSKV_SPIN_US={s} is not a number of microseconds: 50 is used");
            50
        }),
    }
}

#[cfg(test)]
mod spin_tests {
    use super::spin_us;

    #[test]
    fn pskv_spin_us_is_bounded_and_defaults() {
        assert_eq!(spin_us(None), 50);
        assert_eq!(spin_us(Some(" 0 ")), 0);
        assert_eq!(spin_us(Some("200")), 200);
        assert_eq!(spin_us(Some("99999999")), 10_000);
        assert_eq!(spin_us(Some("fast")), 50);
    }
}
