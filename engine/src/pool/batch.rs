//! A worker's batch: the ops of its pool that the op it just finished made
//! ready, kept to run here next or to queue under one lock (`keep_local`).

use std::sync::Arc;

use smallvec::SmallVec;

use super::PoolShared;
use crate::op::OpRef;

/// Worker-local state: the pool this thread serves, and the ops of that pool
/// made ready by the op this worker just finished (or by the finishes of
/// inline tasks that a release of its held reads ran: `worker_loop` and
/// `pop` queue those).
///
/// When a `push_sync` op finishes on a worker, the ops it makes ready that
/// belong to the same pool are collected here instead of being queued one by
/// one. After the finish, the worker either runs the single collected op at
/// once, when the inbox is empty and its priority is above every queued op
/// or nothing is queued (`queued`/`top` hints), or queues the whole batch and
/// takes the next op under one lock. Strictly above, so queued ops of equal
/// priority keep their FIFO turn; and never past the inbox, whose ops'
/// priorities are not known until a worker moves them in. Subtle: the hints
/// are read without the lock; a racing push of a higher-priority op can at
/// worst start one op later.
struct Local {
    pool: *const PoolShared,
    batch: SmallVec<[OpRef; 4]>,
}

thread_local! {
    static LOCAL: std::cell::RefCell<Local> = const {
        std::cell::RefCell::new(Local { pool: std::ptr::null(), batch: SmallVec::new_const() })
    };
    /// Whether `keep_local` may keep: inside a finish on a worker. A cell of
    /// its own (const, no lazy init): it is set and reset around every op.
    static ALLOW: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Allows (or stops allowing) `keep_local` on this thread; what it was.
/// Callers restore it: finishes nest (an op run inline inside another's
/// finish), and each level must leave the outer one's setting as it was.
#[inline]
pub(crate) fn allow_keep(on: bool) -> bool {
    ALLOW.with(|a| a.replace(on))
}

/// Collects `op` into this worker's batch if it is a worker of `pool` inside
/// an allowed finish; gives it back otherwise.
#[inline]
pub(crate) fn keep_local(pool: &PoolShared, op: OpRef) -> Option<OpRef> {
    // `ALLOW` first: a bare cell, where `LOCAL` is a `RefCell` to borrow
    // and a pool to compare (outside a worker's finish, as at every push,
    // the cell is all it reads).
    if !ALLOW.with(std::cell::Cell::get) {
        return Some(op);
    }
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        if std::ptr::eq(l.pool, pool) {
            l.batch.push(op);
            None
        } else {
            Some(op)
        }
    })
}

/// The ops this worker's last finish made ready and kept (`keep_local`),
/// if any (most finishes make none: then no vector is moved or dropped).
#[inline]
pub(super) fn take_batch() -> Option<SmallVec<[OpRef; 4]>> {
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        (!l.batch.is_empty()).then(|| std::mem::take(&mut l.batch))
    })
}

/// Makes this thread a worker of `pool` for `keep_local` (at the start of
/// its loop).
pub(super) fn serve(pool: &Arc<PoolShared>) {
    LOCAL.with(|l| l.borrow_mut().pool = Arc::as_ptr(pool));
}
