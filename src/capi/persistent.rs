//! Persistent requests (ABI version 3): a push, pull or push-pull of a
//! batch of keys over the same buffers, made once by a
//! `pskv_*_persistent` call and started each round by `pskv_start` (MPI's
//! `MPI_Send_init` and `MPI_Start`). The tensors over the caller's buffers,
//! the keys' lookups and the checks of every buffer are done once, when the
//! request is made, not at every start: each start issues its keys' calls
//! planned once (`KvStore::plan`, `KvStore::issue`) and takes a ticket by
//! a plan. A training loop that moves the same buffers every step pays
//! less per start than per call: on a `local` store a 4 B push-pull's
//! start and wait cost about 0.64x the Rust API's plain call (a `pushpull`
//! and a `wait_to_read` on tensors made once) and about 80 ns more than
//! the same plans used from Rust, where a `pskv_*_async` call costs 1.1 µs
//! more than the plain call (BENCHMARKS.md).
//!
//! # States
//!
//! ```text
//!            pskv_start                 pskv_wait / pskv_test (done)
//!  INACTIVE ───────────► ACTIVE ──────────────────────────────────► INACTIVE
//!     │                    │  └── a wait that times out: ACTIVE still
//!     │ pskv_request_free  └── pskv_request_free: an error (wait first)
//!     ▼
//!   freed
//! ```
//!
//! - INACTIVE: the buffers are the caller's (read or write them freely);
//!   a wait or test is an argument error, as is a start of a request whose
//!   store was freed (the request holds the store's memory, and its
//!   tensors the engine's, until it is freed too).
//! - ACTIVE: as a `pskv_*_async` request between its call and its report:
//!   do not write its inputs, nor read or write its outputs.
//! - A start that fails part way (a key refused when issued) waits for the
//!   part it issued and leaves the request INACTIVE, returning the error;
//!   if that part is still in flight at the timeout, the request stays
//!   ACTIVE with it (the error says so): wait for it before the next start.
//!
//! The request's ticket keeps its tensors (`KvStore::ticket_kept`): when a
//! ticket names some spent (pskv let go of their memory, see
//! `kvstore/src/ticket/settle.rs`), the report makes them again over the same
//! memory before the request can be started again.

use std::ffi::c_int;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::buffer::PskvBuffer;
use super::request::{
    batch, issue_entries, items, keys_of, requests, tensors_of, Entry, PskvRequest, Req,
};
use super::store::{handle, PskvKvStore};
use super::wait::report;
use super::{arg, guard, kv_err, set_error, Failure, PSKV_OK};
use crate::kvstore::{Call, CallPlan, KvStore, Ticket, TicketPlan};

/// A persistent request's state (see the module docs).
pub(super) struct Persistent {
    /// The store (a start checks that it was not freed).
    store: Arc<PskvKvStore>,
    entries: Vec<Entry>,
    call: Call,
    /// What every start issues, looked up and checked once; None when
    /// tensors were remade since (made again at the next start).
    plans: Option<Plans>,
    /// The ticket of the start not reported yet (ACTIVE).
    active: Option<Ticket>,
}

/// A persistent request's plans: each entry's call (`KvStore::plan`) and
/// the ticket's keys.
struct Plans {
    calls: Vec<CallPlan>,
    ticket: TicketPlan,
}

impl Plans {
    fn new(kv: &KvStore, entries: &[Entry], call: Call) -> Result<Plans, Failure> {
        let calls = entries
            .iter()
            .map(|e| kv.plan(call, e.key.clone(), &e.values, &e.outs, e.priority))
            .collect::<Result<_, _>>()
            .map_err(kv_err)?;
        let ticket = kv.ticket_plan(&keys_of(entries), &tensors_of(entries));
        Ok(Plans {
            calls,
            ticket: ticket.map_err(kv_err)?,
        })
    }
}

impl Persistent {
    fn new(store: Arc<PskvKvStore>, entries: Vec<Entry>, call: Call, plans: Plans) -> Persistent {
        Persistent {
            plans: Some(plans),
            store,
            entries,
            call,
            active: None,
        }
    }

    fn start(&mut self) -> Result<(), Failure> {
        if self.active.is_some() {
            return Err(arg(
                "the persistent request is started already: wait for it (pskv_wait, pskv_test) before starting it again",
            ));
        }
        let h = &self.store;
        if h.freed.load(Ordering::Acquire) {
            return Err(arg(
                "the persistent request's store was freed (pskv_free): free the request too",
            ));
        }
        let plans = match &mut self.plans {
            Some(p) => p,
            none => none.insert(Plans::new(&h.kv, &self.entries, self.call)?),
        };
        let note = "the request stays started: wait for it before starting it again";
        let calls = &plans.calls;
        let issue = |kv: &KvStore, i: usize, _: &Entry| kv.issue(&calls[i]);
        let issued = issue_entries(&h.kv, &self.entries, Some(&plans.ticket), note, issue);
        match issued {
            Ok(t) => {
                self.active = Some(t);
                Ok(())
            }
            Err((f, None)) => Err(f),
            Err((f, Some(p))) if p.in_flight => {
                self.active = Some(*p.ticket);
                Err(f)
            }
            Err((f, Some(p))) => {
                // The start's error first; a remake's only if it failed too.
                self.remake(p.ticket.spent())?;
                Err(f)
            }
        }
    }

    /// Waits for the active start (a look only, unless `block`); None when
    /// a look found it not done.
    pub(super) fn wait(&mut self, block: bool) -> Result<Option<Result<(), Failure>>, Failure> {
        let Some(t) = &mut self.active else {
            return Err(arg(
                "the persistent request is not started (pskv_start it first; each start is reported once)",
            ));
        };
        let Some(res) = report(t, block)? else {
            return Ok(None);
        };
        let t = self.active.take().expect("active");
        // The request's own error first, then a remake's.
        let remade = self.remake(t.spent());
        Ok(Some(res.and(remade)))
    }

    /// Makes the spent tensors (by index in `tensors_of`'s order: each
    /// entry's values, then its outputs) again over the same memory.
    fn remake(&mut self, spent: &[usize]) -> Result<(), Failure> {
        if spent.is_empty() {
            return Ok(());
        }
        // Name the old tensors: made again at the next start.
        self.plans = None;
        let all = self
            .entries
            .iter_mut()
            .flat_map(|e| e.values.iter_mut().chain(e.outs.iter_mut()));
        for (_, t) in all.enumerate().filter(|(i, _)| spent.contains(i)) {
            // SAFETY: the caller's memory stays valid until the request is
            // freed (`pskv_*_persistent`'s contract); pskv let go of it.
            *t = unsafe { t.remade() }
                .map_err(kv_err)?
                .ok_or_else(|| arg("internal: a spent tensor not over host memory"))?;
        }
        Ok(())
    }
}

/// Makes a persistent request of a batch (`n` keys, as `pskv_*_async`
/// reads them) that issues `call` for each key.
///
/// # Safety
/// As `pskv_push_persistent`.
unsafe fn make(
    kv: *mut PskvKvStore,
    (n, keys, priorities): (usize, *const i64, *const c_int),
    values: Option<*const PskvBuffer>,
    outs: Option<*const PskvBuffer>,
    request: *mut *mut PskvRequest,
    call: Call,
) -> c_int {
    guard(|| {
        if request.is_null() {
            return Err(arg("request is a null pointer"));
        }
        let h = handle(kv)?;
        let b = batch(&h.kv, n, keys, values, outs, priorities)?;
        let plans = Plans::new(&h.kv, &b, call)?;
        let p = Persistent::new(h, b, call, plans);
        *request = requests().insert(PskvRequest::new(Req::Persistent(p)));
        Ok(())
    })
}

/// Makes a persistent push of `n` keys: `values[i]` to `keys[i]` at
/// priority `priorities[i]` (null: 0 each), as `pskv_push_async` issues
/// it, each time `pskv_start` starts it; writes the request to
/// `*request`, inactive. The buffers are checked and recorded now; the
/// values are read in place at each start: leave them alone from a start
/// until its wait reports it. Free it with `pskv_request_free`.
///
/// # Safety
/// `kv` is a live handle; `keys`, `values` and `priorities` (unless null)
/// point to `n` items; each buffer is as `pskv_buffer` describes and stays
/// valid until the request is freed; `request` points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn pskv_push_persistent(
    kv: *mut PskvKvStore,
    n: usize,
    keys: *const i64,
    values: *const PskvBuffer,
    priorities: *const c_int,
    request: *mut *mut PskvRequest,
) -> c_int {
    let ks = (n, keys, priorities);
    make(kv, ks, Some(values), None, request, Call::Push)
}

/// Makes a persistent pull of `n` keys into `outs`, as `pskv_pull_async`
/// issues it, each time `pskv_start` starts it (see
/// `pskv_push_persistent`).
///
/// # Safety
/// As `pskv_push_persistent`, with `outs` for `values`.
#[no_mangle]
pub unsafe extern "C" fn pskv_pull_persistent(
    kv: *mut PskvKvStore,
    n: usize,
    keys: *const i64,
    outs: *const PskvBuffer,
    priorities: *const c_int,
    request: *mut *mut PskvRequest,
) -> c_int {
    let ks = (n, keys, priorities);
    make(kv, ks, None, Some(outs), request, Call::Pull)
}

/// Makes a persistent push-pull of `n` keys, `values[i]` into `outs[i]`,
/// as `pskv_pushpull_async` issues it, each time `pskv_start` starts it
/// (see `pskv_push_persistent`).
///
/// # Safety
/// As `pskv_push_persistent`, with `outs` as well.
#[no_mangle]
pub unsafe extern "C" fn pskv_pushpull_persistent(
    kv: *mut PskvKvStore,
    n: usize,
    keys: *const i64,
    values: *const PskvBuffer,
    outs: *const PskvBuffer,
    priorities: *const c_int,
    request: *mut *mut PskvRequest,
) -> c_int {
    let ks = (n, keys, priorities);
    make(kv, ks, Some(values), Some(outs), request, Call::PushPull)
}

/// Starts a persistent request: issues its batch as its `pskv_*_async`
/// call would, on the buffers it was made with. Report it with
/// `pskv_wait`, `pskv_test` or `pskv_wait_all` before starting it again.
/// A start that fails part way returns the error once the keys it issued
/// are done, and the request is inactive again (unless they were still in
/// flight at the timeout: then it stays started; the error says so).
///
/// # Safety
/// Any value may be passed (handles are checked).
#[no_mangle]
pub unsafe extern "C" fn pskv_start(request: *mut PskvRequest) -> c_int {
    guard(|| {
        let r = requests().get_with(request, PskvRequest::cached)?;
        let mut st = r.lock();
        match &mut *st {
            Req::Persistent(p) => p.start(),
            Req::Once(_) => Err(arg(
                "the request is not persistent (made by a pskv_*_async call, it started then); pskv_start takes requests of pskv_*_persistent",
            )),
        }
    })
}

/// Starts `n` persistent requests, in order, as `pskv_start` each; stops
/// at the first that fails and returns its error, naming it (the requests
/// before it are started: report them).
///
/// # Safety
/// `requests` points to `n` handles (any values).
#[no_mangle]
pub unsafe extern "C" fn pskv_start_all(n: usize, requests: *const *mut PskvRequest) -> c_int {
    let reqs = match items(requests, n, "requests") {
        Ok(r) => r,
        Err(e) => return guard(|| Err(e)),
    };
    for (i, &r) in reqs.iter().enumerate() {
        let code = pskv_start(r);
        if code != PSKV_OK {
            let msg = super::last_error_text();
            set_error(format!(
                "request {i} of {n}: {msg} (the {i} before it were started)"
            ));
            return code;
        }
    }
    PSKV_OK
}

/// Frees a persistent request that is not started (or whose start was
/// reported). Freeing a started one is an argument error (wait for it
/// first); a request of a `pskv_*_async` call is freed by the wait that
/// reports it, not here. Null is accepted.
///
/// # Safety
/// Any value may be passed (handles are checked).
#[no_mangle]
pub unsafe extern "C" fn pskv_request_free(request: *mut PskvRequest) -> c_int {
    guard(|| {
        if request.is_null() {
            return Ok(());
        }
        let r = requests().get_with(request, PskvRequest::cached)?;
        // Held across the removal: no start slips in between.
        let st = r.lock();
        match &*st {
            Req::Once(_) => Err(arg(
                "the request is not persistent: a request of a pskv_*_async call is freed by the wait that reports it",
            )),
            Req::Persistent(p) if p.active.is_some() => Err(arg(
                "the persistent request is started: wait for it (pskv_wait, pskv_test) before freeing it",
            )),
            Req::Persistent(_) => requests().remove(request).map(drop),
        }
    })
}
