//! The control plane: the timer, the pump that runs the protocol state
//! machine's messages and events outside its lock, membership changes and
//! their watchers, and barriers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::TransportError;
use crate::link::{Link, LinkId};
use crate::protocol::member::MemberEvent;
use crate::protocol::scheduler::SchedulerEvent;
use crate::protocol::tracker::TrackError;
use crate::protocol::{describe, role_rank, Group, NodeId, Role, SCHEDULER_ID};
use crate::slot::Slot;
use crate::van;
use crate::wire::{Control, Frame, Vote};

use super::{Ctl, Inner, NodeChange, NodeEnd};

impl Inner {
    pub(super) fn spawn_timer(&self) {
        let me = self.arc();
        let mut tick = Duration::from_millis(100);
        if let Some(i) = self.cfg.heartbeat_interval {
            tick = tick.min(i / 4);
        }
        if self.cfg.resend {
            tick = tick.min(self.cfg.resend_timeout / 4);
        }
        let tick = tick.max(Duration::from_millis(5));
        self.handle.spawn(async move {
            let mut iv = tokio::time::interval(tick);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                if me.shutting_down.load(Ordering::Acquire) {
                    return;
                }
                let now = Instant::now();
                match &mut *me.ctl.lock() {
                    Ctl::Scheduler(s) => s.handle_timeout(now),
                    Ctl::Member(m) => m.handle_timeout(now),
                }
                if let Some(r) = &me.resender {
                    let (again, lost) = r.lock().handle_timeout(now);
                    for (peer, frame) in again {
                        if let Some(link) = me.links.lock().by_id.get(&peer).cloned() {
                            let _ = link.send(frame);
                        }
                    }
                    for peer in lost {
                        let link = me.links.lock().by_id.get(&peer).cloned();
                        if let Some(link) = link {
                            van::end(
                                &link,
                                &me.sink(),
                                "messages were not acknowledged after every resend".into(),
                            );
                        }
                    }
                }
                me.pump();
            }
        });
    }

    /// Sends what the state machine produced and acts on its events.
    pub(super) fn pump(&self) {
        let mut sends: Vec<(Option<LinkId>, Control)> = Vec::new();
        let mut sched_events = Vec::new();
        let mut member_events = Vec::new();
        {
            let mut ctl = self.ctl.lock();
            match &mut *ctl {
                Ctl::Scheduler(s) => {
                    while let Some((conn, msg)) = s.poll_transmit() {
                        sends.push((Some(conn), msg));
                    }
                    while let Some(e) = s.poll_event() {
                        sched_events.push(e);
                    }
                }
                Ctl::Member(m) => {
                    while let Some(msg) = m.poll_transmit() {
                        sends.push((None, msg));
                    }
                    while let Some(e) = m.poll_event() {
                        member_events.push(e);
                    }
                }
            }
        }
        for (conn, msg) in sends {
            let link = match conn {
                Some(id) => self.links.lock().by_id.get(&id).cloned(),
                None => self.link_of(SCHEDULER_ID),
            };
            let Some(link) = link else { continue };
            if let Control::Welcome { your_id, .. } = &msg {
                link.set_peer(*your_id);
                self.links.lock().by_node.insert(*your_id, link.id);
            }
            let recipient = link.peer();
            self.send_on(&link, msg.to_frame(self.my_id(), recipient));
        }
        for e in sched_events {
            self.on_scheduler_event(e);
        }
        for e in member_events {
            self.on_member_event(e);
        }
    }

    /// Queues a frame on a link, numbering it for resend if that is on.
    pub(crate) fn send_on(&self, link: &Arc<Link>, mut frame: Frame) -> bool {
        if let Some(r) = &self.resender {
            r.lock().stamp(link.id, &mut frame, Instant::now());
        }
        link.send(frame).is_ok()
    }

    pub(super) fn on_scheduler_event(&self, e: SchedulerEvent) {
        match e {
            SchedulerEvent::Started => tracing::info!("every node registered: the cluster is up"),
            SchedulerEvent::NodeDead { id, reason } => {
                // Subtle: the link stays open. A node declared dead while
                // alive (stopped) speaks again on it and is answered
                // `Fenced`; a node that really died closes it itself.
                tracing::warn!("{} is dead: {reason}", describe(id));
            }
            SchedulerEvent::NodeRecovered { id } => {
                tracing::info!("{} rejoined after a restart", describe(id))
            }
            SchedulerEvent::BarrierDone { group, error } => self.release_barrier(group, error),
            SchedulerEvent::AllLeft { mut dead } => {
                // With replicas, one dead server is survived: its backup
                // served its keys.
                let servers_dead = dead
                    .iter()
                    .filter(|d| matches!(role_rank(**d), Some((Role::Server, _))))
                    .count() as u32;
                if self.cfg.replicas > 1 && servers_dead < self.cfg.replicas {
                    dead.retain(|d| !matches!(role_rank(*d), Some((Role::Server, _))));
                }
                self.all_left.set(if dead.is_empty() {
                    Ok(())
                } else {
                    let names: Vec<String> = dead.iter().map(|d| describe(*d)).collect();
                    Err(format!("the cluster ended with {} dead", names.join(", ")))
                });
            }
        }
    }

    pub(super) fn on_member_event(&self, e: MemberEvent) {
        match e {
            MemberEvent::Joined { id, recovery } => {
                self.my_id.store(id, Ordering::Release);
                if let Some(r) = &self.resender {
                    // Acks carry the sender id; set it now that it is known.
                    r.lock().set_me(id);
                }
                tracing::info!(
                    "joined as {}{}",
                    describe(id),
                    if recovery { " (recovery)" } else { "" }
                );
                self.joined.set(Ok(()));
            }
            MemberEvent::Rejected(reason) => {
                self.joined.set(Err(TransportError::Rejected(reason)));
            }
            MemberEvent::NodeUpdated(info) => {
                tracing::info!("{} moved to {}:{}", describe(info.id), info.host, info.port);
                // The old connection is stale; a worker reconnects at once.
                self.drop_node(info.id, "it restarted");
                self.tell_watchers(NodeChange::Restarted(info.id));
                if self.cfg.role == Role::Worker && info.role == Role::Server.code() {
                    let me = self.arc();
                    self.handle.spawn(async move {
                        let addr = format!("{}:{}", info.host, info.port);
                        if let Err(e) = me.connect(&addr, info.id).await {
                            tracing::warn!("reconnecting to {}: {e}", describe(info.id));
                        }
                    });
                }
            }
            MemberEvent::NodeDead(id) => {
                tracing::warn!("{} is dead", describe(id));
                self.drop_node(id, "the scheduler declared it dead");
                self.fail_requests_to(id, || TrackError::NodeDead { node: id });
                self.tell_watchers(NodeChange::Dead(id));
            }
            MemberEvent::BarrierDone { group, error } => self.release_barrier(group, error),
            MemberEvent::SchedulerLost(reason) => self.ended(NodeEnd::SchedulerLost(reason)),
            MemberEvent::Fenced(reason) => self.ended(NodeEnd::Fenced(reason)),
            MemberEvent::JobEnded(reason, failed) => {
                self.ended(NodeEnd::JobEnded { reason, failed })
            }
        }
    }

    /// This node can no longer take part: every request in flight fails,
    /// later ones are refused, and the watchers are told.
    pub(super) fn ended(&self, end: NodeEnd) {
        {
            let mut e = self.end.lock();
            if e.is_some() {
                return;
            }
            *e = Some(end.clone());
        }
        if end.is_failure() {
            tracing::error!("{end}");
        } else {
            tracing::info!("{end}");
        }
        self.joined
            .set(Err(TransportError::NotRunning(end.to_string())));
        let done = self.reqs.lock().tracker.fail_all(&end.to_string());
        self.complete(done);
        let watchers = self.end_watchers.read().clone();
        for w in watchers {
            w(&end);
        }
    }

    pub(super) fn tell_watchers(&self, change: NodeChange) {
        let watchers = self.watchers.read().clone();
        for w in watchers {
            w(change);
        }
    }

    pub(super) fn drop_node(&self, id: NodeId, reason: &str) {
        let link = {
            let mut links = self.links.lock();
            links
                .by_node
                .remove(&id)
                .and_then(|lid| links.by_id.get(&lid).cloned())
        };
        if let Some(link) = link {
            link.close(format!("{} {reason}", describe(id)));
        }
        if let Some(r) = &self.resender {
            let ids: Vec<LinkId> = self
                .links
                .lock()
                .by_id
                .values()
                .filter(|l| l.peer() == id)
                .map(|l| l.id)
                .collect();
            for lid in ids {
                r.lock().forget(lid);
            }
        }
    }

    pub(super) fn release_barrier(&self, group: Group, error: Option<String>) {
        if let Some(slot) = self.barriers.lock().remove(&group.0) {
            slot.set(error.map_or(Ok(()), Err));
        }
    }

    pub(super) fn barrier(
        &self,
        group: Group,
        vote: Vote,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        let fail = matches!(vote, Vote::Fail { .. });
        let slot = Slot::new();
        if !fail {
            let mut b = self.barriers.lock();
            if b.contains_key(&group.0) {
                return Err(TransportError::Invalid(format!(
                    "a barrier of group {} is already in progress",
                    group.0
                )));
            }
            b.insert(group.0, slot.clone());
        }
        let started = match &mut *self.ctl.lock() {
            Ctl::Member(m) => m
                .barrier(group, vote, Instant::now())
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Ctl::Scheduler(s) => {
                if group.has(Role::Scheduler) {
                    s.barrier(group);
                    Ok(())
                } else {
                    Err(format!("the scheduler is not in group {}", group.0))
                }
            }
        };
        if let Err(e) = started {
            self.barriers.lock().remove(&group.0);
            return Err(TransportError::Barrier(e));
        }
        self.pump();
        if fail {
            return Ok(());
        }
        match slot.wait(timeout) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(TransportError::Barrier(e)),
            None => {
                self.barriers.lock().remove(&group.0);
                // The round fails for everyone with this cause, and the
                // next barrier of the group starts afresh.
                let reason = format!("it waited {timeout:?} and gave up");
                if let Ctl::Member(m) = &mut *self.ctl.lock() {
                    m.abandon_barrier(group, reason, Instant::now());
                }
                self.pump();
                Err(TransportError::Timeout {
                    what: format!("every node of group {} to reach the barrier", group.0),
                    after: timeout,
                })
            }
        }
    }
}
