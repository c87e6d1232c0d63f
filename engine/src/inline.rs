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

#[derive(Default)]
struct Trampoline {
    active: bool,
    queue: VecDeque<Task>,
}

thread_local! {
    static TRAMPOLINE: RefCell<Trampoline> = RefCell::new(Trampoline::default());
}

/// Whether this thread is inside `run` (an op running inline, or finishing).
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
    let Some(mut task) = outermost else { return };
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
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            TRAMPOLINE.with(|t| t.borrow_mut().active = false);
            crate::pool::allow_keep(self.0);
        }
    }
    let _reset = Reset(crate::pool::allow_keep(false));
    loop {
        match task {
            Task::Execute(op) => crate::core::execute(op, 0),
            Task::Stop(op) => crate::core::stop(&op),
        }
        match TRAMPOLINE.with(|t| t.borrow_mut().queue.pop_front()) {
            Some(next) => task = next,
            None => break,
        }
    }
}
