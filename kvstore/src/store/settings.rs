//! The store's settings and its cluster: the update rule (an optimizer on
//! the servers, or an updater on the workers), compression, the optimizer's
//! saved state, barriers, ranks, dead nodes and server commands.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::KvStore;
use crate::compression::Compression;
use crate::error::Result;
use crate::key::Key;
use crate::optimizer::{OptState, Optimizer};
use crate::updater::Updater;

impl KvStore {
    /// Sets the optimizer that updates stored weights (on the servers of a
    /// distributed store). A new optimizer starts with fresh state.
    ///
    /// In a distributed store this is *collective*, as `init` and `barrier`
    /// are: every worker calls it, with the same optimizer. If it fails on
    /// one worker (a setting out of range), or the workers' optimizers
    /// differ, it fails on every worker with that cause. Workers that make
    /// another collective call meanwhile (`barrier`, `init`) fail with it
    /// at once, naming both calls. If some workers never call it (MXNet
    /// code that calls it on rank 0 only), the callers fail at the store's
    /// timeout (`PSKV_KVSTORE_TIMEOUT`) saying the others did not make the
    /// call; the scheduler tells the others, whose pushes and pulls left
    /// waiting by it fail at their timeout naming the call, and whose next
    /// collective call fails at once with the same cause.
    pub fn set_optimizer(&self, opt: Optimizer) -> Result<()> {
        self.flavor.set_optimizer(opt)
    }

    /// Sets a custom update rule. In a distributed store it runs on the
    /// workers: servers only sum, each worker applies the rule to its copy
    /// of the weights (the summation-only server mode).
    pub fn set_updater(&self, updater: impl Updater) -> Result<()> {
        self.flavor.set_updater(Arc::new(updater))
    }

    /// Runs a built-in optimizer on the workers over the servers' sums
    /// (the summation-only server mode; see [`KvStore::set_updater`]).
    pub fn set_optimizer_on_workers(&self, opt: Optimizer) -> Result<()> {
        opt.validate()?;
        let opt = Arc::new(opt);
        let states = parking_lot::Mutex::new(std::collections::HashMap::new());
        self.flavor.set_updater(Arc::new(
            move |key: &Key, g: &crate::Values<'_>, w: &mut crate::ValuesMut<'_>| {
                let mut states = states.lock();
                let st: &mut crate::updater::KeyState = states.entry(key.id()).or_default();
                let rule = crate::updater::Rule::Optimizer {
                    opt: opt.clone(),
                    generation: 0,
                };
                let shape = w.shape().to_vec();
                rule.apply(
                    key.id(),
                    Some(key),
                    w.dtype(),
                    &shape,
                    g.bytes,
                    g.rows(),
                    w.bytes,
                    st,
                )
                .map_err(|e| e.to_string())
            },
        ))
    }

    /// Turns on gradient compression (`device` and distributed kinds).
    pub fn set_gradient_compression(&self, c: Compression) -> Result<()> {
        self.flavor.set_compression(c)
    }

    /// Waits until every worker reached this barrier (a no-op locally).
    pub fn barrier(&self) -> Result<()> {
        self.flavor.barrier()
    }

    /// This worker's rank (0 locally).
    pub fn rank(&self) -> u32 {
        self.flavor.rank()
    }

    /// The number of workers (1 locally).
    pub fn num_workers(&self) -> u32 {
        self.flavor.num_workers()
    }

    /// Nodes that missed their heartbeats for `timeout`.
    pub fn num_dead_nodes(&self, timeout: Duration) -> Result<usize> {
        self.flavor.num_dead_nodes(timeout)
    }

    /// Sends a command to every server: MXNet's head ids are understood
    /// (see `server`), any other head goes to the server's controller.
    pub fn send_command_to_servers(&self, head: i32, body: &str) -> Result<()> {
        self.flavor.send_command_to_servers(head, body.as_bytes())
    }

    /// Writes the optimizer's state of every key to `path`.
    pub fn save_optimizer_states(&self, path: impl AsRef<Path>) -> Result<()> {
        let states = self.flavor.optimizer_states()?;
        crate::states::save(path.as_ref(), &states)
    }

    /// Reads optimizer state written by `save_optimizer_states` (the keys
    /// must exist with the same sizes; an optimizer must be set).
    pub fn load_optimizer_states(&self, path: impl AsRef<Path>) -> Result<()> {
        let states: Vec<(Key, OptState)> = crate::states::load(path.as_ref())?;
        self.flavor.set_optimizer_states(states)
    }
}
