//! `local` and `device`: one process keeps every key. A push reduces the
//! key's values (one per device) and either applies the updater to the
//! stored weight or stores the sum; a pull copies the stored value out.
//! Every step is an engine op on the tensors' vars, so calls return at once
//! and a pull of a key runs after the push before it. `plan.rs`: the same
//! calls planned once (`KvStore::plan`).

mod plan;

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use pskv_engine::{Context, Engine, OpSpec};

use crate::comm::{copy_prio, Comm, Scratch};
use crate::compression::Compression;
use crate::dtype::DType;
use crate::error::{KvError, Result};
use crate::key::Key;
use crate::kinds::{split_pushpull, Batch, Batch2, Flavor};
use crate::optimizer::{OptState, Optimizer};
use crate::plan::CallPlan;
use crate::registry::{Meta, Registry};
use crate::tensor::{check_rows, Buf, Storage, Tensor};
use crate::updater::{KeyState, Rule, Updater};

/// One key of a local store.
pub(crate) struct LocalKey {
    pub(crate) key: Key,
    pub(crate) meta: Meta,
    /// The stored value (dense, CPU).
    pub(crate) stored: Tensor,
    /// Merge buffers, dense and row-sparse, made on first use.
    merge: Mutex<[Option<Tensor>; 2]>,
    /// A host copy of a merged gradient on a GPU, for the updater (made on
    /// first use).
    grad_host: Mutex<Option<Tensor>>,
    scratch: Scratch,
    /// The updater's state for this key; touched only by ops that write
    /// `stored`, so the lock is never contended.
    pub(crate) state: Mutex<KeyState>,
}

impl LocalKey {
    pub(crate) fn new(key: Key, meta: Meta, stored: Tensor) -> LocalKey {
        LocalKey {
            key,
            meta,
            stored,
            merge: Mutex::new([None, None]),
            grad_host: Mutex::new(None),
            scratch: Scratch::default(),
            state: Mutex::new(KeyState::default()),
        }
    }

    /// The merge buffer for values of this storage.
    fn merge_buffer(&self, storage: Storage, ctx: Context) -> Result<Tensor> {
        let mut m = self.merge.lock();
        let slot = &mut m[(storage == Storage::RowSparse) as usize];
        if let Some(t) = slot.as_ref().filter(|t| t.ctx() == ctx) {
            return Ok(t.clone());
        }
        let e = self.stored.engine();
        let t = match storage {
            Storage::Dense => Tensor::zeros(e, &self.meta.shape, self.meta.dtype, ctx)?,
            Storage::RowSparse => {
                Tensor::zeros_row_sparse(e, &self.meta.shape, self.meta.dtype, ctx)?
            }
        };
        *slot = Some(t.clone());
        Ok(t)
    }

    /// Pushes the ops that reduce `values` and apply them to the stored
    /// value (through `rule`, or replacing it).
    pub(crate) fn push(
        self: &Arc<Self>,
        comm: &Comm,
        values: &[Tensor],
        rule: Option<&Rule>,
        compression: Compression,
        device: bool,
        priority: i32,
    ) -> Result<()> {
        let grad = self.reduce(comm, values, compression, device, priority)?;
        self.apply(&grad, rule, priority)
    }

    /// Reduces the values of one push into one tensor (the value itself
    /// when there is one and nothing to compress).
    pub(crate) fn reduce(
        &self,
        comm: &Comm,
        values: &[Tensor],
        compression: Compression,
        device: bool,
        priority: i32,
    ) -> Result<Tensor> {
        if values.len() == 1 && !compression.is_on() {
            return Ok(values[0].clone());
        }
        let storage = if values.iter().all(|v| v.storage() == Storage::RowSparse) {
            Storage::RowSparse
        } else {
            Storage::Dense
        };
        let ctx = if device {
            values[0].ctx()
        } else {
            Context::Cpu
        };
        let merge = self.merge_buffer(storage, ctx)?;
        comm.reduce(
            &self.key,
            values,
            &merge,
            &self.scratch,
            compression,
            priority,
        )?;
        Ok(merge)
    }

    /// Pushes the op that applies `grad` to the stored value.
    pub(crate) fn apply(
        self: &Arc<Self>,
        grad: &Tensor,
        rule: Option<&Rule>,
        priority: i32,
    ) -> Result<()> {
        match rule {
            None => copy_prio(grad, &self.stored, priority),
            Some(rule) if crate::tensor::gpu_of(grad.ctx()).is_some() => {
                // The updater runs on the host: the gradient comes there
                // first (into pinned memory kept for the key).
                let h = {
                    let mut g = self.grad_host.lock();
                    match g.as_ref().filter(|t| t.storage() == grad.storage()) {
                        Some(t) => t.clone(),
                        None => {
                            let n = crate::tensor::gpu_of(grad.ctx()).unwrap_or(0);
                            let t = grad.zeros_like(Context::CpuPinned(n))?;
                            *g = Some(t.clone());
                            t
                        }
                    }
                };
                copy_prio(grad, &h, priority)?;
                self.apply(&h, Some(rule), priority)
            }
            Some(rule) => {
                let spec = OpSpec::new("kvstore_update")
                    .priority(priority)
                    .read(grad.var())
                    .write(self.stored.var());
                let (g, w, rule) = (grad.clone(), self.stored.clone(), rule.clone());
                let me = self.clone();
                self.stored.engine().push_sync(spec, move |rc| {
                    let (gd, mut wd) = (g.read(&rc)?, w.write(&rc)?);
                    let rows = (g.storage() == Storage::RowSparse).then_some(&gd.rows[..]);
                    // The state is touched only by ops that write `stored`.
                    let mut st = me.state.lock();
                    rule.apply(
                        me.key.id(),
                        Some(&me.key),
                        me.meta.dtype,
                        &me.meta.shape,
                        gd.bytes(),
                        rows,
                        wd.bytes_mut(),
                        &mut st,
                    )
                    .map_err(Into::into)
                })?;
                Ok(())
            }
        }
    }
}

/// The `local` and `device` stores.
pub(crate) struct LocalStore {
    engine: Engine,
    comm: Comm,
    device: bool,
    keys: Registry<LocalKey>,
    rule: RwLock<Option<Rule>>,
    generation: AtomicU64,
    compression: RwLock<Compression>,
}

impl LocalStore {
    pub(crate) fn new(engine: Engine, comm: Comm, device: bool) -> LocalStore {
        LocalStore {
            engine,
            comm,
            device,
            keys: Registry::default(),
            rule: RwLock::new(None),
            generation: AtomicU64::new(1),
            compression: RwLock::new(Compression::None),
        }
    }
}

/// Checks that `outs` can receive a pull of a key (dense, same shape).
pub(crate) fn check_outs(key: &Key, meta: &Meta, outs: &[Tensor], what: &str) -> Result<()> {
    for o in outs {
        meta.check(key, o, what)?;
        if o.storage() != Storage::Dense {
            return Err(KvError::mismatch(
                key,
                format!("{what} into a row-sparse tensor: use pull_row_sparse"),
            ));
        }
    }
    Ok(())
}

/// Checks the pushed values of a key.
pub(crate) fn check_values(
    key: &Key,
    meta: &Meta,
    values: &[Tensor],
    compression: Compression,
) -> Result<()> {
    for v in values {
        meta.check(key, v, "push")?;
        if compression.is_on() && v.storage() == Storage::RowSparse {
            return Err(KvError::Unsupported {
                what: format!("gradient compression of row-sparse key {key}"),
                why: "MXNet's 2-bit and 1-bit codes are dense; push dense gradients or turn compression off".into(),
            });
        }
    }
    if compression.is_on() && meta.dtype != DType::F32 {
        return Err(KvError::Unsupported {
            what: format!("gradient compression of {} key {key}", meta.dtype),
            why: "2-bit and 1-bit compression take f32 gradients only".into(),
        });
    }
    Ok(())
}

/// Pushes the op that gathers `row_ids` rows of `src` (dense) into `out`
/// (row-sparse); through host copies where `src`, `out` or `row_ids` are on
/// a GPU.
pub(crate) fn gather_rows(
    key: &Key,
    src: &Tensor,
    out: &Tensor,
    row_ids: &Tensor,
    priority: i32,
) -> Result<()> {
    use crate::tensor::gpu_of;
    if gpu_of(src.ctx()).is_some() || gpu_of(out.ctx()).is_some() || gpu_of(row_ids.ctx()).is_some()
    {
        let host = |t: &Tensor| -> Result<Tensor> {
            if gpu_of(t.ctx()).is_none() {
                return Ok(t.clone());
            }
            let h = t.zeros_like(Context::Cpu)?;
            copy_prio(t, &h, priority)?;
            Ok(h)
        };
        let (s, r) = (host(src)?, host(row_ids)?);
        let o = match gpu_of(out.ctx()) {
            Some(_) => out.zeros_like(Context::Cpu)?,
            None => out.clone(),
        };
        gather_rows(key, &s, &o, &r, priority)?;
        return copy_prio(&o, out, priority);
    }
    let spec = Tensor::copy_spec("kvstore_pull_row_sparse", src.ctx(), out.ctx())
        .priority(priority)
        .read(src.var())
        .read(row_ids.var())
        .write(out.var());
    let (s, o, r) = (src.clone(), out.clone(), row_ids.clone());
    let kname = key.to_string();
    src.engine().push_sync(spec, move |rc| {
        let (sd, rd, mut od) = (s.read(&rc)?, r.read(&rc)?, o.write(&rc)?);
        let mut rows: Vec<i64> = rd.typed::<i64>().to_vec();
        rows.sort_unstable();
        rows.dedup();
        check_rows(
            &rows,
            s.shape()[0],
            &format!("pull_row_sparse of key {kname}"),
        )
        .map_err(|e| e.to_string())?;
        let rb = s.row_len() * s.dtype().size();
        let mut buf = Buf::zeroed(rows.len() * rb);
        for (i, &row) in rows.iter().enumerate() {
            let row = row as usize;
            buf.bytes_mut()[i * rb..(i + 1) * rb]
                .copy_from_slice(&sd.bytes()[row * rb..(row + 1) * rb]);
        }
        od.set(rows, buf);
        Ok(())
    })?;
    Ok(())
}

/// Pushes the op that copies rows `ids` of the row-sparse `rows` into the
/// dense `out`, in that order (rows not stored are zeros).
pub(crate) fn rows_in_order(
    rows: &Tensor,
    ids: Vec<i64>,
    out: &Tensor,
    priority: i32,
) -> Result<()> {
    let spec = OpSpec::new("kvstore_rows_in_order")
        .priority(priority)
        .read(rows.var())
        .write(out.var());
    let (r, o) = (rows.clone(), out.clone());
    rows.engine().push_sync(spec, move |rc| {
        let (rd, mut od) = (r.read(&rc)?, o.write(&rc)?);
        let rb = r.row_len() * r.dtype().size();
        let src = rd.bytes();
        let dst = od.overwrite();
        for (i, id) in ids.iter().enumerate() {
            let to = &mut dst[i * rb..(i + 1) * rb];
            match rd.rows.binary_search(id) {
                Ok(j) => to.copy_from_slice(&src[j * rb..(j + 1) * rb]),
                Err(_) => to.fill(0),
            }
        }
        Ok(())
    })?;
    Ok(())
}

/// Checks the outputs and row ids of a `pull_row_sparse`.
pub(crate) fn check_row_sparse_pull(
    key: &Key,
    meta: &Meta,
    outs: &[Tensor],
    row_ids: &[Tensor],
) -> Result<()> {
    if outs.len() != row_ids.len() {
        return Err(KvError::invalid(format!(
            "pull_row_sparse of key {key}: {} outputs but {} row-id tensors",
            outs.len(),
            row_ids.len()
        )));
    }
    for (o, r) in outs.iter().zip(row_ids) {
        meta.check(key, o, "pull_row_sparse")?;
        if o.storage() != Storage::RowSparse {
            return Err(KvError::mismatch(
                key,
                "pull_row_sparse writes row-sparse tensors; use pull for dense ones",
            ));
        }
        if r.dtype() != DType::I64 || r.storage() != Storage::Dense || r.shape().len() != 1 {
            return Err(KvError::invalid(format!(
                "pull_row_sparse of key {key}: row ids must be a dense 1-D i64 tensor, got {} {:?}",
                r.dtype(),
                r.shape()
            )));
        }
    }
    Ok(())
}

impl Flavor for LocalStore {
    fn init(&self, items: &[(Key, Tensor)]) -> Result<()> {
        self.keys.check_new(items.iter().map(|(k, _)| k))?;
        // Every key's storage first, then all are added at once: a call
        // that fails adds none of its keys.
        let mut made = Vec::with_capacity(items.len());
        for (key, value) in items {
            let meta = Meta::of(value);
            let stored = Tensor::zeros(&self.engine, &meta.shape, meta.dtype, Context::Cpu)?;
            copy_prio(value, &stored, 0)?;
            made.push((key.clone(), LocalKey::new(key.clone(), meta, stored)));
        }
        self.keys.insert_all(made)?;
        Ok(())
    }

    fn push(&self, items: &Batch, priority: i32) -> Result<()> {
        let compression = *self.compression.read();
        let mut entries = Vec::with_capacity(items.len());
        for (key, values) in items {
            let e = self.keys.get(key)?;
            check_values(key, &e.meta, values, compression)?;
            entries.push(e);
        }
        let rule = self.rule.read().clone();
        for (e, (_, values)) in entries.iter().zip(items) {
            e.push(
                &self.comm,
                values,
                rule.as_ref(),
                compression,
                self.device,
                priority,
            )?;
        }
        Ok(())
    }

    fn pull(&self, items: &Batch, priority: i32) -> Result<()> {
        let mut entries = Vec::with_capacity(items.len());
        for (key, outs) in items {
            let e = self.keys.get(key)?;
            check_outs(key, &e.meta, outs, "pull")?;
            entries.push(e);
        }
        for (e, (_, outs)) in entries.iter().zip(items) {
            self.comm.broadcast(&e.stored, outs, priority)?;
        }
        Ok(())
    }

    fn pushpull(&self, items: &Batch2, priority: i32) -> Result<()> {
        let compression = *self.compression.read();
        for (key, values, outs) in items {
            let e = self.keys.get(key)?;
            check_values(key, &e.meta, values, compression)?;
            check_outs(key, &e.meta, outs, "pushpull")?;
        }
        let (pushes, pulls) = split_pushpull(items);
        self.push(&pushes, priority)?;
        self.pull(&pulls, priority)
    }

    fn pull_row_sparse(&self, items: &Batch2, priority: i32) -> Result<()> {
        let mut entries = Vec::with_capacity(items.len());
        for (key, outs, rows) in items {
            let e = self.keys.get(key)?;
            check_row_sparse_pull(key, &e.meta, outs, rows)?;
            entries.push(e);
        }
        for (e, (key, outs, rows)) in entries.iter().zip(items) {
            for (o, r) in outs.iter().zip(rows) {
                gather_rows(key, &e.stored, o, r, priority)?;
            }
        }
        Ok(())
    }

    fn plan(&self, plan: &CallPlan) -> Result<Box<dyn Any + Send + Sync>> {
        self.plan_call(plan)
    }

    fn issue(&self, plan: &CallPlan) -> Result<()> {
        self.issue_planned(plan)
    }

    fn key_meta(&self, key: &Key) -> Result<Meta> {
        Ok(self.keys.get(key)?.meta.clone())
    }

    fn key_vars(&self, key: &Key) -> Result<Vec<pskv_engine::Var>> {
        Ok(vec![self.keys.get(key)?.stored.var().clone()])
    }

    fn set_optimizer(&self, opt: Optimizer) -> Result<()> {
        opt.validate()?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.rule.write() = Some(Rule::Optimizer {
            opt: Arc::new(opt),
            generation,
        });
        Ok(())
    }

    fn set_updater(&self, updater: Arc<dyn Updater>) -> Result<()> {
        *self.rule.write() = Some(Rule::Custom(updater));
        Ok(())
    }

    fn set_compression(&self, c: Compression) -> Result<()> {
        c.validate()?;
        if c.is_on() && !self.device {
            return Err(KvError::Unsupported {
                what: "gradient compression on a 'local' kvstore".into(),
                why: "values are summed in host memory with nothing to send; use 'device' or a dist kind, as in MXNet".into(),
            });
        }
        *self.compression.write() = c;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }

    fn rank(&self) -> u32 {
        0
    }

    fn num_workers(&self) -> u32 {
        1
    }

    fn num_dead_nodes(&self, _timeout: Duration) -> Result<usize> {
        Ok(0)
    }

    fn send_command_to_servers(&self, head: i32, _body: &[u8]) -> Result<()> {
        Err(KvError::Unsupported {
            what: format!("command {head} to servers"),
            why: "a local kvstore has no servers".into(),
        })
    }

    fn optimizer_states(&self) -> Result<Vec<(Key, OptState)>> {
        let generation = match &*self.rule.read() {
            Some(Rule::Optimizer { generation, .. }) => *generation,
            _ => {
                return Err(KvError::invalid(
                    "there are no optimizer states to save: set_optimizer first",
                ))
            }
        };
        self.engine.wait_for_all()?;
        let mut out = Vec::new();
        for (key, e) in self.keys.all() {
            let st = e.state.lock();
            if st.generation == generation {
                if let Some(s) = &st.state {
                    out.push((key, s.clone()));
                }
            }
        }
        Ok(out)
    }

    fn set_optimizer_states(&self, states: Vec<(Key, OptState)>) -> Result<()> {
        let (generation, opt) = match &*self.rule.read() {
            Some(Rule::Optimizer { generation, opt }) => (*generation, opt.clone()),
            _ => {
                return Err(KvError::invalid(
                    "load_optimizer_states needs an optimizer: set_optimizer first",
                ))
            }
        };
        let mut found = Vec::with_capacity(states.len());
        for (key, s) in states {
            let e = self.keys.get(&key)?;
            for b in &s.bufs {
                let n = match b {
                    crate::optimizer::StateVals::F32(v) => v.len(),
                    crate::optimizer::StateVals::F64(v) => v.len(),
                };
                if n != e.meta.len() {
                    return Err(KvError::mismatch(
                        &key,
                        format!("the saved state has {n} elements, the key {}", e.meta.len()),
                    ));
                }
            }
            found.push((e, s));
        }
        self.engine.wait_for_all()?;
        for (e, s) in found {
            opt.note_count(s.count);
            *e.state.lock() = KeyState {
                generation,
                state: Some(s),
            };
        }
        Ok(())
    }

    fn close(&self) -> Result<()> {
        self.engine.wait_for_all()?;
        Ok(())
    }
}
