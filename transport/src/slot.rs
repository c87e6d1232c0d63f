//! A one-shot slot: set once from any thread; waited on by a blocking
//! thread (with a timeout) or awaited by a task.
//!
//! States: EMPTY → FULL (`set`, once; later sets are ignored) → TAKEN (the
//! waiter took the value). `set` stores the value and takes the waker under
//! the lock, then wakes outside it; waiters check under the same lock before
//! sleeping or registering, so no wake-up is lost.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::spin::{spin_until, Spin};

thread_local! {
    /// The spin budget of this thread's blocking waits on slots.
    static THREAD_SPIN: std::cell::Cell<Spin> = std::cell::Cell::new(Spin::new());
}

struct State<T> {
    value: Option<T>,
    set: bool,
    waker: Option<Waker>,
}

/// The shared slot.
pub(crate) struct Slot<T> {
    state: Mutex<State<T>>,
    cv: Condvar,
    /// Mirrors `set` for waiters that spin without taking the lock.
    ready: AtomicBool,
}

impl<T> Slot<T> {
    pub(crate) fn new() -> Arc<Slot<T>> {
        Arc::new(Slot {
            state: Mutex::new(State {
                value: None,
                set: false,
                waker: None,
            }),
            cv: Condvar::new(),
            ready: AtomicBool::new(false),
        })
    }

    /// Stores `value` if nothing was stored yet; returns whether it did.
    pub(crate) fn set(&self, value: T) -> bool {
        let mut st = self.state.lock();
        if st.set {
            return false;
        }
        st.set = true;
        st.value = Some(value);
        self.ready.store(true, Ordering::Release);
        let waker = st.waker.take();
        drop(st);
        self.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Whether a value was stored.
    pub(crate) fn is_set(&self) -> bool {
        self.state.lock().set
    }

    /// Blocks until a value is stored (and takes it) or `timeout` passes.
    pub(crate) fn wait(&self, timeout: Duration) -> Option<T> {
        let deadline = Instant::now() + timeout;
        // Answers often come within tens of microseconds, and waking a
        // sleeping thread costs about as much on a VM: watch the flag a
        // moment first (an adaptive budget per thread, see spin.rs).
        let ready = || self.ready.load(Ordering::Acquire);
        let waited = (!ready()).then(|| {
            let start = Instant::now();
            let budget = THREAD_SPIN.with(|s| s.get().budget());
            spin_until(&ready, budget.min(timeout));
            start
        });
        let mut st = self.state.lock();
        while !st.set {
            if self.cv.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
        if let Some(start) = waited {
            THREAD_SPIN.with(|s| {
                let mut spin = s.get();
                spin.record(start.elapsed());
                s.set(spin);
            });
        }
        st.value.take()
    }

    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut st = self.state.lock();
        if st.set {
            Poll::Ready(st.value.take())
        } else {
            st.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// A future over a slot.
pub(crate) struct SlotFuture<T>(pub(crate) Arc<Slot<T>>);

impl<T> Future for SlotFuture<T> {
    type Output = Option<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.0.poll_take(cx)
    }
}
