//! `Var`: a versioned variable, the unit of dependency tracking; the
//! queue that orders the ops on one var is in `queue.rs`.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::OpFailure;
use crate::op::OpRef;
use crate::sync::{Mutex, Padded};

mod queue;

pub(crate) use queue::{Access, VarQueue};

static NEXT_VAR_ID: AtomicU64 = AtomicU64::new(1);

/// What a var's handles share.
///
/// Layout: the queue's lock is written by every op on the var, by the
/// pusher and the workers; the `Arc`'s counts by every op too (each holds a
/// clone); the rest is read by every push and run. Each group has cache
/// lines of its own (`Padded`, first field of a `repr(C)` struct aligned
/// to 128: the counts sit alone before it), so reads of the last do not
/// miss on the others' writes. A var so takes 384 B, about three times
/// what it took before.
#[repr(C)]
pub(crate) struct VarInner {
    pub(crate) queue: Padded<Mutex<VarQueue<OpRef>>>,
    id: u64,
    name: Option<Box<str>>,
    /// The failure stored on this var, if any. `has_failure` mirrors
    /// `failure.is_some()` so that the fast path (no failure) takes no lock.
    ///
    /// Subtle: the failure is set by the op holding the var's write grant,
    /// before it completes; an op granted after it sees the flag, because the
    /// grant passes through the var lock and the op's wait counter (both
    /// acquire/release). Reads racing with `take_failure` of a concurrent wait
    /// may see either state; both are correct outcomes.
    failure: parking_lot::Mutex<Option<Arc<OpFailure>>>,
    has_failure: AtomicBool,
    /// Set by `delete_var` at push time: later pushes on this var are refused.
    deleted: AtomicBool,
}

/// A versioned variable: the unit of dependency tracking.
///
/// Ops name the vars they read and the vars they write. Ops that read a var
/// between two writes of it may run together; a write waits for every earlier
/// op on the var and blocks every later one. A `Var` is a cheap handle
/// (`Arc`); clones name the same variable.
///
/// ```
/// use pskv_engine::{Engine, OpSpec, Var};
///
/// let engine = Engine::builder().cpu_threads(2).build()?;
/// let v = Var::named("weight");
/// engine.push_sync(OpSpec::new("init").write(&v), |_| Ok(()))?;
/// engine.wait_for_var(&v)?;
/// assert_eq!(v.version(), 1);
/// # Ok::<(), pskv_engine::EngineError>(())
/// ```
#[derive(Clone)]
pub struct Var(pub(crate) Arc<VarInner>);

impl Var {
    /// A new variable with no name.
    pub fn new() -> Var {
        Var::build(None)
    }

    /// A new variable with a name, shown in errors, traces and graphs.
    pub fn named(name: impl Into<String>) -> Var {
        Var::build(Some(name.into().into_boxed_str()))
    }

    fn build(name: Option<Box<str>>) -> Var {
        Var(Arc::new(VarInner {
            id: NEXT_VAR_ID.fetch_add(1, Ordering::Relaxed),
            name,
            queue: Padded(Mutex::new(VarQueue::default())),
            failure: parking_lot::Mutex::new(None),
            has_failure: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
        }))
    }

    /// A process-wide unique id.
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// The name given at creation, if any.
    pub fn name(&self) -> Option<&str> {
        self.0.name.as_deref()
    }

    /// The number of writes to this var that have completed.
    pub fn version(&self) -> u64 {
        self.0.queue.lock().version()
    }

    /// Whether `delete_var` was called on this var.
    pub fn is_deleted(&self) -> bool {
        self.0.deleted.load(Ordering::Acquire)
    }

    pub(crate) fn mark_deleted(&self) -> bool {
        self.0.deleted.swap(true, Ordering::AcqRel)
    }

    /// The failure stored on this var, without clearing it.
    pub fn failure(&self) -> Option<Arc<OpFailure>> {
        if !self.0.has_failure.load(Ordering::Acquire) {
            return None;
        }
        self.0.failure.lock().clone()
    }

    pub(crate) fn set_failure(&self, failure: &Arc<OpFailure>) {
        let mut slot = self.0.failure.lock();
        // The first failure wins: it names the op that failed first.
        if slot.is_none() {
            *slot = Some(failure.clone());
            self.0.has_failure.store(true, Ordering::Release);
        }
    }

    /// Removes and returns the stored failure (what `wait_for_var` does
    /// once the var's writes are done), marking it told: the caller reports
    /// it, and `wait_for_all` will not. Ops pushed after this no longer
    /// inherit it; ops already queued behind the failed one still do.
    pub fn take_failure(&self) -> Option<Arc<OpFailure>> {
        if !self.0.has_failure.load(Ordering::Acquire) {
            return None;
        }
        let mut slot = self.0.failure.lock();
        self.0.has_failure.store(false, Ordering::Release);
        let f = slot.take();
        if let Some(f) = &f {
            f.mark_told();
        }
        f
    }

    /// Clears the stored failure if it is `failure`.
    pub(crate) fn clear_failure_if(&self, failure: &Arc<OpFailure>) {
        let mut slot = self.0.failure.lock();
        if slot.as_ref().is_some_and(|f| Arc::ptr_eq(f, failure)) {
            *slot = None;
            self.0.has_failure.store(false, Ordering::Release);
        }
    }

    /// A short human description: `var 7 'weight'`.
    pub fn describe(&self) -> String {
        match self.name() {
            Some(n) => format!("var {} '{}'", self.id(), n),
            None => format!("var {}", self.id()),
        }
    }
}

impl Default for Var {
    fn default() -> Self {
        Var::new()
    }
}

impl PartialEq for Var {
    fn eq(&self, other: &Var) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for Var {}

impl std::hash::Hash for Var {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.id.hash(state)
    }
}

impl fmt::Debug for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Var");
        d.field("id", &self.0.id);
        if let Some(n) = self.name() {
            d.field("name", &n);
        }
        d.finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn failure_first_wins_and_take_clears() {
        let v = Var::named("x");
        let a = OpFailure::new("a", crate::FailureCause::Panic("boom".into()));
        let b = OpFailure::new("b", crate::FailureCause::Panic("later".into()));
        v.set_failure(&a);
        v.set_failure(&b);
        assert_eq!(v.failure().unwrap().op(), "a");
        v.clear_failure_if(&b);
        assert!(v.failure().is_some());
        assert_eq!(v.take_failure().unwrap().op(), "a");
        assert!(v.failure().is_none());
        assert_eq!(v.describe(), format!("var {} 'x'", v.id()));
    }
}
