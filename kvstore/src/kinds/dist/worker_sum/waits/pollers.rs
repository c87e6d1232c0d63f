//! Which threads of this worker poll a store's waits now (`Pollers`), so
//! the watcher stays off the gates while a caller polls.
//!
//! A thread waiting for an op polls the waits between its spins (the
//! store's progress hook: `Waits::poll`) and finishes each the moment its
//! round ends. The watcher asleep on a gate would be woken by that round's
//! end too, for nothing, on a core the callers need (back to back small
//! rounds woke it nearly every round); so while a thread polls, the
//! watcher sleeps on its condvar instead, and the last poller to stop
//! wakes it if waits are left (BENCHMARKS.md, "The gate watcher stays off
//! the gates while a caller polls").
//!
//! # States
//!
//! A thread is counted (`count`) from its first poll in a wait
//! (`Call::Poll`: `start`) to that wait's end (`Call::End`: its wait
//! ended while it polled; `Call::Leave`: it goes to sleep, or unwinds;
//! both `stop`). The engine ends every wait that polled with one of the
//! two, on the waiting thread, so the count is the number of threads
//! inside a polling wait (which includes a poller running a hook's work
//! between its polls, or descheduled: the watcher then naps, at most
//! `NAP` a look, where it would have slept on a gate); `start` counts a
//! thread once per wait (a thread-local list of the stores it is counted
//! in says whether it is), and `stop` uncounts only a counted thread
//! (`Leave` also comes from waits that never polled, and a polling wait
//! that sleeps sends it twice). A thread whose thread-locals are gone
//! counts nothing. Stores are told apart by an id never reused, not by address:
//! a thread's list may keep the id of a store dropped while it polled
//! (harmless), and a new store at that address must not find itself in
//! it.
//!
//! # Ordering
//!
//! Subtle: the watcher reads `count` (SeqCst, under the waits' lock, just
//! before it sleeps on the condvar) after it found a wait in the list; a
//! poller that stops decrements `count` (SeqCst) and then reads the
//! list's length (SeqCst) to decide whether to wake it; `Waits::add`
//! stores the length with SeqCst. So a poller that read no wait and a
//! watcher that read it still counted cannot both happen: one of the two
//! sees the other's write (the four accesses are in one total order).
//! What is not closed: the wake-up itself is a `notify_one` that may come
//! between the watcher's read of `count` and its sleep (a hook must not
//! wait for the lock, so it notifies under the lock only if `try_lock`
//! gets it); the watcher then sleeps out its `NAP` (1 ms), once.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use smallvec::SmallVec;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The ids of the stores' waits this thread is counted among the
    /// pollers of (one or two: one per store polled).
    static COUNTED: RefCell<SmallVec<[u64; 2]>> = RefCell::new(SmallVec::new());
}

/// The threads polling one store's waits.
pub(super) struct Pollers {
    id: u64,
    count: AtomicUsize,
}

impl Default for Pollers {
    fn default() -> Pollers {
        Pollers {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            count: AtomicUsize::new(0),
        }
    }
}

impl Pollers {
    /// This thread polls (counted once a wait).
    pub(super) fn start(&self) {
        let new = COUNTED.try_with(|c| {
            let mut c = c.borrow_mut();
            let new = !c.contains(&self.id);
            if new {
                c.push(self.id);
            }
            new
        });
        if new == Ok(true) {
            self.count.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// This thread polls no more; whether it was the last that did.
    pub(super) fn stop(&self) -> bool {
        let counted = COUNTED.try_with(|c| {
            let mut c = c.borrow_mut();
            let at = c.iter().position(|&id| id == self.id);
            at.map(|i| c.swap_remove(i)).is_some()
        });
        counted == Ok(true) && self.count.fetch_sub(1, Ordering::SeqCst) == 1
    }

    /// Whether some thread polls now.
    pub(super) fn any(&self) -> bool {
        self.count() != 0
    }

    /// How many threads poll now.
    pub(super) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_counts_once_per_wait_and_only_a_counted_one_stops() {
        let (a, b) = (Pollers::default(), Pollers::default());
        // A leave from a wait that never polled: nothing to uncount.
        assert!(!a.stop());
        a.start();
        a.start();
        b.start();
        assert!(a.any() && b.any());
        std::thread::scope(|s| {
            s.spawn(|| {
                a.start();
                // Two threads poll `a`: the first to stop is not the last.
                assert!(!a.stop());
                assert!(!a.stop(), "stopped twice");
            });
        });
        assert!(a.any());
        assert!(a.stop(), "the last poller of a");
        assert!(!a.any() && b.any(), "each store counts its own");
        assert!(!a.stop());
        assert!(b.stop());
        // A new store is not counted by an old one's id in this thread.
        let c = Pollers::default();
        assert!(!c.any() && !c.stop());
    }
}
