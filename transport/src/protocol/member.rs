//! A server's or worker's side of the cluster conversation, with no I/O.
//!
//! # States
//!
//! ```text
//!   REGISTERING ──Welcome──► RUNNING ──leave()──► LEFT
//!        │                      │
//!        │ Rejected / timeout   │ scheduler silent beyond the timeout,
//!        ▼                      ▼ or its connection closed
//!     REJECTED            SCHEDULER_LOST
//! ```
//!
//! All messages go to the scheduler. While RUNNING the member sends a
//! heartbeat every interval; any message from the scheduler proves it alive.
//! A barrier wait ends with the scheduler's `BarrierDone`, or with an error
//! when the scheduler is lost: never a hang.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::{describe, Group, NodeId, Role, SCHEDULER_ID};
use crate::wire::{Control, NodeInfo};

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
    /// The scheduler silent for this long is lost (None: only a lost
    /// connection).
    pub heartbeat_timeout: Option<Duration>,
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
    barrier_seq: HashMap<u8, u64>,
    waiting: BTreeSet<u8>,
    out: VecDeque<Control>,
    events: VecDeque<MemberEvent>,
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
            barrier_seq: HashMap::new(),
            waiting: BTreeSet::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            cfg,
        };
        m.out.push_back(Control::Register {
            role: m.cfg.role.code(),
            host: m.cfg.host.clone(),
            port: m.cfg.port,
            host_id: m.cfg.host_id,
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
                let lost = self.cfg.heartbeat_timeout.map(|t| self.last_heard + t);
                match (hb, lost) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
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
            Control::BarrierDone { group, error, .. } => {
                if self.waiting.remove(&group) {
                    self.events.push_back(MemberEvent::BarrierDone {
                        group: Group(group),
                        error,
                    });
                }
            }
            Control::HeartbeatAck => {}
            other => tracing::debug!(?other, "member ignores an unexpected control message"),
        }
    }

    /// Time passed: heartbeats, and the scheduler's silence.
    pub fn handle_timeout(&mut self, now: Instant) {
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
                if let Some(t) = self.cfg.heartbeat_timeout {
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
            _ => {}
        }
    }

    fn lose_scheduler(&mut self, reason: String) {
        self.state = MemberState::SchedulerLost(reason.clone());
        for g in std::mem::take(&mut self.waiting) {
            self.events.push_back(MemberEvent::BarrierDone {
                group: Group(g),
                error: Some(format!("barrier abandoned: {reason}")),
            });
        }
        self.dead.insert(SCHEDULER_ID);
        self.events.push_back(MemberEvent::SchedulerLost(reason));
    }

    /// Arrives at a barrier of `group`; `BarrierDone` follows.
    pub fn barrier(&mut self, group: Group, now: Instant) -> Result<u64, MemberError> {
        if self.state != MemberState::Running {
            return Err(MemberError::NotRunning(self.state.clone()));
        }
        if !group.is_valid() {
            return Err(MemberError::BadGroup(group.0));
        }
        if !self.waiting.insert(group.0) {
            return Err(MemberError::BarrierBusy(group.0));
        }
        let seq = self.barrier_seq.entry(group.0).or_insert(0);
        *seq += 1;
        self.out.push_back(Control::Barrier {
            group: group.0,
            seq: *seq,
        });
        self.last_sent = now;
        Ok(*seq)
    }

    /// Leaves the cluster in order.
    pub fn leave(&mut self, now: Instant) {
        if self.state == MemberState::Running {
            self.out.push_back(Control::Leave);
            self.last_sent = now;
            self.state = MemberState::Left;
        }
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
