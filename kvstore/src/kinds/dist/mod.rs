//! The worker of `dist_sync`, `dist_async` and `dist_sync_device`: the part
//! MXNet's `kvstore_dist.h` plays, on pskv's engine and transport.
//!
//! A push reduces the key's local values (CPU, or devices), then one engine
//! op sends every part of the key (zero-copy slices of the reduced buffer,
//! or 2-bit/1-bit codes with the key's residual; from a GPU, each part
//! staged through pinned memory as it is sent) and completes when every
//! server answered. It writes the key's var, so the next push or pull of
//! the key waits for it; in sync mode the server answers a push only when
//! the round of all workers is summed and applied, so a pull after a push
//! sees that round's result.
//!
//! Two server modes:
//! - **server optimizer** (default; [`Flavor::set_optimizer`]): servers sum
//!   and run the optimizer; a pull fetches the weights.
//! - **summation only** ([`Flavor::set_updater`]): servers sum; every push
//!   is a push-pull that brings the sum back, and the worker's updater
//!   applies it to the worker's own copy of the weights, which a pull
//!   reads. All workers apply the same sums, so the copies stay equal.
//!
//! Rooms: this file is the store (its keys, the `Flavor` calls); `init.rs`
//! the keys of an `init` call (registered, cut into parts, sent by rank 0
//! and checked together); `ops.rs` the engine ops of a key; `parts.rs` the part requests, routing
//! and failover to a backup; `inflight.rs` an op waiting for its answers; `staging.rs` values on a GPU through pinned memory;
//! `segments.rs` the check after `init` and the shared segments;
//! `collective.rs` calls every worker makes together; `states.rs`
//! optimizer states across parts; `worker_sum/` rounds this worker sums
//! with the others at a part's gate (`crate::gate`), without the server.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use pskv_engine::{Engine, Var};
use pskv_transport::status::RoundLog;
use pskv_transport::{Group, KvResponse, KvWorker, MissedBarrier, Postoffice, Region};

use crate::comm::Comm;
use crate::compression::Compression;
use crate::error::{KvError, Result};
use crate::key::Key;
use crate::kinds::local::{check_outs, check_row_sparse_pull, check_values, LocalKey};
use crate::kinds::{split_pushpull, Batch, Batch2, Flavor, Kind};
use crate::optimizer::{OptState, Optimizer};
use crate::options::Options;
use crate::registry::Registry;
use crate::tensor::{Storage, Tensor};
use crate::updater::{Rule, Updater};
use crate::wire::{command, Part};
use staging::{Staging, Way};

/// An op's view of its key's segments, per part (`DistStore::shm_parts`):
/// inline for keys of one or two parts.
type Segs = smallvec::SmallVec<[Option<Arc<Region>>; 2]>;

mod collective;
mod inflight;
mod init;
mod ops;
mod parts;
mod push_buffer;
mod segments;
mod staging;
mod states;
mod worker_sum;

/// One key of a distributed store.
struct DistKey {
    local: Arc<LocalKey>,
    /// Its parts, in order: each a range of the key's units and the ps
    /// key and server that hold it (shared with the ops' answer handlers:
    /// no copy per op).
    parts: Arc<[Part]>,
    /// Elements per unit of the parts (the row length of keys of two or
    /// more dimensions, else 1).
    unit: usize,
    /// The key's var: pushes write it, pulls read it.
    var: Var,
    /// The compression residual of pushes from the host (f32, the key's
    /// size; pushes from a GPU keep theirs on it, `staging`); touched only
    /// by ops that write `var`.
    residual: Mutex<Vec<f32>>,
    /// Where the servers' sums land in summation-only mode.
    sum: Mutex<Option<Tensor>>,
    /// Per part, the shared segment of a co-located server (sync mode).
    segs: RwLock<Vec<Option<Arc<Region>>>>,
    /// Per part (missing: false), whether a push through the part's slot
    /// failed (any failure: a timeout or a broken link may leave it held
    /// by the server in a round): the server may still read the slot, and
    /// write the value slot when that round completes, so the part's
    /// pushes and pulls go by message until a push succeeds (`parts.rs`).
    unsure: Arc<parts::Unsure>,
    /// The sync rounds of this key this worker saw complete (its pushes
    /// whose every part the servers answered without an error): a push is
    /// of round `seen + 1` and says so to each part's server (its tag),
    /// and a check after a server's restart tells the new process
    /// (`segments.rs`), so that a server answers a push of a round it knows
    /// complete without applying it again. Per key, not per part: a push
    /// that failed in some parts only is sent again with its round, which
    /// the parts that completed it answer unapplied. Counted up by ops
    /// that write `var`, before they complete (`Inflight::finish`).
    seen: Arc<AtomicU64>,
    /// Host buffers for values on a GPU (`staging`).
    stage: Staging,
    /// Tickets whose settle op has not run yet: while there are some, a
    /// failure stored on `var` is theirs to report, not the next call's
    /// (`dist_key`).
    settles: Arc<std::sync::atomic::AtomicUsize>,
}

/// The distributed worker.
pub(crate) struct DistStore {
    engine: Engine,
    comm: Comm,
    opts: Options,
    po: Postoffice,
    kv: KvWorker,
    /// Where pushes report their rounds (`pskv status`).
    rounds: Arc<RoundLog>,
    /// Collective rounds this worker missed (named by timeouts).
    missed: MissedBarrier,
    sync: bool,
    device: bool,
    keys: Registry<DistKey>,
    compression: RwLock<Compression>,
    worker_rule: RwLock<Option<Rule>>,
    server_mp: AtomicBool,
    server_opt: AtomicBool,
    /// `close` began: background work (segment re-checks) stops.
    closed: AtomicBool,
    /// Per server rank, how many times it restarted: a thread mapping a
    /// restarted server's segments installs them only if no later restart
    /// happened meanwhile.
    restarts: Vec<AtomicU64>,
    /// Parts pushed from push buffers in place (`push_buffer.rs`).
    in_place: AtomicU64,
    /// Waiting threads read this worker's shared-memory links themselves
    /// (`Postoffice::progress`): removed when the store is dropped.
    _progress: pskv_engine::progress::Hook,
    /// Parts waiting at their gates for the rounds the workers sum
    /// (`worker_sum/`).
    waits: Arc<worker_sum::Waits>,
    /// Copies of each server's keys (`PSKV_REPLICAS`; see
    /// `server/replica.rs`): with 2, a part whose server died is sent to
    /// the next server, the backup.
    replicas: u32,
    me: Weak<DistStore>,
}

impl DistStore {
    pub(crate) fn start(
        kind: Kind,
        engine: Engine,
        comm: Comm,
        opts: Options,
    ) -> Result<Arc<DistStore>> {
        let cfg = match &opts.transport {
            Some(c) => c.clone(),
            None => pskv_transport::Config::from_env()?,
        };
        if cfg.role != pskv_transport::Role::Worker {
            return Err(KvError::invalid(format!(
                "a {} kvstore is created on workers; this process is a {:?} \
                 (servers run pskv_kvstore::Server, schedulers `pskv scheduler`)",
                kind.name(),
                cfg.role
            )));
        }
        let replicas = if cfg.num_servers > 1 { cfg.replicas } else { 1 };
        let sync = kind != Kind::DistAsync;
        let mut opts = opts;
        opts.partition_bytes = opts.partition_for(cfg.van);
        tracing::debug!(
            partition_bytes = opts.partition_bytes,
            van = ?cfg.van,
            "keys are cut into parts of at most this many bytes"
        );
        if replicas > 1 {
            if !sync {
                return Err(KvError::Unsupported {
                    what: format!("PSKV_REPLICAS={replicas} with {}", kind.name()),
                    why: "replicas keep the rounds of a sync store; use dist_sync".into(),
                });
            }
            // A push must be re-sendable to the backup: no shared slots.
            opts.shm_direct = false;
        }
        let po = Postoffice::start(crate::store::for_engine(cfg, &engine), None)?;
        let kv = KvWorker::new(&po);
        let waits = Arc::new(worker_sum::Waits::new(
            opts.timeout,
            comm.kernels.clone(),
            po.my_rank() as usize,
        ));
        let store = Arc::new_cyclic(|me| DistStore {
            _progress: {
                let f = po.progress_fn();
                // Weak: the store owns the waits (dropped with it, never
                // inside a hook's call).
                let w = Arc::downgrade(&waits);
                pskv_engine::progress::add(move |c| {
                    use pskv_engine::progress::Call;
                    let leave = match c {
                        Call::Poll => false,
                        Call::Leave => true,
                        // Only the waits count their pollers; the links'
                        // readers take over on a leave alone.
                        Call::End => {
                            if let Some(w) = w.upgrade() {
                                w.end();
                            }
                            return false;
                        }
                    };
                    // Both run: each may have something to finish.
                    f(leave) | w.upgrade().is_some_and(|w| w.poll(leave))
                })
            },
            waits,
            replicas,
            me: me.clone(),
            server_opt: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            restarts: (0..po.num_servers()).map(|_| AtomicU64::new(0)).collect(),
            in_place: AtomicU64::new(0),
            engine,
            comm,
            rounds: po.round_log(),
            missed: po.missed_barriers(),
            po,
            kv,
            sync,
            device: kind == Kind::DistSyncDevice,
            keys: Registry::default(),
            compression: RwLock::new(Compression::None),
            worker_rule: RwLock::new(None),
            server_mp: AtomicBool::new(false),
            opts,
        });
        segments::watch_restarts(&store);
        Ok(store)
    }

    /// A weak handle for ops (an op must not keep the store alive).
    fn handle(&self) -> Weak<DistStore> {
        self.me.clone()
    }

    /// The key, unless an earlier operation on it failed (its server died,
    /// say) and nobody has been told: then that failure, once, and the key
    /// is usable again, so a caller can push again after a server restart.
    fn dist_key(&self, key: &Key) -> Result<Arc<DistKey>> {
        let dk = self.keys.get(key)?;
        // Subtle: a ticket issued on the key before this call settles after
        // the ops that failed and before this call's: the failure is its.
        if dk.settles.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return Ok(dk);
        }
        if let Some(f) = dk.var.take_failure() {
            return Err(KvError::Engine(pskv_engine::EngineError::Op(f)));
        }
        Ok(dk)
    }

    /// The sum buffer of summation-only mode.
    fn sum_buffer(&self, dk: &DistKey) -> Result<Tensor> {
        let mut s = dk.sum.lock();
        if let Some(t) = s.as_ref() {
            return Ok(t.clone());
        }
        let m = &dk.local.meta;
        let t = Tensor::zeros(&self.engine, &m.shape, m.dtype, pskv_engine::Context::Cpu)?;
        *s = Some(t.clone());
        Ok(t)
    }

    /// Waits for the writes on `vars`, returning the first failure.
    fn wait_vars<'a>(&self, vars: impl IntoIterator<Item = &'a Var>) -> Result<()> {
        let mut first = None;
        for v in vars {
            if let Err(e) = self.engine.wait_for_var_timeout(v, self.opts.timeout) {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn command(&self, head: i32, body: Bytes) -> Result<KvResponse> {
        let pending = if self.replicas > 1 {
            // A dead server's keys are its backup's now: commands go to the
            // servers alive.
            let alive: Vec<pskv_transport::NodeId> = (0..self.po.num_servers())
                .map(|r| pskv_transport::Role::Server.id_of(r))
                .filter(|id| !self.po.is_dead(*id))
                .collect();
            self.kv
                .request_nodes(head, body, &alive, "the servers alive")?
        } else {
            self.kv.request(head, body, Group::SERVERS)?
        };
        Ok(pending.wait(self.opts.timeout)?)
    }
}

impl Flavor for DistStore {
    fn init(&self, items: &[(Key, Tensor)]) -> Result<()> {
        let added = match self.register(items) {
            Ok(a) => a,
            Err(e) => return self.collective("init", Err(e), None),
        };
        if let Err(e) = self.init_together(items, &added) {
            // The keys are unusable on every worker (the same error
            // everywhere); the others of the store are not touched.
            self.keys.remove_all(items.iter().map(|(k, _)| k));
            return Err(e);
        }
        if self.worker_rule.read().is_some() {
            for (dk, _) in &added {
                self.pull_op(dk, &dk.local.stored, 0)?;
            }
            self.wait_vars(added.iter().map(|(dk, _)| dk.local.stored.var()))?;
        }
        Ok(())
    }

    fn push(&self, items: &Batch, priority: i32) -> Result<()> {
        let compression = *self.compression.read();
        let rule = self.worker_rule.read().clone();
        let mut dks = Vec::with_capacity(items.len());
        for (key, values) in items {
            let dk = self.dist_key(key)?;
            check_values(key, &dk.local.meta, values, compression)?;
            if rule.is_some() && values.iter().any(|v| v.storage() == Storage::RowSparse) {
                return Err(KvError::Unsupported {
                    what: format!("row-sparse push of key {key} with a worker-side updater"),
                    why: "summation-only servers send dense sums back; use set_optimizer (server-side)".into(),
                });
            }
            dks.push(dk);
        }
        for (dk, (_, values)) in dks.iter().zip(items) {
            let grad =
                dk.local
                    .reduce(&self.comm, values, Compression::None, self.device, priority)?;
            // Row-sparse values from a GPU are staged whole (their rows are
            // host data); dense ones part by part inside the push.
            let grad = if grad.storage() == Storage::RowSparse {
                dk.stage.send(&grad, priority)?
            } else {
                grad
            };
            match &rule {
                None => self.push_op(dk, &grad, None, priority)?,
                Some(rule) => {
                    let sum = self.sum_buffer(dk)?;
                    self.push_op(dk, &grad, Some(&sum), priority)?;
                    dk.local.apply(&sum, Some(rule), priority)?;
                }
            }
        }
        Ok(())
    }

    fn pull(&self, items: &Batch, priority: i32) -> Result<()> {
        let local = self.worker_rule.read().is_some();
        let mut dks = Vec::with_capacity(items.len());
        for (key, outs) in items {
            let dk = self.dist_key(key)?;
            check_outs(key, &dk.local.meta, outs, "pull")?;
            dks.push(dk);
        }
        for (dk, (_, outs)) in dks.iter().zip(items) {
            if local {
                self.comm.broadcast(&dk.local.stored, outs, priority)?;
            } else {
                self.pull_op(dk, &outs[0], priority)?;
                self.comm.broadcast(&outs[0], outs, priority)?;
            }
        }
        Ok(())
    }

    fn pushpull(&self, items: &Batch2, priority: i32) -> Result<()> {
        let compression = *self.compression.read();
        let local = self.worker_rule.read().is_some();
        let mut dks: smallvec::SmallVec<[_; 4]> = smallvec::SmallVec::with_capacity(items.len());
        for (key, values, outs) in items {
            let dk = self.dist_key(key)?;
            check_values(key, &dk.local.meta, values, compression)?;
            check_outs(key, &dk.local.meta, outs, "pushpull")?;
            if values.iter().any(|v| v.storage() == Storage::RowSparse) {
                return Err(KvError::Unsupported {
                    what: format!("pushpull of row-sparse values of key {key}"),
                    why: "push row-sparse gradients with push, then pull_row_sparse".into(),
                });
            }
            dks.push(dk);
        }
        if local {
            let (pushes, pulls) = split_pushpull(items);
            self.push(&pushes, priority)?;
            return self.pull(&pulls, priority);
        }
        for (dk, (_, values, outs)) in dks.iter().zip(items) {
            let grad =
                dk.local
                    .reduce(&self.comm, values, Compression::None, self.device, priority)?;
            self.push_op(dk, &grad, Some(&outs[0]), priority)?;
            self.comm.broadcast(&outs[0], outs, priority)?;
        }
        Ok(())
    }

    fn pull_row_sparse(&self, items: &Batch2, priority: i32) -> Result<()> {
        let local = self.worker_rule.read().is_some();
        let mut dks = Vec::with_capacity(items.len());
        for (key, outs, rows) in items {
            let dk = self.dist_key(key)?;
            check_row_sparse_pull(key, &dk.local.meta, outs, rows)?;
            dks.push(dk);
        }
        for (dk, (key, outs, rows)) in dks.iter().zip(items) {
            for (o, r) in outs.iter().zip(rows) {
                if local {
                    crate::kinds::local::gather_rows(key, &dk.local.stored, o, r, priority)?;
                } else {
                    let (h, r) = (
                        dk.stage.host_for(o, Way::Recv)?,
                        staging::host_once(r, priority)?,
                    );
                    self.pull_rows_op(dk, &h, &r, priority)?;
                    crate::comm::copy_prio(&h, o, priority)?;
                }
            }
        }
        Ok(())
    }

    fn key_meta(&self, key: &Key) -> Result<crate::registry::Meta> {
        Ok(self.keys.get(key)?.local.meta.clone())
    }

    fn key_vars(&self, key: &Key) -> Result<Vec<Var>> {
        // Not `dist_key`: a failure stored on the key is the ticket's to
        // report.
        let dk = self.keys.get(key)?;
        Ok(vec![dk.var.clone(), dk.local.stored.var().clone()])
    }

    fn settles(&self, key: &Key) -> Option<Arc<std::sync::atomic::AtomicUsize>> {
        self.keys.get(key).ok().map(|dk| dk.settles.clone())
    }

    fn set_optimizer(&self, opt: Optimizer) -> Result<()> {
        #[derive(serde::Serialize)]
        struct Msg<'a> {
            optimizer: &'a Optimizer,
        }
        // Collective: a worker whose optimizer cannot be used fails the call
        // on every worker, and the workers' optimizers must be equal.
        let local = (|| -> Result<Vec<u8>> {
            opt.validate()?;
            if self.worker_rule.read().is_some() {
                return Err(KvError::invalid(
                    "this store runs its updater on the workers (set_updater); create a new store to run an optimizer on the servers",
                ));
            }
            // Pushes made before this call on any worker finish under the
            // old rule: wait for this worker's ops (the barrier waits for
            // every worker).
            self.engine.wait_for_all()?;
            serde_json::to_vec(&Msg { optimizer: &opt })
                .map_err(|e| KvError::invalid(format!("encoding the optimizer: {e}")))
        })();
        let body = match local {
            Ok(b) => b,
            Err(e) => return self.collective("set_optimizer", Err(e), None),
        };
        self.collective(
            "set_optimizer",
            Ok(()),
            Some(collective::json_setting(opt.name(), &body)),
        )?;
        let mut result = Ok(());
        if self.po.my_rank() == 0 {
            result = self
                .command(command::CONTROLLER, Bytes::from(body))
                .map(|_| ());
        }
        self.server_mp.store(opt.multi_precision, Ordering::Release);
        self.server_opt.store(true, Ordering::Release);
        self.collective("set_optimizer", result, None)
    }

    fn set_updater(&self, updater: Arc<dyn Updater>) -> Result<()> {
        if self.server_opt.load(Ordering::Acquire) {
            return Err(KvError::invalid(
                "the servers of this store run an optimizer (set_optimizer); create a new store to update on the workers",
            ));
        }
        let first = self.worker_rule.read().is_none();
        *self.worker_rule.write() = Some(Rule::Custom(updater));
        if first {
            // The workers' copies start from the servers' values.
            let all = self.keys.all();
            for (_, dk) in &all {
                self.pull_op(dk, &dk.local.stored, 0)?;
            }
            self.wait_vars(all.iter().map(|(_, dk)| dk.local.stored.var()))?;
        }
        Ok(())
    }

    fn set_compression(&self, c: Compression) -> Result<()> {
        c.validate()?;
        *self.compression.write() = c;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        // Named, so that a worker in another collective call fails with us.
        self.collective("barrier", Ok(()), Some((0, String::new())))?;
        // Servers that checkpoint record every key now (rank 0 asks, once,
        // and is answered once the files are written); the second barrier
        // holds every worker until then, so no round completed before a
        // barrier returned can be lost to a server crash. A checkpoint
        // that cannot be written fails the barrier on every worker.
        let mut recorded = Ok(());
        if self.po.my_rank() == 0 {
            recorded = self.command(command::CHECKPOINT, Bytes::new()).map(|_| ());
        }
        self.collective("barrier", recorded, None)
    }

    fn rank(&self) -> u32 {
        self.po.my_rank()
    }

    fn num_workers(&self) -> u32 {
        self.po.num_workers()
    }

    fn num_dead_nodes(&self, timeout: Duration) -> Result<usize> {
        Ok(self.po.dead_nodes(timeout).len())
    }

    fn send_command_to_servers(&self, head: i32, body: &[u8]) -> Result<()> {
        self.command(head, Bytes::copy_from_slice(body)).map(|_| ())
    }

    fn optimizer_states(&self) -> Result<Vec<(Key, OptState)>> {
        self.get_states()
    }

    fn set_optimizer_states(&self, states: Vec<(Key, OptState)>) -> Result<()> {
        self.set_states(states)
    }

    fn abort_collective(&self, call: &'static str, e: KvError) -> Result<()> {
        self.collective(call, Err(e), None)
    }

    fn push_buffer(&self, key: &Key) -> Result<Option<Tensor>> {
        DistStore::push_buffer(self, key)
    }

    fn pushed_in_place(&self) -> u64 {
        self.in_place.load(Ordering::Relaxed)
    }

    fn shared_memory_parts(&self) -> usize {
        self.shared_parts()
    }

    fn worker_summed_parts(&self) -> u64 {
        self.waits.summed()
    }

    fn worker_helped_chunks(&self) -> u64 {
        self.waits.helped()
    }

    fn worker_late_parts(&self) -> u64 {
        self.waits.late()
    }

    fn close(&self) -> Result<()> {
        // Subtle: an op queued behind a failed one inherits its failure and
        // may store it on the key's var again (or log it, writing no var)
        // after a caller was told of it; the engine does not report a
        // failure a var handed out (`take_failure` marks it told).
        let result = self.engine.wait_for_all();
        let barrier = self.barrier();
        if self.po.my_rank() == 0 && barrier.is_ok() {
            if let Err(e) = self.command(command::STOP_SERVER, Bytes::new()) {
                tracing::warn!("stopping the servers: {e}");
            }
        }
        self.closed.store(true, Ordering::Release);
        self.waits.close();
        self.po.shutdown();
        result?;
        barrier
    }
}
