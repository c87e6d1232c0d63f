//! [`Ticket`]: one request's completion and its error, for callers that
//! issue many requests and wait for each (the C ABI's request handles,
//! Python's).
//!
//! # States
//!
//! A ticket goes `Issued` → `Settled` → `Done`:
//!
//! - **Issued.** [`KvStore::ticket`](crate::KvStore::ticket) made one *settle* op after the
//!   request's ops. It writes every key's var and every tensor's var of the
//!   request, so it runs once the request's ops are done (their writes,
//!   and the reads of its input tensors). It runs even when one of those
//!   vars holds a failure: it takes the failures (each is reported once, on
//!   this ticket, and the key is usable again) and, for an output over the
//!   caller's memory whose result landed in a buffer of pskv's (T2), keeps
//!   that buffer to copy home. When those vars are all free at issue (the
//!   request's ops are done: small host copies run at their push), it runs
//!   there and then ([`Engine::try_settle_now`]: no op record, no outcome
//!   to publish across threads, the ticket is settled when made); else (a
//!   var busy, or the engine declines: profiling, recording its graph,
//!   inside an op or an inline drain, naive, shutting down) it is pushed
//!   ([`Engine::push_settle`]).
//! - **Settled.** The ticket drops its tensors. pskv may still hold the
//!   caller's memory a short while (a message that shared an input is
//!   dropped by the transport after its answer): the ticket waits for
//!   every [`Home`] to be released, then copies any result home.
//! - **Done.** The result is handed out once.
//!
//! The settle op's side (its parts, its work, how its outcome reaches the
//! ticket, and a persistent request's kept tensors) is `settle.rs`.

mod settle;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pskv_engine::Engine;

pub(crate) use settle::Parts;
use settle::{Outcome, Settled};

use crate::error::{KvError, Result};
use crate::tensor::Home;

/// The parts of a request whose tensors the caller keeps, made once
/// ([`KvStore::ticket_plan`](crate::KvStore::ticket_plan)), for a ticket
/// per issue of the request
/// ([`KvStore::ticket_for`](crate::KvStore::ticket_for)): the keys are
/// looked up once, not per ticket.
#[derive(Clone)]
pub struct TicketPlan(pub(crate) Arc<Parts>);

impl std::fmt::Debug for TicketPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketPlan")
            .field("keys", &self.0.keys.len())
            .field("tensors", &self.0.tensors.len())
            .finish()
    }
}

/// The completion of one request (see the module docs).
pub struct Ticket {
    /// Where the settle op publishes its outcome; None when it ran at
    /// issue (the outcome is in already).
    settled: Option<Arc<Settled>>,
    /// The request's parts: until settled, unless the caller keeps the
    /// tensors.
    parts: Option<Arc<Parts>>,
    homes: Vec<Arc<Home>>,
    outcome: Option<Outcome>,
    /// Given out already.
    done: bool,
    /// How long a wait spins before it sleeps (zero for a large request).
    spin: Duration,
    /// The request's keys (for messages; formatted only when needed),
    /// when `parts` may go: a ticket that keeps its tensors keeps `parts`
    /// and reads them there.
    keys: Option<Arc<[crate::key::Key]>>,
    timeout: Duration,
    /// The kept tensors the settle op let go of (see "Kept tensors" in
    /// `settle.rs`).
    spent: Vec<usize>,
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
    /// Makes the settle op of a request whose ops write `parts.key_vars`
    /// and name `parts.tensors` (see the module docs): runs it now if it
    /// can, else pushes it. `parts.settles`: the
    /// keys' counts of tickets not settled yet (a store that takes a key's
    /// failure at its next call leaves it to them), counted up now and
    /// down when the settle op has taken the failures. With `parts.kept`,
    /// the caller keeps the tensors for its next request over the same
    /// memory (see "Kept tensors" in `settle.rs`).
    pub(crate) fn issue(engine: &Engine, parts: Arc<Parts>, timeout: Duration) -> Result<Ticket> {
        for c in &parts.settles {
            c.fetch_add(1, Ordering::AcqRel);
        }
        let kept = parts.kept;
        let (keys, spin) = ((!kept).then(|| parts.keys.clone()), parts.spin);
        // Kept tensors stay the caller's: their homes are waited for only
        // if the settle op lets go of them. Others are waited for all.
        let homes = if kept {
            Vec::new()
        } else {
            parts
                .tensors
                .iter()
                .filter_map(|t| t.home().cloned())
                .collect()
        };
        let mut ticket = Ticket {
            spin,
            settled: None,
            parts: Some(parts.clone()),
            homes,
            outcome: None,
            done: false,
            keys,
            timeout,
            spent: Vec::new(),
        };
        let mut now = None;
        ticket.settled = settle::start(engine, &parts, &mut now)?;
        if let Some(o) = now {
            ticket.took(o);
        }
        Ok(ticket)
    }

    /// The kept tensors (by index in the request's tensors) that the
    /// settle op let go of: make each again
    /// ([`Tensor::remade`](crate::Tensor::remade)) before the next request
    /// uses it. Filled once the settle op's outcome is in (complete when
    /// the ticket is done); empty for a ticket that does not keep its
    /// tensors.
    pub fn spent(&self) -> &[usize] {
        &self.spent
    }

    /// What the request was ("the request on key 3", ...), for messages.
    pub fn what(&self) -> String {
        let keys = match (&self.keys, &self.parts) {
            (Some(k), _) => &k[..],
            (None, Some(p)) => &p.keys[..],
            (None, None) => &[],
        };
        match keys {
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
            Some(e) => Err(*e),
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

    /// Takes the settle op's outcome: the tensors go unless kept, and the
    /// homes of kept ones it let go of are waited for.
    fn took(&mut self, mut o: Outcome) {
        if !self.parts.as_ref().is_some_and(|p| p.kept) {
            // Our hold on the tensors goes: their memory is waited for.
            self.parts = None;
        }
        for (i, home) in o.spent.drain(..) {
            self.spent.push(i);
            self.homes.push(home);
        }
        self.outcome = Some(o);
    }

    /// Moves on as far as it can within `timeout`; whether the request is
    /// done.
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
        if let (None, Some(settled)) = (&self.outcome, &self.settled) {
            if !settled.wait(self.spin, &mut left) {
                return false;
            }
            // SAFETY: published (`wait`), and this ticket is the outcome's
            // only reader.
            if let Some(o) = unsafe { settled.take() } {
                self.took(o);
            }
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
    use pskv_engine::{OpSpec, Property, Var};

    use super::*;
    use crate::dtype::DType;
    use crate::tensor::Tensor;

    /// A message in flight that shares `t`'s first 16 bytes (as a send
    /// does, read in an op on `t`'s var); dropping it lets go of them.
    pub(super) fn in_flight(e: &Engine, t: &Tensor) -> bytes::Bytes {
        let (tx, rx) = std::sync::mpsc::channel();
        let t2 = t.clone();
        e.push_sync(OpSpec::new("send").read(t.var()), move |rc| {
            tx.send(t2.read(&rc).unwrap().share(0..16)).unwrap();
            Ok(())
        })
        .unwrap();
        rx.recv().unwrap()
    }

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
        let msg = in_flight(&e, &t);
        t.copy_from_slice(&[9.0f32; 4]).unwrap();
        let parts = Parts::new(&[], Vec::new(), Vec::new(), &[t], false);
        let mut ticket = Ticket::issue(&e, parts, Duration::from_secs(5)).unwrap();
        assert!(ticket.wait_for(Duration::from_millis(100)).is_err());
        assert!(!home.is_released());
        // The message still carries the old values.
        assert_eq!(&msg[..4], &1.0f32.to_ne_bytes());
        drop(msg);
        ticket.wait().unwrap();
        assert_eq!(v, [9.0; 4]);
    }

    /// Both ways to settle: at issue (the request's ops are done; a
    /// failure one left on a key var is the ticket's), and pushed behind
    /// ops still running (done only after them, with their failure).
    #[test]
    fn a_ticket_settles_at_issue_or_behind_the_requests_ops() {
        let e = Engine::builder().cpu_threads(1).build().unwrap();
        let key_var = Var::named("key");
        let t = Tensor::zeros(&e, &[4], DType::F32, pskv_engine::Context::Cpu).unwrap();
        let issue = || {
            let parts = Parts::new(
                &[],
                vec![key_var.clone()],
                Vec::new(),
                std::slice::from_ref(&t),
                false,
            );
            Ticket::issue(&e, parts, Duration::from_secs(5)).unwrap()
        };
        // Done already, and failed: settled at issue, the failure reported.
        // (`Async` on a free var: it runs inside its push.)
        let bad = OpSpec::new("bad").write(&key_var).property(Property::Async);
        e.push_sync(bad, |_| Err("lost".into())).unwrap();
        key_var.failure().expect("stored on the key var");
        let mut ticket = issue();
        assert!(ticket.settled.is_none() && ticket.outcome.is_some());
        let err = ticket.wait().unwrap_err().to_string();
        assert!(err.contains("lost"), "{err}");
        assert!(key_var.failure().is_none(), "taken by the ticket");
        // Still running: pushed, done once the op ends.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        e.push_sync(OpSpec::new("slow").write(t.var()), move |_| {
            wait.recv_timeout(Duration::from_secs(30)).unwrap();
            Ok(())
        })
        .unwrap();
        let mut ticket = issue();
        assert!(ticket.settled.is_some());
        assert!(!ticket.is_done());
        go.send(()).unwrap();
        ticket.wait().unwrap();
    }
}
