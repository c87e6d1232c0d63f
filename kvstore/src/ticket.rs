//! [`Ticket`]: one request's completion and its error, for callers that
//! issue many requests and wait for each (the C ABI's request handles,
//! Python's).
//!
//! # States
//!
//! A ticket goes `Issued` → `Settled` → `Done`:
//!
//! - **Issued.** [`KvStore::ticket`] made one *settle* op after the
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
//! # Kept tensors (persistent requests)
//!
//! A caller that issues the same request over the same memory again and
//! again (the C ABI's persistent requests, MPI's `MPI_Send_init`) keeps its
//! tensors between requests instead of making them per request. Its ticket
//! ([`KvStore::ticket_kept`](crate::KvStore::ticket_kept)) cannot learn that
//! pskv let go of the memory from the tensors' drop, so its settle op looks
//! at each tensor over the caller's memory (it writes the tensor's var, so
//! nothing else touches the data meanwhile):
//!
//! - the data is the caller's memory and its buffer is held by the tensor
//!   alone (no message shares it, T2): nothing more to wait for; the
//!   tensor serves the next request as it is (the usual case);
//! - otherwise (a message in flight still shares the memory, or a result
//!   landed in a buffer of pskv's): the op takes the buffer out of the
//!   tensor (leaving an empty one), so the memory is released once the
//!   message is dropped, and the ticket waits for that as for any home,
//!   copies a landed result home, and names the tensor in
//!   [`Ticket::spent`]: the caller makes it again over the same memory
//!   ([`Tensor::remade`](crate::Tensor::remade)) before its next request.
//!
//! Orderings (a pushed settle op): the op (or, if it never ran, its drop) claims
//! `Settled` (`claimed`, one swap: the first publisher wins), writes the
//! outcome, then sets the `set` latch (Release); a waiter spins on it, then
//! sleeps (Acquire: `pskv_engine::Latch`), and takes the outcome. No lock:
//! the outcome has one writer (the claimer, before the latch) and one
//! reader (the ticket, after it). A home's release is a latch too
//! (`tensor/buf.rs`).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pskv_engine::{Engine, EngineError, Latch, OpSpec, Property, Var};

use crate::error::{KvError, Result};
use crate::tensor::{Buf, Home, Tensor};

/// Requests of at most this many bytes (their tensors') spin before they
/// sleep.
const SPIN_BYTES: usize = 256 << 10;

/// What the settle op found.
struct Outcome {
    /// Boxed: a ticket (which holds the outcome) moves through a caller's
    /// results on every request, and a failure is rare.
    failure: Option<Box<KvError>>,
    /// Results to copy home once the home is released.
    landed: Vec<(Arc<Home>, Arc<Buf>)>,
    /// Kept tensors whose memory the op let go of (by index), and their
    /// homes, to wait for.
    spent: Vec<(usize, Arc<Home>)>,
}

/// What every ticket of a request names: its keys, the keys' vars and
/// counts of tickets not settled (see [`Ticket::issue`]), its tensors, and
/// whether the caller keeps them. Made per request, or once for a request
/// issued again and again ([`TicketPlan`]).
pub(crate) struct Parts {
    keys: Arc<[crate::key::Key]>,
    /// The settle op's spec: it writes every key var and tensor var, each
    /// once.
    spec: OpSpec,
    key_vars: Vec<Var>,
    settles: Vec<Arc<AtomicUsize>>,
    tensors: Vec<Tensor>,
    kept: bool,
    /// How long a wait spins before it sleeps (zero for a large request).
    spin: Duration,
}

impl Parts {
    pub(crate) fn new(
        keys: &[crate::key::Key],
        key_vars: Vec<Var>,
        settles: Vec<Arc<AtomicUsize>>,
        tensors: &[Tensor],
        kept: bool,
    ) -> Arc<Parts> {
        // A large request takes long anyway: a sleep's wake-up (tens of
        // microseconds) is small beside it, and a spinning waiter would take
        // a core from the copies that finish it.
        let bytes: usize = tensors.iter().map(|t| t.len() * t.dtype().size()).sum();
        let spin = if bytes <= SPIN_BYTES {
            pskv_engine::spin_budget()
        } else {
            Duration::ZERO
        };
        // Each var once (a tensor given as both value and output): a spec
        // that names a written var twice cannot settle at once.
        let mut vars: Vec<&Var> = key_vars
            .iter()
            .chain(tensors.iter().map(Tensor::var))
            .collect();
        vars.sort_unstable_by_key(|v| v.id());
        vars.dedup_by_key(|v| v.id());
        let spec = OpSpec::new("kvstore_request_settle")
            .property(Property::Async)
            .priority(i32::MAX)
            .writes(vars);
        Arc::new(Parts {
            keys: keys.into(),
            spec,
            key_vars,
            settles,
            tensors: tensors.to_vec(),
            kept,
            spin,
        })
    }

    /// Counts the keys' tickets not settled down by this one (its settle
    /// took the failures, or will never run).
    fn settled(&self) {
        for c in &self.settles {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

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

/// Publishes a settle op's outcome, once: by the op, or, if the op never
/// ran (an engine that stopped), by its drop, as a failure.
struct Publish {
    settled: Arc<Settled>,
    /// The request's parts, until published.
    parts: Option<Arc<Parts>>,
}

impl Publish {
    fn publish(&mut self, o: Outcome) {
        // A second publish (the drop after the op's own) finds it claimed
        // and leaves the outcome alone.
        if self.settled.claimed.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: the claim makes this the outcome's only writer, and its
        // reader reads only after the latch below is set.
        unsafe { *self.settled.outcome.get() = Some(o) };
        if let Some(p) = self.parts.take() {
            // The keys' failures are taken: the next call may take new ones.
            p.settled();
            // Our hold on the tensors goes first, so that a waiter woken
            // below finds the caller's memory released, not held by us.
            drop(p);
        }
        self.settled.set.set();
    }
}

impl Drop for Publish {
    fn drop(&mut self) {
        // Subtle: kept tensors were not checked (the op never ran, or
        // unwound): fail closed, every one over the caller's memory is
        // spent, so the ticket waits for its memory to be let go (the
        // tensors' drop) instead of handing it back unchecked.
        let o = fail_closed(
            self.parts.as_deref(),
            "the request's ops were dropped before they finished (the engine stopped)",
        );
        self.publish(o);
    }
}

/// The outcome of a settle op that never ran or unwound: the request
/// failed with `why`, and every kept tensor over the caller's memory is
/// spent (not checked), so the ticket waits for its memory to be let go
/// (the tensors' drop) instead of handing it back unchecked.
fn fail_closed(parts: Option<&Parts>, why: &str) -> Outcome {
    let spent = match parts {
        Some(p) if p.kept => p
            .tensors
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.home().map(|h| (i, h.clone())))
            .collect(),
        _ => Vec::new(),
    };
    Outcome {
        failure: Some(Box::new(KvError::invalid(why))),
        landed: Vec::new(),
        spent,
    }
}

#[derive(Default)]
struct Settled {
    /// Written once by the claimer before `set`, read by the ticket after.
    outcome: UnsafeCell<Option<Outcome>>,
    /// Whether a publisher took the right to write `outcome`.
    claimed: AtomicBool,
    /// Set after `outcome` is written (the latch's Release/Acquire orders
    /// them).
    set: Latch,
}

// SAFETY: `outcome` is written by one thread (the one that claimed it)
// before `set` is set, and read only by the ticket after it sees `set`
// (Acquire); nothing else touches it (module docs, "Orderings").
unsafe impl Sync for Settled {}

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
    /// The kept tensors the settle op let go of (see the module docs).
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
    /// memory (see "Kept tensors" in the module docs).
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
        // The request's ops are often done already (small host copies run
        // at their push): then the settle runs now, here, with nothing to
        // publish across threads.
        let mut now = None;
        let ran = engine.try_settle_now(&parts.spec, |rc| {
            let o = settle(&parts, &rc);
            // Under the vars' grants, as a pushed settle op does.
            parts.settled();
            now = Some(o);
            Ok(())
        });
        if ran.is_ok() {
            let o = now.take().unwrap_or_else(|| {
                // The settle unwound (the engine stored its panic on the
                // vars): fail closed, and count the keys down.
                parts.settled();
                fail_closed(
                    Some(&parts),
                    "the request's settle failed (a panic inside pskv)",
                )
            });
            ticket.took(o);
            return Ok(ticket);
        }
        let settled = Arc::new(Settled::default());
        // Publishes an outcome even if the closure never runs (the engine
        // stopped with the op queued) or unwinds, and counts the keys down.
        let mut publish = Publish {
            settled: settled.clone(),
            parts: Some(parts.clone()),
        };
        let pushed = engine.push_settle(parts.spec.clone(), move |rc| {
            let p = publish.parts.as_ref().expect("not published yet");
            let o = settle(p, &rc);
            publish.publish(o);
            Ok(())
        });
        if let Err(e) = pushed {
            // Not pushed: the closure (and its `Publish`) is gone, which
            // counted the keys down and published a failure.
            return Err(e.into());
        }
        ticket.settled = Some(settled);
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
        if let (None, Some(settled)) = (&self.outcome, &self.settled) {
            if !settled.set.is_set() && !settled.set.wait_spinning(self.spin, Some(left())) {
                return false;
            }
            // SAFETY: the latch is set: the publisher wrote the outcome
            // before and touches it no more; this ticket is its only reader.
            let o = unsafe { (*settled.outcome.get()).take() };
            if let Some(o) = o {
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

/// The settle op's work (see the module docs): takes the failures of the
/// keys' and tensors' vars; keeps a landed result to copy home; for kept
/// tensors, lets go of those not held by themselves alone.
fn settle(p: &Parts, rc: &pskv_engine::RunContext<'_>) -> Outcome {
    let mut failure = None;
    for v in p.key_vars.iter().chain(p.tensors.iter().map(Tensor::var)) {
        if let Some(f) = v.take_failure() {
            failure.get_or_insert(KvError::Engine(EngineError::Op(f)));
        }
    }
    let mut landed = Vec::new();
    let mut spent = Vec::new();
    for (i, t) in p.tensors.iter().enumerate() {
        let Some(home) = t.home() else { continue };
        if p.kept {
            match let_go_unless_alone(t, home, rc, &mut landed) {
                Ok(true) => {}
                Ok(false) => spent.push((i, home.clone())),
                Err(e) => {
                    // Not checked (a guard of an earlier op still
                    // lives, A3): fail closed, as spent: the ticket
                    // waits for the memory to be let go.
                    failure.get_or_insert(e);
                    spent.push((i, home.clone()));
                }
            }
            continue;
        }
        match t.read(rc) {
            Ok(d) if !d.buf.is_home(home) => landed.push((home.clone(), d.buf.clone())),
            Ok(_) => {}
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    Outcome {
        failure: failure.map(Box::new),
        landed,
        spent,
    }
}

/// A kept tensor's settle step (see "Kept tensors" in the module docs):
/// true if its data is the caller's memory held by the tensor alone (it
/// stays); otherwise the buffer is taken out of the tensor (a landed result
/// goes to `landed` to be copied home) and false.
fn let_go_unless_alone(
    t: &Tensor,
    home: &Arc<Home>,
    rc: &pskv_engine::RunContext<'_>,
    landed: &mut Vec<(Arc<Home>, Arc<Buf>)>,
) -> Result<bool> {
    let mut d = t.write(rc)?;
    let at_home = d.buf.is_home(home);
    // Subtle: `get_mut` is the uniqueness test with the orderings it needs
    // (Acquire on the count): a message that shared the buffer and was
    // dropped is seen as gone, with every read it made before.
    if at_home && Arc::get_mut(&mut d.buf).is_some() {
        return Ok(true);
    }
    let buf = std::mem::replace(&mut d.buf, Arc::new(Buf::zeroed(0)));
    t.mark_spent();
    if !at_home {
        landed.push((home.clone(), buf));
    }
    Ok(false)
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

    /// Kept tensors: one held by the tensor alone stays (nothing spent);
    /// one that a message shares is let go of, the ticket waits for the
    /// message, and names it spent; a result that landed elsewhere is
    /// copied home and its tensor named spent; a remade tensor serves again.
    #[test]
    fn a_kept_tensor_stays_unless_shared_and_a_spent_one_is_remade() {
        let e = Engine::builder().cpu_threads(1).build().unwrap();
        let issue = |ts: &[Tensor]| {
            let parts = Parts::new(&[], Vec::new(), Vec::new(), ts, true);
            Ticket::issue(&e, parts, Duration::from_secs(5)).unwrap()
        };
        let mut a = [1.0f32; 4];
        let mut b = [2.0f32; 4];
        let over = |v: &mut [f32; 4]| {
            // SAFETY: each array is read only after its ticket is done.
            unsafe { Tensor::from_host_ptr(&e, &[4], DType::F32, v.as_mut_ptr() as usize) }
                .unwrap()
                .0
        };
        let (ta, tb) = (over(&mut a), over(&mut b));

        // Alone: done at once, nothing spent, the data still the caller's.
        ta.copy_from_slice(&[3.0f32; 4]).unwrap();
        let mut t = issue(&[ta.clone(), tb.clone()]);
        t.wait().unwrap();
        assert!(t.spent().is_empty());
        assert_eq!(a, [3.0; 4]);

        // A message shares `tb`'s memory: the ticket waits for it.
        let (tx, rx) = std::sync::mpsc::channel();
        let tb2 = tb.clone();
        e.push_sync(OpSpec::new("send").read(tb.var()), move |rc| {
            tx.send(tb2.read(&rc).unwrap().share(0..16)).unwrap();
            Ok(())
        })
        .unwrap();
        let msg = rx.recv().unwrap();
        // And `ta` is written while a message shares it: the result lands
        // in a buffer of pskv's.
        let ta2 = ta.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        e.push_sync(OpSpec::new("send").read(ta.var()), move |rc| {
            tx.send(ta2.read(&rc).unwrap().share(0..16)).unwrap();
            Ok(())
        })
        .unwrap();
        let msg_a = rx.recv().unwrap();
        ta.copy_from_slice(&[7.0f32; 4]).unwrap();
        let mut t = issue(&[ta.clone(), tb.clone()]);
        assert!(t.wait_for(Duration::from_millis(100)).is_err());
        drop(msg);
        assert!(t.wait_for(Duration::from_millis(100)).is_err());
        drop(msg_a);
        t.wait().unwrap();
        assert_eq!(t.spent(), [0, 1]);
        assert_eq!(a, [7.0; 4]);
        assert_eq!(b, [2.0; 4]);

        // Spent, a tensor is refused by the kvstore's calls, by name.
        assert!(ta.is_spent() && tb.is_spent());
        let kv = crate::KvStore::create("local", &e).unwrap();
        kv.init(
            0,
            &Tensor::zeros(&e, &[4], DType::F32, pskv_engine::Context::Cpu).unwrap(),
        )
        .unwrap();
        let err = kv
            .push(0, std::slice::from_ref(&ta), 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("Tensor::remade"), "{err}");
        let err = kv
            .pull(0, std::slice::from_ref(&tb), 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("let go of"), "{err}");

        // Remade, they serve again, in place.
        // SAFETY: as `over`.
        let (ta, tb) = unsafe { (ta.remade().unwrap().unwrap(), tb.remade().unwrap().unwrap()) };
        assert!(!ta.is_spent());
        ta.copy_from_slice(&[5.0f32; 4]).unwrap();
        tb.copy_from_slice(&[6.0f32; 4]).unwrap();
        let mut t = issue(&[ta.clone(), tb.clone()]);
        t.wait().unwrap();
        assert!(t.spent().is_empty());
        assert_eq!((a, b), ([5.0; 4], [6.0; 4]));
        // A tensor of pskv's own memory has nothing to remake.
        let own = Tensor::zeros(&e, &[1], DType::F32, pskv_engine::Context::Cpu).unwrap();
        assert!(unsafe { own.remade() }.unwrap().is_none());
    }
}
