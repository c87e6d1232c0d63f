//! The scheduler's side of the cluster conversation, with no I/O.
//!
//! # States of a node entry
//!
//! ```text
//!   (pending registration) ──all registered──► ALIVE ──no heartbeat / conn lost──► DEAD
//!                                                │  ▲                               │
//!                      Leave (answered LeaveAck) │  └────── re-registration ────────┘
//!                                                ▼           (recovery: same id, new address)
//!                                               LEFT
//! ```
//!
//! Ranks are given once the last expected node has registered: a node that
//! asked for a rank (`DMLC_SERVER_ID`, `DMLC_WORKER_ID`, as the launcher
//! sets them) gets it, the others fill the free ranks in registration
//! order. A node that registers after the start takes over a dead node's
//! id and rank (recovery; the one it asks for, if it asks), and the id's
//! *epoch* moves on, so peers refuse the old process. If no node it could
//! replace is dead yet, its registration is *held* for up to the heartbeat
//! timeout (5 s without heartbeats): a restarted process often registers
//! before its old self is declared dead. It takes over when that node dies
//! meanwhile, or is refused when the time is up.
//!
//! Fencing: a node declared dead that still talks (it was stopped, not
//! killed) gets `Fenced` and must stop; so does a connection the scheduler
//! does not know. A replacement can then take its rank.
//!
//! Barriers: a round of group g completes when every non-left member of g
//! (and the scheduler itself, if g includes it) has arrived; if a member is
//! dead the round is released at once with an error naming it, so no
//! barrier waits for a node that will not come. A node may vote `Fail`
//! (its part of the collective failed, or it gave up waiting): the round
//! fails at once on every node that arrived, and members that had not yet
//! arrived are *owed* that failure: their next arrival in the group is
//! answered with it at once, and they are told at once (`BarrierMissed`:
//! others made a collective call they had not reached; the notice names
//! them). So a collective fails on every rank with the same cause. `Agree` votes must carry equal digests, or the round fails
//! naming the disagreeing nodes.
//!
//! The end: when every node has left or died, `AllLeft` says which died.
//! When every worker is gone (left or dead) while servers remain, the
//! servers are told `JobEnded`.
//!
//! Rooms: this file the node table, heartbeats, deaths, fencing and the
//! end; `registration.rs` ranks and recovery; `barriers.rs` the rounds
//! and votes; `status.rs` the counters below.
//!
//! Status (`status.rs`): each node's counters arrive with its heartbeats
//! (`Stats`); the machine keeps the last two, for `pskv status`. An
//! observer's question never reaches the machine: the driver answers it
//! from `status()`.
//!
//! Subtle: the scheduler's own stalls. If the clock jumps by more than a
//! quarter of the heartbeat timeout between two calls, the scheduler itself
//! did not run (stopped, starved); the nodes' silence during the gap is
//! not theirs, so every live node's last sign of life moves forward by the
//! gap instead of everyone being declared dead.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::{describe, key_ranges, Group, NodeId, Role, SCHEDULER_ID};
use crate::status::NodeStats;
use crate::wire::{Control, NodeInfo, Vote};

mod barriers;
mod registration;
mod status;

/// The driver's handle of a connection.
pub type ConnId = u64;

/// What the scheduler needs to know.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Servers expected.
    pub num_servers: u32,
    /// Workers expected.
    pub num_workers: u32,
    /// A node silent for this long is dead (None: only a lost connection
    /// makes a node dead).
    pub heartbeat_timeout: Option<Duration>,
}

/// What happened, for the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SchedulerEvent {
    /// Every expected node registered; ids and ranks are given.
    Started,
    /// A node is dead.
    NodeDead {
        /// Its id.
        id: NodeId,
        /// Why it was declared dead.
        reason: String,
    },
    /// A restarted node took over a dead node's id.
    NodeRecovered {
        /// The id.
        id: NodeId,
    },
    /// A barrier the scheduler itself waited on completed.
    BarrierDone {
        /// The group.
        group: Group,
        /// Why it failed, if it did.
        error: Option<String>,
    },
    /// Every node has left or died: the cluster is shut down. `dead` names
    /// the nodes that died (empty: an orderly end).
    AllLeft {
        /// The nodes that died instead of leaving.
        dead: Vec<NodeId>,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum State {
    Alive,
    Dead,
    Left,
}

#[derive(Debug)]
struct Entry {
    info: NodeInfo,
    conn: Option<ConnId>,
    last_seen: Instant,
    state: State,
    /// Its latest counters and when they came, and the ones before
    /// (`status.rs`).
    stats: Option<(Instant, NodeStats)>,
    prev_stats: Option<NodeStats>,
}

#[derive(Debug)]
struct Pending {
    conn: ConnId,
    role: Role,
    host: String,
    port: u16,
    host_id: u64,
    rank: Option<u32>,
}

/// A registration after the start, waiting for a node of its role to die.
#[derive(Debug)]
struct Held {
    reg: Pending,
    until: Instant,
}

/// How long a registration is held when there are no heartbeats (only a
/// closed connection makes a node dead then).
const HOLD_WITHOUT_HEARTBEATS: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Round {
    /// Node → the seq it sent, and its vote.
    arrived: BTreeMap<NodeId, (u64, Vote)>,
    me: bool,
}

/// The scheduler state machine.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    started: bool,
    all_left_reported: bool,
    pending: Vec<Pending>,
    held: Vec<Held>,
    /// The latest time the driver gave (for events without one).
    clock: Option<Instant>,
    nodes: BTreeMap<NodeId, Entry>,
    conn_node: HashMap<ConnId, NodeId>,
    rounds: BTreeMap<u8, Round>,
    /// Per group, the members that had not arrived at a round that failed,
    /// and its error: their next arrival gets it.
    owed: BTreeMap<u8, BTreeMap<NodeId, String>>,
    /// Connections of nodes declared dead (answered `Fenced`).
    fenced: HashMap<ConnId, NodeId>,
    /// The servers were told the job ended.
    job_ended: bool,
    /// The last time the driver called in (for stall detection).
    last_call: Option<Instant>,
    out: VecDeque<(ConnId, Control)>,
    events: VecDeque<SchedulerEvent>,
}

impl Scheduler {
    /// A scheduler waiting for registrations.
    pub fn new(cfg: SchedulerConfig) -> Scheduler {
        Scheduler {
            cfg,
            started: false,
            all_left_reported: false,
            pending: Vec::new(),
            held: Vec::new(),
            clock: None,
            nodes: BTreeMap::new(),
            conn_node: HashMap::new(),
            rounds: BTreeMap::new(),
            owed: BTreeMap::new(),
            fenced: HashMap::new(),
            job_ended: false,
            last_call: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Whether every expected node has registered.
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// The node table (empty before the start).
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.nodes.values().map(|e| e.info.clone()).collect()
    }

    /// The node a connection belongs to.
    pub fn node_of(&self, conn: ConnId) -> Option<NodeId> {
        self.conn_node.get(&conn).copied()
    }

    /// A message to send: the connection and the message.
    pub fn poll_transmit(&mut self) -> Option<(ConnId, Control)> {
        self.out.pop_front()
    }

    /// Something that happened.
    pub fn poll_event(&mut self) -> Option<SchedulerEvent> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must run next.
    pub fn next_timeout(&self) -> Option<Instant> {
        let silent = self.cfg.heartbeat_timeout.and_then(|t| {
            self.nodes
                .values()
                .filter(|e| e.state == State::Alive)
                .map(|e| e.last_seen + t)
                .min()
        });
        let held = self.held.iter().map(|h| h.until).min();
        // Calls often enough that a longer gap is a stall of ours.
        let probe = self
            .cfg
            .heartbeat_timeout
            .zip(self.last_call)
            .map(|(t, last)| last + super::stall_probe(t));
        [silent, held, probe].into_iter().flatten().min()
    }

    /// Nodes that are dead, or silent for longer than `timeout` (ps-lite's
    /// `GetDeadNodes`).
    pub fn dead_nodes(&self, now: Instant, timeout: Duration) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, e)| {
                e.state == State::Dead
                    || (e.state == State::Alive && now.duration_since(e.last_seen) > timeout)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// A message arrived on `conn`.
    pub fn handle(&mut self, conn: ConnId, msg: Control, now: Instant) {
        self.clock = Some(now);
        // Subtle: stalls are measured from the first message on; a first
        // timeout call after a stall would otherwise see no gap.
        self.last_call.get_or_insert(now);
        if msg == Control::Leave {
            // Whoever leaves may close once this arrives (a fenced or
            // already left node too: it must not wait in vain). Sent
            // before the entry is marked left below; that happens in this
            // same call, before anything reads the answer.
            self.out.push_back((conn, Control::LeaveAck));
        }
        if let Some(id) = self.fenced.get(&conn).copied() {
            // A node declared dead that still talks: it must stop.
            if !matches!(msg, Control::Leave) {
                self.fence(conn, id);
            }
            return;
        }
        if let Some(&id) = self.conn_node.get(&conn) {
            match self.nodes.get_mut(&id) {
                Some(e) if e.state == State::Alive => e.last_seen = now,
                // A left node's connection: nothing more to say.
                _ => return,
            }
        } else if matches!(msg, Control::Heartbeat | Control::Barrier { .. }) {
            // Talk from a connection no node holds (a replaced process).
            self.out.push_back((
                conn,
                Control::Fenced {
                    reason: "the scheduler does not know this connection's node (it was replaced after being declared dead)".into(),
                },
            ));
            return;
        }
        match msg {
            Control::Register {
                role,
                host,
                port,
                host_id,
                rank,
            } => self.on_register(
                conn,
                Pending {
                    conn,
                    role: Role::Scheduler, // set by on_register
                    host,
                    port,
                    host_id,
                    rank,
                },
                role,
                now,
            ),
            Control::Heartbeat => {
                if self.conn_node.contains_key(&conn) {
                    self.out.push_back((conn, Control::HeartbeatAck));
                }
            }
            Control::Stats(stats) => self.on_stats(conn, *stats, now),
            Control::Barrier { group, seq, vote } => {
                if let Some(&id) = self.conn_node.get(&conn) {
                    self.on_barrier(id, Group(group), seq, vote);
                }
            }
            Control::Leave => {
                if let Some(&id) = self.conn_node.get(&conn) {
                    if let Some(e) = self.nodes.get_mut(&id) {
                        e.state = State::Left;
                    }
                    for owed in self.owed.values_mut() {
                        owed.remove(&id);
                    }
                    self.recheck_barriers();
                    self.check_all_left();
                }
            }
            other => tracing::debug!(
                ?other,
                conn,
                "scheduler ignores an unexpected control message"
            ),
        }
    }

    fn broadcast_except(&mut self, skip: NodeId, msg: Control) {
        for (id, e) in &self.nodes {
            if *id != skip && e.state == State::Alive {
                if let Some(conn) = e.conn {
                    self.out.push_back((conn, msg.clone()));
                }
            }
        }
    }

    /// Tells the node of `conn` (declared dead, yet talking) to stop.
    fn fence(&mut self, conn: ConnId, id: NodeId) {
        self.out.push_back((
            conn,
            Control::Fenced {
                reason: format!(
                    "the scheduler declared {} dead (its heartbeats stopped for longer than the timeout); its rank may be taken by a restart",
                    describe(id)
                ),
            },
        ));
    }

    /// The connection `conn` closed.
    pub fn disconnected(&mut self, conn: ConnId) {
        self.pending.retain(|p| p.conn != conn);
        self.held.retain(|h| h.reg.conn != conn);
        self.fenced.remove(&conn);
        if let Some(id) = self.conn_node.remove(&conn) {
            let alive = self.nodes.get(&id).is_some_and(|e| e.state == State::Alive);
            if let Some(e) = self.nodes.get_mut(&id) {
                e.conn = None;
            }
            if alive {
                self.declare_dead(id, "its connection to the scheduler closed".into());
            }
        }
    }

    /// Time passed: nodes silent beyond the heartbeat timeout are dead.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = Some(now);
        let gap = self
            .last_call
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.last_call = Some(now);
        if let Some(t) = self.cfg.heartbeat_timeout {
            if gap > super::stall_gap(t) {
                // The scheduler itself did not run: the nodes' silence
                // during the gap is not theirs.
                tracing::warn!(
                    "the scheduler did not run for {gap:?} (stopped or starved); node silence during that time is not held against them"
                );
                for e in self.nodes.values_mut().filter(|e| e.state == State::Alive) {
                    e.last_seen = (e.last_seen + gap).min(now);
                }
                for h in &mut self.held {
                    h.until += gap;
                }
            }
        }
        if let Some(t) = self.cfg.heartbeat_timeout {
            let silent: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|(_, e)| e.state == State::Alive && now.duration_since(e.last_seen) > t)
                .map(|(id, _)| *id)
                .collect();
            for id in silent {
                self.declare_dead(id, format!("no heartbeat for {t:?}"));
            }
        }
        let (expired, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| h.until <= now);
        self.held = kept;
        for h in expired {
            let role = h.reg.role;
            self.reject(
                h.reg.conn,
                format!("the cluster is complete and no {role} is dead, nor died while this registration waited: nothing to recover"),
            );
        }
    }

    fn declare_dead(&mut self, id: NodeId, reason: String) {
        let Some(e) = self.nodes.get_mut(&id) else {
            return;
        };
        if e.state != State::Alive {
            return;
        }
        e.state = State::Dead;
        let role = Role::from_code(e.info.role);
        let rank = e.info.rank;
        if let Some(conn) = e.conn {
            // Its connection may still be open (a stopped process):
            // whatever it says from now on is answered `Fenced`.
            self.fenced.insert(conn, id);
            self.conn_node.remove(&conn);
            e.conn = None;
        }
        tracing::warn!("{} is dead: {reason}", describe(id));
        self.broadcast_except(id, Control::NodeDead { id });
        self.events
            .push_back(SchedulerEvent::NodeDead { id, reason });
        for owed in self.owed.values_mut() {
            owed.remove(&id);
        }
        self.recheck_barriers();
        // A registration held for a node of this role (and rank, if it
        // asked for one) takes it over.
        if let Some(i) = self
            .held
            .iter()
            .position(|h| Some(h.reg.role) == role && h.reg.rank.is_none_or(|r| r == rank))
        {
            let h = self.held.remove(i);
            let now = self.clock.unwrap_or(h.until);
            self.take_over(id, h.reg, now);
        }
        self.check_all_left();
    }

    fn check_all_left(&mut self) {
        if !self.started {
            return;
        }
        let dead = |nodes: &BTreeMap<NodeId, Entry>, role: Option<Role>| -> Vec<NodeId> {
            nodes
                .iter()
                .filter(|(_, e)| {
                    e.state == State::Dead
                        && role.is_none_or(|r| Role::from_code(e.info.role) == Some(r))
                })
                .map(|(id, _)| *id)
                .collect()
        };
        let workers_gone = self
            .nodes
            .values()
            .all(|e| Role::from_code(e.info.role) != Some(Role::Worker) || e.state != State::Alive);
        if workers_gone && !self.job_ended {
            // Nobody is left to push, pull or stop the servers: tell them.
            self.job_ended = true;
            let dead_workers = dead(&self.nodes, Some(Role::Worker));
            let failed = !dead_workers.is_empty();
            let reason = if failed {
                let names: Vec<String> = dead_workers.iter().map(|d| describe(*d)).collect();
                format!("every worker is gone, and {} died", names.join(", "))
            } else {
                "every worker has left".to_string()
            };
            self.broadcast_except(SCHEDULER_ID, Control::JobEnded { reason, failed });
        }
        if !self.all_left_reported && self.nodes.values().all(|e| e.state != State::Alive) {
            self.all_left_reported = true;
            let dead = dead(&self.nodes, None);
            self.events.push_back(SchedulerEvent::AllLeft { dead });
        }
    }

    /// The scheduler's own id.
    pub fn id(&self) -> NodeId {
        SCHEDULER_ID
    }

    /// Whether the servers were told the job ended.
    pub fn job_ended(&self) -> bool {
        self.job_ended
    }

    /// Ids of the nodes that are alive.
    pub fn alive(&self) -> BTreeSet<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, e)| e.state == State::Alive)
            .map(|(id, _)| *id)
            .collect()
    }
}
