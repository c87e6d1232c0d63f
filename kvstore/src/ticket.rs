//! [`Ticket`]: one request's completion and its error, for callers that
//! issue many requests and wait for each (the C ABI's request handles,
//! Python's).
//!
//! # States
//!
//! A ticket goes `Issued` → `Settled` → `Done`:
//!
//! - **Issued.** [`KvStore::ticket`] pushed one *settle* op after the
//!   request's ops. It writes every key's var and every tensor's var of the
//!   request, so it runs once the request's ops are done (their writes,
//!   and the reads of its input tensors). It is pushed with
//!   [`Engine::push_settle`], so it runs even when one of those vars holds
//!   a failure: it takes the failures (each is reported once, on this
//!   ticket, and the key is usable again) and, for an output over the
//!   caller's memory whose result landed in a buffer of pskv's (T2), keeps
//!   that buffer to copy home.
//! - **Settled.** The ticket drops its tensors. pskv may still hold the
//!   caller's memory a short while (a message that shared an input is
//!   dropped by the transport after its answer): the ticket waits for
//!   every [`Home`] to be released, then copies any result home.
//! - **Done.** The result is handed out once.
//!
//! Orderings: the settle op stores its outcome under `Settled`'s mutex,
//! then sets the `set` latch (Release); a waiter spins on it, then sleeps
//! (Acquire: `pskv_engine::Latch`), and takes the outcome under the mutex.
//! A home's release is a latch too (`tensor/buf.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pskv_engine::{Engine, EngineError, Latch, OpSpec, Property, Var};

use crate::error::{KvError, Result};
use crate::tensor::{Buf, Home, Tensor};

/// Requests of at most this many bytes (their tensors') spin before they
/// sleep.
const SPIN_BYTES: usize = 256 << 10;

/// What the settle op found.
struct Outcome {
    failure: Option<KvError>,
    /// Results to copy home once the home is released.
    landed: Vec<(Arc<Home>, Arc<Buf>)>,
}

/// Publishes a settle op's outcome, once: by the op, or, if the op never
/// ran (an engine that stopped), by its drop, as a failure.
struct Publish {
    settled: Arc<Settled>,
    settles: Vec<Arc<AtomicUsize>>,
}

impl Publish {
    fn publish(&self, o: Outcome) {
        let mut slot = self.settled.outcome.lock();
        if self.settled.set.is_set() {
            return;
        }
        *slot = Some(o);
        // The keys' failures are taken: the next call may take new ones.
        for c in &self.settles {
            c.fetch_sub(1, Ordering::AcqRel);
        }
        // Under the lock: a second publish (the drop after the op's own)
        // sees it set and leaves the outcome alone.
        self.settled.set.set();
    }
}

impl Drop for Publish {
    fn drop(&mut self) {
        self.publish(Outcome {
            failure: Some(KvError::invalid(
                "the request's ops were dropped before they finished (the engine stopped)",
            )),
            landed: Vec::new(),
        });
    }
}

#[derive(Default)]
struct Settled {
    outcome: Mutex<Option<Outcome>>,
    /// Set after `outcome` is (the latch's Release/Acquire orders them).
    set: Latch,
}

/// The completion of one request (see the module docs).
pub struct Ticket {
    settled: Arc<Settled>,
    /// The request's tensors, until settled.
    keep: Vec<Tensor>,
    homes: Vec<Arc<Home>>,
    outcome: Option<Outcome>,
    /// Given out already.
    done: bool,
    /// How long a wait spins before it sleeps (zero for a large request).
    spin: Duration,
    /// The request's keys (for messages; formatted only when needed).
    keys: Vec<crate::key::Key>,
    timeout: Duration,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("what", &self.what())
            .field("settled", &self.outcome.is_some())
            .field("done", &self.done)
            .finish()
    }
}

impl Ticket {
    /// Pushes the settle op of a request whose ops write `key_vars` and
    /// name `tensors` (see the module docs). `settles`: the keys' counts
    /// of tickets not settled yet (a store that takes a key's failure at
    /// its next call leaves it to them), counted up now and down when the
    /// settle op has taken the failures.
    pub(crate) fn issue(
        engine: &Engine,
        key_vars: Vec<Var>,
        settles: Vec<Arc<AtomicUsize>>,
        tensors: &[Tensor],
        keys: Vec<crate::key::Key>,
        timeout: Duration,
    ) -> Result<Ticket> {
        let settled = Arc::new(Settled::default());
        let spec = OpSpec::new("kvstore_request_settle")
            .property(Property::Async)
            .priority(i32::MAX)
            .writes(&key_vars)
            .writes(tensors.iter().map(Tensor::var));
        for c in &settles {
            c.fetch_add(1, Ordering::AcqRel);
        }
        // Publishes an outcome even if the closure never runs (the engine
        // stopped with the op queued) or unwinds, and counts the keys down.
        let publish = Publish {
            settled: settled.clone(),
            settles,
        };
        let ts = tensors.to_vec();
        let pushed = engine.push_settle(spec, move |rc| {
            let mut failure = None;
            for v in key_vars.iter().chain(ts.iter().map(Tensor::var)) {
                if let Some(f) = v.take_failure() {
                    failure.get_or_insert(KvError::Engine(EngineError::Op(f)));
                }
            }
            let mut landed = Vec::new();
            for t in &ts {
                let Some(home) = t.home() else { continue };
                match t.read(&rc) {
                    Ok(d) if !d.buf.is_home(home) => landed.push((home.clone(), d.buf.clone())),
                    Ok(_) => {}
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
            // Our clones go first, so that a waiter woken below finds the
            // caller's memory released, not held by this closure.
            drop(ts);
            publish.publish(Outcome { failure, landed });
            Ok(())
        });
        if let Err(e) = pushed {
            // Not pushed: the closure (and its `Publish`) is gone, which
            // counted the keys down and published a failure.
            return Err(e.into());
        }
        // A large request takes long anyway: a sleep's wake-up (tens of
        // microseconds) is small beside it, and a spinning waiter would take
        // a core from the copies that finish it.
        let bytes: usize = tensors.iter().map(|t| t.len() * t.dtype().size()).sum();
        let spin = if bytes <= SPIN_BYTES {
            pskv_engine::spin_budget()
        } else {
            Duration::ZERO
        };
        Ok(Ticket {
            spin,
            settled,
            homes: tensors.iter().filter_map(|t| t.home().cloned()).collect(),
            keep: tensors.to_vec(),
            outcome: None,
            done: false,
            keys,
            timeout,
        })
    }

    /// What the request was ("the request on key 3", ...), for messages.
    pub fn what(&self) -> String {
        match &self.keys[..] {
            [] => "the request".to_string(),
            [k] => format!("the request on key {k}"),
            ks if ks.len() <= 4 => format!(
                "the request on keys {}",
                ks.iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            ks => format!("the request on {} keys from key {}", ks.len(), ks[0]),
        }
    }

    /// Whether the request is done; then `wait` returns at once.
    pub fn is_done(&mut self) -> bool {
        self.settle(Duration::ZERO)
    }

    /// Waits until the request is done, at most the store's timeout, and
    /// returns its result: its first failure, once (a later call is an
    /// error). A timed-out wait is `KvError::Timeout`, and the request is
    /// still in flight: its memory must stay untouched; wait again.
    pub fn wait(&mut self) -> Result<()> {
        self.wait_for(self.timeout)
    }

    /// As `wait`, at most `timeout`.
    pub fn wait_for(&mut self, timeout: Duration) -> Result<()> {
        if self.done {
            return Err(KvError::invalid(format!(
                "the result of {} was taken already",
                self.what()
            )));
        }
        if !self.settle(timeout) {
            return Err(KvError::Timeout {
                what: self.pending_what(),
                after: timeout,
            });
        }
        self.done = true;
        let o = self.outcome.take().expect("settled");
        match o.failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn pending_what(&self) -> String {
        if self.outcome.is_none() {
            format!("{} to finish", self.what())
        } else {
            format!(
                "pskv to let go of the memory of {} (a message that held it was not dropped)",
                self.what()
            )
        }
    }

    /// Moves on as far as it can by `until`; whether the request is done.
    /// A waiter spins first (a small request is often done within
    /// microseconds, and a sleep costs a wake-up across threads), then
    /// sleeps. The clock is read only if something is still pending (a
    /// small request is often done by the time its wait starts).
    fn settle(&mut self, timeout: Duration) -> bool {
        if self.done {
            return true;
        }
        let mut until = None;
        let mut left = || {
            let end = *until.get_or_insert_with(|| Instant::now() + timeout);
            end.saturating_duration_since(Instant::now())
        };
        if self.outcome.is_none() {
            if !self.settled.set.is_set()
                && !self.settled.set.wait_spinning(self.spin, Some(left()))
            {
                return false;
            }
            self.outcome = self.settled.outcome.lock().take();
            self.keep.clear();
        }
        // A transfer that held the memory usually lets go within
        // microseconds of the op's end.
        for h in &self.homes {
            if !h.is_released() && !h.wait_released(self.spin, left()) {
                return false;
            }
        }
        if let Some(o) = &mut self.outcome {
            for (home, buf) in o.landed.drain(..) {
                // SAFETY: the home is released (no buffer over it is left)
                // and the caller leaves the memory alone until this ticket
                // is done (`Tensor::from_host_ptr`'s contract).
                unsafe { home.write_back(buf.bytes()) };
            }
        }
        self.homes.clear();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    /// A result written while the caller's memory was shared lands in a
    /// buffer of pskv's (T2); the ticket copies it home once the memory
    /// is let go, not before.
    #[test]
    fn a_result_that_landed_elsewhere_is_copied_home_after_release() {
        let e = Engine::builder().cpu_threads(1).build().unwrap();
        let mut v = [1.0f32; 4];
        // SAFETY: `v` is read only after the ticket is done.
        let (t, home) =
            unsafe { Tensor::from_host_ptr(&e, &[4], DType::F32, v.as_mut_ptr() as usize) }
                .unwrap();
        // A message in flight shares the memory.
        let (tx, rx) = std::sync::mpsc::channel();
        let t2 = t.clone();
        e.push_sync(OpSpec::new("send").read(t.var()), move |rc| {
            tx.send(t2.read(&rc).unwrap().share(0..16)).unwrap();
            Ok(())
        })
        .unwrap();
        let msg = rx.recv().unwrap();
        t.copy_from_slice(&[9.0f32; 4]).unwrap();
        let mut ticket = Ticket::issue(
            &e,
            Vec::new(),
            Vec::new(),
            &[t],
            Vec::new(),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(ticket.wait_for(Duration::from_millis(100)).is_err());
        assert!(!home.is_released());
        // The message still carries the old values.
        assert_eq!(&msg[..4], &1.0f32.to_ne_bytes());
        drop(msg);
        ticket.wait().unwrap();
        assert_eq!(v, [9.0; 4]);
    }
}
