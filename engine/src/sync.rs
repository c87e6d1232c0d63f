//! The synchronisation primitives of the engine's core, swapped for `loom`'s
//! under `--cfg loom` so that the per-var state machine and the op wait counter
//! can be model-checked (see `var::loom_tests`).
//!
//! Only `var.rs` and the op wait counter use these; the worker pools use
//! `parking_lot` and `std` directly because loom does not model them.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicUsize, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicUsize, Ordering};

/// A mutex whose `lock` cannot fail (parking_lot's, or loom's under `--cfg loom`).
#[cfg(not(loom))]
pub(crate) type Mutex<T> = parking_lot::Mutex<T>;

#[cfg(loom)]
#[derive(Debug)]
pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(loom)]
impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Mutex(loom::sync::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        // A poisoned lock means a panic inside the model: report it as such.
        self.0
            .lock()
            .expect("loom model panicked while holding a var lock")
    }
}
