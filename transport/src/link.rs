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
//!
//! # Sending on the caller's thread
//!
//! A van may offer a direct path ([`DirectSend`]): when nothing is queued
//! and nobody is writing, `send` writes the frame on the calling thread
//! (a socket write, a ring copy), which saves the hand-off to the writer
//! task and its wake-up — most of a small round trip's latency. The
//! `writing` flag keeps frames whole: whoever sets it (a direct sender, or
//! the writer taking a batch) is the only one writing. A direct write that
//! stops halfway (the socket is full) hands the rest to the writer as a
//! continuation, which goes out before anything else, `writing` still set.
//! A direct sender claims the path first (`claim`, under the queue lock)
//! and writes after (`send_claimed`); a frame it could not start at all
//! is queued ahead of everything queued since its claim. So a frame that
//! a direct sender claimed, or the writer took, leaves before every frame
//! sent after that; queued frames leave by priority, then in order.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering as AtomicOrdering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;

use parking_lot::{Condvar, Mutex};

use crate::protocol::NodeId;
use crate::status::Traffic;
use crate::wire::{Frame, Kind};

/// A link's id, unique in the process (the scheduler's connection ids).
pub(crate) type LinkId = u64;

struct Queued {
    /// A frame a direct sender claimed and could not start: it keeps the
    /// place its claim took, ahead of everything queued meanwhile.
    claimed: bool,
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
        match (self.claimed, other.claimed) {
            // In claim order (at most one waits at a time, see `claim`).
            (true, true) => other.seq.cmp(&self.seq),
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => self
                .priority
                .cmp(&other.priority)
                .then_with(|| other.seq.cmp(&self.seq)),
        }
    }
}

#[derive(Default)]
struct QueueState {
    heap: BinaryHeap<Queued>,
    seq: u64,
    closed: Option<String>,
    /// Someone is writing (a direct sender or the writer).
    writing: bool,
    /// The rest of a frame a direct sender could not finish.
    cont: Option<Vec<Bytes>>,
}

/// What `Link::claim` did with a frame.
pub(crate) enum Claim {
    /// It is queued: `finish_claim` wakes the writer.
    Queued,
    /// The direct path is claimed for it: `finish_claim` writes it on the caller's thread.
    Direct(Frame),
}

/// What a direct send did.
pub(crate) enum Direct {
    /// The whole frame is written.
    Sent,
    /// Nothing was written: queue the frame.
    NotSent,
    /// Part was written; these bytes must follow before anything else.
    Partial(Vec<Bytes>),
}

/// A van's way to send on the caller's thread.
pub(crate) trait DirectSend: Send + Sync {
    /// Tries to write `frame` now, without blocking. An error counts as
    /// "not sent": the writer will meet it and end the link.
    fn try_send(&self, frame: &Frame) -> Result<Direct, crate::van::VanError>;

    /// The link closed: end the connection now, so the peer sees the end
    /// at once even if the writer never runs again (a node killed
    /// in-process).
    fn shutdown(&self) {}
}

/// What the writer has to do next.
pub(crate) enum Work {
    /// Finish a frame a direct sender started.
    Rest(Vec<Bytes>),
    /// Write these frames.
    Frames(Vec<Frame>),
}

/// One connection to one peer.
pub(crate) struct Link {
    pub(crate) id: LinkId,
    peer: AtomicU32,
    pub(crate) van: crate::wire::VanId,
    queue: Mutex<QueueState>,
    notify: tokio::sync::Notify,
    cv: Condvar,
    closed: AtomicBool,
    direct: OnceLock<Arc<dyn DirectSend>>,
    /// What the link carried (`pskv status`).
    pub(crate) traffic: Traffic,
}

impl Link {
    pub(crate) fn new(id: LinkId, peer: NodeId, van: crate::wire::VanId) -> Link {
        Link {
            id,
            peer: AtomicU32::new(peer),
            van,
            queue: Mutex::new(QueueState::default()),
            notify: tokio::sync::Notify::new(),
            cv: Condvar::new(),
            closed: AtomicBool::new(false),
            direct: OnceLock::new(),
            traffic: Traffic::default(),
        }
    }

    /// Installs the van's direct path (once, when the van starts).
    pub(crate) fn set_direct(&self, d: Arc<dyn DirectSend>) {
        let _ = self.direct.set(d);
    }

    fn wake(&self) {
        self.cv.notify_all();
        self.notify.notify_one();
    }

    /// The peer's node id (0: not registered yet).
    pub(crate) fn peer(&self) -> NodeId {
        self.peer.load(AtomicOrdering::Acquire)
    }

    pub(crate) fn set_peer(&self, id: NodeId) {
        self.peer.store(id, AtomicOrdering::Release);
    }

    /// Sends a frame: on this thread if the van allows and the link is
    /// idle, else through the queue. Fails with the reason if the link is
    /// closed.
    pub(crate) fn send(&self, frame: Frame) -> Result<(), String> {
        self.finish_claim(self.claim(frame)?);
        Ok(())
    }

    /// The second half of `send`, for what `claim` did: writes a claimed
    /// frame on this thread, or wakes the writer for a queued one.
    pub(crate) fn finish_claim(&self, claim: Claim) {
        match claim {
            Claim::Direct(frame) => self.send_claimed(frame),
            Claim::Queued => self.wake(),
        }
    }

    /// The first half of `send`: queues `frame`, or, if the direct path is
    /// free, claims it (sets `writing`) and hands the frame back; the
    /// caller then calls [`finish_claim`](Self::finish_claim). A caller
    /// that must order the send with its own bookkeeping (a request and
    /// its expiry) claims under its lock and finishes after it: from the
    /// claim on, the frame leaves before anything sent later. Fails with the reason if
    /// the link is closed.
    pub(crate) fn claim(&self, frame: Frame) -> Result<Claim, String> {
        let mut q = self.queue.lock();
        if let Some(reason) = &q.closed {
            return Err(reason.clone());
        }
        self.traffic.sent(frame.wire_len());
        if self.direct.get().is_some() && q.heap.is_empty() && !q.writing && q.cont.is_none() {
            q.writing = true;
            return Ok(Claim::Direct(frame));
        }
        self.push(&mut q, frame, false);
        Ok(Claim::Queued)
    }

    /// Writes a frame `claim` handed back, on this thread; what cannot be
    /// written now goes to the writer, ahead of everything queued since
    /// the claim (or is dropped if the link closed meanwhile).
    fn send_claimed(&self, frame: Frame) {
        let r = match self.direct.get() {
            Some(d) => d.try_send(&frame),
            // `claim` hands a frame back only where a direct path is set.
            None => Ok(Direct::NotSent),
        };
        let mut q = self.queue.lock();
        if q.closed.is_some() {
            q.writing = false;
            // Taken back only if none of it left (as the writer's frames:
            // once handed to the wire, counted).
            if matches!(r, Ok(Direct::NotSent) | Err(_)) {
                self.traffic.unsent(frame.wire_len());
            }
            return;
        }
        match r {
            Ok(Direct::Sent) => {
                q.writing = false;
                let more = !q.heap.is_empty();
                drop(q);
                if more {
                    self.wake();
                }
            }
            Ok(Direct::Partial(rest)) => {
                q.cont = Some(rest);
                drop(q);
                self.wake();
            }
            Ok(Direct::NotSent) | Err(_) => {
                q.writing = false;
                self.push(&mut q, frame, true);
                drop(q);
                self.wake();
            }
        }
    }

    /// Takes the request frames of `request_ids` (sorted) that still wait
    /// in the queue out of it, so they are never sent (the requests failed:
    /// their callers were told so, and may send them again, maybe at
    /// another priority, which must not be overtaken by the old ones). A
    /// frame the writer has taken, or a direct sender has claimed, is not
    /// touched: it leaves before anything queued after it. One pass over
    /// the queue for them all. Returns how many were taken (they are taken
    /// off the link's count of frames sent: a frame is counted when queued
    /// or claimed, and taken back only if it never left the queue or the
    /// claim; one handed to a writer stays counted, whatever becomes of it).
    pub(crate) fn withdraw(&self, request_ids: &[u64]) -> usize {
        let mut q = self.queue.lock();
        let mut taken = 0;
        q.heap.retain(|w| {
            let keep = w.frame.kind != Kind::Request
                || request_ids.binary_search(&w.frame.request_id).is_err();
            if !keep {
                taken += 1;
                self.traffic.unsent(w.frame.wire_len());
            }
            keep
        });
        taken
    }

    fn push(&self, q: &mut QueueState, frame: Frame, claimed: bool) {
        let seq = q.seq;
        q.seq += 1;
        q.heap.push(Queued {
            claimed,
            priority: frame.priority,
            seq,
            frame,
        });
    }

    fn take_work(q: &mut QueueState, max_bytes: usize) -> Option<Work> {
        if let Some(rest) = q.cont.take() {
            return Some(Work::Rest(rest));
        }
        if q.writing || q.heap.is_empty() {
            return None;
        }
        q.writing = true;
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
        Some(Work::Frames(out))
    }

    /// The writer's next work (frames at most `max_bytes` unless a single
    /// frame is larger), or None once the link is closed. The writer calls
    /// `done_writing` when it has written it.
    pub(crate) async fn next_work(&self, max_bytes: usize) -> Option<Work> {
        loop {
            {
                let mut q = self.queue.lock();
                if q.closed.is_some() {
                    return None;
                }
                if let Some(w) = Self::take_work(&mut q, max_bytes) {
                    return Some(w);
                }
            }
            self.notify.notified().await;
        }
    }

    /// As `next_work`, for a writer thread; wakes every `tick` (returning
    /// `Some(Work::Frames(vec![]))`) so the caller can check other things.
    pub(crate) fn next_work_blocking(&self, max_bytes: usize, tick: Duration) -> Option<Work> {
        let mut q = self.queue.lock();
        loop {
            if q.closed.is_some() {
                return None;
            }
            if let Some(w) = Self::take_work(&mut q, max_bytes) {
                return Some(w);
            }
            if self.cv.wait_for(&mut q, tick).timed_out() {
                return Some(Work::Frames(Vec::new()));
            }
        }
    }

    /// The writer finished its work.
    pub(crate) fn done_writing(&self) {
        let mut q = self.queue.lock();
        q.writing = false;
        let more = !q.heap.is_empty();
        drop(q);
        if more {
            self.wake();
        }
    }

    /// The next frames to write, for vans without a direct path (the writer
    /// thread of the RDMA van): as `next_work_blocking`, frames only.
    pub(crate) fn next_batch_blocking(
        &self,
        max_bytes: usize,
        tick: Duration,
    ) -> Option<Vec<Frame>> {
        let work = self.next_work_blocking(max_bytes, tick)?;
        // No direct path on these vans, so no continuation can exist.
        let frames = match work {
            Work::Frames(f) => f,
            Work::Rest(_) => Vec::new(),
        };
        self.done_writing();
        Some(frames)
    }

    /// Closes the link (first reason wins); queued frames are dropped (and
    /// taken off the count of frames sent).
    pub(crate) fn close(&self, reason: impl Into<String>) -> bool {
        let mut q = self.queue.lock();
        if q.closed.is_some() {
            return false;
        }
        q.closed = Some(reason.into());
        for dropped in q.heap.drain() {
            self.traffic.unsent(dropped.frame.wire_len());
        }
        drop(q);
        self.closed.store(true, AtomicOrdering::Release);
        if let Some(d) = self.direct.get() {
            d.shutdown();
        }
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

    /// Whether nothing is queued or being written.
    pub(crate) fn is_idle(&self) -> bool {
        let q = self.queue.lock();
        q.heap.is_empty() && !q.writing && q.cont.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(priority: i32, tag: u64) -> Frame {
        let mut f = Frame::new(Kind::Request);
        f.priority = priority;
        f.request_id = tag;
        f
    }

    #[test]
    fn urgent_frames_leave_first_and_equal_ones_in_order() {
        let link = Link::new(1, 0, crate::wire::VanId::Tcp);
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

    #[test]
    fn a_withdrawn_request_never_leaves_and_the_rest_keep_their_order() {
        let link = Link::new(1, 0, crate::wire::VanId::Tcp);
        // A response to request 2 of the peer's is not this node's request.
        let mut answer = frame(0, 2);
        answer.kind = Kind::Response;
        link.send(answer).unwrap();
        for (p, tag) in [(0, 1), (0, 2), (9, 3), (0, 2)] {
            link.send(frame(p, tag)).unwrap();
        }
        assert_eq!(link.withdraw(&[2]), 2);
        assert_eq!(link.withdraw(&[7]), 0);
        let batch = link
            .next_batch_blocking(usize::MAX, Duration::from_millis(1))
            .unwrap();
        let sent: Vec<(Kind, u64)> = batch.iter().map(|f| (f.kind, f.request_id)).collect();
        assert_eq!(
            sent,
            vec![(Kind::Request, 3), (Kind::Response, 2), (Kind::Request, 1)]
        );
        // The two withdrawn frames never left: not counted as sent.
        let out = link.traffic.counts();
        assert_eq!(out.frames_out, 3);
        let wire: u64 = batch.iter().map(|f| f.wire_len() as u64).sum();
        assert_eq!(out.bytes_out, wire);
    }

    #[test]
    fn frames_a_close_drops_are_not_counted_as_sent() {
        let link = Link::new(1, 0, crate::wire::VanId::Tcp);
        link.send(frame(0, 1)).unwrap();
        link.send(frame(0, 2)).unwrap();
        let mut q = link.queue.lock();
        let work = Link::take_work(&mut q, frame(0, 1).wire_len());
        drop(q);
        // The writer took the first; the second still waits when the link closes.
        assert!(matches!(work, Some(Work::Frames(f)) if f.len() == 1));
        link.close("bye");
        let out = link.traffic.counts();
        assert_eq!(out.frames_out, 1);
        assert_eq!(out.bytes_out, frame(0, 1).wire_len() as u64);
        // A claimed frame whose link closed before its direct send is dropped too.
        let link = Link::new(1, 0, crate::wire::VanId::Tcp);
        link.set_direct(Arc::new(Full));
        let Claim::Direct(first) = link.claim(frame(0, 3)).unwrap() else {
            panic!("an idle link is claimed")
        };
        link.close("bye");
        link.send_claimed(first);
        assert_eq!(link.traffic.counts().frames_out, 0);
        assert_eq!(link.traffic.counts().bytes_out, 0);
        // One that left whole as the link closed stays counted.
        let link = Arc::new(Link::new(1, 0, crate::wire::VanId::Tcp));
        let direct = Arc::new(SentAsItCloses(std::sync::OnceLock::new()));
        let _ = direct.0.set(Arc::downgrade(&link));
        link.set_direct(direct);
        let Claim::Direct(f) = link.claim(frame(0, 4)).unwrap() else {
            panic!("an idle link is claimed")
        };
        link.send_claimed(f);
        assert!(link.is_closed());
        assert_eq!(link.traffic.counts().frames_out, 1);
        assert_eq!(
            link.traffic.counts().bytes_out,
            frame(0, 4).wire_len() as u64
        );
    }

    /// A direct path that never takes a frame (a full socket).
    struct Full;

    /// A direct path that sends the frame whole while its link closes (the
    /// reader saw the peer go meanwhile).
    struct SentAsItCloses(std::sync::OnceLock<std::sync::Weak<Link>>);

    impl DirectSend for SentAsItCloses {
        fn try_send(&self, _: &Frame) -> Result<Direct, crate::van::VanError> {
            if let Some(link) = self.0.get().and_then(std::sync::Weak::upgrade) {
                link.close("peer gone");
            }
            Ok(Direct::Sent)
        }
    }

    impl DirectSend for Full {
        fn try_send(&self, _: &Frame) -> Result<Direct, crate::van::VanError> {
            Ok(Direct::NotSent)
        }
    }

    #[test]
    fn a_claimed_frame_the_direct_path_could_not_start_keeps_its_place() {
        let link = Link::new(1, 0, crate::wire::VanId::Tcp);
        link.set_direct(Arc::new(Full));
        let Claim::Direct(first) = link.claim(frame(0, 1)).unwrap() else {
            panic!("an idle link is claimed")
        };
        // Sent while the claim holds the path: queued, urgent as it is.
        link.send(frame(9, 2)).unwrap();
        link.send_claimed(first);
        let batch = link
            .next_batch_blocking(usize::MAX, Duration::from_millis(1))
            .unwrap();
        let tags: Vec<u64> = batch.iter().map(|f| f.request_id).collect();
        assert_eq!(tags, vec![1, 2]);
    }

    #[test]
    fn a_frame_being_written_is_not_withdrawn() {
        let link = Link::new(1, 0, crate::wire::VanId::Tcp);
        link.send(frame(0, 1)).unwrap();
        link.send(frame(0, 2)).unwrap();
        // The writer took both (it is writing them): too late to take back.
        let mut q = link.queue.lock();
        let work = Link::take_work(&mut q, usize::MAX);
        drop(q);
        assert!(matches!(work, Some(Work::Frames(f)) if f.len() == 2));
        assert_eq!(link.withdraw(&[1]), 0);
        link.done_writing();
        assert!(link.is_idle());
    }
}
