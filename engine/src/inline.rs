//! Running ops inline on the current thread without recursion.
//!
//! Async ops, `delete_var` ops, every op of the naive engine, and ops failed
//! at shutdown run on the thread that makes them ready. Finishing one op can
//! make the next ready, which would run it inside the first one's finish, and
//! so on: a chain of 100,000 such ops would overflow the stack. So each thread
//! has a trampoline: the outermost `run` on a thread drains a local queue;
//! nested calls only enqueue.
//!
//! States per thread: IDLE (`active == false`, queue empty) and DRAINING
//! (`active == true`). Only the thread itself touches its trampoline.

use std::cell::RefCell;
use std::collections::VecDeque;

use crate::op::OpRef;

pub(crate) enum Task {
    /// Run the op's closure.
    Execute(OpRef),
    /// Fail the op: the engine stopped.
    Stop(OpRef),
}

struct Trampoline {
    active: bool,
    queue: VecDeque<Task>,
}

thread_local! {
    static TRAMPOLINE: RefCell<Trampoline> = const {
        RefCell::new(Trampoline { active: false, queue: VecDeque::new() })
    };
}

/// Whether this thread is inside `run` or `scope` (an op running inline,
/// or finishing).
pub(crate) fn is_active() -> bool {
    TRAMPOLINE.with(|t| t.borrow().active)
}

/// Runs `task` now, or after the task this thread is running inline.
pub(crate) fn run(task: Task) {
    let outermost = TRAMPOLINE.with(|t| {
        let mut t = t.borrow_mut();
        if t.active {
            t.queue.push_back(task);
            None
        } else {
            t.active = true;
            Some(task)
        }
    });
    let Some(task) = outermost else { return };
    drain(|| execute(task));
}

/// Runs `f` as this thread's outermost inline task (an op run at its
/// push): inline tasks that `f` makes (an op it pushes, ops its finish
/// makes ready) are queued and run after it, as after any inline task,
/// not inside it. The caller makes sure no drain is under way on this
/// thread (`is_active`).
pub(crate) fn scope<R>(f: impl FnOnce() -> R) -> R {
    TRAMPOLINE.with(|t| {
        let mut t = t.borrow_mut();
        debug_assert!(!t.active, "inline::scope inside a drain");
        t.active = true;
    });
    drain(f)
}

fn execute(task: Task) {
    match task {
        Task::Execute(op) => crate::core::execute(op, 0),
        Task::Stop(op) => crate::core::stop(&op),
    }
}

/// Runs `first` and then the tasks queued meanwhile, with `active` set (by
/// the caller) and reset at the end.
fn drain<R>(first: impl FnOnce() -> R) -> R {
    // Subtle: the guard resets `active` even if a task unwinds (execute
    // catches closure panics, but a panic in the engine itself must not leave
    // the thread unable to run inline ops).
    //
    // Subtle: inline ops run with keeping off (`pool::keep_local`), restored
    // after: the outermost `run` on a worker is often inside another op's
    // finish, which keeps, and ops that an inline closure pushes to this
    // worker's pool must be queued for every worker, not kept here behind
    // the closure (one that waited for them would wait forever). Not
    // covered: the finish of a `delete_var` op drained here keeps what it
    // makes ready (as any finish on a worker does) while later tasks of the
    // drain run; only a push racing the deletion can queue an op behind it.
    struct Reset {
        keep: bool,
        /// `active` was reset already (with the last look at the queue).
        left: bool,
    }
    impl Drop for Reset {
        fn drop(&mut self) {
            if !self.left {
                TRAMPOLINE.with(|t| t.borrow_mut().active = false);
            }
            crate::pool::allow_keep(self.keep);
        }
    }
    let mut reset = Reset {
        keep: crate::pool::allow_keep(false),
        left: false,
    };
    // No read held over while an inline closure runs (it may wait:
    // `held_reads.rs`), before the first task and each next one.
    crate::held_reads::flush();
    let r = first();
    // One look per task: the next one, or the drain ends (`active` reset
    // in the same borrow).
    let next = || {
        TRAMPOLINE.with(|t| {
            let mut t = t.borrow_mut();
            let next = t.queue.pop_front();
            t.active = next.is_some();
            next
        })
    };
    while let Some(task) = next() {
        crate::held_reads::flush();
        execute(task);
    }
    reset.left = true;
    r
}
