//! The waits that report requests (`pskv_wait`, `pskv_test`,
//! `pskv_wait_all`): a one-shot request's result once, then its handle
//! is freed; a persistent request's once per start (`persistent.rs`).

use std::ffi::c_int;

use super::request::{items, requests, PskvRequest, Req};
use super::{arg, guard, kv_err, put, set_error, Failure, PSKV_OK};
use crate::kvstore::{KvError, Ticket};

/// Waits on one request; None when a test found it not done.
fn wait_one(req: *mut PskvRequest, block: bool) -> Result<Option<Result<(), Failure>>, Failure> {
    let r = requests().get_with(req, PskvRequest::cached)?;
    let mut st = match r.try_lock() {
        Ok(st) => st,
        Err(std::sync::TryLockError::WouldBlock) if !block => return Ok(None),
        Err(_) => r.lock(),
    };
    let t = match &mut *st {
        Req::Once(t) => t,
        Req::Persistent(p) => return p.wait(block),
    };
    // Another thread's wait may have reported it while this one waited for
    // the lock: then its ticket says so at once (its result was taken) and
    // the handle is gone, which `remove` below reports.
    let Some(res) = report(t, block)? else {
        return Ok(None);
    };
    // Reported: the handle goes.
    requests().remove(req)?;
    Ok(Some(res))
}

/// A ticket's result, waited for (a look only, unless `block`): None when
/// a look found it not done; a wait that timed out is the error (the
/// request stays in flight).
pub(super) fn report(t: &mut Ticket, block: bool) -> Result<Option<Result<(), Failure>>, Failure> {
    if !block && !t.is_done() {
        return Ok(None);
    }
    match t.wait() {
        Err(e @ KvError::Timeout { .. }) => Err(kv_err(e)),
        res => Ok(Some(res.map_err(kv_err))),
    }
}

/// Waits until `request` is done and returns its result (`PSKV_OK` or
/// its error), once: the handle is freed then, and waiting again is an
/// argument error. Waits at most `PSKV_KVSTORE_TIMEOUT`; a wait that gives
/// up returns `PSKV_ERR_TIMEOUT` and leaves the request in flight (its
/// buffers still the store's): wait again. A persistent request is
/// reported the same way, once per start, and then is inactive, not freed
/// (`pskv_start` it again, or `pskv_request_free` it); waiting for one not
/// started is an argument error.
///
/// # Safety
/// Any value may be passed (handles are checked).
#[no_mangle]
pub unsafe extern "C" fn pskv_wait(request: *mut PskvRequest) -> c_int {
    guard(|| {
        wait_one(request, true)?
            .unwrap_or_else(|| Err(arg("the request is being waited for by another thread")))
    })
}

/// Whether `request` is done, without waiting: writes 1 to `*done` and
/// returns the request's result (then the handle is freed, as by
/// `pskv_wait`), or writes 0 and returns `PSKV_OK`.
///
/// # Safety
/// `done` points to writable storage; any `request` may be passed.
#[no_mangle]
pub unsafe extern "C" fn pskv_test(request: *mut PskvRequest, done: *mut c_int) -> c_int {
    guard(|| {
        if done.is_null() {
            return Err(arg("done is a null pointer"));
        }
        match wait_one(request, false)? {
            Some(res) => {
                put(done, 1)?;
                res
            }
            None => put(done, 0),
        }
    })
}

/// Waits for `n` requests, as `pskv_wait` each: writes each one's result
/// to `statuses[i]` (unless `statuses` is null) and returns `PSKV_OK` if
/// all succeeded, else the first failure's code (its message is
/// `pskv_last_error()`). Every request is waited for, whatever the others
/// gave.
///
/// # Safety
/// `requests` points to `n` handles (any values); `statuses` is null or
/// points to `n` writable ints.
#[no_mangle]
pub unsafe extern "C" fn pskv_wait_all(
    n: usize,
    requests: *const *mut PskvRequest,
    statuses: *mut c_int,
) -> c_int {
    let reqs = match items(requests, n, "requests") {
        Ok(r) => r,
        Err(e) => return guard(|| Err(e)),
    };
    let mut first: Option<(c_int, String)> = None;
    for (i, &r) in reqs.iter().enumerate() {
        let code = pskv_wait(r);
        if !statuses.is_null() {
            *statuses.add(i) = code;
        }
        if code != PSKV_OK && first.is_none() {
            let msg = super::last_error_text();
            first = Some((code, format!("request {i} of {n}: {msg}")));
        }
    }
    match first {
        Some((code, msg)) => {
            set_error(msg);
            code
        }
        None => PSKV_OK,
    }
}
