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

/// A value on cache lines of its own (128 bytes: the pair of lines x86's
/// adjacent-line prefetcher fetches together), so that writes to it do not
/// evict its neighbours from other cores' caches, nor theirs it. Also used
/// as a struct's first field to keep an `Arc`'s counts off the lines of the
/// fields behind them.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}
