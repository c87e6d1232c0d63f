//! The configuration read from the environment (`Config::from_env`; the
//! variables are in the table of `config/mod.rs`), and the settings that
//! other rooms read from it once per process.

use std::time::Duration;

use super::{Config, VanKind};
use crate::error::TransportError;
use crate::protocol::Role;

impl Config {
    /// Reads the configuration from the environment (the table in
    /// `config/mod.rs`).
    pub fn from_env() -> Result<Config, TransportError> {
        Config::from_lookup(&|k| std::env::var(k).ok())
    }

    /// As [`Config::from_env`], reading variables through `get`.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Config, TransportError> {
        let bad = |name: &str, value: &str, reason: &str| TransportError::Config {
            name: name.into(),
            value: value.into(),
            reason: reason.into(),
        };
        let need = |name: &str| get(name).ok_or_else(|| bad(name, "", "must be set"));
        fn num<T: std::str::FromStr>(
            get: &dyn Fn(&str) -> Option<String>,
            name: &str,
            what: &str,
        ) -> Result<Option<T>, TransportError> {
            match get(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| TransportError::Config {
                        name: name.into(),
                        value: v.clone(),
                        reason: format!("expected {what}"),
                    }),
            }
        }
        let role_s = need("DMLC_ROLE")?;
        let role = match role_s.trim() {
            "scheduler" => Role::Scheduler,
            "server" => Role::Server,
            "worker" => Role::Worker,
            _ => {
                return Err(bad(
                    "DMLC_ROLE",
                    &role_s,
                    "expected scheduler, server or worker",
                ))
            }
        };
        let root_uri = need("DMLC_PS_ROOT_URI")?;
        let port_s = need("DMLC_PS_ROOT_PORT")?;
        // 0 lets a scheduler take any free port (its launcher learns which
        // through PSKV_PORT_FD); the other roles must be told the port.
        let root_port: u16 = match port_s.trim().parse() {
            Ok(p) if p > 0 || role == Role::Scheduler => p,
            _ => {
                return Err(bad(
                    "DMLC_PS_ROOT_PORT",
                    &port_s,
                    "expected a port from 1 to 65535",
                ))
            }
        };
        let count = |name: &str| -> Result<u32, TransportError> {
            let v = need(name)?;
            match v.trim().parse::<u32>() {
                Ok(n) if (1..=4096).contains(&n) => Ok(n),
                _ => Err(bad(name, &v, "expected a count from 1 to 4096")),
            }
        };
        let mut c = Config::new(
            role,
            root_uri,
            root_port,
            count("DMLC_NUM_SERVER")?,
            count("DMLC_NUM_WORKER")?,
        );
        c.interface = get("DMLC_INTERFACE").filter(|s| !s.is_empty());
        c.node_host = get("DMLC_NODE_HOST").filter(|s| !s.is_empty());
        if let Some(p) = num::<u16>(get, "DMLC_PORT", "a port")? {
            c.port = p;
        }
        let secs = |name: &str| -> Result<Option<Option<Duration>>, TransportError> {
            Ok(num::<f64>(get, name, "a number of seconds")?.map(|s| {
                if s > 0.0 && s.is_finite() {
                    Some(Duration::from_secs_f64(s.min(1e6)))
                } else {
                    None
                }
            }))
        };
        if let Some(v) = secs("PS_HEARTBEAT_INTERVAL")? {
            c.heartbeat_interval = v;
        }
        if let Some(v) = secs("PS_HEARTBEAT_TIMEOUT")? {
            c.heartbeat_timeout = v;
        }
        if let Some(v) = secs("PSKV_SCHEDULER_TIMEOUT")? {
            c.scheduler_timeout = v;
        }
        if let Some(v) = get("PSKV_REPLICAS") {
            c.replicas = match v.trim().parse::<u32>() {
                Ok(n @ 1..=2) => n,
                _ => return Err(bad("PSKV_REPLICAS", &v, "expected 1 or 2")),
            };
        }
        let id_var = match role {
            Role::Server => Some("DMLC_SERVER_ID"),
            Role::Worker => Some("DMLC_WORKER_ID"),
            Role::Scheduler => None,
        };
        if let Some(name) = id_var {
            c.rank = match get(name).filter(|v| !v.trim().is_empty()) {
                None => None,
                Some(v) => match v.trim().parse::<u32>() {
                    Ok(r) if r < c.count_of(role) => Some(r),
                    _ => {
                        return Err(bad(
                            name,
                            &v,
                            &format!(
                                "expected a rank from 0 to {}",
                                c.count_of(role).saturating_sub(1)
                            ),
                        ))
                    }
                },
            };
        }
        if let Some(v) = num::<u32>(get, "PS_RESEND", "0 or 1")? {
            c.resend = v != 0;
        }
        if let Some(ms) = num::<u64>(get, "PS_RESEND_TIMEOUT", "milliseconds")? {
            c.resend_timeout = Duration::from_millis(ms.max(1));
        }
        if let Some(v) = num::<u8>(get, "PS_VERBOSE", "0, 1 or 2")? {
            c.verbose = v;
        }
        c.token = get("PSKV_TOKEN").filter(|t| !t.is_empty());
        if let Some(v) = get("PSKV_VAN") {
            c.van = match v.trim() {
                "tcp" => VanKind::Tcp,
                "shm" => VanKind::Shm,
                "auto" => VanKind::Auto,
                "rdma" => VanKind::Rdma,
                "rdma-emulated" => VanKind::RdmaEmulated,
                _ => {
                    return Err(bad(
                        "PSKV_VAN",
                        &v,
                        "expected tcp, shm, auto, rdma or rdma-emulated",
                    ))
                }
            };
        }
        if let Some(b) = num::<usize>(get, "PSKV_SHM_BYTES", "a byte count")? {
            if !(1 << 16..=1 << 34).contains(&b) {
                return Err(bad(
                    "PSKV_SHM_BYTES",
                    &b.to_string(),
                    "expected 64 KiB to 16 GiB",
                ));
            }
            c.shm_bytes = b;
        }
        if let Some(b) = num::<usize>(get, "PSKV_SHM_HEAP_BYTES", "a byte count")? {
            if b != 0 && !(1 << 20..=crate::van::shm::MAX_HEAP).contains(&b) {
                return Err(bad(
                    "PSKV_SHM_HEAP_BYTES",
                    &b.to_string(),
                    "expected 0 (off) or 1 MiB to 16 GiB",
                ));
            }
            c.shm_heap_bytes = b;
        }
        if let Some(v) = get("PSKV_SHM_READERS") {
            c.shm_reader_per_link = match v.trim() {
                "node" => false,
                "link" => true,
                _ => return Err(bad("PSKV_SHM_READERS", &v, "expected node or link")),
            };
        }
        if let Some(b) = num::<u64>(get, "PSKV_MAX_MESSAGE_BYTES", "a byte count")? {
            c.limits.max_payload = b;
        }
        if let Some(s) = num::<f64>(get, "PSKV_CONNECT_TIMEOUT", "a number of seconds")? {
            if !(s > 0.0 && s.is_finite()) {
                return Err(bad(
                    "PSKV_CONNECT_TIMEOUT",
                    &s.to_string(),
                    "expected a positive number of seconds",
                ));
            }
            c.connect_timeout = Duration::from_secs_f64(s.min(1e6));
        }
        if let Some(n) = num::<usize>(get, "PSKV_IO_THREADS", "a thread count")? {
            c.io_threads = n.clamp(1, 64);
        }
        if let Some(n) = num::<usize>(get, "PSKV_TCP_SNDBUF", "a byte count")? {
            c.tcp_send_buffer = n;
        }
        if let Some(us) = num::<u64>(get, "PSKV_TCP_POLL_US", "a number of microseconds")? {
            if us > 10_000 {
                return Err(bad(
                    "PSKV_TCP_POLL_US",
                    &us.to_string(),
                    "expected 0 (off) to 10000 microseconds",
                ));
            }
            c.tcp_idle_poll = Some(Duration::from_micros(us));
        }
        if role == Role::Scheduler {
            if let Some(v) = get("PSKV_PORT_FD").filter(|v| !v.trim().is_empty()) {
                c.port_fd = match v.trim().parse::<i32>() {
                    Ok(fd) if fd > 2 => Some(fd),
                    _ => {
                        return Err(bad(
                            "PSKV_PORT_FD",
                            &v,
                            "expected a descriptor number above 2",
                        ))
                    }
                };
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TCP_SEND_BUFFER;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    const BASE: [(&str, &str); 5] = [
        ("DMLC_ROLE", "worker"),
        ("DMLC_PS_ROOT_URI", "10.0.0.1"),
        ("DMLC_PS_ROOT_PORT", "9091"),
        ("DMLC_NUM_SERVER", "2"),
        ("DMLC_NUM_WORKER", "4"),
    ];

    #[test]
    fn reads_the_launcher_environment() {
        let mut pairs = BASE.to_vec();
        pairs.extend([
            ("DMLC_INTERFACE", "eth1"),
            ("DMLC_NODE_HOST", "node7"),
            ("PS_HEARTBEAT_INTERVAL", "2"),
            ("PS_HEARTBEAT_TIMEOUT", "0"),
            ("PS_RESEND", "1"),
            ("PS_RESEND_TIMEOUT", "250"),
            ("PS_VERBOSE", "2"),
            ("PSKV_TOKEN", "s3cret"),
            ("PSKV_VAN", "tcp"),
            ("PSKV_SHM_READERS", "link"),
            ("PSKV_TCP_SNDBUF", "0"),
            ("PSKV_TCP_POLL_US", "20"),
        ]);
        let c = Config::from_lookup(&env(&pairs)).unwrap();
        assert_eq!(c.role, Role::Worker);
        assert_eq!(
            (
                c.root_uri.as_str(),
                c.root_port,
                c.num_servers,
                c.num_workers
            ),
            ("10.0.0.1", 9091, 2, 4)
        );
        assert_eq!(c.interface.as_deref(), Some("eth1"));
        assert_eq!(c.node_host.as_deref(), Some("node7"));
        assert_eq!(c.heartbeat_interval, Some(Duration::from_secs(2)));
        assert_eq!(c.heartbeat_timeout, None);
        assert!(c.resend);
        assert_eq!(c.resend_timeout, Duration::from_millis(250));
        assert_eq!(c.verbose, 2);
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert_eq!(c.van, VanKind::Tcp);
        assert!(c.shm_reader_per_link);
        assert_eq!(c.tcp_send_buffer, 0);
        assert_eq!(c.tcp_idle_poll(), Duration::from_micros(20));
        let c = Config::from_lookup(&env(&BASE)).unwrap();
        assert_eq!(c.tcp_send_buffer, TCP_SEND_BUFFER);
        // Only a server watches its TCP links before it sleeps, unless told.
        assert_eq!(c.tcp_idle_poll(), Duration::ZERO);
        // By the role it has when the node starts; never on the scheduler.
        let mut server = c;
        server.role = Role::Server;
        assert_eq!(
            server.tcp_idle_poll(),
            Duration::from_micros(spin_base_us().into())
        );
        server.tcp_idle_poll = Some(Duration::from_micros(20));
        server.role = Role::Scheduler;
        assert_eq!(server.tcp_idle_poll(), Duration::ZERO);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("DMLC_ROLE", "boss"),
            ("DMLC_PS_ROOT_PORT", "0"),
            ("DMLC_PS_ROOT_PORT", "http"),
            ("DMLC_NUM_SERVER", "0"),
            ("DMLC_NUM_WORKER", "-2"),
            ("PS_HEARTBEAT_INTERVAL", "often"),
            ("PSKV_VAN", "carrier-pigeon"),
            ("PSKV_SHM_BYTES", "12"),
            ("PSKV_SHM_HEAP_BYTES", "4096"),
            ("PSKV_SHM_READERS", "thread"),
            ("PSKV_CONNECT_TIMEOUT", "-1"),
            ("PSKV_TCP_SNDBUF", "big"),
            ("PSKV_TCP_POLL_US", "20000"),
            ("PSKV_TCP_POLL_US", "soon"),
        ] {
            let mut pairs: Vec<(&str, &str)> =
                BASE.iter().copied().filter(|(n, _)| *n != k).collect();
            pairs.push((k, v));
            let err = Config::from_lookup(&env(&pairs)).unwrap_err();
            assert!(err.to_string().contains(k), "{err}");
        }
        let missing = Config::from_lookup(&env(&BASE[1..])).unwrap_err();
        assert!(missing.to_string().contains("DMLC_ROLE"), "{missing}");
    }

    /// Port 0 is "any free port" for a scheduler alone: the others must
    /// be told where it listens.
    #[test]
    fn only_a_scheduler_takes_any_port() {
        let mut pairs: Vec<(&str, &str)> = BASE
            .iter()
            .copied()
            .filter(|(n, _)| !matches!(*n, "DMLC_ROLE" | "DMLC_PS_ROOT_PORT"))
            .collect();
        pairs.push(("DMLC_PS_ROOT_PORT", "0"));
        pairs.push(("DMLC_ROLE", "scheduler"));
        pairs.push(("PSKV_PORT_FD", "7"));
        let c = Config::from_lookup(&env(&pairs)).unwrap();
        assert_eq!((c.root_port, c.port_fd), (0, Some(7)));
        *pairs.last_mut().unwrap() = ("PSKV_PORT_FD", "1");
        let err = Config::from_lookup(&env(&pairs)).unwrap_err();
        assert!(err.to_string().contains("PSKV_PORT_FD"), "{err}");
        pairs.pop();
        for role in ["server", "worker"] {
            *pairs.last_mut().unwrap() = ("DMLC_ROLE", role);
            let err = Config::from_lookup(&env(&pairs)).unwrap_err();
            assert!(err.to_string().contains("DMLC_PS_ROOT_PORT"), "{err}");
        }
    }
}

/// `PSKV_PROFILE`: where the transport's profile goes (see `trace.rs`),
/// read once per process; the engine reads the same variable for its own
/// file. None when unset or empty.
pub(crate) fn profile_spec() -> Option<&'static str> {
    static SPEC: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| std::env::var("PSKV_PROFILE").ok().filter(|s| !s.is_empty()))
        .as_deref()
}

/// `PSKV_SPIN_US`: the base of the adaptive spin of transport waits (see
/// `spin.rs`), read once per process; the engine reads the same variable
/// for its waits, with the same meaning.
pub(crate) fn spin_base_us() -> u32 {
    static US: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *US.get_or_init(|| spin_us(std::env::var("PSKV_SPIN_US").ok().as_deref()))
}

/// `PSKV_SPIN_US`'s microseconds: default 50, at most 10,000; a value that
/// is not a number is reported and the default taken.
fn spin_us(v: Option<&str>) -> u32 {
    match v.map(str::trim) {
        None | Some("") => 50,
        Some(s) => s.parse::<u32>().map(|n| n.min(10_000)).unwrap_or_else(|_| {
            tracing::warn!("PSKV_SPIN_US={s} is not a number of microseconds: 50 is used");
            50
        }),
    }
}

/// `PSKV_RDMA_GID_INDEX`: which GID of the port RDMA uses (RoCE); None
/// when unset.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) fn rdma_gid_index() -> Result<Option<u8>, TransportError> {
    gid_index(std::env::var("PSKV_RDMA_GID_INDEX").ok().as_deref())
}

fn gid_index(v: Option<&str>) -> Result<Option<u8>, TransportError> {
    v.map(|v| {
        v.trim().parse().map_err(|_| TransportError::Config {
            name: "PSKV_RDMA_GID_INDEX".into(),
            value: v.into(),
            reason: "a number from 0 to 255".into(),
        })
    })
    .transpose()
}

#[cfg(test)]
mod env_tests {
    use super::{gid_index, spin_us};
    use crate::TransportError;

    #[test]
    fn spin_and_gid_settings_parse_or_say_why() {
        assert_eq!(spin_us(None), 50);
        assert_eq!(spin_us(Some("0")), 0);
        assert_eq!(spin_us(Some("123456")), 10_000);
        assert_eq!(spin_us(Some("x")), 50);
        assert!(matches!(gid_index(None), Ok(None)));
        assert!(matches!(gid_index(Some(" 3 ")), Ok(Some(3))));
        let e = gid_index(Some("300")).unwrap_err();
        assert!(matches!(&e, TransportError::Config { value, .. } if value == "300"));
        assert!(e.to_string().contains("0 to 255"), "{e}");
    }
}
