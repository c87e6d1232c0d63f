//! Busy polling of a node's TCP links by its I/O threads before they sleep
//! ([`IdlePoll`]).
//!
//! A link's frames are read by a task on the node's runtime; a runtime
//! thread with nothing to run sleeps in the kernel (epoll), and a frame
//! that comes for a sleeping thread wakes it. On the VMs this project is
//! measured on, that wake-up is the largest part of a small round over
//! TCP: the sender's write waits for the interrupt to the sleeping vCPU,
//! and the thread runs 10 to 20 µs after the frame came (BENCHMARKS.md,
//! "A server's I/O threads watch their links before they sleep"). So a
//! node's runtime thread about to sleep (tokio's `on_thread_park`) first
//! watches the node's TCP sockets for a while, yielding the core between
//! looks; once one is readable it stops and the runtime's own epoll finds
//! the frame at once: the thread never slept.
//!
//! # States
//!
//! The sockets are in an epoll set of this node's own (level-triggered,
//! readable), looked at with a zero timeout: one system call a look for
//! any number of links. A socket leaves the set when its last descriptor
//! closes (the kernel's rule for epoll), so nothing is removed by hand and
//! a reused descriptor number is not watched by mistake.
//!
//! At most one thread of the runtime watches at a time (`watching`, taken
//! by a compare-exchange, Acquire/Release; the others sleep at once), for
//! at most the budget. A watch also stops when a task was queued for the
//! runtime from outside it (its global queue: a caller's frame for a
//! writer task): tokio runs nothing while a thread is in this hook, so the
//! task would wait out the budget. A socket that stays readable without
//! being read (a reader held back, a peer that closed) makes every watch
//! stop at its first look: no watch, never a longer one.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The TCP sockets a node's runtime threads watch before they sleep.
pub(crate) struct IdlePoll {
    /// The epoll set (None: watching is off, or the set could not be made).
    set: Option<OwnedFd>,
    budget: Duration,
    watching: AtomicBool,
    /// The runtime, for its global queue (set once it is built).
    rt: OnceLock<tokio::runtime::Handle>,
}

impl IdlePoll {
    /// Watching for up to `budget` before each sleep (zero: never).
    pub(crate) fn new(budget: Duration) -> IdlePoll {
        let set = (!budget.is_zero()).then(make_set).flatten();
        IdlePoll {
            set,
            budget,
            watching: AtomicBool::new(false),
            rt: OnceLock::new(),
        }
    }

    /// The runtime whose threads call [`IdlePoll::before_park`].
    pub(crate) fn set_runtime(&self, rt: tokio::runtime::Handle) {
        let _ = self.rt.set(rt);
    }

    /// Watches `socket` (a link's) from now on, until it closes.
    pub(crate) fn watch(&self, socket: RawFd) {
        let Some(set) = &self.set else { return };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: socket as u64,
        };
        // SAFETY: epoll_ctl on the set this value owns, with an open
        // socket and an event it only reads.
        let r = unsafe { libc::epoll_ctl(set.as_raw_fd(), libc::EPOLL_CTL_ADD, socket, &mut ev) };
        if r != 0 {
            tracing::debug!(
                "a TCP link is not watched before the I/O threads sleep: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// A runtime thread is about to sleep: watches the sockets first (at
    /// most one thread, at most the budget); returns once one is readable.
    pub(crate) fn before_park(&self) {
        let Some(set) = &self.set else { return };
        if self
            .watching
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let queued = || {
            self.rt
                .get()
                .is_some_and(|rt| rt.metrics().global_queue_depth() > 0)
        };
        let start = Instant::now();
        while !readable(set.as_raw_fd()) && !queued() && start.elapsed() < self.budget {
            std::thread::yield_now();
        }
        self.watching.store(false, Ordering::Release);
    }
}

/// A fresh epoll set, or None (logged) if the kernel refuses one.
fn make_set() -> Option<OwnedFd> {
    // SAFETY: epoll_create1 takes no pointers; a descriptor it returns is
    // owned by the OwnedFd alone.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        tracing::warn!(
            "no epoll set for watching TCP links before the I/O threads sleep: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    // SAFETY: `fd` was just returned by the kernel and is not owned yet.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether a socket of the set is readable now (no wait).
fn readable(set: RawFd) -> bool {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: room for one event, a zero timeout.
    unsafe { libc::epoll_wait(set, &mut ev, 1, 0) > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_watch_ends_when_a_socket_is_readable_and_lasts_the_budget_when_none_is() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, _) = listener.accept().unwrap();
        let budget = Duration::from_millis(300);
        let idle = IdlePoll::new(budget);
        idle.watch(rx.as_raw_fd());
        // Nothing to read: the whole budget.
        let t = Instant::now();
        idle.before_park();
        assert!(t.elapsed() >= budget);
        // A byte waits: at once.
        tx.write_all(b"x").unwrap();
        let t = Instant::now();
        while !readable(idle.set.as_ref().unwrap().as_raw_fd()) {
            assert!(t.elapsed() < Duration::from_secs(10), "the byte never came");
        }
        let t = Instant::now();
        idle.before_park();
        assert!(t.elapsed() < budget);
        // Off: never watches.
        let off = IdlePoll::new(Duration::ZERO);
        assert!(off.set.is_none());
        off.watch(rx.as_raw_fd());
        off.before_park();
    }

    #[test]
    fn a_task_queued_from_outside_ends_a_watch() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, _) = listener.accept().unwrap();
        // Long enough to tell a task run at once from one run after it.
        let budget = Duration::from_secs(2);
        let idle = std::sync::Arc::new(IdlePoll::new(budget));
        idle.watch(rx.as_raw_fd());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .on_thread_park({
                let idle = idle.clone();
                move || idle.before_park()
            })
            .build()
            .unwrap();
        idle.set_runtime(rt.handle().clone());
        // The runtime thread starts with nothing to run: it watches.
        let t = Instant::now();
        while !idle.watching.load(Ordering::Acquire) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the runtime thread never watched"
            );
            std::thread::yield_now();
        }
        let t = Instant::now();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        rt.spawn(async move { done_tx.send(()).unwrap() });
        done_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(t.elapsed() < budget, "the task waited out the watch");
    }

    #[test]
    fn one_thread_watches_at_a_time_and_a_closed_socket_leaves_the_set() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, _) = listener.accept().unwrap();
        let idle = IdlePoll::new(Duration::from_secs(60));
        idle.watch(rx.as_raw_fd());
        idle.watching.store(true, Ordering::Relaxed);
        // Another thread watches: this one returns at once.
        let t = Instant::now();
        idle.before_park();
        assert!(t.elapsed() < Duration::from_secs(30));
        idle.watching.store(false, Ordering::Relaxed);
        // The peer closes: readable (the end), so a watch ends at once;
        // once the socket itself closes, the set is empty again.
        drop(tx);
        idle.before_park();
        drop(rx);
        assert!(!readable(idle.set.as_ref().unwrap().as_raw_fd()));
    }
}
