//! A worker's read releases held over to the next op it runs.
//!
//! Why: the dispatch bench's fan-out has a thousand ops that read one var,
//! r. Each finish took r's lock to count its read off, and each push took
//! it to count one on (or to queue behind the next write): r's line moved
//! between the pushing thread and the workers twice an op (`perf`: the
//! compare-exchange of a var's lock was a third of the workers' samples
//! and a quarter of the pusher's). A read counted off while another read of
//! the same var runs grants nothing: a write waits for them all. So a
//! worker that finishes an op reading r and next runs another op reading r
//! may leave the first read counted until the second's finish, and count
//! both off under one lock.
//!
//! # States (per thread; only an engine's pool worker leaves EMPTY)
//!
//! - EMPTY: nothing held.
//! - HOLDING(v, n): `n` reads of var `v`, by ops of this worker's engine
//!   that finished on it, not yet counted off `v`'s queue, and those `n`
//!   ops not yet counted finished (`Core::ops_finished`). The queue still
//!   counts the reads as running, so it stays busy (the uncounted handle's
//!   address stays valid, `var/mod.rs` K3) and no write of `v` starts; the
//!   engine counts the ops pending, so no `wait_for_all` returns and its
//!   core stays alive (`core_ref.rs`, C1).
//!
//! Moves:
//!
//! - The finish of an op that reads, on a worker of the op's engine and
//!   outside any closure (`release_finished`, from `core::complete`): if
//!   it reads the held var, `n + 1`, and that read is not released; else
//!   what is held is released (`flush`) and the op's first read is held
//!   (`n = 1`). Its other vars are released as before.
//! - Back to EMPTY (`flush`: the reads counted off under one lock, then the
//!   ops counted finished): before the worker runs an op that does not
//!   read `v` (`before_run`), before it looks for work it did not find at
//!   once (`pool::PoolShared::pop`), before each inline task it runs
//!   (`inline::drain`), and at its exit.
//!
//! So a read is held only while its worker moves from a finish to its next
//! op, or while that worker runs an op that itself reads `v` (which keeps
//! `v`'s writes waiting anyway): never while the worker waits, sleeps, or
//! runs a closure that could wait for a write of `v`. What the engine's
//! users see is unchanged: an op counts as finished when its vars are
//! released, as before, but perhaps later than its closure returned: when
//! its worker next runs an op that does not read `v`, or looks for work.
//! A write of `v` waits no longer for it: every read held was granted
//! before any write queued behind it (a read queues behind a waiting
//! write), so the write waited for them all anyway.
//! Finishes elsewhere (a completion on another thread, inside a closure,
//! another engine's op, the naive engine) release at once.

use std::cell::Cell;
use std::ptr::NonNull;

use smallvec::SmallVec;

use crate::core_ref::CoreRef;
use crate::op::OpRef;
use crate::var::{Var, VarInner};

/// What this thread holds (`var` None: EMPTY).
#[derive(Copy, Clone)]
struct Held {
    var: Option<NonNull<VarInner>>,
    /// The reads held, one per op whose finish is held with it.
    count: u32,
    /// The ops' engine: this worker's (`release_finished`).
    core: Option<CoreRef>,
}

const EMPTY: Held = Held {
    var: None,
    count: 0,
    core: None,
};

thread_local! {
    static HELD: Cell<Held> = const { Cell::new(EMPTY) };
}

/// Whether this thread holds a read.
#[inline]
pub(crate) fn holding() -> bool {
    HELD.with(|h| h.get().var.is_some())
}

/// Releases what this thread holds, if anything, dispatches what that
/// makes ready, and counts the ops finished.
#[inline]
pub(crate) fn flush() {
    let held = HELD.with(|h| h.replace(EMPTY));
    if let (Some(var), Some(core)) = (held.var, held.core) {
        release_held(var, held.count, core);
    }
}

#[cold]
#[allow(unsafe_code)]
fn release_held(var: NonNull<VarInner>, count: u32, core: CoreRef) {
    let mut grants: SmallVec<[OpRef; 8]> = SmallVec::new();
    // SAFETY: this thread holds `count` read grants of the var (HOLDING),
    // taken over from finished ops; released once, here, and the address
    // is not used after.
    unsafe { Var::at(var).release_reads(count, &mut grants) };
    crate::core::dispatch_granted(grants);
    // The core is this worker's engine's, which outlives its workers
    // (`core_ref.rs`, C1).
    core.ops_finished(count as usize);
}

/// Before a worker runs `op`: flushes unless `op` reads the held var.
#[inline]
pub(crate) fn before_run(op: &OpRef) {
    // A loop: a flush may run inline tasks whose finishes hold reads again.
    while let Some(var) = HELD.with(Cell::get).var {
        if op.reads().iter().any(|v| v.addr() == var) {
            return;
        }
        flush();
    }
}

/// Releases the grants of `op`, finished (it ran), holding one read over
/// where this module allows it (see the module docs), and dispatches what
/// became ready. True if a read is held: the op is then counted finished
/// by the flush that releases it, not by the caller.
///
/// # Safety
/// As `core::release`'s, for `op`'s vars.
#[allow(unsafe_code)]
#[inline]
pub(crate) unsafe fn release_finished(op: &OpRef) -> bool {
    let (reads, writes) = (op.reads(), op.writes());
    if reads.is_empty() || !crate::pool::is_worker_of(op.core.id) || crate::core::in_op() {
        // SAFETY: the caller's contract.
        unsafe { crate::core::release(reads, writes, true) };
        return false;
    }
    let held = HELD.with(Cell::get);
    let mut i = 0;
    let mut count = 1;
    match held
        .var
        .map(|var| reads.iter().position(|v| v.addr() == var))
    {
        Some(Some(at)) => {
            i = at;
            count += held.count;
        }
        Some(None) => {
            flush();
            // Subtle: the flush may have run inline tasks (its grants'),
            // whose finishes hold reads of their own: keep those, and
            // release this op's at once.
            if holding() {
                // SAFETY: the caller's contract.
                unsafe { crate::core::release(reads, writes, true) };
                return false;
            }
        }
        None => {}
    }
    HELD.with(|h| {
        h.set(Held {
            var: Some(reads[i].addr()),
            count,
            core: Some(op.core),
        })
    });
    // SAFETY: the caller's contract; read `i`'s grant is now this
    // thread's (HOLDING), the others are released.
    unsafe {
        if i > 0 {
            crate::core::release(&reads[..i], &[], true);
        }
        crate::core::release(&reads[i + 1..], writes, true);
    }
    true
}
