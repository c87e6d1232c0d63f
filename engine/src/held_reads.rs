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
//! - The finish of an op that reads, on a worker of the op's engine,
//!   outside any closure, before the worker left its loop
//!   (`release_finished`, from `core::complete`): if its first read is of
//!   the held var and fewer than `HOLD_CAP` are held, `n + 1`, and that
//!   read is not released; else what is held is released (`flush`) and the
//!   op's first read is held (`n = 1`), unless that flush's inline tasks
//!   held reads of their own (then the op's read is released at once).
//!   Its other vars are released as before, all of them before any op they
//!   grant is dispatched (`core::release`).
//! - Back to EMPTY (`flush`: the reads counted off under one lock, what
//!   that grants dispatched, then the ops counted finished):
//!   - when the worker has taken an op that does not read `v`
//!     (`must_flush_before`, in `pool::worker_loop`): it gives the op back,
//!     first in its priority's turn, and takes again, so that what the
//!     release made ready competes with it by priority, and what inline
//!     tasks run by the release kept on this worker is queued for all;
//!   - when it finds nothing ready, before it searches or sleeps
//!     (`pool::PoolShared::pop`; what inline tasks kept is queued there);
//!   - before each inline task it runs (`inline::drain`);
//!   - when it leaves its loop (`stop_holding`: it holds nothing after).
//!
//! A flush may run inline tasks whose finishes hold again (the last task
//! of a drain, say): each of the points above looks again, so a worker
//! runs an op, searches or sleeps only with nothing held, or with
//! reads of a var that the op it runs reads too (whose writes wait for
//! that op anyway): never while it waits or runs a closure that could
//! wait for a write of `v`. What the engine's users see: an op counts as
//! finished when all its vars are released, as before, but perhaps later
//! than its closure returned (when its worker next takes an op that does
//! not read `v`, or finds nothing ready); `wait_for_all` returns when every
//! read is counted off. An `Async` op that writes `v`, pushed in the moment
//! between a finish and its worker's next take, is not run at its push
//! (`try_run_now` answers that it could not): it is queued and runs when
//! the read goes, as behind any running read. A write of `v` waits no
//! longer for a held read: every read held was granted before any write
//! queued behind it (a read queues behind a waiting write), so the write
//! waited for them all anyway, and the flush comes before the worker runs
//! anything else.
//! Finishes elsewhere (a completion on another thread, inside a closure,
//! another engine's op, the naive engine, a worker that left its loop)
//! release at once.

use std::cell::Cell;
use std::ptr::NonNull;

use smallvec::SmallVec;

use crate::core_ref::CoreRef;
use crate::op::{OpRef, Waiting};
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

/// The most reads held at once: a worker that never runs out of ops that
/// read one var releases them at least this often (the var's count of
/// running reads, a `u32`, never nears its bound; the ops' finished count
/// lags by this many at most).
const HOLD_CAP: u32 = 1 << 16;

const EMPTY: Held = Held {
    var: None,
    count: 0,
    core: None,
};

thread_local! {
    static HELD: Cell<Held> = const { Cell::new(EMPTY) };
    /// Set when this worker left its loop (`stop_holding`).
    static STOPPED: Cell<bool> = const { Cell::new(false) };
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
    let mut grants: SmallVec<[Waiting; 8]> = SmallVec::new();
    // SAFETY: this thread holds `count` read grants of the var (HOLDING),
    // taken over from finished ops; released once, here, and the address
    // is not used after.
    unsafe { Var::at(var).release_reads(count, &mut grants) };
    crate::core::dispatch_granted(&mut grants);
    // The core is this worker's engine's, which outlives its workers
    // (`core_ref.rs`, C1).
    core.ops_finished(count as usize);
}

/// Whether this worker must flush before it runs `op`: it holds reads of a
/// var that `op` does not read.
#[inline]
pub(crate) fn must_flush_before(op: &OpRef) -> bool {
    HELD.with(|h| h.get().var)
        .is_some_and(|var| !op.reads().iter().any(|v| v.addr() == var))
}

/// Flushes, and holds no read from here on on this thread (a worker that
/// leaves its loop): what the flush and later finishes here release goes
/// at once.
pub(crate) fn stop_holding() {
    STOPPED.with(|s| s.set(true));
    flush();
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
    if reads.is_empty()
        || !crate::pool::is_worker_of(op.core.id)
        || crate::core::in_op()
        || STOPPED.with(Cell::get)
    {
        // SAFETY: the caller's contract.
        unsafe { crate::core::release(reads, writes, true) };
        return false;
    }
    let held = HELD.with(Cell::get);
    let mut count = 1;
    if let Some(var) = held.var {
        if reads[0].addr() == var && held.count < HOLD_CAP {
            count += held.count;
        } else {
            // Another var held (or this one, read after another: rare; it
            // goes, to keep one release path, its vars released before
            // anything they grant is dispatched), or `HOLD_CAP` reads.
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
    }
    HELD.with(|h| {
        h.set(Held {
            var: Some(reads[0].addr()),
            count,
            core: Some(op.core),
        })
    });
    // SAFETY: the caller's contract; read 0's grant is now this thread's
    // (HOLDING), the others are released (all before any op they grant is
    // dispatched: a dispatch may run an inline task whose drain flushes,
    // counting this op finished, which must come after all its vars).
    unsafe { crate::core::release(&reads[1..], writes, true) };
    true
}
