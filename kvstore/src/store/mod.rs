//! [`KvStore`]: the one type callers use, whatever the kind. It checks
//! arguments, groups repeated keys, and hands the work to the kind's
//! [`Flavor`](crate::kinds::Flavor).
//!
//! Rooms: this file is the store, its creation, its data calls (init,
//! push, pull and their kin) and tickets, and its close; `settings.rs` the
//! update rule, compression, barriers and the rest of the cluster's
//! calls; `buffers.rs` push buffers and the counts of how pushes
//! travelled.

mod buffers;
mod settings;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pskv_engine::Engine;
use pskv_gpu::cpu::CpuKernels;

use crate::comm::tree::Topology;
use crate::comm::{Comm, CommMode};
use crate::dtype::DType;
use crate::error::{KvError, Result};
use crate::key::{IntoKey, Key};
use crate::kinds::dist::DistStore;
use crate::kinds::local::LocalStore;
use crate::kinds::{Flavor, Kind};
use crate::options::Options;
use crate::tensor::{Storage, Tensor};
use crate::ticket::{Parts, Ticket, TicketPlan};

/// A kvstore: MXNet's `mx.kv.create(name)`.
///
/// ```
/// use pskv_engine::{Context, Engine};
/// use pskv_kvstore::{KvStore, Optimizer, Tensor};
///
/// let engine = Engine::builder().cpu_threads(2).build()?;
/// let kv = KvStore::create("local", &engine)?;
/// kv.init(3, &Tensor::full(&engine, &[4], 1.0f32, Context::Cpu)?)?;
/// kv.set_optimizer(Optimizer::sgd(0.5))?;
/// // Gradients from two devices: summed, then one SGD step.
/// let g = [Tensor::full(&engine, &[4], 1.0f32, Context::Gpu(0))?,
///          Tensor::full(&engine, &[4], 1.0f32, Context::Gpu(1))?];
/// kv.push(3, &g, 0)?;
/// let out = Tensor::zeros(&engine, &[4], pskv_kvstore::DType::F32, Context::Cpu)?;
/// kv.pull(3, &[out.clone()], 0)?;
/// assert_eq!(out.to_vec::<f32>()?, vec![0.0; 4]); // 1 - 0.5 * (1 + 1)
/// # Ok::<(), pskv_kvstore::KvError>(())
/// ```
pub struct KvStore {
    kind: Kind,
    /// `Options::timeout`: how long a ticket's wait waits.
    timeout: Duration,
    engine: Engine,
    flavor: Arc<dyn Flavor>,
    closed: AtomicBool,
    /// Drawn from `NEXT_STORE_ID` (see `KvStore::id`).
    id: u64,
}

/// The id of the next store made in this process.
static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("kind", &self.kind)
            .field("rank", &self.rank())
            .finish()
    }
}

/// Merges repeated keys of a batch (their tensors join, in order), as
/// MXNet's `GroupKVPairs` does.
fn group<T: Clone>(items: &[(Key, Vec<T>)]) -> Vec<(Key, Vec<T>)> {
    let mut out: Vec<(Key, Vec<T>)> = Vec::with_capacity(items.len());
    for (k, v) in items {
        match out.iter_mut().find(|(k2, _)| k2 == k) {
            Some((_, v2)) => v2.extend(v.iter().cloned()),
            None => out.push((k.clone(), v.clone())),
        }
    }
    out
}

impl KvStore {
    /// A store of this kind, with settings from the environment (a
    /// distributed kind joins the cluster the `DMLC_*` variables describe).
    pub fn create(name: &str, engine: &Engine) -> Result<KvStore> {
        KvStore::create_with(name, engine, Options::from_env()?)
    }

    /// A store of this kind with these settings.
    pub fn create_with(name: &str, engine: &Engine, opts: Options) -> Result<KvStore> {
        let kind = Kind::parse(name).ok_or_else(|| KvError::UnknownKind(name.to_string()))?;
        let kernels = Arc::new(CpuKernels::with_threads(opts.reduce_threads)?);
        let timeout = opts.timeout;
        let device = matches!(kind, Kind::Device | Kind::DistSyncDevice);
        let mode = if device {
            CommMode::Device {
                tree: opts.use_tree.then(|| {
                    opts.topology
                        .clone()
                        .unwrap_or_else(|| Topology::uniform(0))
                }),
            }
        } else {
            CommMode::Cpu
        };
        let comm = Comm::new(kernels, mode);
        let flavor: Arc<dyn Flavor> = match kind {
            Kind::Local | Kind::Device => Arc::new(LocalStore::new(engine.clone(), comm, device)),
            Kind::DistSync | Kind::DistAsync | Kind::DistSyncDevice => {
                DistStore::start(kind, engine.clone(), comm, opts)?
            }
        };
        Ok(KvStore {
            kind,
            timeout,
            engine: engine.clone(),
            flavor,
            closed: AtomicBool::new(false),
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The kind's MXNet name.
    pub fn type_name(&self) -> &'static str {
        self.kind.name()
    }

    /// The engine its ops run on.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The kind's half.
    pub(crate) fn flavor(&self) -> &dyn Flavor {
        &*self.flavor
    }

    /// Names this store for the plans it makes (never another's, even
    /// once this one is dropped).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn check_tensors<'a>(
        &self,
        key: &Key,
        ts: impl IntoIterator<Item = &'a Tensor>,
    ) -> Result<()> {
        let mut any = false;
        for t in ts {
            t.check_engine(&self.engine)?;
            any = true;
        }
        if !any {
            return Err(KvError::invalid(format!("key {key} was given no tensors")));
        }
        Ok(())
    }

    /// The shape, element type and storage `key` was initialized with.
    pub fn key_info(&self, key: impl IntoKey) -> Result<(Vec<usize>, DType, Storage)> {
        let m = self.flavor.key_meta(&key.into_key()?)?;
        Ok((m.shape, m.dtype, m.storage))
    }

    /// A ticket on a request just issued: it is done when every op issued
    /// so far on `keys` and on `tensors` (the request's values and outputs)
    /// has finished, and reports their first failure, once (see
    /// [`Ticket`]). Outputs made over the caller's memory
    /// ([`Tensor::from_host_ptr`]) hold their result when it is done, and
    /// pskv holds that memory no longer.
    ///
    /// ```
    /// use pskv_engine::{Context, Engine};
    /// use pskv_kvstore::{DType, KvStore, Tensor};
    /// let engine = Engine::new()?;
    /// let kv = KvStore::create("local", &engine)?;
    /// kv.init(3, &Tensor::from_vec(&engine, &[2], vec![1.0f32, 2.0], Context::Cpu)?)?;
    /// let mut out = vec![0.0f32; 2];
    /// // SAFETY: `out` is left alone until the ticket is done.
    /// let (t, _home) = unsafe {
    ///     Tensor::from_host_ptr(&engine, &[2], DType::F32, out.as_mut_ptr() as usize)?
    /// };
    /// kv.pull(3, std::slice::from_ref(&t), 0)?;
    /// let mut ticket = kv.ticket(&[3u32.into()], &[t])?;
    /// ticket.wait()?;
    /// assert_eq!(out, [1.0, 2.0]);
    /// # Ok::<(), pskv_kvstore::KvError>(())
    /// ```
    ///
    /// A key never initialized is passed over (nothing of the request ran
    /// on it): a caller whose request failed part way can still take a
    /// ticket on all of it, to know when pskv lets go of its memory.
    pub fn ticket(&self, keys: &[Key], tensors: &[Tensor]) -> Result<Ticket> {
        let parts = self.parts(keys, tensors, false)?;
        Ticket::issue(&self.engine, parts, self.timeout)
    }

    /// As [`KvStore::ticket`], for a request whose tensors over the
    /// caller's memory the caller keeps, to issue the same request again
    /// (a persistent request). Once the ticket is done, the memory is the
    /// caller's until its next request, and the tensors serve that request
    /// as they are, except those that [`Ticket::spent`] names: pskv had to
    /// let go of their memory (a message still shared it, or a result
    /// landed elsewhere and was copied home); make each again with
    /// [`Tensor::remade`] first. See "Kept tensors" in `ticket/settle.rs`.
    pub fn ticket_kept(&self, keys: &[Key], tensors: &[Tensor]) -> Result<Ticket> {
        let plan = self.ticket_plan(keys, tensors)?;
        self.ticket_for(&plan)
    }

    /// What [`KvStore::ticket_kept`] looks up of `keys` and `tensors`, made
    /// once for a request issued again and again on the same tensors:
    /// [`KvStore::ticket_for`] then takes a ticket without looking the
    /// keys up again. Make a new plan when a ticket names spent tensors.
    pub fn ticket_plan(&self, keys: &[Key], tensors: &[Tensor]) -> Result<TicketPlan> {
        self.parts(keys, tensors, true).map(TicketPlan)
    }

    /// The ticket of the request just issued on `plan`'s keys and tensors
    /// (as [`KvStore::ticket_kept`]).
    pub fn ticket_for(&self, plan: &TicketPlan) -> Result<Ticket> {
        Ticket::issue(&self.engine, plan.0.clone(), self.timeout)
    }

    fn parts(&self, keys: &[Key], tensors: &[Tensor], kept: bool) -> Result<Arc<Parts>> {
        let mut vars = Vec::with_capacity(keys.len());
        let mut settles = Vec::new();
        for k in keys {
            match self.flavor.key_vars(k) {
                Ok(v) => vars.extend(v),
                Err(KvError::NotInitialized { .. }) => continue,
                Err(e) => return Err(e),
            }
            settles.extend(self.flavor.settles(k));
        }
        for t in tensors {
            t.check_engine(&self.engine)?;
        }
        Ok(Parts::new(keys, vars, settles, tensors, kept))
    }

    /// Initializes a key with a value (its shape, dtype and storage are the
    /// key's from now on). A second init of a key is an error. In a
    /// distributed store this is collective: every worker calls it, rank 0's
    /// value is stored, and it returns after a barrier, as in MXNet.
    pub fn init(&self, key: impl IntoKey, value: &Tensor) -> Result<()> {
        self.init_many(&[(key.into_key()?, value.clone())])
    }

    /// Initializes several keys.
    pub fn init_many(&self, items: &[(Key, Tensor)]) -> Result<()> {
        for (k, v) in items {
            if let Err(e) = self.check_tensors(k, [v]) {
                return self.flavor.abort_collective("init", e);
            }
        }
        self.flavor.init(items)
    }

    /// Pushes a key's values (one per device; summed first). Returns at
    /// once: the push is an engine op after the ops that write the values.
    pub fn push(&self, key: impl IntoKey, values: &[Tensor], priority: i32) -> Result<()> {
        self.push_many(&[(key.into_key()?, values.to_vec())], priority)
    }

    /// Pushes several keys; a key given twice has its values summed.
    pub fn push_many(&self, items: &[(Key, Vec<Tensor>)], priority: i32) -> Result<()> {
        let items = group(items);
        for (k, v) in &items {
            self.check_tensors(k, v)?;
        }
        self.flavor.push(&items, priority)
    }

    /// Pulls a key's value into `outs` (one per device). Runs after this
    /// process's earlier pushes of the key.
    pub fn pull(&self, key: impl IntoKey, outs: &[Tensor], priority: i32) -> Result<()> {
        self.pull_many(&[(key.into_key()?, outs.to_vec())], priority)
    }

    /// Pulls several keys.
    pub fn pull_many(&self, items: &[(Key, Vec<Tensor>)], priority: i32) -> Result<()> {
        let items = group(items);
        for (k, v) in &items {
            self.check_tensors(k, v)?;
        }
        self.flavor.pull(&items, priority)
    }

    /// Pushes `values` and pulls the result into `outs` (one round trip in
    /// a distributed store).
    pub fn pushpull(
        &self,
        key: impl IntoKey,
        values: &[Tensor],
        outs: &[Tensor],
        priority: i32,
    ) -> Result<()> {
        self.pushpull_many(
            &[(key.into_key()?, values.to_vec(), outs.to_vec())],
            priority,
        )
    }

    /// Push-pulls several keys.
    pub fn pushpull_many(
        &self,
        items: &[(Key, Vec<Tensor>, Vec<Tensor>)],
        priority: i32,
    ) -> Result<()> {
        for (i, (k, v, o)) in items.iter().enumerate() {
            self.check_tensors(k, v)?;
            self.check_tensors(k, o)?;
            if items[..i].iter().any(|(k2, _, _)| k2 == k) {
                return Err(KvError::invalid(format!(
                    "pushpull: key {k} is given twice; give each key once"
                )));
            }
        }
        self.flavor.pushpull(items, priority)
    }

    /// Pulls the rows `row_ids[i]` (a dense 1-D i64 tensor) of a key into
    /// the row-sparse `outs[i]`.
    pub fn pull_row_sparse(
        &self,
        key: impl IntoKey,
        outs: &[Tensor],
        row_ids: &[Tensor],
        priority: i32,
    ) -> Result<()> {
        let key = key.into_key()?;
        self.check_tensors(&key, outs)?;
        self.check_tensors(&key, row_ids)?;
        self.flavor
            .pull_row_sparse(&[(key, outs.to_vec(), row_ids.to_vec())], priority)
    }

    /// Pulls rows `row_ids` of a key (any order, repeats allowed) into
    /// `out`, a dense CPU tensor of `row_ids.len()` rows of the key's row
    /// length: row `i` of `out` is row `row_ids[i]`. One row-sparse pull of
    /// the distinct rows, then a gather into `out` (an embedding lookup).
    pub fn pull_rows(
        &self,
        key: impl IntoKey,
        row_ids: &[i64],
        out: &Tensor,
        priority: i32,
    ) -> Result<()> {
        let key = key.into_key()?;
        self.check_tensors(&key, [out])?;
        let (shape, dtype, _) = self.key_info(&key)?;
        let row_len: usize = shape.iter().skip(1).product();
        let want = row_ids.len().checked_mul(row_len);
        if out.dtype() != dtype
            || out.storage() != Storage::Dense
            || out.ctx() != pskv_engine::Context::Cpu
            || Some(out.len()) != want
        {
            return Err(KvError::mismatch(
                &key,
                format!(
                    "pull_rows of {} rows of {row_len} elements of {dtype} needs a dense {dtype} host tensor of {} elements, got {} {} elements on {:?}",
                    row_ids.len(),
                    want.map_or_else(|| "too many".to_string(), |n| n.to_string()),
                    out.dtype(),
                    out.len(),
                    out.ctx()
                ),
            ));
        }
        let ctx = pskv_engine::Context::Cpu;
        let ids = Tensor::from_slice(&self.engine, &[row_ids.len()], row_ids, ctx)?;
        let rows = Tensor::zeros_row_sparse(&self.engine, &shape, dtype, ctx)?;
        self.pull_row_sparse(key, std::slice::from_ref(&rows), &[ids], priority)?;
        crate::kinds::local::rows_in_order(&rows, row_ids.to_vec(), out, priority)
    }

    /// Initializes a key with `value` and pulls it into `outs`.
    pub fn broadcast(
        &self,
        key: impl IntoKey,
        value: &Tensor,
        outs: &[Tensor],
        priority: i32,
    ) -> Result<()> {
        let key = key.into_key()?;
        self.init(key.clone(), value)?;
        self.pull(key, outs, priority)
    }

    /// Waits for the store's ops; a distributed store then stops its
    /// servers (rank 0, after a barrier) and leaves the cluster. Dropping
    /// the store does the same, ignoring errors.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.flavor.close()
    }
}

impl Drop for KvStore {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!("closing the kvstore: {e}");
        }
    }
}

/// The transport configuration a node of `engine` runs with: under the
/// naive engine a push waits for its op, also inside a frame's handling
/// (a server's op on a replicated key waits for its backup's answer), so
/// each shared-memory link gets a reader thread of its own and such a wait
/// never holds up the other links (the node's one reader of all its links
/// would wait for a frame only it can read: `transport/src/van/shm/group.rs`).
pub(crate) fn for_engine(
    mut cfg: pskv_transport::Config,
    engine: &Engine,
) -> pskv_transport::Config {
    if engine.config().kind == pskv_engine::EngineKind::Naive {
        cfg.shm_reader_per_link = true;
    }
    cfg
}
