//! `pskv scheduler` and `pskv server`: one node of a cluster, configured by
//! the DMLC_* / PSKV_* environment (the role is the command's).

use std::time::Duration;

use pskv::engine::Engine;
use pskv::kvstore::Server;
use pskv::transport::{Config, Postoffice};

/// The transport configuration of the environment, with this role.
pub fn config_as(role: &'static str) -> Result<Config, String> {
    Config::from_lookup(&|k| {
        if k == "DMLC_ROLE" {
            Some(role.to_string())
        } else {
            std::env::var(k).ok()
        }
    })
    .map_err(|e| e.to_string())
}

/// Runs the scheduler until every node has left or died: an error (and a
/// non-zero exit) names the nodes that died, so a launcher never takes a
/// failed job's end for a normal one.
pub fn scheduler() -> Result<(), String> {
    let po = Postoffice::start(config_as("scheduler")?, None).map_err(|e| e.to_string())?;
    tracing::info!("pskv scheduler: listening on {}", po.local_addr());
    let result = loop {
        match po.wait_all_left(Duration::from_secs(60)) {
            Err(pskv::transport::TransportError::Timeout { .. }) => continue,
            r => break r,
        }
    };
    po.shutdown();
    result.map_err(|e| format!("pskv scheduler: {e}"))
}

/// Runs one server until a worker stops it.
pub fn server() -> Result<(), String> {
    let engine = Engine::new().map_err(|e| e.to_string())?;
    let s = Server::start(config_as("server")?, engine).map_err(|e| e.to_string())?;
    s.wait(None).map_err(|e| e.to_string())?;
    s.shutdown();
    Ok(())
}
