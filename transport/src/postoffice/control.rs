//! The control plane: the timer, the pump that runs the protocol state
//! machine's messages and events outside its lock, membership changes and
//! their watchers, and barriers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

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

/// The latest failed barrier round that a node had not reached, told by the
/// scheduler (`Control::BarrierMissed`), until the node's next barrier of
/// that group, which fails with the same error, delivers it.
#[derive(Clone, Debug, Default)]
pub struct MissedBarrier(Arc<Mutex<Option<(Instant, Group, String)>>>);

impl MissedBarrier {
    /// Why such a round failed, if one failed after `since` and its error
    /// is not delivered yet.
    pub fn since(&self, since: Instant) -> Option<String> {
        self.0
            .lock()
            .as_ref()
            .filter(|(at, _, _)| *at >= since)
            .map(|(_, _, e)| e.clone())
    }

    pub(crate) fn told(&self, group: Group, error: String) {
        *self.0.lock() = Some((Instant::now(), group, error));
    }

    /// A barrier of `group` ended here: a missed round of it is delivered.
    pub(crate) fn delivered(&self, group: Group) {
        let mut m = self.0.lock();
        if m.as_ref().is_some_and(|(_, g, _)| *g == group) {
            *m = None;
        }
    }
}

impl Inner {
    /// The timer task: sleeps until the earliest of the state machine's,
    /// the resender's and the request tracker's next timeouts (never longer
    /// than `IDLE_WAKE`), wakes earlier when `Timer` says a sooner one came,
    /// then runs what is due and pumps.
    pub(super) fn spawn_timer(&self) {
        let me = self.arc();
        self.handle.spawn(async move {
            loop {
                // Subtle: "recomputing" is published before the deadlines
                // are read, so a request whose deadline the read missed
                // sees it and wakes the sleep below (`Timer::need`).
                me.timer.armed.store(RECOMPUTING, Ordering::SeqCst);
                let now = Instant::now();
                let next = me.next_wake(now);
                me.timer.armed.store(me.timer.at(next), Ordering::SeqCst);
                tokio::select! {
                    _ = tokio::time::sleep_until(next.into()) => {}
                    _ = me.timer.wake.notified() => continue,
                }
                if me.shutting_down.load(Ordering::Acquire) {
                    return;
                }
                me.on_timer(Instant::now());
            }
        });
    }

    /// When the timer must run next: the earliest timeout, at least
    /// `MIN_WAKE` and at most `IDLE_WAKE` from `now`.
    fn next_wake(&self, now: Instant) -> Instant {
        let machine = match &*self.ctl.lock() {
            Ctl::Scheduler(s) => s.next_timeout(),
            Ctl::Member(m) => m.next_timeout(),
        };
        let resend = self.resender.as_ref().and_then(|r| r.lock().next_timeout());
        let request = self.reqs.lock().tracker.next_deadline();
        [machine, resend, request]
            .into_iter()
            .flatten()
            .fold(now + IDLE_WAKE, Instant::min)
            .max(now + MIN_WAKE)
    }

    /// Runs what is due at `now`: the state machine's timeouts, resends,
    /// requests past their deadline.
    fn on_timer(&self, now: Instant) {
        match &mut *self.ctl.lock() {
            Ctl::Scheduler(s) => s.handle_timeout(now),
            Ctl::Member(m) => m.handle_timeout(now),
        }
        if let Some(r) = &self.resender {
            let (again, lost) = r.lock().handle_timeout(now);
            for (peer, frame) in again {
                if let Some(link) = self.links.lock().by_id.get(&peer).cloned() {
                    self.resend(&link, frame);
                }
            }
            for peer in lost {
                let link = self.links.lock().by_id.get(&peer).cloned();
                if let Some(link) = link {
                    van::end(
                        &link,
                        &self.sink(),
                        "messages were not acknowledged after every resend".into(),
                    );
                }
            }
        }
        let expired = self.reqs.lock().tracker.expire(now);
        self.complete(expired);
        self.pump();
    }

    /// Sends what the state machine produced and acts on its events.
    pub(super) fn pump(&self) {
        // The machines' next timeouts may move: the timer recomputes.
        self.timer.poke();
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
            let beat = msg == Control::Heartbeat;
            self.send_on(&link, msg.to_frame(self.my_id(), recipient));
            if beat {
                let stats = Control::Stats(Box::new(self.node_stats()));
                self.send_on(&link, stats.to_frame(self.my_id(), recipient));
            }
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
        self.stamp(link, &mut frame);
        link.send(frame).is_ok()
    }

    /// Numbers `frame` for resend on `link`, if that is on.
    pub(super) fn stamp(&self, link: &Link, frame: &mut Frame) {
        if let Some(r) = &self.resender {
            let now = Instant::now();
            r.lock().stamp(link.id, frame, now);
            self.timer.need(now + self.cfg.resend_timeout);
        }
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
                // Subtle: no link is ended here. The scheduler gives a rank
                // to a restarted node only once the old one was declared
                // dead, which ended the old process's link (`NodeDead`,
                // below, came first on the scheduler's link); a link to the
                // node now may be the new process's, made since the update
                // was applied (a retry's dial): ending it would fail a
                // request the new process holds. A worker connects at once.
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
                // Its requests fail as the node's death first, then its
                // link closes.
                self.fail_requests_to(id, || TrackError::NodeDead { node: id });
                self.drop_node(id, "the scheduler declared it dead");
                self.tell_watchers(NodeChange::Dead(id));
            }
            MemberEvent::BarrierDone { group, error } => self.release_barrier(group, error),
            MemberEvent::SchedulerLost(reason) => self.ended(NodeEnd::SchedulerLost(reason)),
            MemberEvent::Fenced(reason) => self.ended(NodeEnd::Fenced(reason)),
            MemberEvent::JobEnded(reason, failed) => {
                self.ended(NodeEnd::JobEnded { reason, failed })
            }
            MemberEvent::BarrierMissed { group, error } => {
                tracing::warn!(
                    "a barrier of group {} that this node had not reached failed: {error}",
                    group.0
                );
                self.missed.told(group, error);
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
            // Through the sink, as a van ends a link: its parts in flight
            // fail, it leaves the link table and the resender forgets it.
            crate::van::end(&link, &self.sink(), format!("{} {reason}", describe(id)));
        }
    }

    pub(super) fn release_barrier(&self, group: Group, error: Option<String>) {
        self.missed.delivered(group);
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

/// The timer task never sleeps longer than this (a safety net: every
/// timeout it serves is in `next_wake`).
const IDLE_WAKE: Duration = Duration::from_secs(1);

/// Nor shorter (a machine that reports a past timeout it does not clear
/// cannot make it spin).
const MIN_WAKE: Duration = Duration::from_millis(1);

/// `Timer::armed` while the timer recomputes its wake-up.
const RECOMPUTING: u64 = 0;

/// Where the timer task sleeps until, so that whoever adds an earlier
/// timeout wakes it.
///
/// States: *recomputing* (`armed == RECOMPUTING`: the task is reading the
/// deadlines) → *sleeping until `armed`* → (its time, or a wake) →
/// recomputing. Every add of a deadline happens before the caller reads
/// `armed` (it is made under the owner's lock, which the task takes to
/// read); so a deadline the task missed is seen by its caller as
/// recomputing or as later than `armed`, and the caller wakes the task
/// (a `Notify` permit, kept until the task next waits).
pub(super) struct Timer {
    base: Instant,
    /// Nanoseconds after `base` plus one, or `RECOMPUTING`.
    pub(super) armed: AtomicU64,
    pub(super) wake: Notify,
}

impl Timer {
    pub(super) fn new() -> Timer {
        Timer {
            base: Instant::now(),
            armed: AtomicU64::new(RECOMPUTING),
            wake: Notify::new(),
        }
    }

    /// `armed`'s value for `at`.
    fn at(&self, at: Instant) -> u64 {
        let ns = at.saturating_duration_since(self.base).as_nanos();
        u64::try_from(ns).unwrap_or(u64::MAX - 1) + 1
    }

    /// A timeout at `at` was added: wakes the task if it sleeps past it.
    pub(super) fn need(&self, at: Instant) {
        let armed = self.armed.load(Ordering::SeqCst);
        if armed == RECOMPUTING || self.at(at) < armed {
            self.wake.notify_one();
        }
    }

    /// The state machines changed: the task recomputes its wake-up.
    pub(super) fn poke(&self) {
        self.wake.notify_one();
    }
}
