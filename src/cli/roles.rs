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
    let result = loop {
        match po.wait_all_left(Duration::from_secs(60)) {
            Err(pskv::transport::TransportError::Timeout { .. }) => continue,
            r => break r,
        }
    };
    po.shutdown();
    result.map_err(|e| CliError::Failed(format!("pskv scheduler: {e}")))
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
