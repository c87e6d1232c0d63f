//! The C ABI (`include/pskv.h`, generated from these files by cbindgen).
//!
//! Every function returns a status: `PSKV_OK` (0) or a negative error code;
//! `pskv_last_error()` then gives the message, for the calling thread. No
//! function aborts the caller: null pointers and bad arguments are errors,
//! and a panic inside pskv is caught and reported as `PSKV_ERR_INTERNAL`.
//!
//! Two ways to move values:
//!
//! - **Requests** (`request.rs`, ABI version 2): `pskv_push_async`,
//!   `pskv_pull_async`, `pskv_pushpull_async` and
//!   `pskv_pull_rows_async` take many keys (rows) at once, each key with
//!   its own priority, as `pskv_buffer` descriptors (pointer, element count,
//!   dtype, device), and return a `pskv_request` at once. The buffers are
//!   used in place, not copied: the caller leaves them alone (no writes to
//!   inputs, no reads or writes of outputs) until `pskv_wait`,
//!   `pskv_test` or `pskv_wait_all` reports the request done. A failed
//!   request's error is reported there, once.
//! - **Persistent requests** (`persistent.rs`, version 3):
//!   `pskv_push_persistent`, `pskv_pull_persistent` and
//!   `pskv_pushpull_persistent` make a request over a batch's buffers
//!   once; `pskv_start` starts it each round and the same waits report
//!   each start; `pskv_request_free` frees it.
//! - **Blocking calls** (`blocking.rs`, version 1): `pskv_push` and
//!   friends take float32 buffers and copy them: a push's input may be
//!   reused when the call returns, a pull returns once `out` holds the
//!   value. The `_device` ones take GPU memory the same way.
//!
//! A handle (store or request) is a token, not an address: it names an
//! entry of a table under a number never used again, and every call looks
//! it up (`handles.rs`). So a handle used after it was freed (a store after
//! `pskv_free`, a request after the wait that reported it), freed twice, or
//! made up is an argument error, not a crash; and a store freed while
//! another thread still uses it lives until that call returns.
//!
//! Threads: every function may be called from any thread, concurrently,
//! on one store or several; a request may be waited for from a thread other
//! than the one that issued it. Operations of one store on one key run in
//! the order they were issued, whatever thread issued them.

mod blocking;
mod buffer;
mod handles;
mod persistent;
mod request;
mod store;
mod wait;

#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use blocking::*;
pub use buffer::*;
pub use persistent::*;
pub use request::*;
pub use store::*;
pub use wait::*;

/// The version of this interface: a program built against this header
/// checks it against `pskv_abi_version()` at run time.
pub const PSKV_ABI_VERSION: c_int = 3;

/// Success.
pub const PSKV_OK: c_int = 0;
/// A null pointer, a bad string or a bad length was passed.
pub const PSKV_ERR_ARGUMENT: c_int = -1;
/// The kvstore refused or failed the operation (unknown key, wrong size,
/// a node that died, ...): see `pskv_last_error`.
pub const PSKV_ERR_KVSTORE: c_int = -2;
/// pskv failed internally (a caught panic): see `pskv_last_error`.
pub const PSKV_ERR_INTERNAL: c_int = -3;
/// A wait gave up at its time limit; the request is still in flight (its
/// buffers stay the store's) and may be waited for again.
pub const PSKV_ERR_TIMEOUT: c_int = -4;
/// The argument is valid but this build of pskv cannot do it yet (a dtype
/// without kernels, ...).
pub const PSKV_ERR_UNSUPPORTED: c_int = -5;

/// An error: a status code and its message.
pub(crate) type Failure = (c_int, String);

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl Into<String>) {
    let mut m = msg.into();
    m.retain(|c| c != '\0');
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(m).unwrap_or_default());
}

/// Runs `f`, turning its error or panic into a status code.
fn guard(f: impl FnOnce() -> Result<(), Failure>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => PSKV_OK,
        Ok(Err((code, msg))) => {
            set_error(msg);
            code
        }
        Err(p) => {
            set_error(format!(
                "internal error (panic): {}",
                panic_text(p.as_ref())
            ));
            PSKV_ERR_INTERNAL
        }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn arg(msg: impl Into<String>) -> Failure {
    (PSKV_ERR_ARGUMENT, msg.into())
}

fn kv_err(e: crate::kvstore::KvError) -> Failure {
    let code = match e {
        crate::kvstore::KvError::Timeout { .. } => PSKV_ERR_TIMEOUT,
        _ => PSKV_ERR_KVSTORE,
    };
    (code, e.to_string())
}

/// # Safety
/// `p` is null or a valid NUL-terminated string.
unsafe fn string<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(arg(format!("{what} is a null pointer")));
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|_| arg(format!("{what} is not UTF-8")))
}

/// `*out = v`, refusing a null `out`.
///
/// # Safety
/// `out` is null or points to writable storage.
unsafe fn put<T>(out: *mut T, v: T) -> Result<(), Failure> {
    let o = out.as_mut().ok_or_else(|| arg("out is a null pointer"))?;
    *o = v;
    Ok(())
}

fn key(k: i64) -> Result<crate::kvstore::Key, Failure> {
    crate::kvstore::Key::int(k).map_err(kv_err)
}

/// The calling thread's last error message, as a Rust string (for calls
/// that wrap another call's error).
fn last_error_text() -> String {
    LAST_ERROR.with(|e| e.borrow().to_string_lossy().into_owned())
}

/// The message of the calling thread's last error ("" if none). The pointer
/// stays valid until this thread's next failing call.
#[no_mangle]
pub extern "C" fn pskv_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The ABI version of the library (`PSKV_ABI_VERSION` of the header it was
/// built with). A program compares it with its header's at start-up.
#[no_mangle]
pub extern "C" fn pskv_abi_version() -> c_int {
    PSKV_ABI_VERSION
}

/// The library's version, "MAJOR.MINOR.PATCH" (a static string).
#[no_mangle]
pub extern "C" fn pskv_version() -> *const c_char {
    static V: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    V.as_ptr()
}
