//! A ticket's settle op (`mod.rs`): its parts ([`Parts`], made per
//! request or once per plan), its work (`settle`: the failures taken, a
//! landed result kept to copy home, kept tensors checked), and how its
//! outcome reaches the ticket: at once when it runs at issue (`start`),
//! else through [`Settled`], published once by the op or by its drop.
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
//!   [`Ticket::spent`](super::Ticket::spent): the caller makes it again
//!   over the same memory ([`Tensor::remade`](crate::Tensor::remade))
//!   before its next request.
//!
//! # Orderings (a pushed settle op)
//!
//! The op (or, if it never ran, its drop) claims `Settled` (`claimed`, one
//! swap: the first publisher wins), writes the outcome, then sets the
//! `set` latch (Release); a waiter spins on it, then sleeps (Acquire:
//! `pskv_engine::Latch`), and takes the outcome. No lock: the outcome has
//! one writer (the claimer, before the latch) and one reader (the ticket,
//! after it). A home's release is a latch too (`tensor/buf.rs`).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pskv_engine::{Engine, EngineError, Latch, OpSpec, Property, RunContext, Var};

use crate::error::{KvError, Result};
use crate::tensor::{Buf, Home, Tensor};

/// Requests of at most this many bytes (their tensors') spin before they
/// sleep.
const SPIN_BYTES: usize = 256 << 10;

/// What the settle op found.
pub(super) struct Outcome {
    /// Boxed: a ticket (which holds the outcome) moves through a caller's
    /// results on every request, and a failure is rare.
    pub(super) failure: Option<Box<KvError>>,
    /// Results to copy home once the home is released.
    pub(super) landed: Vec<(Arc<Home>, Arc<Buf>)>,
    /// Kept tensors whose memory the op let go of (by index), and their
    /// homes, to wait for.
    pub(super) spent: Vec<(usize, Arc<Home>)>,
}

/// What every ticket of a request names: its keys, the keys' vars and
/// counts of tickets not settled (see
/// [`Ticket::issue`](super::Ticket::issue)), its tensors, and whether the
/// caller keeps them. Made per request, or once for a request issued again
/// and again ([`TicketPlan`](super::TicketPlan)).
pub(crate) struct Parts {
    pub(super) keys: Arc<[crate::key::Key]>,
    /// The settle op's spec: it writes every key var and tensor var, each
    /// once.
    spec: OpSpec,
    key_vars: Vec<Var>,
    pub(super) settles: Vec<Arc<AtomicUsize>>,
    pub(super) tensors: Vec<Tensor>,
    pub(super) kept: bool,
    /// How long a wait spins before it sleeps (zero for a large request).
    pub(super) spin: Duration,
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

/// Where a pushed settle op publishes its outcome for its ticket (see
/// "Orderings").
#[derive(Default)]
pub(super) struct Settled {
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

impl Settled {
    /// Whether the outcome is published, waiting for it (spinning `spin`
    /// first) at most `left()`.
    pub(super) fn wait(&self, spin: Duration, left: impl FnOnce() -> Duration) -> bool {
        self.set.is_set() || self.set.wait_spinning(spin, Some(left()))
    }

    /// The published outcome, taken (None once taken).
    ///
    /// # Safety
    /// Only the ticket this `Settled` was made for calls it (the outcome's
    /// one reader), after `wait` returned true.
    pub(super) unsafe fn take(&self) -> Option<Outcome> {
        // SAFETY: the latch is set (the caller's contract): the publisher
        // wrote the outcome before it and touches it no more.
        unsafe { (*self.outcome.get()).take() }
    }
}

/// Runs the settle op of `parts` now if it can, its outcome into `now`
/// (None on entry; None returned), else pushes it: its outcome comes
/// through the `Settled` returned (see `Ticket::issue`, which counted the
/// keys' tickets up).
pub(super) fn start(
    engine: &Engine,
    parts: &Arc<Parts>,
    now: &mut Option<Outcome>,
) -> Result<Option<Arc<Settled>>> {
    // An outcome already in would hide a settle that unwound below.
    debug_assert!(now.is_none(), "start takes an empty outcome slot");
    // The request's ops are often done already (small host copies run
    // at their push): then the settle runs now, here, with nothing to
    // publish across threads.
    let ran = engine.try_settle_now(&parts.spec, |rc| {
        let o = settle(parts, &rc);
        // Under the vars' grants, as a pushed settle op does.
        parts.settled();
        *now = Some(o);
        Ok(())
    });
    if ran.is_ok() {
        if now.is_none() {
            // The settle unwound (the engine stored its panic on the
            // vars): fail closed, and count the keys down.
            parts.settled();
            *now = Some(fail_closed(
                Some(parts),
                "the request's settle failed (a panic inside pskv)",
            ));
        }
        return Ok(None);
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
    Ok(Some(settled))
}

/// The settle op's work (see the module docs): takes the failures of the
/// keys' and tensors' vars; keeps a landed result to copy home; for kept
/// tensors, lets go of those not held by themselves alone.
fn settle(p: &Parts, rc: &RunContext<'_>) -> Outcome {
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
    rc: &RunContext<'_>,
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
    use super::super::tests::in_flight;
    use super::super::Ticket;
    use super::*;
    use crate::dtype::DType;

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
        let msg = in_flight(&e, &tb);
        // And `ta` is written while a message shares it: the result lands
        // in a buffer of pskv's.
        let msg_a = in_flight(&e, &ta);
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
