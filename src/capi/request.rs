//! Requests (ABI version 2): push, pull, push-pull and row pulls of many
//! keys at once on the caller's buffers in place, each returning a
//! `pskv_request` that `pskv_wait`, `pskv_test` or `pskv_wait_all` reports;
//! and `pskv_init_batch`. Persistent requests (version 3), made once and
//! started many times, are in `persistent.rs`; the waits that report
//! requests of both kinds in `wait.rs`.
//!
//! A request's states: *issued* (its ops are on the engine; its buffers
//! are the store's), then *done* once its ticket is (every op finished and
//! pskv holds none of its memory: `kvstore::Ticket`), then *reported* by
//! the one wait or test that returns its result, which frees the handle. A
//! wait that times out leaves it issued.
//!
//! A request's ticket waits for its tensors to be dropped (the call drops
//! them as it returns), except where the tensors stay: a persistent
//! request's, and the one a batch that failed part way waits on while it
//! still holds them; those keep their tensors (`KvStore::ticket_kept`: the
//! settle op checks that nothing else holds the caller's memory).

use std::ffi::c_int;
use std::sync::{Mutex, OnceLock};

use super::buffer::{place, PskvBuffer};
use super::handles::{Cache, Table};
use super::persistent::Persistent;
use super::store::{handle, PskvKvStore};
use super::{arg, guard, key, kv_err, Failure};
use crate::kvstore::{Key, KvError, KvStore, Tensor, Ticket, TicketPlan};

/// A request (opaque to C: a handle is a token for one of these).
pub struct PskvRequest {
    state: Mutex<Req>,
    /// Made by a `pskv_*_persistent` call (for good): its handle is looked
    /// up again and again, so lookups keep it in the thread's cache (a
    /// one-shot request's is looked up once).
    persistent: bool,
}

/// What a request handle names.
pub(super) enum Req {
    /// Issued by a `pskv_*_async` call: reported once, then freed.
    Once(Ticket),
    /// Made by a `pskv_*_persistent` call: started and reported many
    /// times, freed by `pskv_request_free`.
    Persistent(Persistent),
}

pub(super) fn requests() -> &'static Table<PskvRequest> {
    static REQUESTS: OnceLock<Table<PskvRequest>> = OnceLock::new();
    thread_local! {
        static REQUEST_CACHE: Cache<PskvRequest> = const { std::cell::RefCell::new(None) };
    }
    REQUESTS.get_or_init(|| Table::new("request", "a pskv_*_async call", &REQUEST_CACHE))
}

/// The `n` elements at `p` (none when `n` is 0; then `p` may be null).
///
/// # Safety
/// `p` is null or points to `n` elements.
pub(super) unsafe fn items<'a, T>(p: *const T, n: usize, what: &str) -> Result<&'a [T], Failure> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(arg(format!("{what} is a null pointer")));
    }
    if n > (isize::MAX as usize) / std::mem::size_of::<T>().max(1) {
        return Err(arg(format!("{what}: {n} items is more than memory holds")));
    }
    Ok(std::slice::from_raw_parts(p, n))
}

/// Names an argument in messages without a string made per call:
/// `values[3]`.
pub(super) struct Arg(pub(super) &'static str, pub(super) usize);

impl std::fmt::Display for Arg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.0, self.1)
    }
}

/// One key of a batch: its buffers, placed, and its priority.
pub(super) struct Entry {
    pub(super) key: Key,
    pub(super) values: Vec<Tensor>,
    pub(super) outs: Vec<Tensor>,
    pub(super) priority: i32,
}

fn issue_push(kv: &KvStore, e: &Entry) -> crate::kvstore::Result<()> {
    kv.push(e.key.clone(), &e.values, e.priority)
}

fn issue_pull(kv: &KvStore, e: &Entry) -> crate::kvstore::Result<()> {
    kv.pull(e.key.clone(), &e.outs, e.priority)
}

fn issue_pushpull(kv: &KvStore, e: &Entry) -> crate::kvstore::Result<()> {
    kv.pushpull(e.key.clone(), &e.values, &e.outs, e.priority)
}

/// What `init` fixed for a key: its shape and dtype.
type KeyShape = (Vec<usize>, crate::kvstore::DType);

/// Places buffer `b` for `key`, which holds `shape` of `dtype`: its element
/// count and dtype must be the key's, and its shape if it gives one; the
/// tensor takes the key's shape.
///
/// # Safety
/// As `place`.
unsafe fn placed_for(
    kv: &KvStore,
    key: &Key,
    (shape, dtype): &KeyShape,
    b: &PskvBuffer,
    what: &dyn std::fmt::Display,
) -> Result<Tensor, Failure> {
    let n: usize = shape.iter().product();
    let t = place(kv.engine(), b, None, what)?;
    if t.len() != n || t.dtype() != *dtype || (b.ndim != 0 && t.shape() != &shape[..]) {
        return Err((
            super::PSKV_ERR_KVSTORE,
            format!(
                "{what}: key {key} holds {n} elements of {} (shape {shape:?}), the buffer {} elements of {} (shape {:?})",
                dtype.name(),
                t.len(),
                t.dtype().name(),
                t.shape()
            ),
        ));
    }
    if shape.len() == 1 {
        return Ok(t);
    }
    // The key's shape over the same memory.
    place(kv.engine(), b, Some(shape), what)
}

/// Reads a batch: `n` keys, with values and/or outputs, and priorities
/// (null: 0 each). Keys given twice are one entry (MXNet's grouping: a
/// push sums their values, a pull fills every output), at the higher
/// priority.
///
/// # Safety
/// The pointers are null or point to `n` items each; the buffers are as
/// `pskv_buffer` describes.
pub(super) unsafe fn batch(
    kv: &KvStore,
    n: usize,
    keys: *const i64,
    values: Option<*const PskvBuffer>,
    outs: Option<*const PskvBuffer>,
    priorities: *const c_int,
) -> Result<Vec<Entry>, Failure> {
    if n == 0 {
        return Err(arg("a request of 0 keys"));
    }
    let keys = items(keys, n, "keys")?;
    let values = values.map(|v| items(v, n, "values")).transpose()?;
    let outs = outs.map(|o| items(o, n, "outs")).transpose()?;
    let prios = if priorities.is_null() {
        None
    } else {
        Some(items(priorities, n, "priorities")?)
    };
    let mut out: Vec<Entry> = Vec::with_capacity(n);
    for i in 0..n {
        let k = key(keys[i])?;
        let p = prios.map_or(0, |p| p[i]);
        // One lookup for the key's values and outputs.
        let (shape, dtype, _) = kv.key_info(&k).map_err(kv_err)?;
        let held = (shape, dtype);
        let v = match values {
            Some(v) => Some(placed_for(kv, &k, &held, &v[i], &Arg("values", i))?),
            None => None,
        };
        let o = match outs {
            Some(o) => Some(placed_for(kv, &k, &held, &o[i], &Arg("outs", i))?),
            None => None,
        };
        match out.iter_mut().find(|e| e.key == k) {
            Some(_) if values.is_some() && outs.is_some() => {
                return Err(arg(format!(
                    "pushpull: key {k} is given twice; give each key once"
                )))
            }
            Some(e) => {
                e.values.extend(v);
                e.outs.extend(o);
                e.priority = e.priority.max(p);
            }
            None => out.push(Entry {
                key: k,
                values: v.into_iter().collect(),
                outs: o.into_iter().collect(),
                priority: p,
            }),
        }
    }
    Ok(out)
}

/// Issues each entry of `entries` with `issue`; the request's ticket
/// (by `plan`, made for `entries`, or made from them when None). If
/// an entry fails to issue, the entries before it (and perhaps part of it)
/// are in flight: the call waits for all of them, so that their buffers
/// are the caller's again when it returns the error naming the key; the
/// ticket of that part comes back with the error: done, or in flight still
/// if that wait timed out (`Partial::in_flight`; then the error ends with
/// `in_flight_note`, what the caller does with it).
pub(super) fn issue_entries(
    kv: &KvStore,
    entries: &[Entry],
    plan: Option<&TicketPlan>,
    in_flight_note: &str,
    issue: impl Fn(&KvStore, usize, &Entry) -> crate::kvstore::Result<()>,
) -> Result<Ticket, (Failure, Option<Partial>)> {
    for (i, e) in entries.iter().enumerate() {
        let Err(err) = issue(kv, i, e) else { continue };
        let mut msg = format!("key {}: {err}", e.key);
        let tried = &entries[..=i];
        let code = kv_err(err).0;
        // Kept: this call still holds the entries' tensors while it waits.
        return match ticket(kv, tried, None, true) {
            Ok(mut t) => {
                let waited = t.wait();
                let in_flight = matches!(waited, Err(KvError::Timeout { .. }));
                match waited {
                    Ok(()) if i > 0 => msg.push_str(&format!(
                        " (the {i} key(s) before it in the batch were issued and are done)"
                    )),
                    Ok(()) => {}
                    Err(KvError::Timeout { after, .. }) => msg.push_str(&format!(
                        " (the batch's buffers were still in flight after {after:?}: {in_flight_note})"
                    )),
                    Err(e) if i > 0 => msg.push_str(&format!(
                        " (the {i} key(s) before it in the batch were issued, and failed: {e})"
                    )),
                    Err(_) => {}
                }
                let ticket = Box::new(t);
                Err(((code, msg), Some(Partial { ticket, in_flight })))
            }
            Err(e) => {
                msg.push_str(&format!(" (and its ticket failed: {e})"));
                Err(((code, msg), None))
            }
        };
    }
    ticket(kv, entries, plan, false).map_err(|e| (kv_err(e), None))
}

/// The ticket of the part of a batch issued before an entry failed.
pub(super) struct Partial {
    pub(super) ticket: Box<Ticket>,
    /// Its wait timed out: it was still in flight.
    pub(super) in_flight: bool,
}

/// Issues a `pskv_*_async` batch and registers its request; a batch that
/// failed part way, with its issued part still in flight at the timeout,
/// leaves that part's ticket to the store until `pskv_free`.
fn issue(
    h: &PskvKvStore,
    entries: Vec<Entry>,
    out: *mut *mut PskvRequest,
    issue: impl Fn(&KvStore, &Entry) -> crate::kvstore::Result<()>,
) -> Result<(), Failure> {
    if out.is_null() {
        return Err(arg("request is a null pointer"));
    }
    let note = "they stay pskv's until pskv_free";
    match issue_entries(&h.kv, &entries, None, note, |kv, _, e| issue(kv, e)) {
        Ok(t) => {
            // SAFETY: `out` is not null (checked) and points to writable
            // storage (the caller's contract).
            unsafe { *out = requests().insert(PskvRequest::new(Req::Once(t))) };
            Ok(())
        }
        Err((f, part)) => {
            if let Some(p) = part.filter(|p| p.in_flight) {
                // Kept with the store until `pskv_free`.
                h.orphans
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(*p.ticket);
            }
            Err(f)
        }
    }
}

impl PskvRequest {
    pub(super) fn new(r: Req) -> PskvRequest {
        PskvRequest {
            persistent: matches!(r, Req::Persistent(_)),
            state: Mutex::new(r),
        }
    }

    /// Whether lookups of its handle keep it in the thread's cache.
    pub(super) fn cached(&self) -> bool {
        self.persistent
    }

    /// Its state if no other thread holds it now.
    pub(super) fn try_lock(&self) -> std::sync::TryLockResult<std::sync::MutexGuard<'_, Req>> {
        self.state.try_lock()
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Req> {
        // A panic under this lock leaves the request whole (its ticket or
        // its persistent state): go on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A batch call: reads the batch (`n` keys and priorities), issues each
/// entry with `f`, registers the request.
///
/// # Safety
/// As `pskv_push_async`.
unsafe fn call(
    kv: *mut PskvKvStore,
    (n, keys, priorities): (usize, *const i64, *const c_int),
    values: Option<*const PskvBuffer>,
    outs: Option<*const PskvBuffer>,
    request: *mut *mut PskvRequest,
    f: impl Fn(&KvStore, &Entry) -> crate::kvstore::Result<()>,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let b = batch(&h.kv, n, keys, values, outs, priorities)?;
        issue(&h, b, request, f)
    })
}

/// The tensors of `entries`, in the order a ticket takes them: each
/// entry's values, then its outputs.
pub(super) fn tensors_of(entries: &[Entry]) -> Vec<Tensor> {
    entries
        .iter()
        .flat_map(|e| e.values.iter().chain(&e.outs).cloned())
        .collect()
}

/// The ticket of `entries`: by `plan`, made for them (a persistent
/// request's); else, with `kept`, one that keeps its tensors (see the
/// module docs), else one that waits for them to be dropped (a
/// `pskv_*_async` request's: its caller drops them as it returns).
fn ticket(
    kv: &KvStore,
    entries: &[Entry],
    plan: Option<&TicketPlan>,
    kept: bool,
) -> crate::kvstore::Result<Ticket> {
    match plan {
        Some(p) => kv.ticket_for(p),
        None if kept => kv.ticket_kept(&keys_of(entries), &tensors_of(entries)),
        None => kv.ticket(&keys_of(entries), &tensors_of(entries)),
    }
}

/// The keys of `entries`, in order.
pub(super) fn keys_of(entries: &[Entry]) -> Vec<Key> {
    entries.iter().map(|e| e.key.clone()).collect()
}

/// Pushes `n` keys: `values[i]` to `keys[i]` at priority `priorities[i]`
/// (null: 0 each; higher goes first), and writes the request to
/// `*request`. A key given twice has its values summed, as in MXNet. The
/// values are read in place: do not write them until the request is done.
///
/// # Safety
/// `kv` is a live handle; `keys`, `values` and `priorities` (unless null)
/// point to `n` items; each buffer is as `pskv_buffer` describes and stays
/// valid until the request is done; `request` points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pskv_push_async(
    kv: *mut PskvKvStore,
    n: usize,
    keys: *const i64,
    values: *const PskvBuffer,
    priorities: *const c_int,
    request: *mut *mut PskvRequest,
) -> c_int {
    let ks = (n, keys, priorities);
    call(kv, ks, Some(values), None, request, issue_push)
}

/// Pulls `n` keys: `keys[i]`'s value into `outs[i]`, after every push of
/// this store issued before it, and writes the request to `*request`.
/// The outputs hold the values once the request is done; do not read or
/// write them before.
///
/// # Safety
/// As `pskv_push_async`, with `outs` for `values`.
#[no_mangle]
pub unsafe extern "C" fn pskv_pull_async(
    kv: *mut PskvKvStore,
    n: usize,
    keys: *const i64,
    outs: *const PskvBuffer,
    priorities: *const c_int,
    request: *mut *mut PskvRequest,
) -> c_int {
    let ks = (n, keys, priorities);
    call(kv, ks, None, Some(outs), request, issue_pull)
}

/// Pushes `values[i]` to `keys[i]` and pulls the result into `outs[i]`
/// (one round trip per key in a distributed store); `values[i]` and
/// `outs[i]` may be the same memory. Each key at most once.
///
/// # Safety
/// As `pskv_push_async` and `pskv_pull_async`.
#[no_mangle]
pub unsafe extern "C" fn pskv_pushpull_async(
    kv: *mut PskvKvStore,
    n: usize,
    keys: *const i64,
    values: *const PskvBuffer,
    outs: *const PskvBuffer,
    priorities: *const c_int,
    request: *mut *mut PskvRequest,
) -> c_int {
    let ks = (n, keys, priorities);
    call(kv, ks, Some(values), Some(outs), request, issue_pushpull)
}

/// Pulls rows `row_ids[0..nrows]` (any order, repeats allowed) of `key`
/// into `out`, `nrows` rows of the key's row length (the elements of one
/// row of its first dimension): row `i` of `out` is row `row_ids[i]`, as
/// MXNet's `row_sparse_pull` gives them (an embedding lookup). `row_ids`
/// is copied before the call returns; `out` is host memory (CPU or
/// pinned), used as `pskv_pull_async`'s outputs are.
///
/// # Safety
/// `kv` is a live handle; `row_ids` points to `nrows` ids; `out` to one
/// buffer as `pskv_buffer` describes; `request` to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pskv_pull_rows_async(
    kv: *mut PskvKvStore,
    key: i64,
    row_ids: *const i64,
    nrows: usize,
    out: *const PskvBuffer,
    priority: c_int,
    request: *mut *mut PskvRequest,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        let k = self::key(key)?;
        if nrows == 0 {
            return Err(arg("a row pull of 0 rows"));
        }
        let ids = items(row_ids, nrows, "row_ids")?.to_vec();
        let o = out.as_ref().ok_or_else(|| arg("out is a null pointer"))?;
        let t = place(h.kv.engine(), o, None, &"out")?;
        let e = Entry {
            key: k,
            values: Vec::new(),
            outs: vec![t],
            priority,
        };
        issue(&h, vec![e], request, |kv, e| {
            kv.pull_rows(e.key.clone(), &ids, &e.outs[0], e.priority)
        })
    })
}

/// Initializes `n` keys at once: `keys[i]` with `values[i]` (its dtype
/// and element count are the key's from now on). Collective, as
/// `pskv_init`, with one barrier for the whole batch instead of one per
/// key. Returns when the keys are initialized; the values may be reused
/// then.
///
/// # Safety
/// `kv` is a live handle; `keys` and `values` point to `n` items; each
/// buffer is as `pskv_buffer` describes.
#[no_mangle]
pub unsafe extern "C" fn pskv_init_batch(
    kv: *mut PskvKvStore,
    n: usize,
    keys: *const i64,
    values: *const PskvBuffer,
) -> c_int {
    guard(|| {
        let h = handle(kv)?;
        if n == 0 {
            return Err(arg("an init of 0 keys"));
        }
        let ks = items(keys, n, "keys")?;
        let vs = items(values, n, "values")?;
        let mut all = Vec::with_capacity(n);
        for i in 0..n {
            let t = place(h.kv.engine(), &vs[i], None, &Arg("values", i))?;
            all.push((key(ks[i])?, t));
        }
        let inited = h.kv.init_many(&all);
        // The values are read by engine ops, also when the init failed part
        // way: wait for them (and for pskv to let go of the memory) before
        // the caller may reuse it.
        let keys: Vec<Key> = all.iter().map(|(k, _)| k.clone()).collect();
        let tensors: Vec<Tensor> = all.into_iter().map(|(_, t)| t).collect();
        let mut t = h.kv.ticket(&keys, &tensors).map_err(kv_err)?;
        // The ticket holds what it needs; ours would keep the memory held.
        drop(tensors);
        let settled = t.wait();
        if let Err(KvError::Timeout { .. }) = settled {
            h.orphans.lock().unwrap_or_else(|p| p.into_inner()).push(t);
        }
        inited.map_err(kv_err)?;
        settled.map_err(kv_err)
    })
}
