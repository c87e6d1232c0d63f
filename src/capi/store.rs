//! The store's handle and its calls other than moving values: create,
//! free, optimizer, updater, compression, optimizer states, barrier, and
//! what the cluster looks like.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::handles::{Cache, Table};
use super::{arg, guard, kv_err, put, string, Failure, PskvBuffer, PSKV_ERR_KVSTORE};
use crate::engine::Engine;
use crate::kvstore::{Compression, KvStore, Optimizer, Tensor};

/// A kvstore and the engine it schedules on (opaque to C: a handle is a
/// token for one of these, see the module docs).
pub struct PskvKvStore {
    pub(crate) kv: KvStore,
    _engine: Engine,
    /// Tickets of batches that failed to issue and whose buffers were
    /// still in flight at the timeout: kept until the store is freed.
    pub(crate) orphans: std::sync::Mutex<Vec<crate::kvstore::Ticket>>,
    /// Set by `pskv_free` (a persistent request, which holds the store,
    /// refuses to start on a freed one).
    pub(crate) freed: std::sync::atomic::AtomicBool,
    /// The push buffers handed out (`pskv_push_buffer`), by key: each
    /// key's slot, and in it the tensor that owns the buffer's memory and
    /// its address; kept until the store is freed. A key's buffer is made
    /// under its slot's lock only (the making waits for the key's earlier
    /// ops): a second caller for the key waits and gets the same buffer,
    /// and callers for other keys do not wait. (A key whose making failed
    /// keeps an empty slot: the next call tries again.)
    pub(crate) push_buffers: std::sync::Mutex<HashMap<i64, Arc<PushBufferSlot>>>,
}

/// A key's push buffer, once made (`PskvKvStore::push_buffers`).
pub(crate) type PushBufferSlot = std::sync::Mutex<Option<(Tensor, usize)>>;

/// The live stores, by token.
fn stores() -> &'static Table<PskvKvStore> {
    static STORES: OnceLock<Table<PskvKvStore>> = OnceLock::new();
    thread_local! {
        static STORE_CACHE: Cache<PskvKvStore> = const { std::cell::RefCell::new(None) };
    }
    STORES.get_or_init(|| Table::new("kvstore", "pskv_create", &STORE_CACHE))
}

/// The store behind a handle (kept alive for the call).
pub(crate) fn handle(kv: *const PskvKvStore) -> Result<Arc<PskvKvStore>, Failure> {
    stores().get(kv)
}

/// Creates a kvstore of `kind` ("local", "device", "dist_sync",
/// "dist_async", ...) on an engine of its own, configured from the
/// environment (a distributed kind joins the cluster named by DMLC_*, as
/// set by `pskv launch`). Writes the handle to `*out`.
///
/// # Safety
/// `kind` is a NUL-terminated string; `out` points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pskv_create(kind: *const c_char, out: *mut *mut PskvKvStore) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(arg("out is a null pointer"));
        }
        let kind = string(kind, "kind")?;
        crate::logging::init();
        let engine = Engine::new().map_err(|e| (PSKV_ERR_KVSTORE, e.to_string()))?;
        let kv = KvStore::create(kind, &engine).map_err(kv_err)?;
        *out = stores().insert(PskvKvStore {
            kv,
            _engine: engine,
            orphans: std::sync::Mutex::new(Vec::new()),
            freed: std::sync::atomic::AtomicBool::new(false),
            push_buffers: std::sync::Mutex::new(HashMap::new()),
        });
        Ok(())
    })
}

/// Gives `key`'s push buffer in `*out`: host memory for the key's values
/// (its element count and dtype, 1-D: `ndim` 0), zeroed, that the store
/// owns until `pskv_free`. Write a gradient there and give `out` as the
/// values of the key's pushes and push-pulls: where the key's values
/// cross shared memory to its servers (`dist_sync`, servers on this host,
/// `PSKV_VAN=shm`), the memory is this worker's slots of the key's
/// segments and a push from it copies nothing; elsewhere it is ordinary
/// memory and pushes from it are as from any buffer. `*shared` (if not
/// NULL) is set to 1 in the first case, 0 in the second. Calling it again
/// for the key, from any thread (first calls at once too: one makes it,
/// the others wait for it), gives the same buffer. As any buffer, leave it
/// alone while a request that uses it runs. A push or push-pull from it through its
/// slots that fails moves it off them (the same bytes at the same address,
/// on private pages: the server may still read the slots; should that
/// remap fail, the error is logged and the buffer stays shared), and
/// pushes from it then copy. The key must be initialized, and dense.
///
/// # Safety
/// `kv` is a live handle; `out` points to writable storage; `shared` is
/// NULL or points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pskv_push_buffer(
    kv: *mut PskvKvStore,
    key: i64,
    out: *mut PskvBuffer,
    shared: *mut c_int,
) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(arg("out is a null pointer"));
        }
        let h = handle(kv)?;
        let k = super::key(key)?;
        let slot = (h.push_buffers.lock().unwrap_or_else(|p| p.into_inner()))
            .entry(key)
            .or_default()
            .clone();
        let mut made = slot.lock().unwrap_or_else(|p| p.into_inner());
        let (t, addr) = match &*made {
            Some(b) => b.clone(),
            None => {
                let b = h.kv.push_buffer_at(k).map_err(kv_err)?;
                *made = Some(b.clone());
                b
            }
        };
        drop(made);
        if !shared.is_null() {
            *shared = c_int::from(t.in_shared_memory().map_err(kv_err)?);
        }
        let (count, dtype) = (t.len() as u64, t.dtype().code() as i32);
        *out = PskvBuffer::flat(addr as *mut c_void, count, dtype, super::PSKV_DEVICE_CPU, 0);
        Ok(())
    })
}

/// Waits for the store's operations, leaves the cluster (rank 0 stops the
/// servers after a barrier) and frees the handle. Null is accepted; a
/// handle freed already is an argument error.
///
/// # Safety
/// Any value may be passed (handles are checked).
#[no_mangle]
pub unsafe extern "C" fn pskv_free(kv: *mut PskvKvStore) -> c_int {
    guard(|| {
        if kv.is_null() {
            return Ok(());
        }
        let h = stores().remove(kv)?;
        h.freed.store(true, std::sync::atomic::Ordering::Release);
        h.kv.close().map_err(kv_err)
    })
}

/// Sets the optimizer the servers (or a local store) run on pushes: `name`
/// is sgd, nag, adam or adagrad; `params` is "" or comma-separated
/// `name=value` pairs with MXNet's names (learning_rate, momentum, wd,
/// rescale_grad, clip_gradient, beta1, beta2, epsilon, begin_num_update),
/// and optionally `lr_scheduler=KIND(name=value;...)` with MXNet's
/// scheduler and argument names, e.g.
/// `learning_rate=0.1,lr_scheduler=factor(step=100;factor=0.9;warmup_steps=10)`
/// or `lr_scheduler=multifactor(step=30:60:90;factor=0.1)`; kinds are
/// factor, multifactor, poly and cosine. MXNet's attributes pass as they
/// are: `lazy_update=1` and AdaGrad's `float_stable_eps` take effect
/// (`lazy_update=0` is refused); `aggregate_num`, `use_fused_step`,
/// `param_idx2name`, `idx2name`, `param_dict` and `sym` are ignored with a
/// logged warning, whatever their value (without a comma).
///
/// Collective, as `pskv_init` and `pskv_barrier`: every worker calls it
/// with the same optimizer; if it fails on one worker it fails on all.
/// Workers in another collective call meanwhile fail with it at once,
/// naming both calls. If some workers never call it (MXNet code that calls
/// it on rank 0 only), the callers fail at `PSKV_KVSTORE_TIMEOUT` saying the
/// others did not make the call; the others' pushes and pulls left waiting
/// fail at their timeout naming the call, and their next collective call
/// fails at once.
///
/// # Safety
/// `kv` is a live handle; `name` and `params` are NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn pskv_set_optimizer(
    kv: *mut PskvKvStore,
    name: *const c_char,
    params: *const c_char,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let name = string(name, "name")?;
        let params = string(params, "params")?;
        let pairs = name_values(params, "optimizer parameter")?;
        let opt = Optimizer::from_text(name, &pairs)
            .map_err(|e| arg(e.to_string()))?
            .map_err(kv_err)?;
        h.kv.set_optimizer(opt).map_err(kv_err)
    })
}

/// `name=value` pairs separated by commas (blanks around them ignored).
fn name_values<'a>(params: &'a str, what: &str) -> Result<Vec<(&'a str, &'a str)>, Failure> {
    params
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| arg(format!("{what} '{p}': expected name=value")))
        })
        .collect()
}

/// Sets gradient compression (`device` and distributed stores), as
/// MXNet's `set_gradient_compression`: `params` is `type=2bit`,
/// `type=1bit` or `type=none`, optionally with `,threshold=T` (default
/// 0.5). Pushes of float32 keys are then quantized with error feedback.
/// Collective in a distributed store: every worker sets the same.
///
/// # Safety
/// `kv` is a live handle; `params` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pskv_set_gradient_compression(
    kv: *mut PskvKvStore,
    params: *const c_char,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let params = string(params, "params")?;
        let pairs = name_values(params, "gradient compression parameter")?;
        let c = Compression::from_params(&pairs).map_err(|e| arg(e.to_string()))?;
        h.kv.set_gradient_compression(c).map_err(kv_err)
    })
}

/// Writes the optimizer state of every key (the servers', in a
/// distributed store) to the file `path`. Waits for the store's
/// operations first.
///
/// # Safety
/// `kv` is a live handle; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pskv_save_optimizer_states(
    kv: *mut PskvKvStore,
    path: *const c_char,
) -> c_int {
    with_path(kv, path, |kv, p| kv.save_optimizer_states(p))
}

/// Reads optimizer state written by `pskv_save_optimizer_states` (the
/// keys must exist with the same sizes, and an optimizer must be set).
///
/// # Safety
/// `kv` is a live handle; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pskv_load_optimizer_states(
    kv: *mut PskvKvStore,
    path: *const c_char,
) -> c_int {
    with_path(kv, path, |kv, p| kv.load_optimizer_states(p))
}

/// Runs `f` on the store and the file `path`.
///
/// # Safety
/// As `pskv_save_optimizer_states`.
unsafe fn with_path(
    kv: *mut PskvKvStore,
    path: *const c_char,
    f: fn(&KvStore, &str) -> crate::kvstore::Result<()>,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let path = string(path, "path")?;
        f(&h.kv, path).map_err(kv_err)
    })
}

/// Writes to `*out` the number of nodes (servers and workers) that have
/// missed their heartbeats for `timeout_sec` seconds (0 for a local
/// store), as MXNet's `get_num_dead_node`.
///
/// # Safety
/// `kv` is a live handle; `out` points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pskv_num_dead_nodes(
    kv: *const PskvKvStore,
    timeout_sec: c_int,
    out: *mut c_int,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let secs = u64::try_from(timeout_sec).map_err(|_| {
            arg(format!(
                "timeout_sec {timeout_sec}: not a number of seconds"
            ))
        })?;
        let n =
            h.kv.num_dead_nodes(Duration::from_secs(secs))
                .map_err(kv_err)?;
        put(out, c_int::try_from(n).unwrap_or(c_int::MAX))
    })
}

/// A custom update rule in C: applies the gradient `grad` of `key` to the
/// stored `weight` (both in host memory, the key's dtype and full length;
/// `weight` is written in place). A row-sparse gradient holds only rows
/// `grad_rows[0..grad_nrows]`, packed (`grad->count` is their elements);
/// for a dense one `grad_rows` is NULL and `grad_nrows` 0. Returns 0, or
/// any other value to fail the push (its request reports it).
///
/// Called on pskv's threads, for several keys at once but never twice at
/// once for one key; it must not call back into the same store.
pub type PskvUpdater = Option<
    unsafe extern "C" fn(
        key: i64,
        grad: *const PskvBuffer,
        grad_rows: *const i64,
        grad_nrows: usize,
        weight: *mut PskvBuffer,
        user: *mut c_void,
    ) -> c_int,
>;

/// Sets a custom update rule (see `pskv_updater`), as MXNet's
/// `set_updater`: it runs where the weights are (in a distributed store,
/// on every worker; the servers then only sum). `user` is passed to every
/// call as it is; it must stay valid until the store is freed.
///
/// # Safety
/// `kv` is a live handle; `updater` is a function as `pskv_updater`
/// describes, safe to call from any thread with `user`.
#[no_mangle]
pub unsafe extern "C" fn pskv_set_updater(
    kv: *mut PskvKvStore,
    updater: PskvUpdater,
    user: *mut c_void,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let f = updater.ok_or_else(|| arg("updater is a null pointer"))?;
        let user = user as usize;
        h.kv.set_updater(
            move |key: &crate::kvstore::Key,
                  grad: &crate::kvstore::Values<'_>,
                  weight: &mut crate::kvstore::ValuesMut<'_>| {
                super::buffer::call_updater(f, key, grad, weight, user)
            },
        )
        .map_err(kv_err)
    })
}

/// Waits until every worker reached the barrier.
///
/// # Safety
/// `kv` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn pskv_barrier(kv: *mut PskvKvStore) -> c_int {
    guard(|| handle(kv)?.kv.barrier().map_err(kv_err))
}

/// Writes this worker's rank (0 for a local store) to `*out`.
///
/// # Safety
/// `kv` is a live handle; `out` points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pskv_rank(kv: *const PskvKvStore, out: *mut c_int) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        put(out, h.kv.rank() as c_int)
    })
}

/// Writes the number of workers (1 for a local store) to `*out`.
///
/// # Safety
/// `kv` is a live handle; `out` points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pskv_num_workers(kv: *const PskvKvStore, out: *mut c_int) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        put(out, h.kv.num_workers() as c_int)
    })
}
