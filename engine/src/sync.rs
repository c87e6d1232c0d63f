//! The synchronisation primitives of the engine's core, swapped for `loom`'s
//! under `--cfg loom` so that the per-var state machine and the op wait counter
//! can be model-checked (see `var::queue::loom_tests`).
//!
//! Only `var/` and the op's wait counter (and the profiler's thread id
//! beside it in the op's header) use these; the worker pools use
//! `parking_lot` and `std` directly because loom does not model them. The
//! var queues' lock is this module's own test-and-set lock (`spin_lock`;
//! loom's mutex under `--cfg loom`, so the model checks the state machine
//! it guards, and a test here the lock itself).

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

#[cfg(not(loom))]
pub(crate) use spin_lock::Mutex;

/// The per-var queues' lock: one word, taken with a compare-exchange and
/// released with a plain store (parking_lot's release is a second
/// compare-exchange, to look for sleepers: on a 4 B call's path, where
/// every op takes and releases each of its vars' locks twice, that second
/// atomic write per hold was a quarter of the push's own time).
///
/// States: FREE (`false`) and HELD (`true`). `lock` moves FREE → HELD with
/// Acquire; the guard's drop stores FREE with Release, so each holder sees
/// every write of the holders before it. A contended `lock` spins on a
/// plain load (no cache-line traffic while it waits), then yields its core
/// to the holder (on a VM with fewer cores than threads, a holder
/// preempted inside its few instructions must get to run); it never
/// sleeps, which suits critical sections of a few dozen instructions and
/// would not suit long ones.
#[cfg(not(loom))]
#[allow(unsafe_code)]
mod spin_lock {
    use std::cell::UnsafeCell;
    use std::sync::atomic::{AtomicBool, Ordering};

    pub(crate) struct Mutex<T> {
        held: AtomicBool,
        value: UnsafeCell<T>,
    }

    // SAFETY: the value is reached only through a guard, and one guard at
    // most lives at a time (the `held` word), as with any mutex.
    unsafe impl<T: Send> Send for Mutex<T> {}
    unsafe impl<T: Send> Sync for Mutex<T> {}

    impl<T> Mutex<T> {
        pub(crate) const fn new(value: T) -> Self {
            Mutex {
                held: AtomicBool::new(false),
                value: UnsafeCell::new(value),
            }
        }

        #[inline]
        pub(crate) fn lock(&self) -> Guard<'_, T> {
            if self
                .held
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                self.lock_contended();
            }
            Guard { m: self }
        }

        #[cold]
        fn lock_contended(&self) {
            let mut spins = 0u32;
            loop {
                while self.held.load(Ordering::Relaxed) {
                    if spins < 64 {
                        spins += 1;
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
                if self
                    .held
                    .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return;
                }
            }
        }
    }

    impl<T: Default> Default for Mutex<T> {
        fn default() -> Self {
            Mutex::new(T::default())
        }
    }

    impl<T> std::fmt::Debug for Mutex<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Mutex { .. }")
        }
    }

    /// A held lock; released on drop.
    pub(crate) struct Guard<'a, T> {
        m: &'a Mutex<T>,
    }

    impl<T> std::ops::Deref for Guard<'_, T> {
        type Target = T;

        fn deref(&self) -> &T {
            // SAFETY: this guard holds the lock.
            unsafe { &*self.m.value.get() }
        }
    }

    impl<T> std::ops::DerefMut for Guard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: this guard holds the lock, and is borrowed mutably.
            unsafe { &mut *self.m.value.get() }
        }
    }

    impl<T> Drop for Guard<'_, T> {
        fn drop(&mut self) {
            self.m.held.store(false, Ordering::Release);
        }
    }
}

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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::Mutex;
    use std::sync::Arc;

    /// Holders exclude each other and see each other's writes: more
    /// threads than this VM has cores, each adding under the lock.
    #[test]
    fn the_var_lock_excludes_and_publishes() {
        let m = Arc::new(Mutex::new((0u64, 0u64)));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        let mut g = m.lock();
                        // Two fields moved apart by a torn update would differ.
                        g.0 += 1;
                        g.1 = g.0;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let g = m.lock();
        assert_eq!(*g, (80_000, 80_000));
    }
}
