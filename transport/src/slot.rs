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
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

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
        // moment first (PSKV_SPIN_US; 0 turns this off).
        spin_until(&|| self.ready.load(Ordering::Acquire), spin_budget());
        let mut st = self.state.lock();
        while !st.set {
            if self.cv.wait_until(&mut st, deadline).timed_out() {
                break;
            }
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

/// How long a waiter spins before sleeping: `PSKV_SPIN_US` microseconds
/// (default 50; 0: never spin). Read once.
pub(crate) fn spin_budget() -> Duration {
    static US: OnceLock<u64> = OnceLock::new();
    let us = *US.get_or_init(|| {
        std::env::var("PSKV_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(50)
            .min(10_000)
    });
    Duration::from_micros(us)
}

/// Spins until `ready()` or `budget` passes; whether it became ready.
pub(crate) fn spin_until(ready: &dyn Fn() -> bool, budget: Duration) -> bool {
    if budget.is_zero() {
        return ready();
    }
    let end = Instant::now() + budget;
    loop {
        for _ in 0..64 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if Instant::now() >= end {
            return ready();
        }
        // Give the core to whoever we are waiting for, if they need it
        // (with fewer cores than busy threads, pure spinning starves them).
        std::thread::yield_now();
    }
}
