//! How pskv's errors reach Python: `pskv.PskvError` (a `RuntimeError`)
//! for what the kvstore refused or failed, `KeyError` for a key never
//! initialized, `ValueError` for a wrong size, type or argument,
//! `TimeoutError` for a wait past its limit, `pskv.Unsupported` (a
//! `NotImplementedError`) for what this build cannot do yet. Every message
//! is pskv's own, naming the key and the sizes.

use pskv_kvstore::KvError;
use pyo3::create_exception;
use pyo3::exceptions::{
    PyKeyError, PyNotImplementedError, PyRuntimeError, PyTimeoutError, PyValueError,
};
use pyo3::PyErr;

create_exception!(
    pskv,
    PskvError,
    PyRuntimeError,
    "An operation of pskv failed."
);
create_exception!(
    pskv,
    Unsupported,
    PyNotImplementedError,
    "Valid, but this build of pskv cannot do it yet."
);

/// A kvstore error as a Python exception.
pub(crate) fn kv_err(e: KvError) -> PyErr {
    let msg = e.to_string();
    match e {
        KvError::NotInitialized { .. } => PyKeyError::new_err(msg),
        KvError::Mismatch { .. }
        | KvError::Invalid(_)
        | KvError::AlreadyInitialized { .. }
        | KvError::UnknownKind(_) => PyValueError::new_err(msg),
        KvError::Unsupported { .. } => Unsupported::new_err(msg),
        KvError::Timeout { .. } => PyTimeoutError::new_err(msg),
        _ => PskvError::new_err(msg),
    }
}
