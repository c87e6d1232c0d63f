//! `Var`: a versioned variable, the unit of dependency tracking; the
//! queue that orders the ops on one var is in `queue.rs`.
//!
//! # Who keeps a var alive
//!
//! A var's memory is an `Arc<VarInner>`. All the callers' handles (`Var`)
//! together hold one count of it, and count themselves apart, in
//! `VarInner::handles`; the ops in its queue hold none:
//!
//! - **K1.** `handles` counts the `Var` handles (a clone adds one with
//!   Relaxed, a drop takes one off with Release, as `Arc` does). While it
//!   is above zero the handles' count of the `Arc` is held.
//! - **K2.** The drop that takes `handles` to zero (after an Acquire
//!   fence) looks at the queue under its lock. If it is idle
//!   (`VarQueue::is_idle`: nothing granted, nothing waiting), the
//!   handles' count is dropped there (after the lock is let go). Else the
//!   queue is marked orphaned and the release that makes it idle drops
//!   the count (`release_grant`, after the lock is let go; it touches the
//!   var no more). One of the two does, once: a queue with no handle left
//!   can never be made busy again (a push names its vars by handles).
//! - **K3.** An op's var handles (`Op::vars`, `OpVars`) carry its spec's
//!   counts until its push has appended it to each var; then the push
//!   drops each count (`give_up`). From there on they are uncounted,
//!   valid while the op holds its place on each var, from its append to
//!   its release (K2: the queue is busy): all that reads through them
//!   (the op's skip, its run, its failure, its release) falls in that
//!   window, and an op's drop drops none of them. They are never cloned
//!   (a clone from zero handles aborts: K4). Subtle: an async op's
//!   closure may still run after its completion released the vars;
//!   `RunContext::access` then answers None and compares the handles as
//!   addresses only (`Var::is`). A pool worker that holds a finished op's
//!   read over (`held_reads.rs`) keeps the handle's address past the op
//!   (`Var::addr`) and releases through it (`Var::at`): the held read
//!   keeps the queue busy until that release, so the address is valid as
//!   long as the op's handle would have been.
//! - **K4.** Nothing makes a handle from a bare `Arc<VarInner>` (the
//!   failure log's `Weak` upgrades call `VarInner`'s methods; `Var::at`
//!   makes an uncounted one from a held read's address, never dropped) or
//!   clones an uncounted one (K3), so `handles` never rises from zero (a
//!   clone that would aborts).
//!
//! Why: with an `Arc` per handle, each op's var counts were written by
//! the pusher (the spec's clones) and by the worker that dropped the op:
//! a cache line moved between two cores twice per var per op. Now
//! `handles` is written only where handles are cloned and dropped (the
//! pushing thread, for a spec's), and the workers touch only the queue's
//! lock, which they must.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use smallvec::SmallVec;

use crate::error::OpFailure;
use crate::op::Waiting;
use crate::sync::{Mutex, Padded};

mod queue;

pub(crate) use queue::{Access, VarQueue};

static NEXT_VAR_ID: AtomicU64 = AtomicU64::new(1);

/// Set, for good, the first time a failure is stored on any var of the
/// process: until then an op's run need not look at its vars' failures
/// (`may_hold_failures`). Subtle: set before the var's own flag, both
/// before the failing op releases its grants, so an op granted after
/// sees it through the grant (as it sees the var's flag). Never cleared
/// (`take_failure` and `clear_failure_if` leave it): after the first
/// failure of the process, including an op failed by an engine's stop or
/// a dropped completion, every run looks at its vars as before. Process
/// wide, not per engine: a var may be named by ops of several engines.
/// On lines of its own: every run reads it.
static ANY_FAILURE: Padded<AtomicBool> = Padded(AtomicBool::new(false));

/// Whether any var of the process may hold a failure (false: none was
/// ever stored, and an op need not look at its vars').
#[inline]
pub(crate) fn may_hold_failures() -> bool {
    ANY_FAILURE.load(Ordering::Acquire)
}

/// The queue length past which a release prefetches the op first in line
/// (`Var::release_grant`).
const PREFETCH_QUEUE: usize = 8;

/// What a var's handles share.
///
/// Layout: `handles` is written by every clone and drop of a handle (the
/// pusher's); the queue's lock by every op on the var, by the pusher and
/// the workers; the rest is read by every push and run. Each group has
/// cache lines of its own (`Padded`, fields of a `repr(C)` struct aligned
/// to 128; the `Arc`'s own counts, written only when the var is made or
/// freed and by the failure log, sit alone before them), so reads of the
/// last do not miss on the others' writes. A var so takes 512 B.
#[repr(C)]
pub(crate) struct VarInner {
    handles: Padded<AtomicUsize>,
    pub(crate) queue: Padded<Mutex<VarState>>,
    id: u64,
    name: Option<Box<str>>,
    /// The failure stored on this var, if any. `has_failure` mirrors
    /// `failure.is_some()` so that the fast path (no failure) takes no lock.
    ///
    /// Subtle: the failure is set by the op holding the var's write grant,
    /// before it completes; an op granted after it sees the flag, because the
    /// grant passes through the var lock and the op's wait counter (both
    /// acquire/release). Reads racing with `take_failure` of a concurrent wait
    /// may see either state; both are correct outcomes. The process-wide
    /// `ANY_FAILURE` is set before this flag, the same way, and never
    /// cleared: an op's run looks at this flag only once that one is set.
    failure: parking_lot::Mutex<Option<Arc<OpFailure>>>,
    has_failure: AtomicBool,
    /// Set by `delete_var` at push time: later pushes on this var are refused.
    deleted: AtomicBool,
}

/// What a var's lock guards: its queue, and whether its handles are all
/// gone while it was busy (K2).
#[derive(Default)]
pub(crate) struct VarState {
    queue: VarQueue<Waiting>,
    orphaned: bool,
}

impl std::ops::Deref for VarState {
    type Target = VarQueue<Waiting>;

    fn deref(&self) -> &VarQueue<Waiting> {
        &self.queue
    }
}

impl std::ops::DerefMut for VarState {
    fn deref_mut(&mut self) -> &mut VarQueue<Waiting> {
        &mut self.queue
    }
}

impl VarInner {
    /// The failure stored on this var, without clearing it.
    pub(crate) fn failure(&self) -> Option<Arc<OpFailure>> {
        if !self.has_failure.load(Ordering::Acquire) {
            return None;
        }
        self.failure.lock().clone()
    }

    /// Clears the stored failure if it is `failure`.
    pub(crate) fn clear_failure_if(&self, failure: &Arc<OpFailure>) {
        let mut slot = self.failure.lock();
        if slot.as_ref().is_some_and(|f| Arc::ptr_eq(f, failure)) {
            *slot = None;
            self.has_failure.store(false, Ordering::Release);
        }
    }
}

/// An op's var handles (`Op::vars`): counted until its push gives them up
/// (`give_up`), uncounted after (K3). Dropping it drops no var count.
pub(crate) struct OpVars(SmallVec<[Var; 4]>);

impl OpVars {
    /// Takes the spec's counted handles, reads first (`OpSpec::vars`).
    #[inline]
    pub(crate) fn new(vars: SmallVec<[Var; 4]>) -> OpVars {
        OpVars(vars)
    }

    /// Drops the handles' counts; the handles stay, uncounted (K3).
    ///
    /// # Safety
    /// Called once, after the op was appended to every var, and before it
    /// can be released from any (the push's own hold on its wait counter).
    #[inline]
    pub(crate) unsafe fn give_up(&self) {
        for v in self.0.iter() {
            // SAFETY: each count is dropped once (the caller's contract
            // and `Drop` below); the queue is busy with the op, so a drop
            // to zero handles leaves the var to the op's release (K2).
            unsafe { v.drop_handle() };
        }
    }
}

impl std::ops::Deref for OpVars {
    type Target = [Var];

    fn deref(&self) -> &[Var] {
        &self.0
    }
}

impl Drop for OpVars {
    fn drop(&mut self) {
        // SAFETY: the handles' counts were given up at the push (K3):
        // forget the handles; the vector's own buffer, if it spilled, is
        // still freed. (A push that never gave them up leaks its counts:
        // a leak, not a free too many.)
        unsafe { self.0.set_len(0) };
    }
}

/// A versioned variable: the unit of dependency tracking.
///
/// Ops name the vars they read and the vars they write. Ops that read a var
/// between two writes of it may run together; a write waits for every earlier
/// op on the var and blocks every later one. A `Var` is a cheap counted
/// handle; clones name the same variable, which lives until the last
/// handle is dropped and no op names it.
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
pub struct Var(NonNull<VarInner>);

// SAFETY: a handle gives shared access to a `VarInner`, which is Send and
// Sync (checked below: its mutable state is behind locks and atomics), and
// its count is atomic: as an `Arc<VarInner>` would be.
unsafe impl Send for Var {}
unsafe impl Sync for Var {}

const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<VarInner>()
};

impl Clone for Var {
    #[inline]
    fn clone(&self) -> Var {
        // Relaxed, as `Arc::clone`: this handle keeps the var alive, and
        // nothing is published by the count.
        let before = self.inner().handles.fetch_add(1, Ordering::Relaxed);
        // As `Arc`: a count that could overflow (leaked handles) aborts; so
        // does a clone of an op's uncounted handle (K4), which would free
        // the var twice.
        if before.wrapping_sub(1) >= isize::MAX as usize {
            std::process::abort();
        }
        Var(self.0)
    }
}

impl Drop for Var {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: a live handle carries one count (K1).
        unsafe { self.drop_handle() };
    }
}

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
        let inner = Arc::new(VarInner {
            handles: Padded(AtomicUsize::new(1)),
            id: NEXT_VAR_ID.fetch_add(1, Ordering::Relaxed),
            name,
            queue: Padded(Mutex::new(VarState::default())),
            failure: parking_lot::Mutex::new(None),
            has_failure: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
        });
        // The handles' count of the `Arc` (K1).
        let raw = Arc::into_raw(inner).cast_mut();
        // SAFETY: `Arc::into_raw` never gives a null pointer.
        Var(unsafe { NonNull::new_unchecked(raw) })
    }

    /// The shared state.
    #[inline]
    pub(crate) fn inner(&self) -> &VarInner {
        // SAFETY: valid while this handle is counted (K1), or, for an
        // op's uncounted one, while the op holds its place on the var (K3).
        unsafe { self.0.as_ref() }
    }

    /// Takes one off `handles`; the last one gone gives the var up (K2).
    ///
    /// # Safety
    /// `self` carries a count that is dropped once, here; the handle is
    /// not used after this call unless it is an op's (K3).
    #[inline]
    unsafe fn drop_handle(&self) {
        if self.inner().handles.fetch_sub(1, Ordering::Release) == 1 {
            // SAFETY: this was the last handle's count (the caller's).
            unsafe { self.last_handle_gone() };
        }
    }

    /// The rest of `drop_handle` for the last handle (K2).
    ///
    /// # Safety
    /// As `drop_handle`'s, whose count took `handles` to zero.
    #[cold]
    #[inline(never)]
    unsafe fn last_handle_gone(&self) {
        // As `Arc`'s drop: every use of the var through other handles
        // happens before what follows.
        fence(Ordering::Acquire);
        let mut state = self.inner().queue.lock();
        let idle = state.is_idle();
        if !idle {
            state.orphaned = true;
        }
        drop(state);
        if idle {
            // SAFETY: no handle is left, and the idle queue can no longer
            // be made busy (K2, K4).
            unsafe { self.free_handles_count() };
        }
    }

    /// Drops the handles' count of the `Arc` (K1): the var may be gone
    /// when this returns.
    ///
    /// # Safety
    /// Called once per var, by the last handle's drop or by the release it
    /// left that to (K2), after the var's lock is let go; the var is not
    /// touched again through this handle.
    unsafe fn free_handles_count(&self) {
        // SAFETY: the count `build` made with `Arc::into_raw` (the
        // caller's contract: dropped once).
        unsafe { drop(Arc::from_raw(self.0.as_ptr().cast_const())) };
    }

    /// A `Weak` to the var's memory, for the failure log (K4).
    pub(crate) fn downgrade(&self) -> Weak<VarInner> {
        // SAFETY: the handles' `Arc` count is held while this handle is
        // valid (K1, K3); `ManuallyDrop`: it is not dropped here.
        let arc =
            std::mem::ManuallyDrop::new(unsafe { Arc::from_raw(self.0.as_ptr().cast_const()) });
        Arc::downgrade(&arc)
    }

    /// Whether `other` names the same var (their addresses: neither is
    /// read, so an op's handle may be compared after its release).
    pub(crate) fn is(&self, other: &Var) -> bool {
        self.0 == other.0
    }

    /// A process-wide unique id.
    pub fn id(&self) -> u64 {
        self.inner().id
    }

    /// The name given at creation, if any.
    pub fn name(&self) -> Option<&str> {
        self.inner().name.as_deref()
    }

    /// Appends an op that will `access` this var to its queue
    /// (`VarQueue::append`); true if granted at once.
    #[inline]
    pub(crate) fn append(&self, access: Access, op: impl FnOnce() -> Waiting) -> bool {
        self.inner().queue.lock().append(access, op)
    }

    /// Grants `access` if it may start now (`VarQueue::try_grant`); the
    /// grant is released by `release_grant`.
    #[inline]
    pub(crate) fn try_grant(&self, access: Access) -> bool {
        self.inner().queue.lock().try_grant(access)
    }

    /// Releases a grant of `access` (`ran`: completed, else given back
    /// unused) and adds to `grants` the ops it made grantable; prefetches
    /// the op then first in line if the queue is longer than
    /// `PREFETCH_QUEUE`. If no handle is left and the queue became idle,
    /// the var is given up (K2): it may be gone when this returns.
    ///
    /// # Safety
    /// The caller holds a grant of `access` on this var (so the handle is
    /// valid, K3) and does not use the handle after this call unless it is
    /// a counted one.
    #[inline]
    pub(crate) unsafe fn release_grant(
        &self,
        access: Access,
        ran: bool,
        grants: &mut SmallVec<[Waiting; 8]>,
    ) {
        let mut state = self.inner().queue.lock();
        if ran {
            state.complete(access, grants);
        } else {
            state.give_back(access, grants);
        }
        // SAFETY: the caller's contract.
        unsafe { self.end_release(state) };
    }

    /// Releases `n` completed read grants at once (a worker's held reads,
    /// `held_reads.rs`), as `release_grant` does one.
    ///
    /// # Safety
    /// As `release_grant`'s, for `n` read grants.
    #[inline]
    pub(crate) unsafe fn release_reads(&self, n: u32, grants: &mut SmallVec<[Waiting; 8]>) {
        let mut state = self.inner().queue.lock();
        state.complete_reads(n, grants);
        // SAFETY: the caller's contract.
        unsafe { self.end_release(state) };
    }

    /// The end of a release, `state` the var's locked state: the prefetch
    /// and the give-up of `release_grant`'s docs.
    ///
    /// # Safety
    /// As `release_grant`'s.
    #[inline(always)]
    unsafe fn end_release(&self, state: impl std::ops::DerefMut<Target = VarState>) {
        // The op now first in line is granted by a later finish on this
        // var. Behind a long queue it was pushed long ago (its header has
        // left every cache): start bringing it back now. Subtle: not behind
        // a short one, whose front the pusher may still be writing (its
        // wait counter, after the append): taking the line from it then
        // costs more than it saves (the chain of the dispatch bench).
        if state.pending().2 > PREFETCH_QUEUE {
            if let Some(next) = state.waiting().next() {
                next.prefetch();
            }
        }
        let give_up = state.orphaned && state.is_idle();
        drop(state);
        if give_up {
            // SAFETY: left to this release by the last handle's drop (K2);
            // the lock is let go and the var is not touched again here.
            unsafe { self.free_handles_count() };
        }
    }

    /// The var's address: what a worker keeps of an op's uncounted handle
    /// while it holds the op's read over (`held_reads.rs`).
    #[inline]
    pub(crate) fn addr(&self) -> NonNull<VarInner> {
        self.0
    }

    /// An uncounted handle at `addr` (never dropped: K3, K4).
    ///
    /// # Safety
    /// `addr` is a var's (`addr`) whose queue is kept busy by a grant the
    /// caller holds (K3).
    #[inline]
    pub(crate) unsafe fn at(addr: NonNull<VarInner>) -> std::mem::ManuallyDrop<Var> {
        std::mem::ManuallyDrop::new(Var(addr))
    }

    /// The number of writes to this var that have completed.
    pub fn version(&self) -> u64 {
        self.inner().queue.lock().version()
    }

    /// Whether `delete_var` was called on this var.
    pub fn is_deleted(&self) -> bool {
        self.inner().deleted.load(Ordering::Acquire)
    }

    pub(crate) fn mark_deleted(&self) -> bool {
        self.inner().deleted.swap(true, Ordering::AcqRel)
    }

    /// The failure stored on this var, without clearing it.
    pub fn failure(&self) -> Option<Arc<OpFailure>> {
        self.inner().failure()
    }

    pub(crate) fn set_failure(&self, failure: &Arc<OpFailure>) {
        let mut slot = self.inner().failure.lock();
        // The first failure wins: it names the op that failed first.
        if slot.is_none() {
            *slot = Some(failure.clone());
            if !ANY_FAILURE.load(Ordering::Relaxed) {
                ANY_FAILURE.store(true, Ordering::Release);
            }
            self.inner().has_failure.store(true, Ordering::Release);
        }
    }

    /// Removes and returns the stored failure (what `wait_for_var` does
    /// once the var's writes are done), marking it told: the caller reports
    /// it, and `wait_for_all` will not. Ops pushed after this no longer
    /// inherit it; ops already queued behind the failed one still do.
    pub fn take_failure(&self) -> Option<Arc<OpFailure>> {
        if !self.inner().has_failure.load(Ordering::Acquire) {
            return None;
        }
        let mut slot = self.inner().failure.lock();
        self.inner().has_failure.store(false, Ordering::Release);
        let f = slot.take();
        if let Some(f) = &f {
            f.mark_told();
        }
        f
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
        self.id() == other.id()
    }
}

impl Eq for Var {}

impl std::hash::Hash for Var {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id().hash(state)
    }
}

impl fmt::Debug for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Var");
        d.field("id", &self.id());
        if let Some(n) = self.name() {
            d.field("name", &n);
        }
        d.finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
