//! Ops waiting for their parts' answers ([`Inflight`]), the watchdog that
//! fails them past their deadline, and the pointer their answers write
//! through ([`OutPtr`]).
//!
//! # Invariants
//!
//! An op with `n` parts completes exactly once: when the last part's answer
//! arrives, or when the watchdog finds it past its deadline. Answers copy
//! into the op's output under the read lock of `done`; the finisher takes
//! the completion under its write lock. So once an op has finished, no late
//! answer writes into a tensor that the next op may already own.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use pskv_engine::Completion;
use pskv_transport::{KvResponse, TransportError};

use super::staging;
use crate::error::KvError;
use crate::key::Key;

/// A mutable pointer to a buffer that several answers fill (disjoint
/// ranges), moved into the answers' callbacks.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut u8, pub(super) usize);
// SAFETY: the pointer targets a buffer the op owns for writing until it
// completes; callbacks write disjoint ranges, under `Inflight::done`'s
// read lock, and never after the op finished (see the module docs).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Copies `src` to `at` (bounds checked against the buffer).
    pub(super) fn write(&self, at: usize, src: &[u8]) -> std::result::Result<(), String> {
        if at + src.len() > self.1 {
            return Err(format!(
                "an answer of {} bytes at {at} overruns the {}-byte output",
                src.len(),
                self.1
            ));
        }
        // SAFETY: in bounds (checked); see the type's docs for exclusivity.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.add(at), src.len()) };
        Ok(())
    }
}

/// An op waiting for its parts' answers.
pub(super) struct Inflight {
    done: RwLock<Option<Completion>>,
    remaining: AtomicUsize,
    error: Mutex<Option<String>>,
    deadline: Instant,
    op: &'static str,
    key: String,
    /// Device lanes that carry the op's staging copies (`staging`): the op
    /// completes only once they are drained, so no copy of its outlives it.
    settle: staging::Lanes,
}

impl Inflight {
    pub(super) fn new(
        c: Completion,
        parts: usize,
        timeout: Duration,
        op: &'static str,
        key: &Key,
        settle: staging::Lanes,
    ) -> Arc<Inflight> {
        Arc::new(Inflight {
            done: RwLock::new(Some(c)),
            remaining: AtomicUsize::new(parts),
            error: Mutex::new(None),
            deadline: Instant::now() + timeout,
            op,
            key: key.to_string(),
            settle,
        })
    }

    /// One part answered: `on_ok` stores its values (under the read lock).
    pub(super) fn part_done(
        &self,
        r: std::result::Result<KvResponse, TransportError>,
        on_ok: impl FnOnce(&KvResponse) -> std::result::Result<(), String>,
    ) {
        {
            let g = self.done.read();
            if g.is_none() {
                return;
            }
            let res = r.map_err(|e| e.to_string()).and_then(|resp| on_ok(&resp));
            if let Err(e) = res {
                self.error.lock().get_or_insert(e);
            }
        }
        // AcqRel: the last answer sees every earlier answer's writes.
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish(None);
        }
    }

    /// Completes the op (with `timeout` as the error if given).
    pub(super) fn finish(&self, timeout: Option<Duration>) {
        let Some(c) = self.done.write().take() else {
            return;
        };
        let err = match timeout {
            Some(after) => Some(KvError::Timeout {
                what: format!(
                    "the servers to answer a {} of key {} ({} of its parts unanswered)",
                    self.op,
                    self.key,
                    self.remaining.load(Ordering::Acquire)
                ),
                after,
            }),
            None => self.error.lock().take().map(|message| KvError::Server {
                op: self.op,
                key: self.key.clone(),
                message,
            }),
        };
        // Subtle: every staging copy of the op was queued under the read
        // lock of `done` (answers) or before its part was sent, so all are
        // queued by now (the lock was just taken for writing, or every part
        // answered): draining the lanes covers them.
        staging::settle(self.settle.clone(), move |drained| match (err, drained) {
            (None, Ok(())) => c.complete(),
            (Some(e), _) => c.fail(e),
            (None, Err(e)) => c.fail(KvError::from(e)),
        });
    }
}

/// Fails ops past their deadline.
pub(super) struct Watchdog {
    list: Mutex<Vec<Weak<Inflight>>>,
    pub(super) stop: AtomicBool,
    timeout: Duration,
}

impl Watchdog {
    pub(super) fn start(timeout: Duration) -> Arc<Watchdog> {
        let w = Arc::new(Watchdog {
            list: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            timeout,
        });
        let weak = Arc::downgrade(&w);
        let _ = std::thread::Builder::new()
            .name("pskv-kv-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(50));
                let Some(w) = weak.upgrade() else { return };
                if w.stop.load(Ordering::Acquire) {
                    return;
                }
                let now = Instant::now();
                let mut expired = Vec::new();
                w.list.lock().retain(|x| match x.upgrade() {
                    Some(i) if i.done.read().is_none() => false,
                    Some(i) if i.deadline <= now => {
                        expired.push(i);
                        false
                    }
                    Some(_) => true,
                    None => false,
                });
                for i in expired {
                    i.finish(Some(w.timeout));
                }
            });
        w
    }

    pub(super) fn add(&self, i: &Arc<Inflight>) {
        self.list.lock().push(Arc::downgrade(i));
    }
}
