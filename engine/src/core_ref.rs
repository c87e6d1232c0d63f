//! `CoreRef`: an op's pointer to its engine's [`Core`], without a count;
//! and [`Held`], how a thread that is about to use one makes sure the core
//! outlives the use.
//!
//! Why: an op used to hold an `Arc<Core>`, a count taken at push, another
//! at each dispatch, both dropped by whoever finished it: two to four
//! atomic writes per op, on one cache line that every pusher and worker of
//! the engine writes (without them the dispatch bench's (a) took 0.70x
//! the time and (c) 0.86x: BENCHMARKS.md, "No count of the engine's core
//! per op").
//!
//! # The invariant
//!
//! **C1.** A core lives while any op of it is unfinished (not yet counted
//! by `Core::op_finished`, or by `Core::ops_finished` when a worker's held
//! reads are released: `held_reads.rs`), and while any thread is inside
//! [`Held`] for it.
//!
//! Kept so:
//!
//! - The core is freed when its last `Arc` goes. The engine's owner drops
//!   its own after `shutdown` returned, which is after the pending count
//!   reached zero and the pools' workers were joined; the other `Arc`s
//!   (a completion handle's, a counted `Held`'s, a shutdown thread's) are
//!   held only across their own uses. If the wait times out, or a worker
//!   stays inside a closure past the join's grace, shutdown leaks the core
//!   (it is never freed), so C1 holds for the ops and threads left.
//! - Pending zero says every op was counted finished, not that every
//!   finisher has left: `op_finished` reads the core after its count (the
//!   idle waiters' wake-up), and so may code after it. So every thread that
//!   runs an op, finishes one or dispatches one does it inside a [`Held`]
//!   of the op's core, which is free when the thread holds the core
//!   already and counted otherwise:
//!   - a worker of the engine's pools (shutdown joins it, or leaks);
//!   - a thread inside a push on an `Engine` handle of it (and the naive
//!     engine's wait for the op pushed): the handle holds the owner;
//!     [`Held::by_handle`];
//!   - a thread holding an `Arc` of it (a completion handle's; the
//!     shutdown's);
//!   - any other thread (an op of another engine that granted this one's
//!     op, on that engine's worker or completion thread) takes a counted
//!     reference for the span ([`Held::of`]): the op it is about to use is
//!     unfinished, so by C1 the core is alive at that moment.
//!
//! Subtle: a `Held` must be taken before the op is finished and dropped
//! after the last use of the core, and a thread-local records which core
//! the thread holds (by engine id: ids are never reused), restored when
//! the `Held` goes, so nested spans for other engines are correct.

use std::cell::Cell;
use std::sync::Arc;

use crate::core::Core;

/// An op's engine core, not counted (see the module docs).
#[derive(Clone, Copy)]
pub(crate) struct CoreRef(*const Core);

// SAFETY: a `CoreRef` is a shared reference in effect (C1 says when it is
// valid); `Core` is `Sync`, and `&Core` may cross threads.
unsafe impl Send for CoreRef {}
// SAFETY: as above.
unsafe impl Sync for CoreRef {}

impl CoreRef {
    pub(crate) fn new(core: &Arc<Core>) -> CoreRef {
        // `as_ptr`, not a reference's address: the pointer keeps the
        // `Arc`'s provenance, which `upgrade` needs to reach the counts.
        CoreRef(Arc::as_ptr(core))
    }

    /// A counted reference.
    ///
    /// The caller is in a span where the core is alive by C1: it holds an
    /// unfinished op of it, or a `Held` of it.
    pub(crate) fn upgrade(self) -> Arc<Core> {
        // SAFETY: the pointer came from an `Arc<Core>` (`new`), and the core
        // is alive (C1, the caller's contract), so its count is at least
        // one and may be raised; `from_raw` takes over the count added.
        unsafe {
            Arc::increment_strong_count(self.0);
            Arc::from_raw(self.0)
        }
    }
}

impl std::ops::Deref for CoreRef {
    type Target = Core;

    fn deref(&self) -> &Core {
        // SAFETY: ops use their `CoreRef` only while unfinished or inside a
        // `Held` of the core (C1, the module docs): the core is alive.
        unsafe { &*self.0 }
    }
}

thread_local! {
    /// The id of the engine whose core this thread holds by other means
    /// than a pool of its own (0: none).
    static HELD: Cell<u64> = const { Cell::new(0) };
}

/// A span in which this thread holds a core (see the module docs).
pub(crate) struct Held {
    /// What `HELD` was before (restored at drop), if this span changed it.
    prev: Option<u64>,
    /// The count taken for the span, if the thread held none.
    _count: Option<Arc<Core>>,
}

impl Held {
    /// For a thread that uses `core` on behalf of an unfinished op of it (or
    /// inside a `Held` of it): free if the thread holds the core already (a
    /// worker of its pools, or inside another `Held` of it: a push on an
    /// engine handle, a completion's finish, the shutdown, a counted span),
    /// a count for the span otherwise.
    #[inline]
    pub(crate) fn of(core: CoreRef) -> Held {
        let id = core.id;
        if crate::pool::is_worker_of(id) || HELD.with(Cell::get) == id {
            return Held {
                prev: None,
                _count: None,
            };
        }
        let count = core.upgrade();
        Held {
            prev: Some(HELD.with(|h| h.replace(id))),
            _count: Some(count),
        }
    }

    /// For a thread whose `core` is kept alive by the caller for the span
    /// (an `Engine` handle, an `Arc` it holds): records it, counts nothing.
    #[inline]
    pub(crate) fn by_handle(core: &Core) -> Held {
        Held {
            prev: Some(HELD.with(|h| h.replace(core.id))),
            _count: None,
        }
    }
}

impl Drop for Held {
    #[inline]
    fn drop(&mut self) {
        // The thread-local first, then the count (the field's drop, after
        // this): once the count goes, the core may too.
        if let Some(prev) = self.prev {
            HELD.with(|h| h.set(prev));
        }
    }
}
