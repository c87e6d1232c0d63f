//! Logs of the `pskv` program and of libpskv: what the crates say through
//! `tracing` (refused connections, checkpoint write errors, shared-memory
//! fallbacks, deaths and restarts) goes to stderr, each line tagged with
//! the process's role and pid, so that the interleaved output of a job says
//! who spoke.
//!
//! The level: `RUST_LOG` (tracing's filter syntax, e.g.
//! `RUST_LOG=pskv_transport=debug`) if set; else `PS_VERBOSE` as ps-lite
//! users know it (0: warnings and errors, 1: also info, 2: also debug);
//! else warnings and errors.

use std::sync::Once;

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::EnvFilter;

/// The filter the environment asks for.
pub fn filter_of(rust_log: Option<&str>, ps_verbose: Option<&str>) -> String {
    if let Some(f) = rust_log.filter(|f| !f.trim().is_empty()) {
        return f.to_string();
    }
    match ps_verbose.map(str::trim) {
        Some("1") => "info".into(),
        Some(v) if v.parse::<u32>().is_ok_and(|n| n >= 2) => "debug".into(),
        _ => "warn".into(),
    }
}

/// A line's head: seconds since the epoch, then who speaks.
struct Head(String);

impl FormatTime for Head {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        write!(w, "{}.{:03} {}", t.as_secs(), t.subsec_millis(), self.0)
    }
}

/// Installs the stderr subscriber once per process (a no-op if the program
/// already installed one of its own).
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let rust_log = std::env::var("RUST_LOG").ok();
        let verbose = std::env::var("PS_VERBOSE").ok();
        let filter = EnvFilter::try_new(filter_of(rust_log.as_deref(), verbose.as_deref()))
            .unwrap_or_else(|_| EnvFilter::new("warn"));
        let role = std::env::var("DMLC_ROLE").unwrap_or_else(|_| "pskv".into());
        let who = format!("{role}[{}]", std::process::id());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_timer(Head(who))
            .try_init();
    });
}

#[cfg(test)]
mod tests {
    use super::filter_of;

    #[test]
    fn the_level_comes_from_rust_log_then_ps_verbose() {
        assert_eq!(filter_of(None, None), "warn");
        assert_eq!(filter_of(None, Some("0")), "warn");
        assert_eq!(filter_of(None, Some("1")), "info");
        assert_eq!(filter_of(None, Some("2")), "debug");
        assert_eq!(
            filter_of(Some("pskv_transport=trace"), Some("1")),
            "pskv_transport=trace"
        );
        assert_eq!(filter_of(Some(" "), Some("1")), "info");
    }
}
