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
//! watches the node's TCP data links for a while, yielding the core
//! between looks; once one is readable it stops, and the runtime's epoll
//! finds the frame at once: its vCPU never halted.
//!
//! # States
//!
//! The sockets are in an epoll set of this node's own (level-triggered,
//! readable), looked at with a zero timeout: one system call a look for
//! any number of links. A link's socket leaves the set when its reader
//! ends ([`WatchedLink::end`], while the socket is still open: the link's
//! writer may hold it open a while longer, and a peer's end left in the
//! set would end every watch at once), or else when its last descriptor
//! closes (the kernel's rule for epoll; a reused descriptor number is so
//! never watched by mistake). Links to the scheduler are not watched
//! (heartbeats), and no thread starts a watch while no data link is
//! (`watched` counts them: an shm or RDMA node never watches, nor a node
//! whose links have all ended).
//!
//! At most one thread of the runtime watches at a time (`watching`, taken
//! by a compare-exchange, Acquire/Release); the others park at once (one
//! of them may then sleep in the runtime's epoll, and a frame wakes it
//! even while another thread watches). A watch ends at a readable socket;
//! at a task queued for the runtime from outside it (its global queue: a
//! caller's frame for a writer task), since tokio runs nothing while a
//! thread is in this hook; while a link's writer waits for room in its
//! socket (`blocked`, counted by [`IdlePoll::writer_blocked`]'s guards:
//! only the runtime's epoll would see the room come); or at the budget,
//! checked between yields (a yield that ran another thread may overrun it
//! by that thread's turn). What else only the runtime's epoll sees (a
//! timer, an accept, a task woken inside the runtime) waits out the watch
//! (at most the budget). A socket that stays readable without being read
//! (a reader held back; a peer that closed, until its reader has ended)
//! ends every watch at its first look: no watch, never a longer one.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The TCP sockets a node's runtime threads watch before they sleep.
pub(crate) struct IdlePoll {
    /// The epoll set (None: watching is off, or the set could not be made).
    set: Option<OwnedFd>,
    budget: Duration,
    /// Data links watched: their live `WatchedLink`s (a socket whose
    /// guard dropped without `end` stays in the set, uncounted, until it
    /// closes).
    watched: AtomicUsize,
    watching: AtomicBool,
    /// Link writers waiting for room in their sockets.
    blocked: AtomicUsize,
    /// The runtime, for its global queue (set once it is built).
    rt: OnceLock<tokio::runtime::Handle>,
}

/// A data link in its node's watch ([`IdlePoll::watch`]), counted while
/// this lives.
pub(crate) struct WatchedLink {
    idle: Arc<IdlePoll>,
    socket: RawFd,
}

impl WatchedLink {
    /// The link's reader ended: its socket, still open (`socket`, the
    /// same descriptor as watched), leaves the set now.
    pub(crate) fn end(self, socket: BorrowedFd<'_>) {
        if socket.as_raw_fd() != self.socket {
            debug_assert!(false, "a watched link ended with another socket");
            return;
        }
        if let Some(set) = &self.idle.set {
            // SAFETY: epoll_ctl on the set this value's watch owns, with
            // the watched socket, open while `socket` is borrowed; a
            // delete takes no event.
            let r = unsafe {
                libc::epoll_ctl(
                    set.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    socket.as_raw_fd(),
                    std::ptr::null_mut(),
                )
            };
            if r != 0 {
                tracing::debug!(
                    "an ended TCP link stays in the watch until its socket closes: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

impl Drop for WatchedLink {
    fn drop(&mut self) {
        self.idle.watched.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A link's writer waits for room in its socket while this lives.
pub(crate) struct BlockedWriter<'a>(&'a IdlePoll);

impl Drop for BlockedWriter<'_> {
    fn drop(&mut self) {
        self.0.blocked.fetch_sub(1, Ordering::Relaxed);
    }
}

impl IdlePoll {
    /// Watching for up to `budget` before each sleep (zero: never).
    pub(crate) fn new(budget: Duration) -> IdlePoll {
        let set = (!budget.is_zero()).then(make_set).flatten();
        IdlePoll {
            set,
            budget,
            watched: AtomicUsize::new(0),
            watching: AtomicBool::new(false),
            blocked: AtomicUsize::new(0),
            rt: OnceLock::new(),
        }
    }

    /// Whether its threads watch at all (a hook to install).
    pub(crate) fn on(&self) -> bool {
        self.set.is_some()
    }

    /// The runtime whose threads call [`IdlePoll::before_park`].
    pub(crate) fn set_runtime(&self, rt: tokio::runtime::Handle) {
        let _ = self.rt.set(rt);
    }

    /// Watches `socket` (a data link's), counted while the guard lives;
    /// its `end` takes the socket out of the set, a drop alone leaves it
    /// there until it closes (None: watching is off, or the kernel
    /// refused, logged).
    pub(crate) fn watch(self: &Arc<Self>, socket: RawFd) -> Option<WatchedLink> {
        let set = self.set.as_ref()?;
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
            return None;
        }
        self.watched.fetch_add(1, Ordering::Relaxed);
        Some(WatchedLink {
            idle: self.clone(),
            socket,
        })
    }

    /// Says that a link's writer waits for room in its socket, until the
    /// guard drops: no watch meanwhile (a peer that stops reading keeps
    /// the node's watch off until its link ends).
    pub(crate) fn writer_blocked(&self) -> BlockedWriter<'_> {
        self.blocked.fetch_add(1, Ordering::Relaxed);
        BlockedWriter(self)
    }

    /// Whether a link's writer waits for room now.
    #[cfg(test)]
    pub(crate) fn writer_waits(&self) -> bool {
        self.blocked.load(Ordering::Relaxed) != 0
    }

    /// The data links watched now.
    #[cfg(test)]
    pub(crate) fn watched_links(&self) -> usize {
        self.watched.load(Ordering::Relaxed)
    }

    /// Whether a socket of the set is readable now.
    #[cfg(test)]
    pub(crate) fn any_readable(&self) -> bool {
        self.set.as_ref().is_some_and(|s| readable(s.as_raw_fd()))
    }

    /// A runtime thread is about to sleep: watches the sockets first (at
    /// most one thread, at most the budget); returns once one is readable
    /// or the watch has to end (module docs).
    pub(crate) fn before_park(&self) {
        let Some(set) = &self.set else { return };
        if self.watched.load(Ordering::Relaxed) == 0
            || self
                .watching
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // Not before the runtime is known: a watch that cannot see its
        // queue would keep a queued task waiting.
        let Some(metrics) = self.rt.get().map(tokio::runtime::Handle::metrics) else {
            self.watching.store(false, Ordering::Release);
            return;
        };
        let queued = || metrics.global_queue_depth() > 0;
        let start = Instant::now();
        while !readable(set.as_raw_fd())
            && !queued()
            && self.blocked.load(Ordering::Relaxed) == 0
            && start.elapsed() < self.budget
        {
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

    /// A connected pair of sockets on 127.0.0.1: (sender, receiver).
    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, _) = listener.accept().unwrap();
        (tx, rx)
    }

    /// A watch of `budget` that knows a runtime (one that runs nothing:
    /// its queue stays empty), and the runtime.
    fn idle_poll(budget: Duration) -> (Arc<IdlePoll>, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let idle = Arc::new(IdlePoll::new(budget));
        idle.set_runtime(rt.handle().clone());
        (idle, rt)
    }

    /// Waits (bounded) until the set has a readable socket.
    fn until_readable(idle: &IdlePoll) {
        let t = Instant::now();
        while !readable(idle.set.as_ref().unwrap().as_raw_fd()) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "nothing became readable"
            );
            std::thread::yield_now();
        }
    }

    /// Whether a watch by `idle` returns well within its (long) budget.
    fn returns_at_once(idle: &IdlePoll) -> bool {
        let t = Instant::now();
        idle.before_park();
        t.elapsed() < Duration::from_secs(20)
    }

    #[test]
    fn a_watch_lasts_the_budget_until_a_socket_is_readable() {
        let (mut tx, rx) = pair();
        // Nothing to read: the whole budget.
        let budget = Duration::from_millis(300);
        let (short, _rt) = idle_poll(budget);
        let _w = short.watch(rx.as_raw_fd()).unwrap();
        let t = Instant::now();
        short.before_park();
        assert!(t.elapsed() >= budget);
        let (idle, _rt) = idle_poll(Duration::from_secs(60));
        // No data link yet, or no runtime yet: no watch.
        assert!(returns_at_once(&idle));
        let unknown = Arc::new(IdlePoll::new(Duration::from_secs(60)));
        let _u = unknown.watch(rx.as_raw_fd()).unwrap();
        assert!(returns_at_once(&unknown));
        // A byte waits: at once.
        let _w2 = idle.watch(rx.as_raw_fd()).unwrap();
        tx.write_all(b"x").unwrap();
        until_readable(&idle);
        assert!(returns_at_once(&idle));
    }

    #[test]
    fn a_blocked_writer_ends_a_watch_and_zero_turns_watching_off() {
        let (_tx, rx) = pair();
        let (idle, _rt) = idle_poll(Duration::from_secs(60));
        let _w = idle.watch(rx.as_raw_fd()).unwrap();
        let blocked = idle.writer_blocked();
        assert!(returns_at_once(&idle));
        drop(blocked);
        assert!(!idle.writer_waits());
        // Zero: no set, so nothing to install and nothing watched.
        let off = Arc::new(IdlePoll::new(Duration::ZERO));
        assert!(!off.on());
        assert!(off.watch(rx.as_raw_fd()).is_none());
        assert_eq!(off.watched.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_task_queued_from_outside_ends_a_watch() {
        let (mut tx, rx) = pair();
        // Long enough to tell a task run at once from one run after it.
        let budget = Duration::from_secs(8);
        let idle = std::sync::Arc::new(IdlePoll::new(budget));
        let _w = idle.watch(rx.as_raw_fd()).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .on_thread_park({
                let idle = std::sync::Arc::downgrade(&idle);
                move || {
                    if let Some(idle) = idle.upgrade() {
                        idle.before_park();
                    }
                }
            })
            .build()
            .unwrap();
        idle.set_runtime(rt.handle().clone());
        // A task run and done: the runtime thread, which may have parked
        // before the runtime was known (no watch), parks again: it watches.
        rt.block_on(rt.spawn(async {})).unwrap();
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
        assert!(t.elapsed() < budget / 4, "the task waited out the watch");
        // A byte to read ends the watch the thread is in again, so the
        // runtime's end does not wait out the budget.
        tx.write_all(b"x").unwrap();
        drop(rt);
    }

    #[test]
    fn one_thread_watches_at_a_time_and_a_closed_socket_leaves_the_set() {
        let (tx, rx) = pair();
        let (idle, _rt) = idle_poll(Duration::from_secs(60));
        let _w = idle.watch(rx.as_raw_fd()).unwrap();
        idle.watching.store(true, Ordering::Relaxed);
        // Another thread watches: this one returns at once.
        assert!(returns_at_once(&idle));
        idle.watching.store(false, Ordering::Relaxed);
        // The peer closes: readable (the end), so a watch ends at once.
        drop(tx);
        until_readable(&idle);
        assert!(returns_at_once(&idle));
        // The socket itself closes: the set is empty again.
        drop(rx);
        assert!(!readable(idle.set.as_ref().unwrap().as_raw_fd()));
    }

    #[test]
    fn an_ended_link_leaves_the_watch_and_with_none_left_nothing_is_watched() {
        let (tx, rx) = pair();
        let (_tx2, rx2) = pair();
        let budget = Duration::from_millis(300);
        let (idle, _rt) = idle_poll(budget);
        let ended = idle.watch(rx.as_raw_fd()).unwrap();
        let live = idle.watch(rx2.as_raw_fd()).unwrap();
        // The first link's peer closes: its socket is readable for good.
        drop(tx);
        until_readable(&idle);
        // Its reader ends, the socket still open: out of the set, so the
        // other link's watch lasts its budget again.
        ended.end(std::os::fd::AsFd::as_fd(&rx));
        assert!(!readable(idle.set.as_ref().unwrap().as_raw_fd()));
        let t = Instant::now();
        idle.before_park();
        assert!(t.elapsed() >= budget);
        assert_eq!(idle.watched.load(Ordering::Relaxed), 1);
        // The last link's guard goes: nothing is watched, at any budget.
        drop(live);
        let (long, _rt2) = idle_poll(Duration::from_secs(60));
        let w = long.watch(rx2.as_raw_fd()).unwrap();
        drop(w);
        assert!(returns_at_once(&long));
        drop(rx);
    }
}
