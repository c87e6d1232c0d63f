//! A server's or worker's side of the cluster conversation, with no I/O.
//!
//! # States
//!
//! ```text
//!   REGISTERING ──Welcome──► RUNNING ──leave()──► LEFT
//!        │                      │ │ │
//!        │ Rejected / timeout   │ │ └─ Fenced ──► FENCED    (declared dead, yet alive)
//!        ▼                      │ └─── JobEnded ► JOB_ENDED (every worker gone)
//!     REJECTED                  ▼ scheduler silent beyond the scheduler
//!                        SCHEDULER_LOST  timeout, or its connection closed
//! ```
//!
//! All messages go to the scheduler. While RUNNING the member sends a
//! heartbeat every interval; any message from the scheduler proves it alive.
//! A barrier wait ends with the scheduler's `BarrierDone`, or with an error
//! when the scheduler is lost: never a hang.
//!
//! A silent scheduler is not a lost one at once: it may be stalled (paused,
//! swapped out), and nodes keep their links and wait. Only its closed
//! connection, or silence beyond `scheduler_timeout` (longer than the
//! heartbeat timeout), loses it.
//!
//! Subtle: the member's own stalls. `next_timeout` asks for a call at
//! least every `stall_probe` (a quarter of the heartbeat timeout, halved,
//! at least 250 ms); if the driver's clock jumps by more than twice that
//! between two calls, this process did not run meanwhile; the scheduler's silence during that time is not
//! counted against it (the time since the last word is shifted by the
//! gap). The scheduler's verdict on *this* node comes with its next
//! message: `Fenced` if it was declared dead meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::{describe, Group, NodeId, Role, SCHEDULER_ID};
use crate::wire::{Control, NodeInfo, Vote};

/// What a member needs to know.
#[derive(Clone, Debug)]
pub struct MemberConfig {
    /// Server or worker.
    pub role: Role,
    /// Host it listens on (announced to the others).
    pub host: String,
    /// Port it listens on.
    pub port: u16,
    /// Its host's identifier.
    pub host_id: u64,
    /// Heartbeat period (None: no heartbeats).
    pub heartbeat_interval: Option<Duration>,
    /// The scheduler's heartbeat timeout (None: no heartbeats): what it
    /// allows this node; a quarter of it is how long a jump of the clock
    /// must be to count as this process's own stall.
    pub heartbeat_timeout: Option<Duration>,
    /// The scheduler silent for this long is lost (None: only a lost
    /// connection).
    pub scheduler_timeout: Option<Duration>,
    /// The rank this node asks for (None: any).
    pub rank: Option<u32>,
    /// How long to wait for the scheduler's answer to the registration.
    pub register_timeout: Duration,
}

/// The member's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Registered, waiting for the node table.
    Registering,
    /// Part of the cluster.
    Running,
    /// The scheduler refused it, or did not answer.
    Rejected(String),
    /// The scheduler is gone.
    SchedulerLost(String),
    /// The scheduler declared this node dead while it was alive: its id
    /// may belong to a replacement; it must stop.
    Fenced(String),
    /// Every worker is gone: the job is over (`true`: a worker died).
    JobEnded(String, bool),
    /// Left in order.
    Left,
}

/// What happened, for the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    /// Registered: ids, the node table and key ranges are known.
    Joined {
        /// This node's id.
        id: NodeId,
        /// Replaces a dead node.
        recovery: bool,
    },
    /// The registration failed.
    Rejected(String),
    /// A node moved (it restarted): reconnect to its new address.
    NodeUpdated(NodeInfo),
    /// A node is dead: fail what waits on it.
    NodeDead(NodeId),
    /// A barrier completed (or failed).
    BarrierDone {
        /// The group.
        group: Group,
        /// Why it failed, if it did.
        error: Option<String>,
    },
    /// The scheduler is gone: everything waiting must fail.
    SchedulerLost(String),
    /// This node was declared dead (fenced): it must stop.
    Fenced(String),
    /// The job is over (every worker is gone); `true`: it failed.
    JobEnded(String, bool),
    /// A round of a barrier this node had not reached failed (others
    /// made a collective call this node did not): its next barrier of the
    /// group gets the same error.
    BarrierMissed {
        /// The group.
        group: Group,
        /// Why the round failed.
        error: String,
    },
}

/// Why a request to the member cannot be served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemberError {
    /// Not (or no longer) part of a running cluster.
    #[error("not part of a running cluster (state: {0:?})")]
    NotRunning(MemberState),
    /// An invalid group.
    #[error("group {0} is not a valid group (1 to 7)")]
    BadGroup(u8),
    /// Already waiting on a barrier of this group.
    #[error("already waiting on a barrier of group {0}")]
    BarrierBusy(u8),
}

/// The member state machine.
#[derive(Debug)]
pub struct Member {
    cfg: MemberConfig,
    state: MemberState,
    id: Option<NodeId>,
    recovery: bool,
    nodes: BTreeMap<NodeId, NodeInfo>,
    dead: BTreeSet<NodeId>,
    key_ranges: Vec<(u64, u64)>,
    started: Instant,
    last_sent: Instant,
    last_heard: Instant,
    /// The last time the driver called in (for stall detection).
    last_call: Instant,
    barrier_seq: HashMap<u8, u64>,
    /// Groups with a barrier in progress, and its seq.
    waiting: BTreeMap<u8, u64>,
    out: VecDeque<Control>,
    events: VecDeque<MemberEvent>,
    /// The scheduler answered this node's `Leave` (`LeaveAck`), or can no
    /// longer answer (its connection closed).
    leave_answered: bool,
}

impl Member {
    /// A member that registers at once.
    pub fn new(cfg: MemberConfig, now: Instant) -> Member {
        let mut m = Member {
            state: MemberState::Registering,
            id: None,
            recovery: false,
            nodes: BTreeMap::new(),
            dead: BTreeSet::new(),
            key_ranges: Vec::new(),
            started: now,
            last_sent: now,
            last_heard: now,
            last_call: now,
            barrier_seq: HashMap::new(),
            waiting: BTreeMap::new(),
            leave_answered: false,
            out: VecDeque::new(),
            events: VecDeque::new(),
            cfg,
        };
        m.out.push_back(Control::Register {
            role: m.cfg.role.code(),
            host: m.cfg.host.clone(),
            port: m.cfg.port,
            host_id: m.cfg.host_id,
            rank: m.cfg.rank,
        });
        m
    }

    /// The current state.
    pub fn state(&self) -> &MemberState {
        &self.state
    }

    /// This node's id, once joined.
    pub fn id(&self) -> Option<NodeId> {
        self.id
    }

    /// This node's epoch for its id (0 before it joined).
    pub fn epoch(&self) -> u32 {
        self.id
            .and_then(|id| self.nodes.get(&id))
            .map_or(0, |n| n.epoch)
    }

    /// Whether `id` may connect to this node with `epoch`: the id is a
    /// live node of the table, of that epoch. `Err` says why not.
    pub fn admits(&self, id: NodeId, epoch: u32) -> Result<(), String> {
        if id == 0 || self.id.is_none() {
            return Ok(()); // not registered yet (a scheduler link), or we are not
        }
        if self.dead.contains(&id) {
            return Err(format!(
                "{} was declared dead by the scheduler; a process that still claims its id is fenced",
                describe(id)
            ));
        }
        match self.nodes.get(&id) {
            Some(n) if n.epoch == epoch => Ok(()),
            Some(n) => Err(format!(
                "{} is now epoch {} (it was restarted); epoch {epoch} is an old process, fenced",
                describe(id),
                n.epoch
            )),
            None => Err(format!("{} is not in the node table", describe(id))),
        }
    }

    /// Whether this node replaced a dead one.
    pub fn is_recovery(&self) -> bool {
        self.recovery
    }

    /// The node table.
    pub fn nodes(&self) -> &BTreeMap<NodeId, NodeInfo> {
        &self.nodes
    }

    /// Each server's key range, by rank.
    pub fn key_ranges(&self) -> &[(u64, u64)] {
        &self.key_ranges
    }

    /// A message for the scheduler.
    pub fn poll_transmit(&mut self) -> Option<Control> {
        self.out.pop_front()
    }

    /// Something that happened.
    pub fn poll_event(&mut self) -> Option<MemberEvent> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must run next.
    pub fn next_timeout(&self) -> Option<Instant> {
        match self.state {
            MemberState::Registering => Some(self.started + self.cfg.register_timeout),
            MemberState::Running => {
                let hb = self.cfg.heartbeat_interval.map(|i| self.last_sent + i);
                let lost = self.cfg.scheduler_timeout.map(|t| self.last_heard + t);
                // Calls often enough that a longer gap is a stall of ours.
                let probe = self
                    .cfg
                    .heartbeat_timeout
                    .map(|t| self.last_call + super::stall_probe(t));
                [hb, lost, probe].into_iter().flatten().min()
            }
            _ => None,
        }
    }

    /// A message from the scheduler.
    pub fn handle(&mut self, msg: Control, now: Instant) {
        self.last_heard = now;
        match msg {
            Control::Welcome {
                your_id,
                nodes,
                key_ranges,
                recovery,
            } if self.state == MemberState::Registering => {
                self.id = Some(your_id);
                self.recovery = recovery;
                self.nodes = nodes.into_iter().map(|n| (n.id, n)).collect();
                self.key_ranges = key_ranges;
                self.state = MemberState::Running;
                self.last_sent = now;
                self.events.push_back(MemberEvent::Joined {
                    id: your_id,
                    recovery,
                });
            }
            Control::Rejected { reason } if self.state == MemberState::Registering => {
                self.state = MemberState::Rejected(reason.clone());
                self.events.push_back(MemberEvent::Rejected(reason));
            }
            Control::NodeUpdate { node } => {
                self.dead.remove(&node.id);
                self.nodes.insert(node.id, node.clone());
                self.events.push_back(MemberEvent::NodeUpdated(node));
            }
            Control::NodeDead { id } => {
                if self.dead.insert(id) {
                    self.events.push_back(MemberEvent::NodeDead(id));
                }
            }
            Control::BarrierDone { group, seq, error } => {
                // Only the answer to the barrier in progress (a late answer
                // to one that timed out here is stale).
                if self.waiting.get(&group) == Some(&seq) {
                    self.waiting.remove(&group);
                    self.events.push_back(MemberEvent::BarrierDone {
                        group: Group(group),
                        error,
                    });
                }
            }
            Control::HeartbeatAck => {}
            Control::LeaveAck if self.state == MemberState::Left => self.leave_answered = true,
            Control::BarrierMissed { group, error } if self.state == MemberState::Running => {
                self.events.push_back(MemberEvent::BarrierMissed {
                    group: Group(group),
                    error,
                });
            }
            Control::Fenced { reason } if self.state == MemberState::Running => {
                self.end(
                    MemberState::Fenced(reason.clone()),
                    MemberEvent::Fenced(reason),
                );
            }
            Control::JobEnded { reason, failed } if self.state == MemberState::Running => {
                self.end(
                    MemberState::JobEnded(reason.clone(), failed),
                    MemberEvent::JobEnded(reason, failed),
                );
            }
            other => tracing::debug!(?other, "member ignores an unexpected control message"),
        }
    }

    /// Time passed: heartbeats, and the scheduler's silence.
    pub fn handle_timeout(&mut self, now: Instant) {
        let gap = now.saturating_duration_since(self.last_call);
        self.last_call = now;
        if self.is_stall(gap) && self.state == MemberState::Running {
            // This process did not run for `gap`: the scheduler's silence
            // meanwhile says nothing about it.
            tracing::warn!(
                "this node did not run for {gap:?} (stopped or starved); the scheduler may have declared it dead"
            );
            self.last_heard = (self.last_heard + gap).min(now);
            if self.cfg.heartbeat_interval.is_some() {
                self.out.push_back(Control::Heartbeat);
                self.last_sent = now;
            }
        }
        match self.state {
            MemberState::Registering
                if now.duration_since(self.started) >= self.cfg.register_timeout =>
            {
                let reason = format!(
                    "the scheduler did not answer the registration within {:?}",
                    self.cfg.register_timeout
                );
                self.state = MemberState::Rejected(reason.clone());
                self.events.push_back(MemberEvent::Rejected(reason));
            }
            MemberState::Running => {
                if let Some(t) = self.cfg.scheduler_timeout {
                    if now.duration_since(self.last_heard) > t {
                        self.lose_scheduler(format!("no word from the scheduler for {t:?}"));
                        return;
                    }
                }
                if let Some(i) = self.cfg.heartbeat_interval {
                    if now.duration_since(self.last_sent) >= i {
                        self.out.push_back(Control::Heartbeat);
                        self.last_sent = now;
                    }
                }
            }
            _ => {}
        }
    }

    /// The connection to the scheduler closed.
    pub fn scheduler_disconnected(&mut self) {
        match self.state {
            MemberState::Running => {
                self.lose_scheduler("the connection to the scheduler closed".into())
            }
            MemberState::Registering => {
                let reason = "the scheduler closed the connection during registration".to_string();
                self.state = MemberState::Rejected(reason.clone());
                self.events.push_back(MemberEvent::Rejected(reason));
            }
            // Nobody is left to answer the Leave.
            MemberState::Left => self.leave_answered = true,
            _ => {}
        }
    }

    /// Whether a jump of the clock by `gap` between two calls means this
    /// process was not running.
    fn is_stall(&self, gap: Duration) -> bool {
        self.cfg
            .heartbeat_timeout
            .is_some_and(|t| gap > super::stall_gap(t))
    }

    fn lose_scheduler(&mut self, reason: String) {
        self.dead.insert(SCHEDULER_ID);
        self.end(
            MemberState::SchedulerLost(reason.clone()),
            MemberEvent::SchedulerLost(reason),
        );
    }

    /// Leaves RUNNING for good: barriers in progress fail with the reason.
    fn end(&mut self, state: MemberState, event: MemberEvent) {
        let reason = match &event {
            MemberEvent::SchedulerLost(r) => format!("lost the scheduler: {r}"),
            MemberEvent::Fenced(r) => format!("this node was fenced: {r}"),
            MemberEvent::JobEnded(r, _) => format!("the job ended: {r}"),
            _ => String::new(),
        };
        self.state = state;
        for (g, _) in std::mem::take(&mut self.waiting) {
            self.events.push_back(MemberEvent::BarrierDone {
                group: Group(g),
                error: Some(format!("barrier abandoned: {reason}")),
            });
        }
        self.events.push_back(event);
    }

    /// Arrives at a barrier of `group` with `vote`; `BarrierDone` follows.
    pub fn barrier(&mut self, group: Group, vote: Vote, now: Instant) -> Result<u64, MemberError> {
        if self.state != MemberState::Running {
            return Err(MemberError::NotRunning(self.state.clone()));
        }
        if !group.is_valid() {
            return Err(MemberError::BadGroup(group.0));
        }
        if self.waiting.contains_key(&group.0) {
            return Err(MemberError::BarrierBusy(group.0));
        }
        let seq = self.barrier_seq.entry(group.0).or_insert(0);
        *seq += 1;
        let seq = *seq;
        if !matches!(vote, Vote::Fail { .. }) {
            // A failing node does not wait: the round fails with its
            // reason, which it already knows.
            self.waiting.insert(group.0, seq);
        }
        self.out.push_back(Control::Barrier {
            group: group.0,
            seq,
            vote,
        });
        self.last_sent = now;
        Ok(seq)
    }

    /// The caller stopped waiting for the barrier of `group` in progress
    /// (its timeout passed): the round fails on every node with `reason`,
    /// and the next barrier of the group starts afresh here.
    pub fn abandon_barrier(&mut self, group: Group, reason: String, now: Instant) {
        let Some(seq) = self.waiting.remove(&group.0) else {
            return;
        };
        if self.state == MemberState::Running {
            self.out.push_back(Control::Barrier {
                group: group.0,
                seq,
                vote: Vote::Fail { reason },
            });
            self.last_sent = now;
        }
    }

    /// Leaves the cluster in order.
    pub fn leave(&mut self, now: Instant) {
        if matches!(self.state, MemberState::Running | MemberState::JobEnded(..)) {
            self.out.push_back(Control::Leave);
            self.last_sent = now;
            self.state = MemberState::Left;
        }
    }

    /// Whether this node left (`leave`) and the scheduler has not yet
    /// answered: until it does, closing the connection to the scheduler
    /// may be taken for a death (the close can overtake the `Leave` still
    /// in flight). False once answered, once the connection is gone, and
    /// for a node that sent no `Leave` (it was not running).
    pub fn awaits_leave_ack(&self) -> bool {
        self.state == MemberState::Left && !self.leave_answered
    }

    /// Nodes known dead, and the scheduler if it has been silent beyond
    /// `timeout` (what ps-lite's `GetDeadNodes` answers on a worker).
    pub fn dead_nodes(&self, now: Instant, timeout: Duration) -> Vec<NodeId> {
        let mut d = self.dead.clone();
        if self.state == MemberState::Running && now.duration_since(self.last_heard) > timeout {
            d.insert(SCHEDULER_ID);
        }
        d.into_iter().collect()
    }

    /// Whether `id` is known dead.
    pub fn is_dead(&self, id: NodeId) -> bool {
        self.dead.contains(&id)
    }

    /// The ids of the servers, by rank.
    pub fn servers(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.role == Role::Server.code())
            .map(|n| n.id)
            .collect()
    }

    /// Number of nodes of `role`.
    pub fn count(&self, role: Role) -> u32 {
        self.nodes
            .values()
            .filter(|n| n.role == role.code())
            .count() as u32
    }

    /// A short description of a node, for errors.
    pub fn describe(&self, id: NodeId) -> String {
        describe(id)
    }
}
