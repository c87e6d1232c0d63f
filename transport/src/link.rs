//! A link: one connection to one peer, whatever van carries it, with its
//! send queue.
//!
//! # The send queue
//!
//! Frames wait in a max-heap ordered by priority, then by the order they were
//! queued, so an urgent key's messages leave before a bulk key's (a frame
//! already being written is not interrupted). The van's writer takes
//! batches (several small frames go out in one vectored write). States:
//! OPEN → CLOSED (`close`, once, with a reason). After CLOSED, `send`
//! refuses and the writer drains nothing more.
//!
//! Writers are a tokio task (TCP) or a thread (shared memory), so a push
//! wakes both kinds of waiter: the tokio `Notify` keeps a permit if no task
//! waits, and the condvar is signalled under the queue lock.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering as AtomicOrdering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::protocol::NodeId;
use crate::wire::Frame;

/// A link's id, unique in the process (the scheduler's connection ids).
pub(crate) type LinkId = u64;

struct Queued {
    priority: i32,
    seq: u64,
    frame: Frame,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
struct QueueState {
    heap: BinaryHeap<Queued>,
    seq: u64,
    closed: Option<String>,
}

/// One connection to one peer.
pub(crate) struct Link {
    pub(crate) id: LinkId,
    peer: AtomicU32,
    pub(crate) van: &'static str,
    queue: Mutex<QueueState>,
    notify: tokio::sync::Notify,
    cv: Condvar,
    closed: AtomicBool,
}

impl Link {
    pub(crate) fn new(id: LinkId, peer: NodeId, van: &'static str) -> Link {
        Link {
            id,
            peer: AtomicU32::new(peer),
            van,
            queue: Mutex::new(QueueState::default()),
            notify: tokio::sync::Notify::new(),
            cv: Condvar::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// The peer's node id (0: not registered yet).
    pub(crate) fn peer(&self) -> NodeId {
        self.peer.load(AtomicOrdering::Acquire)
    }

    pub(crate) fn set_peer(&self, id: NodeId) {
        self.peer.store(id, AtomicOrdering::Release);
    }

    /// Queues a frame; gives it back with the reason if the link is closed.
    pub(crate) fn send(&self, frame: Frame) -> Result<(), String> {
        let mut q = self.queue.lock();
        if let Some(reason) = &q.closed {
            return Err(reason.clone());
        }
        let seq = q.seq;
        q.seq += 1;
        q.heap.push(Queued {
            priority: frame.priority,
            seq,
            frame,
        });
        drop(q);
        self.cv.notify_one();
        self.notify.notify_one();
        Ok(())
    }

    fn take_batch(q: &mut QueueState, max_bytes: usize) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(top) = q.heap.peek() {
            let len = top.frame.wire_len();
            if !out.is_empty() && bytes + len > max_bytes {
                break;
            }
            bytes += len;
            out.push(q.heap.pop().expect("peeked").frame);
        }
        out
    }

    /// The next frames to write (at least one; at most `max_bytes` unless a
    /// single frame is larger), or None once the link is closed.
    pub(crate) async fn next_batch(&self, max_bytes: usize) -> Option<Vec<Frame>> {
        loop {
            {
                let mut q = self.queue.lock();
                if q.closed.is_some() {
                    return None;
                }
                if !q.heap.is_empty() {
                    return Some(Self::take_batch(&mut q, max_bytes));
                }
            }
            self.notify.notified().await;
        }
    }

    /// As `next_batch`, for a writer thread; wakes every `tick` to let the
    /// caller check other conditions (returns an empty batch then).
    pub(crate) fn next_batch_blocking(
        &self,
        max_bytes: usize,
        tick: Duration,
    ) -> Option<Vec<Frame>> {
        let mut q = self.queue.lock();
        loop {
            if q.closed.is_some() {
                return None;
            }
            if !q.heap.is_empty() {
                return Some(Self::take_batch(&mut q, max_bytes));
            }
            if self.cv.wait_for(&mut q, tick).timed_out() {
                return Some(Vec::new());
            }
        }
    }

    /// Closes the link (first reason wins); queued frames are dropped.
    pub(crate) fn close(&self, reason: impl Into<String>) -> bool {
        let mut q = self.queue.lock();
        if q.closed.is_some() {
            return false;
        }
        q.closed = Some(reason.into());
        q.heap.clear();
        drop(q);
        self.closed.store(true, AtomicOrdering::Release);
        self.cv.notify_all();
        self.notify.notify_waiters();
        self.notify.notify_one();
        true
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(AtomicOrdering::Acquire)
    }

    pub(crate) fn close_reason(&self) -> Option<String> {
        self.queue.lock().closed.clone()
    }

    /// Frames waiting.
    pub(crate) fn queued(&self) -> usize {
        self.queue.lock().heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Kind;

    fn frame(priority: i32, tag: u64) -> Frame {
        let mut f = Frame::new(Kind::Request);
        f.priority = priority;
        f.request_id = tag;
        f
    }

    #[test]
    fn urgent_frames_leave_first_and_equal_ones_in_order() {
        let link = Link::new(1, 0, "test");
        for (p, tag) in [(0, 1), (5, 2), (0, 3), (9, 4), (5, 5)] {
            link.send(frame(p, tag)).unwrap();
        }
        let batch = link
            .next_batch_blocking(usize::MAX, Duration::from_millis(1))
            .unwrap();
        let tags: Vec<u64> = batch.iter().map(|f| f.request_id).collect();
        assert_eq!(tags, vec![4, 2, 5, 1, 3]);
        link.close("bye");
        assert!(link.send(frame(0, 6)).is_err());
        assert!(link
            .next_batch_blocking(1, Duration::from_millis(1))
            .is_none());
    }
}
