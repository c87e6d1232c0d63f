//! `pskv scheduler` and `pskv server`: one node of a cluster, configured by
//! the DMLC_* / PSKV_* environment (the role is the command's).

use std::time::Duration;

use pskv::engine::Engine;
use pskv::kvstore::Server;
use pskv::transport::{Config, Postoffice};

use super::error::{CliError, CliResult};

/// The transport configuration of the environment, with this role.
pub fn config_as(role: &'static str) -> CliResult<Config> {
    Ok(Config::from_lookup(&|k| {
        if k == "DMLC_ROLE" {
            Some(role.to_string())
        } else {
            std::env::var(k).ok()
        }
    })?)
}

/// Runs the scheduler until every node has left or died: an error (and a
/// non-zero exit) names the nodes that died, so a launcher never takes a
/// failed job's end for a normal one.
pub fn scheduler() -> CliResult {
    let po = Postoffice::start(config_as("scheduler")?, None)?;
    tracing::info!("pskv scheduler: listening on {}", po.local_addr());
    if let Ok(fd) = std::env::var("PSKV_PORT_FD") {
        if let Err(e) = report_port(&fd, po.local_addr().port()) {
            po.shutdown();
            return Err(e);
        }
    }
    let result = loop {
        match po.wait_all_left(Duration::from_secs(60)) {
            Err(pskv::transport::TransportError::Timeout { .. }) => continue,
            r => break r,
        }
    };
    po.shutdown();
    result.map_err(|e| CliError::Failed(format!("pskv scheduler: {e}")))
}

/// Writes `port` and a newline to the inherited descriptor `fd`
/// (`PSKV_PORT_FD`), then closes it: how `pskv launch` learns the port of a
/// scheduler it started with `DMLC_PS_ROOT_PORT=0`. (A port the launcher
/// picked and released could be taken by anyone before the scheduler
/// bound it: CI saw "Address already in use".)
fn report_port(fd: &str, port: u16) -> CliResult {
    let bad = |why: String| CliError::Usage(format!("PSKV_PORT_FD={fd}: {why}"));
    let n: std::os::fd::RawFd = fd
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 2)
        .ok_or_else(|| bad("expected an open descriptor number above 2".into()))?;
    // SAFETY: fcntl(F_GETFD) only asks whether `n` is open.
    if unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        return Err(bad(format!("{}", std::io::Error::last_os_error())));
    }
    // SAFETY: an open descriptor that this process inherited for this one
    // use; nothing else in it knows the number, so owning (and closing) it
    // here takes it from nobody.
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(n) };
    std::io::Write::write_all(&mut f, format!("{port}\n").as_bytes())
        .map_err(|e| bad(format!("writing the port: {e}")))
}

/// Runs one server until a worker stops it.
pub fn server() -> CliResult {
    let engine = Engine::new()?;
    let s = Server::start(config_as("server")?, engine)?;
    // Shut down (and write the profile) whether the job ended well or not.
    let ended = s.wait(None);
    s.shutdown();
    Ok(ended?)
}
