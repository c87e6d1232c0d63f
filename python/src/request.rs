//! `pskv.Request`: one push, pull or push-pull in flight, and its result.
//!
//! States: *in flight* (its ticket is live; it keeps its arrays alive),
//! then *finished* (the ticket reported: the outcome is kept and the arrays
//! are let go). `wait` and `done` move it on; a store keeps every request
//! it issued until finished, so arrays stay alive even when the caller
//! drops the `Request`.
//!
//! Subtle: the ticket's mutex is taken only with the GIL released, and
//! the GIL only with that mutex released or not held, so that two threads
//! waiting on one request cannot deadlock each other (one holding the
//! mutex and wanting the GIL back, the other the other way round).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pskv_kvstore::{KvError, Ticket};
use pyo3::exceptions::PyTimeoutError;
use pyo3::prelude::*;

use crate::errors::kv_err;

/// What a look at the ticket found.
enum Look {
    /// Finished before (the outcome is stored).
    Finished,
    /// Not done yet.
    NotYet,
    /// Done now, with this result.
    Now(Result<(), KvError>),
}

pub(crate) struct Inner {
    ticket: Mutex<Option<Ticket>>,
    outcome: Mutex<Option<Result<(), PyErr>>>,
    keep: Mutex<Vec<PyObject>>,
    /// Its error was raised to the caller already.
    reported: AtomicBool,
    what: String,
}

impl Inner {
    pub(crate) fn new(ticket: Ticket, keep: Vec<PyObject>) -> Arc<Inner> {
        Arc::new(Inner {
            what: ticket.what(),
            ticket: Mutex::new(Some(ticket)),
            outcome: Mutex::new(None),
            keep: Mutex::new(keep),
            reported: AtomicBool::new(false),
        })
    }

    /// Moves the request on: `wait` None polls; `Some(None)` waits up to
    /// the store's timeout, `Some(Some(d))` up to `d`. Whether it is
    /// finished; a wait that times out is a `TimeoutError`.
    pub(crate) fn settle(&self, py: Python<'_>, wait: Option<Option<Duration>>) -> PyResult<bool> {
        let look = py.allow_threads(|| {
            let mut t = match (wait, self.ticket.try_lock()) {
                (_, Ok(t)) => t,
                // A poll does not wait for another thread's wait.
                (None, Err(std::sync::TryLockError::WouldBlock)) => return Look::NotYet,
                (_, Err(_)) => self.ticket.lock().unwrap_or_else(|p| p.into_inner()),
            };
            let Some(ticket) = t.as_mut() else {
                return Look::Finished;
            };
            let r = match wait {
                None if !ticket.is_done() => return Look::NotYet,
                None | Some(None) => ticket.wait(),
                Some(Some(d)) => ticket.wait_for(d),
            };
            if !matches!(r, Err(KvError::Timeout { .. })) {
                *t = None;
            }
            Look::Now(r)
        });
        match look {
            Look::Finished => Ok(true),
            Look::NotYet => Ok(false),
            Look::Now(Err(e @ KvError::Timeout { .. })) => Err(PyTimeoutError::new_err(format!(
                "{e}; the request is still in flight"
            ))),
            Look::Now(r) => {
                *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(r.map_err(kv_err));
                // The arrays may go now (under the GIL: their references
                // drop at once).
                let keep =
                    std::mem::take(&mut *self.keep.lock().unwrap_or_else(|p| p.into_inner()));
                drop(keep);
                Ok(true)
            }
        }
    }

    /// The outcome of a finished request, marking its error reported.
    fn result(&self, py: Python<'_>) -> PyResult<()> {
        let o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        match o.as_ref() {
            Some(Ok(())) | None => Ok(()),
            Some(Err(e)) => {
                self.reported.store(true, Ordering::Relaxed);
                Err(e.clone_ref(py))
            }
        }
    }

    /// Whether it is finished (its arrays let go).
    pub(crate) fn finished(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Whether it is finished and has nothing left to tell.
    pub(crate) fn settled_quietly(&self) -> bool {
        let o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        match o.as_ref() {
            Some(Ok(())) => true,
            Some(Err(_)) => self.reported.load(Ordering::Relaxed),
            None => false,
        }
    }

    /// Waits at most `timeout` (None: the store's timeout) and returns the
    /// result.
    pub(crate) fn wait(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<()> {
        self.settle(py, Some(timeout))?;
        self.result(py)
    }
}

/// A push, pull or push-pull in flight. Its arrays belong to pskv until it
/// is done: do not write its values nor read or write its outputs before
/// `wait()` returns (or `done()` says True).
#[pyclass(name = "Request", module = "pskv", frozen)]
pub struct Request {
    pub(crate) inner: Arc<Inner>,
}

#[pymethods]
impl Request {
    /// Waits until the request is done and raises its error, if it failed
    /// (each time it is called). `timeout` in seconds (default: the store's,
    /// `PSKV_KVSTORE_TIMEOUT`); a wait that times out raises `TimeoutError`
    /// and the request stays in flight. The GIL is released while waiting.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let t = timeout
            .map(|s| {
                Duration::try_from_secs_f64(s).map_err(|_| {
                    pyo3::exceptions::PyValueError::new_err(format!(
                        "timeout {s}: not a number of seconds"
                    ))
                })
            })
            .transpose()?;
        self.inner.wait(py, t)
    }

    /// Whether the request is done, without waiting (then `wait()` returns
    /// at once).
    fn done(&self, py: Python<'_>) -> PyResult<bool> {
        self.inner.settle(py, None)
    }

    fn __repr__(&self) -> String {
        let state = if self
            .inner
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            "done"
        } else {
            "in flight"
        };
        format!("<pskv.Request: {}, {state}>", self.inner.what)
    }
}
