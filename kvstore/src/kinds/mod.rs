//! The kinds of kvstore, one folder each behind one small interface
//! ([`Flavor`]): `local/` serves `local` and `device`, `dist/` the
//! workers of `dist_sync`, `dist_async` and `dist_sync_device`.

pub(crate) mod dist;
pub(crate) mod local;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use crate::compression::Compression;
use crate::error::{KvError, Result};
use crate::key::Key;
use crate::optimizer::{OptState, Optimizer};
use crate::plan::{Call, CallPlan};
use crate::registry::Meta;
use crate::tensor::Tensor;
use crate::updater::Updater;

/// A kvstore kind, by MXNet name.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// One process; values of several devices are summed on the CPU.
    Local,
    /// One process; values are summed on the devices (along a tree with
    /// `PSKV_KVSTORE_USETREE=1`).
    Device,
    /// Workers and servers; every round sums all workers' pushes.
    DistSync,
    /// Workers and servers; each push is applied when it arrives.
    DistAsync,
    /// `DistSync`, with the workers' own devices summed on the devices
    /// first (`dist_sync_device`, alias `dist_device_sync`).
    DistSyncDevice,
}

impl Kind {
    /// The kind of an MXNet kvstore name.
    pub fn parse(name: &str) -> Option<Kind> {
        Some(match name {
            "local" | "local_update_cpu" | "local_allreduce_cpu" => Kind::Local,
            "device" | "local_allreduce_device" => Kind::Device,
            "dist_sync" | "dist" => Kind::DistSync,
            "dist_async" => Kind::DistAsync,
            "dist_sync_device" | "dist_device_sync" => Kind::DistSyncDevice,
            _ => return None,
        })
    }

    /// Its MXNet name.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Device => "device",
            Kind::DistSync => "dist_sync",
            Kind::DistAsync => "dist_async",
            Kind::DistSyncDevice => "dist_sync_device",
        }
    }

    /// Whether it has servers.
    pub fn is_dist(&self) -> bool {
        matches!(
            self,
            Kind::DistSync | Kind::DistAsync | Kind::DistSyncDevice
        )
    }
}

/// Keys with one list of tensors each.
pub(crate) type Batch = [(Key, Vec<Tensor>)];
/// Keys with two lists of tensors each (values and outputs; outputs and
/// row ids).
pub(crate) type Batch2 = [(Key, Vec<Tensor>, Vec<Tensor>)];

/// An owned `Batch`.
pub(crate) type OwnedBatch = Vec<(Key, Vec<Tensor>)>;

/// A push-pull batch as the push batch and the pull batch it stands for
/// (kinds that run a push-pull as a push, then a pull).
pub(crate) fn split_pushpull(items: &Batch2) -> (OwnedBatch, OwnedBatch) {
    items
        .iter()
        .map(|(k, v, o)| ((k.clone(), v.clone()), (k.clone(), o.clone())))
        .unzip()
}

/// A plan's checks (`KvStore::plan`): what no later setting changes (P2 in
/// `plan.rs`); compression's are left to each issue.
pub(crate) fn check_planned(meta: &Meta, p: &CallPlan) -> Result<()> {
    if p.call.pushes() {
        local::check_values(&p.key, meta, &p.values, Compression::None)?;
    }
    if p.call.pulls() {
        local::check_outs(&p.key, meta, &p.outs, p.call.name())?;
    }
    Ok(())
}

/// What every kind does. Arguments arrive checked for shape: every key has
/// at least one tensor, and the tensors share the store's engine.
pub(crate) trait Flavor: Send + Sync {
    fn init(&self, items: &[(Key, Tensor)]) -> Result<()>;
    fn push(&self, items: &Batch, priority: i32) -> Result<()>;
    fn pull(&self, items: &Batch, priority: i32) -> Result<()>;
    fn pushpull(&self, items: &Batch2, priority: i32) -> Result<()>;
    fn pull_row_sparse(&self, items: &Batch2, priority: i32) -> Result<()>;
    /// What issuing `plan`'s call needs, looked up and checked once
    /// (`KvStore::plan`, `plan.rs`; `plan.kept` is not made yet); `issue`
    /// gets it back in `CallPlan::kept`. The default makes the plan's
    /// checks (`check_planned`) and keeps nothing: `issue` then makes the
    /// call as it is.
    fn plan(&self, plan: &CallPlan) -> Result<Box<dyn Any + Send + Sync>> {
        check_planned(&self.key_meta(&plan.key)?, plan)?;
        Ok(Box::new(()))
    }
    /// Issues a plan's call (checked by `KvStore::issue`: this store's,
    /// no spent tensor).
    fn issue(&self, plan: &CallPlan) -> Result<()> {
        let (key, prio) = (&plan.key, plan.priority);
        match plan.call {
            Call::Push => self.push(&[(key.clone(), plan.values.clone())], prio),
            Call::Pull => self.pull(&[(key.clone(), plan.outs.clone())], prio),
            Call::PushPull => self.pushpull(
                &[(key.clone(), plan.values.clone(), plan.outs.clone())],
                prio,
            ),
        }
    }
    /// The vars that the ops of every push, pull or init of `key` end by
    /// writing or reading (a failure of the key's ops is stored there).
    fn key_vars(&self, key: &Key) -> Result<Vec<pskv_engine::Var>>;
    /// The count of tickets on `key` not settled yet, if this kind takes a
    /// key's failure when the next call on it is made (then it leaves a
    /// failure to the tickets while there are some).
    fn settles(&self, key: &Key) -> Option<Arc<std::sync::atomic::AtomicUsize>> {
        let _ = key;
        None
    }
    /// The shape, type and storage `key` was initialized with.
    fn key_meta(&self, key: &Key) -> Result<crate::registry::Meta>;
    fn set_optimizer(&self, opt: Optimizer) -> Result<()>;
    fn set_updater(&self, updater: Arc<dyn Updater>) -> Result<()>;
    fn set_compression(&self, c: Compression) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    fn rank(&self) -> u32;
    fn num_workers(&self) -> u32;
    fn num_dead_nodes(&self, timeout: Duration) -> Result<usize>;
    fn send_command_to_servers(&self, head: i32, body: &[u8]) -> Result<()>;
    fn optimizer_states(&self) -> Result<Vec<(Key, OptState)>>;
    fn set_optimizer_states(&self, states: Vec<(Key, OptState)>) -> Result<()>;
    /// Finishes the store: waits for its ops, stops its servers (rank 0 of
    /// a distributed store) and leaves the cluster.
    fn close(&self) -> Result<()>;
    /// `key`'s push buffer (`KvStore::push_buffer`, which checked that the
    /// key is dense), where this kind has one for it; None: an ordinary
    /// tensor will do.
    fn push_buffer(&self, key: &Key) -> Result<Option<Tensor>> {
        let _ = key;
        Ok(None)
    }
    /// Parts pushed from push buffers in place, so far.
    fn pushed_in_place(&self) -> u64 {
        0
    }
    /// Key parts whose values travel through shared memory.
    fn shared_memory_parts(&self) -> usize {
        0
    }
    /// Parts of pushes summed by the workers at their gates, so far.
    fn worker_summed_parts(&self) -> u64 {
        0
    }
    /// Chunks of rounds another worker summed that this one summed
    /// beside it, so far.
    fn worker_helped_chunks(&self) -> u64 {
        0
    }
    /// Of `worker_summed_parts`, those of rounds of late copies, so far.
    fn worker_late_parts(&self) -> u64 {
        0
    }
    /// This worker's part of the collective `call` failed before it began
    /// (`e`, a bad argument): the other workers' call fails too, with this
    /// cause. Returns `e`.
    fn abort_collective(&self, call: &'static str, e: KvError) -> Result<()> {
        let _ = call;
        Err(e)
    }
}
