//! How a node ends: in order (`shutdown`: leave the cluster, let queued
//! answers go out, fail what is still waiting, stop the runtime), abruptly
//! (`kill`, a crash for tests), or from outside (`NodeEnd`: fenced, the
//! scheduler lost, the job over), and who is told.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::TransportError;
use crate::link::Link;

use super::{Ctl, Inner, Postoffice};

/// Why this node can no longer take part in the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEnd {
    /// The scheduler declared this node dead while it was alive (it was
    /// stopped or cut off beyond the heartbeat timeout): its rank may be
    /// taken by a restart, so it must stop.
    Fenced(String),
    /// The scheduler is gone (its connection closed, or it was silent
    /// beyond `PSKV_SCHEDULER_TIMEOUT`).
    SchedulerLost(String),
    /// Every worker is gone: the job is over. `failed`: a worker died.
    JobEnded {
        /// Why.
        reason: String,
        /// A worker died.
        failed: bool,
    },
}

impl NodeEnd {
    /// Whether the end is a failure (anything but every worker leaving in
    /// order).
    pub fn is_failure(&self) -> bool {
        !matches!(self, NodeEnd::JobEnded { failed: false, .. })
    }
}

impl std::fmt::Display for NodeEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeEnd::Fenced(r) => write!(f, "this node was fenced: {r}"),
            NodeEnd::SchedulerLost(r) => write!(f, "lost the scheduler: {r}"),
            NodeEnd::JobEnded { reason, .. } => write!(f, "the job ended: {reason}"),
        }
    }
}

/// Sees this node's end, once, on an I/O thread: it must not block.
pub type EndWatcher = Arc<dyn Fn(&NodeEnd) + Send + Sync>;

impl Postoffice {
    /// Why this node can no longer take part in the cluster, if it cannot
    /// (fenced, the scheduler lost, the job ended).
    pub fn end(&self) -> Option<NodeEnd> {
        self.inner().end.lock().clone()
    }

    /// Adds a watcher of this node's end (called at once if it has ended).
    pub fn watch_end(&self, watcher: EndWatcher) {
        let inner = self.inner();
        let ended = {
            let end = inner.end.lock();
            inner.end_watchers.write().push(watcher.clone());
            end.clone()
        };
        if let Some(e) = ended {
            watcher(&e);
        }
    }

    /// Scheduler: waits until every node has left or died (or `timeout`
    /// passes); an error names the nodes that died.
    pub fn wait_all_left(&self, timeout: Duration) -> Result<(), TransportError> {
        match self.inner().all_left.wait(timeout) {
            Some(r) => r.map_err(TransportError::NotRunning),
            None => Err(TransportError::Timeout {
                what: "every node to leave the cluster".into(),
                after: timeout,
            }),
        }
    }

    /// Leaves the cluster in order and stops this node's threads (also done
    /// when the last handle is dropped).
    pub fn shutdown(&self) {
        self.inner().shutdown(Duration::from_secs(2));
    }

    /// Whether this node was shut down (or killed).
    pub fn is_shut_down(&self) -> bool {
        self.inner().shutting_down.load(Ordering::Acquire)
    }

    /// Stops abruptly, as a crash would: connections close without leaving
    /// the cluster (the scheduler declares this node dead). For tests.
    #[doc(hidden)]
    pub fn kill(&self) {
        let inner = self.inner();
        inner.shutting_down.store(true, Ordering::Release);
        // The pollers hold the node (their sink): none once it is gone.
        *inner.pollers.write() = Arc::new(Vec::new());
        let links: Vec<Arc<Link>> = inner.links.lock().by_id.values().cloned().collect();
        for l in links {
            l.close("killed");
        }
        if let Some(rt) = inner.rt.lock().take() {
            rt.shutdown_background();
        }
    }
}

impl Inner {
    pub(super) fn shutdown(&self, grace: Duration) {
        if self.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        // The pollers hold the node (their sink): none once it stops.
        *self.pollers.write() = Arc::new(Vec::new());
        if let Ctl::Member(m) = &mut *self.ctl.lock() {
            m.leave(Instant::now());
        }
        self.pump();
        // Let the Leave and any answers already queued go out, and wait
        // for the scheduler's answer to the Leave: closing before it may
        // be taken for a death (the close can reach the scheduler's
        // bookkeeping before the Leave does).
        let deadline = Instant::now() + grace;
        let wait = || loop {
            let busy = self
                .links
                .lock()
                .by_id
                .values()
                .any(|l| !l.is_closed() && !l.is_idle());
            // The member stops waiting once answered or once its link to
            // the scheduler closes (`on_closed` tells it, shutting down or
            // not).
            let unanswered = matches!(&*self.ctl.lock(), Ctl::Member(m) if m.awaits_leave_ack());
            if !(busy || unanswered) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        // Subtle: on a thread of a runtime (the last handle dropped in a
        // task or a request's callback), the wait must not hold up that
        // runtime: with one I/O thread (`PSKV_IO_THREADS=1`) no reader
        // could deliver the answer, and the wait would run out its grace.
        // `block_in_place` hands the thread's other tasks to a new thread
        // first; not the current one: dropped on the task that reads the
        // scheduler's link (a node watcher's callback), the wait still runs
        // out its grace. It refuses (panics, before it runs anything) on a
        // thread that entered a multi-thread runtime's handle from inside
        // a current-thread runtime: then the wait runs here. Not while
        // unwinding, where a second panic would abort.
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let handed = multi
            && !std::thread::panicking()
            && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                tokio::task::block_in_place(wait)
            }))
            .is_ok();
        if !handed {
            wait();
        }
        let done = self.reqs.lock().tracker.fail_all("this node shut down");
        self.complete(done);
        let links: Vec<Arc<Link>> = self.links.lock().by_id.values().cloned().collect();
        for l in links {
            l.close("this node shut down");
        }
        for (_, slot) in self.barriers.lock().drain() {
            slot.set(Err("this node shut down".into()));
        }
        self.joined.set(Err(TransportError::NotRunning(
            "this node shut down".into(),
        )));
        if let Some(rt) = self.rt.lock().take() {
            // Legal from any thread, including the runtime's own.
            rt.shutdown_background();
        }
        let offset = self.clock.lock().offset();
        crate::trace::write(self.cfg.role, self.my_id(), offset);
    }
}
