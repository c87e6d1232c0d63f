//! The data plane: requests out (a part per node, tracked until every
//! node answered), reconnects, requests in (to the handler, from the node
//! the link authenticated), answers in, and the van's frames and closes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::error::TransportError;
use crate::kv::{Callback, Responder};
use crate::landing::Landing;
use crate::link::Link;
use crate::protocol::resender::Received;
use crate::protocol::tracker::{Completed, TrackError};
use crate::protocol::{describe, NodeId, SCHEDULER_ID};
use crate::trace::{self, Hop};
use crate::van::{self, FrameSink};
use crate::wire::{Control, Flags, Frame, Kind};

use super::{Ctl, Inner};

impl Inner {
    /// Starts a request to `parts` (one frame per target node); `callback`
    /// runs once with every answer, or with the first failure.
    /// With `timeout`, the request fails (`TrackError::TimedOut`) if some
    /// node has not answered by then.
    ///
    /// `landing`: where the answer's payload may be received (a request to
    /// one node only; ignored otherwise, and by vans that cannot).
    pub(crate) fn request(
        &self,
        parts: SmallVec<[(NodeId, Frame); 1]>,
        timeout: Option<Duration>,
        landing: Option<Arc<Landing>>,
        callback: Callback,
    ) -> Result<(), TransportError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(TransportError::NotRunning(
                "this node is shutting down".into(),
            ));
        }
        if let Some(end) = self.end.lock().clone() {
            return Err(TransportError::NotRunning(end.to_string()));
        }
        let mut links: SmallVec<[_; 1]> = SmallVec::with_capacity(parts.len());
        for (node, _) in &parts {
            let dead = match &*self.ctl.lock() {
                Ctl::Member(m) => m.is_dead(*node),
                Ctl::Scheduler(_) => false,
            };
            if dead {
                return Err(TrackError::NodeDead { node: *node }.into());
            }
            let link = self.link_of(*node);
            if link.is_none() {
                // Checked now, so that a stranger is the caller's error.
                self.address_of(*node)?;
            }
            links.push(link);
        }
        let now = Instant::now();
        let id = {
            let mut reqs = self.reqs.lock();
            let targets = parts.iter().map(|(n, _)| *n);
            let id = match timeout {
                Some(t) => reqs.tracker.start_until(targets, now, t),
                None => reqs.tracker.start(targets),
            };
            // Before the sends: a link that breaks after one fails the part.
            for ((node, _), link) in parts.iter().zip(&links) {
                if let Some(link) = link {
                    reqs.tracker.sent_on(id, *node, link.id);
                }
            }
            reqs.callbacks.insert(id, callback);
            if let (Some(l), [(node, _)]) = (landing, &parts[..]) {
                reqs.landings.insert(id, (*node, l));
            }
            id
        };
        // After the deadline is in the tracker (see `Timer`).
        if let Some(t) = timeout {
            self.timer.need(now + t);
        }
        let me = self.my_id();
        let mut lost = false;
        for ((node, mut frame), link) in parts.into_iter().zip(links) {
            frame.request_id = id;
            frame.sender = me;
            frame.recipient = node;
            // A part's link broke: the request failed, and its other parts
            // must not reach their nodes (a dial checks for itself).
            if lost && !self.reqs.lock().tracker.is_pending(id) {
                return Ok(());
            }
            trace::record(Hop::RequestOut, me, node, id);
            match link {
                Some(link) => {
                    if !self.send_part(&link, node, frame) {
                        self.link_lost(&link, node);
                        lost = true;
                    }
                }
                None => self.send_when_linked(node, frame),
            }
        }
        Ok(())
    }

    /// Sends the request frame `frame` on `link`, recording that its part
    /// to `node` went out there; fails it if the link is closed. A request
    /// that failed or timed out while its frame waited is not sent.
    fn send_or_fail(&self, link: &Arc<Link>, node: NodeId, frame: Frame) {
        if !self.send_part(link, node, frame) {
            self.link_lost(link, node);
        }
    }

    /// Sends part `frame` of a request to `node` on `link` if the request
    /// is still pending (else drops it: true); false if the link is closed.
    ///
    /// Subtle: the check, the record of the link, the resend number and
    /// the queueing (or the claim of the direct path) happen under the
    /// requests' lock, which every failure of the request takes too. So a
    /// failure either comes first (the frame is never sent) or finds the
    /// frame queued (and takes it back) or claimed (it then leaves before
    /// anything sent after the caller learns of the failure). The direct
    /// write itself runs after the lock.
    fn send_part(&self, link: &Arc<Link>, node: NodeId, mut frame: Frame) -> bool {
        let claimed = {
            let mut reqs = self.reqs.lock();
            if !reqs.tracker.sent_on(frame.request_id, node, link.id) {
                return true;
            }
            self.stamp(link, &mut frame);
            link.claim(frame)
        };
        match claimed {
            Ok(claim) => {
                link.finish_claim(claim);
                true
            }
            Err(_) => false,
        }
    }

    /// Sends a resend of `frame` on `link`: a request's frame only while
    /// the request is pending, checked and queued under the requests' lock
    /// as `send_part` does; else its `VOID` stand-in (a failure may have
    /// voided the resender's copy after the timer took this one).
    pub(super) fn resend(&self, link: &Arc<Link>, frame: Frame) {
        let is_request = frame.kind == Kind::Request && !frame.flags.contains(Flags::VOID);
        let reqs = is_request.then(|| self.reqs.lock());
        let frame = match &reqs {
            Some(r) if !r.tracker.is_pending(frame.request_id) => {
                crate::protocol::resender::void_of(&frame)
            }
            _ => frame,
        };
        let claimed = link.claim(frame);
        drop(reqs);
        if let Ok(claim) = claimed {
            link.finish_claim(claim);
        }
    }

    /// `link` to `node` is closed: the parts sent on it fail.
    fn link_lost(&self, link: &Arc<Link>, node: NodeId) {
        let reason = link.close_reason().unwrap_or_default();
        let done =
            self.reqs
                .lock()
                .tracker
                .on_link_lost(node, link.id, || TrackError::ConnectionLost {
                    node,
                    reason: reason.clone(),
                });
        self.complete(done);
    }

    /// Sends `frame` to `node`, which has no link now, once a connection
    /// made in the background is up (a restarted server, a node this one
    /// never talked to); the caller's thread never waits for it.
    ///
    /// States per node: *no link* → (a request) *dialing* (`dialing` holds
    /// the frames, in order) → *linked* (the frames are sent, then new ones
    /// go straight to the link) or *failed* (the requests whose frames
    /// waited fail, naming why).
    fn send_when_linked(&self, node: NodeId, frame: Frame) {
        let mut dialing = self.dialing.lock();
        if let Some(queued) = dialing.get_mut(&node) {
            queued.push(frame);
            return;
        }
        // Subtle: a link may have come up since the caller looked (a dial
        // that just finished, or the node connected to us): looked up again
        // under the lock that a finishing dial takes.
        if let Some(link) = self.link_of(node) {
            drop(dialing);
            self.send_or_fail(&link, node, frame);
            return;
        }
        dialing.insert(node, vec![frame]);
        drop(dialing);
        let me = self.arc();
        let addr = self.address_of(node);
        self.handle.spawn(async move {
            let linked = match addr {
                Ok(addr) => me.connect(&addr, node).await,
                Err(e) => Err(e),
            };
            let queued = me.dialing.lock().remove(&node).unwrap_or_default();
            match linked {
                Ok(link) => {
                    for f in queued {
                        me.send_or_fail(&link, node, f);
                    }
                }
                Err(e) => {
                    // Only the requests whose frames waited here: others
                    // to the node went out on a link (a concurrent dial's).
                    let reason = format!("no connection, and connecting failed: {e}");
                    let done: Vec<_> = {
                        let mut reqs = me.reqs.lock();
                        queued
                            .iter()
                            .filter_map(|f| {
                                reqs.tracker.on_unsent(f.request_id, node, || {
                                    TrackError::ConnectionLost {
                                        node,
                                        reason: reason.clone(),
                                    }
                                })
                            })
                            .collect()
                    };
                    me.complete(done);
                }
            }
        });
    }

    /// Where `node` listens, from the node table.
    fn address_of(&self, node: NodeId) -> Result<String, TransportError> {
        let info = match &*self.ctl.lock() {
            Ctl::Member(m) => m.nodes().get(&node).cloned(),
            Ctl::Scheduler(s) => s.nodes().into_iter().find(|n| n.id == node),
        };
        let info = info.ok_or_else(|| {
            TransportError::Invalid(format!("{} is not in the node table", describe(node)))
        })?;
        Ok(format!("{}:{}", info.host, info.port))
    }

    /// See [`crate::Postoffice::progress`].
    pub(super) fn progress(&self) -> bool {
        // A snapshot: the frames a poll delivers may end a link.
        let pollers = self.pollers.read().clone();
        let mut any = false;
        for (_, p) in pollers.iter() {
            any |= p.poll();
        }
        any
    }

    /// See [`crate::Postoffice::progress_leave`].
    pub(super) fn progress_leave(&self) {
        let pollers = self.pollers.read().clone();
        for (_, p) in pollers.iter() {
            p.leave();
        }
    }

    pub(super) fn fail_requests_to(&self, node: NodeId, error: impl Fn() -> TrackError) {
        let done = self.reqs.lock().tracker.on_node_lost(node, error);
        self.complete(done);
    }

    /// Reports finished requests to their callbacks; the failed ones'
    /// parts still queued are taken back first, all of them before any
    /// callback (one pass per link).
    pub(super) fn complete(&self, done: Vec<Completed<Frame>>) {
        // Before the callbacks: a part is sent (or resent) only while its
        // request is pending, and queued or claimed under the requests'
        // lock that failed it (`send_part`, `resend`), so a frame not taken
        // back here was taken by a writer, or claimed by a direct sender,
        // before the caller learns of the failure: it leaves before
        // anything the caller sends after.
        let mut by_link: Vec<(u64, u64)> = done
            .iter()
            .flat_map(|c| c.unanswered_on.iter().map(|&l| (l, c.request_id)))
            .collect();
        by_link.sort_unstable();
        for run in by_link.chunk_by(|a, b| a.0 == b.0) {
            let link = run[0].0;
            let ids: Vec<u64> = run.iter().map(|&(_, id)| id).collect();
            let l = self.links.lock().by_id.get(&link).cloned();
            if let Some(l) = l {
                l.withdraw(&ids);
            }
            if let Some(r) = &self.resender {
                r.lock().void(link, &ids);
            }
        }
        for c in done {
            let cb = self.reqs.lock().take_callback(c.request_id);
            if let Some(cb) = cb {
                cb(c.result.map_err(TransportError::from));
            }
        }
    }

    pub(super) fn on_request(&self, link: &Arc<Link>, mut frame: Frame) {
        // A request is from the node its link proved to be in the
        // handshake, whatever the header's sender field says (a member
        // that holds the token must not push as another rank).
        let peer = link.peer();
        let claimed = frame.sender;
        frame.sender = peer;
        let responder = Responder::new(self.arc(), link.clone(), &frame);
        if peer == 0 {
            return responder.error(
                "a request on a link that gave no node id in its handshake (register with the scheduler first)",
            );
        }
        if claimed != peer {
            tracing::warn!(
                "a request from {} claimed to be from {}: taken as {}'s",
                describe(peer),
                describe(claimed),
                describe(peer)
            );
        }
        trace::record(Hop::RequestIn, self.my_id(), peer, frame.request_id);
        let handler = self.handler.read().clone();
        match handler {
            Some(h) => h.handle(crate::kv::KvRequest::from_frame(frame), responder),
            None => responder.error(format!("{} has no request handler", describe(self.my_id()))),
        }
    }

    pub(super) fn on_response(&self, link: &Arc<Link>, frame: Frame) {
        // From the link's node: an answer cannot complete a part that
        // another node owes (the tracker matches node and request id).
        let from = match link.peer() {
            0 => frame.sender,
            peer => peer,
        };
        let request_id = frame.request_id;
        trace::record(Hop::AnswerIn, self.my_id(), from, request_id);
        let (c, cb) = {
            let mut reqs = self.reqs.lock();
            let done = if frame.flags.contains(Flags::ERROR) {
                let msg = String::from_utf8_lossy(&frame.meta).into_owned();
                reqs.tracker.on_error(from, request_id, msg)
            } else {
                reqs.tracker.on_response(from, request_id, frame)
            };
            let Some(c) = done else { return };
            if !c.unanswered_on.is_empty() {
                drop(reqs);
                return self.complete(vec![c]);
            }
            // Nothing to take back from a link: `complete`'s work, under
            // the same lock.
            let cb = reqs.take_callback(c.request_id);
            (c, cb)
        };
        if let Some(cb) = cb {
            cb(c.result.map_err(TransportError::from));
        }
    }
}

impl FrameSink for Inner {
    fn on_frame(&self, link: &Arc<Link>, frame: Frame) {
        link.traffic.received(frame.wire_len());
        if self.cfg.verbose >= 2 {
            tracing::info!(link = link.id, kind = ?frame.kind, keys = frame.keys.len(), bytes = frame.payload.len(), "received");
        }
        if let Some(r) = &self.resender {
            let verdict = r.lock().on_receive(link.id, &frame);
            match verdict {
                Received::Consumed => return,
                Received::Duplicate { ack } => {
                    let _ = link.send(ack);
                    return;
                }
                Received::Deliver { ack } => {
                    if let Some(ack) = ack {
                        let _ = link.send(ack);
                    }
                }
            }
        }
        if frame.flags.contains(Flags::VOID) {
            // Its sender took it back (acknowledged above in resend mode).
            return;
        }
        match frame.kind {
            Kind::Control => {
                let msg = match Control::from_frame(&frame) {
                    Ok(m) => m,
                    Err(e) => {
                        van::end(link, &self.sink(), format!("malformed control frame: {e}"));
                        return;
                    }
                };
                let now = Instant::now();
                match &msg {
                    Control::StatusQuery => return self.answer_status(link),
                    Control::Clock { echo_us, unix_us } if link.peer() == SCHEDULER_ID => {
                        return self.clock.lock().answered(*echo_us, *unix_us, now);
                    }
                    Control::Stats(s) => self.answer_clock(link, s.uptime_us),
                    _ => {}
                }
                match &mut *self.ctl.lock() {
                    Ctl::Scheduler(s) => s.handle(link.id, msg, now),
                    Ctl::Member(m) => {
                        if link.peer() == SCHEDULER_ID {
                            m.handle(msg, now);
                        }
                    }
                }
                self.pump();
            }
            Kind::Request => self.on_request(link, frame),
            Kind::Response => self.on_response(link, frame),
            Kind::Ack => {}
        }
    }

    fn landing(&self, link: &Link, request_id: u64) -> Option<Arc<Landing>> {
        let reqs = self.reqs.lock();
        let (node, l) = reqs.landings.get(&request_id)?;
        // Only the node the request went to answers into it.
        (*node == link.peer()).then(|| l.clone())
    }

    fn add_poller(&self, link: &Arc<Link>, poller: Arc<dyn crate::van::shm::Poll>) {
        // Only workers poll (their kvstore's waits), until they stop.
        if self.cfg.role != crate::Role::Worker || self.shutting_down.load(Ordering::Acquire) {
            return;
        }
        let mut p = self.pollers.write();
        // Subtle: a link that ended before its van registered the poller
        // is not added (its reader thread may have removed it already).
        if !link.is_closed() {
            let mut list = (**p).clone();
            list.push((link.id, poller));
            *p = Arc::new(list);
        }
    }

    fn remove_poller(&self, link: crate::link::LinkId) {
        let mut p = self.pollers.write();
        if p.iter().any(|(id, _)| *id == link) {
            let list = p.iter().filter(|(id, _)| *id != link).cloned().collect();
            *p = Arc::new(list);
        }
    }

    fn on_closed(&self, link: &Arc<Link>, reason: String) {
        self.remove_poller(link.id);
        if let Some(r) = &self.resender {
            // Nothing can be resent on it.
            r.lock().forget(link.id);
        }
        {
            let mut links = self.links.lock();
            if links.by_id.remove(&link.id).is_some() {
                // Subtle: under the links lock, so a snapshot counts the
                // link once, live or retired.
                self.retired.absorb(link.traffic.counts());
            }
            if links.by_node.get(&link.peer()) == Some(&link.id) {
                links.by_node.remove(&link.peer());
            }
        }
        let peer = link.peer();
        let shutting_down = self.shutting_down.load(Ordering::Acquire);
        if !shutting_down {
            self.verbose(
                1,
                &format!("link {} to {} closed: {reason}", link.id, describe(peer)),
            );
        }
        match &mut *self.ctl.lock() {
            Ctl::Scheduler(s) if !shutting_down => s.disconnected(link.id),
            // Also while shutting down: a member that left stops waiting
            // for the answer to its Leave (`Inner::shutdown`).
            Ctl::Member(m) if peer == SCHEDULER_ID => m.scheduler_disconnected(),
            _ => {}
        }
        if shutting_down {
            return;
        }
        self.pump();
        if peer != 0 {
            self.link_lost(link, peer);
        }
    }
}
