//! The scheduler's side of the cluster conversation, with no I/O.
//!
//! # States of a node entry
//!
//! ```text
//!   (pending registration) ──all registered──► ALIVE ──no heartbeat / conn lost──► DEAD
//!                                                │  ▲                               │
//!                                          Leave │  └────── re-registration ────────┘
//!                                                ▼           (recovery: same id, new address)
//!                                               LEFT
//! ```
//!
//! Ranks are given in order of registration once the last expected node has
//! registered. A node that registers after the start takes over a dead
//! node's id and rank (recovery). If none of its role is dead yet, its
//! registration is *held* for up to the heartbeat timeout (5 s without
//! heartbeats): a restarted process often registers before its old self is
//! declared dead. It takes over the first node of its role to die
//! meanwhile, or is refused when the time is up. Barriers: a round of group g completes when every non-left
//! member of g (and the scheduler itself, if g includes it) has arrived; if a
//! member is dead the round is released at once with an error naming it, so
//! no barrier waits for a node that will not come.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::{describe, key_ranges, Group, NodeId, Role, SCHEDULER_ID};
use crate::wire::{Control, NodeInfo};

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
    /// Every node has left: the cluster is shut down.
    AllLeft,
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
}

#[derive(Debug)]
struct Pending {
    conn: ConnId,
    role: Role,
    host: String,
    port: u16,
    host_id: u64,
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
    /// Node → the seq it sent.
    arrived: BTreeMap<NodeId, u64>,
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
        match (silent, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
        if let Some(&id) = self.conn_node.get(&conn) {
            match self.nodes.get_mut(&id) {
                Some(e) if e.state == State::Alive => e.last_seen = now,
                // A message from a dead node's old connection: ignored.
                _ => return,
            }
        }
        match msg {
            Control::Register {
                role,
                host,
                port,
                host_id,
            } => self.on_register(conn, role, host, port, host_id, now),
            Control::Heartbeat => {
                if self.conn_node.contains_key(&conn) {
                    self.out.push_back((conn, Control::HeartbeatAck));
                }
            }
            Control::Barrier { group, seq } => {
                if let Some(&id) = self.conn_node.get(&conn) {
                    self.on_barrier(id, Group(group), seq);
                }
            }
            Control::Leave => {
                if let Some(&id) = self.conn_node.get(&conn) {
                    if let Some(e) = self.nodes.get_mut(&id) {
                        e.state = State::Left;
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

    fn on_register(
        &mut self,
        conn: ConnId,
        role: u8,
        host: String,
        port: u16,
        host_id: u64,
        now: Instant,
    ) {
        let role = match Role::from_code(role) {
            Some(r @ (Role::Server | Role::Worker)) => r,
            _ => {
                self.reject(
                    conn,
                    format!("role code {role} cannot register (1: server, 2: worker)"),
                );
                return;
            }
        };
        if self.conn_node.contains_key(&conn)
            || self.pending.iter().any(|p| p.conn == conn)
            || self.held.iter().any(|h| h.reg.conn == conn)
        {
            return; // a duplicate of a registration already handled
        }
        if self.started {
            self.on_recovery(conn, role, host, port, host_id, now);
            return;
        }
        let expected = match role {
            Role::Server => self.cfg.num_servers,
            _ => self.cfg.num_workers,
        };
        let have = self.pending.iter().filter(|p| p.role == role).count() as u32;
        if have >= expected {
            self.reject(
                conn,
                format!("the cluster expects {expected} {role}s and all have registered"),
            );
            return;
        }
        self.pending.push(Pending {
            conn,
            role,
            host,
            port,
            host_id,
        });
        if self.pending.len() as u32 == self.cfg.num_servers + self.cfg.num_workers {
            self.start(now);
        }
    }

    fn start(&mut self, now: Instant) {
        let mut ranks: HashMap<Role, u32> = HashMap::new();
        for p in std::mem::take(&mut self.pending) {
            let rank = ranks.entry(p.role).or_insert(0);
            let id = p.role.id_of(*rank);
            let info = NodeInfo {
                id,
                role: p.role.code(),
                rank: *rank,
                host: p.host,
                port: p.port,
                host_id: p.host_id,
            };
            *rank += 1;
            self.conn_node.insert(p.conn, id);
            self.nodes.insert(
                id,
                Entry {
                    info,
                    conn: Some(p.conn),
                    last_seen: now,
                    state: State::Alive,
                },
            );
        }
        self.started = true;
        let table = self.nodes();
        for (id, e) in &self.nodes {
            if let Some(conn) = e.conn {
                self.out.push_back((
                    conn,
                    Control::Welcome {
                        your_id: *id,
                        nodes: table.clone(),
                        key_ranges: key_ranges(self.cfg.num_servers),
                        recovery: false,
                    },
                ));
            }
        }
        self.events.push_back(SchedulerEvent::Started);
    }

    fn on_recovery(
        &mut self,
        conn: ConnId,
        role: Role,
        host: String,
        port: u16,
        host_id: u64,
        now: Instant,
    ) {
        let dead = self
            .nodes
            .iter()
            .find(|(_, e)| e.state == State::Dead && Role::from_code(e.info.role) == Some(role))
            .map(|(id, _)| *id);
        let Some(id) = dead else {
            // Only a live node of the role could die and be taken over.
            let could_die = self
                .nodes
                .values()
                .any(|e| e.state == State::Alive && Role::from_code(e.info.role) == Some(role));
            if !could_die {
                self.reject(
                    conn,
                    format!("the cluster is complete and no {role} is dead: nothing to recover"),
                );
                return;
            }
            let wait = self
                .cfg
                .heartbeat_timeout
                .unwrap_or(HOLD_WITHOUT_HEARTBEATS);
            // A node silent since before `now` is dead by `now + wait`.
            let until = now + wait + wait / 4;
            tracing::info!(
                conn,
                "a {role} registers while none is dead: held up to {:?} for one to die",
                until - now
            );
            self.held.push(Held {
                reg: Pending {
                    conn,
                    role,
                    host,
                    port,
                    host_id,
                },
                until,
            });
            return;
        };
        self.take_over(id, conn, host, port, host_id, now);
    }

    /// A restarted node at `conn` takes over dead node `id`.
    fn take_over(
        &mut self,
        id: NodeId,
        conn: ConnId,
        host: String,
        port: u16,
        host_id: u64,
        now: Instant,
    ) {
        let info = {
            let e = self.nodes.get_mut(&id).expect("found above");
            if let Some(old) = e.conn.take() {
                self.conn_node.remove(&old);
            }
            e.info.host = host;
            e.info.port = port;
            e.info.host_id = host_id;
            e.conn = Some(conn);
            e.last_seen = now;
            e.state = State::Alive;
            e.info.clone()
        };
        self.conn_node.insert(conn, id);
        self.out.push_back((
            conn,
            Control::Welcome {
                your_id: id,
                nodes: self.nodes(),
                key_ranges: key_ranges(self.cfg.num_servers),
                recovery: true,
            },
        ));
        self.broadcast_except(id, Control::NodeUpdate { node: info });
        self.events.push_back(SchedulerEvent::NodeRecovered { id });
    }

    fn reject(&mut self, conn: ConnId, reason: String) {
        tracing::warn!(conn, "registration refused: {reason}");
        self.out.push_back((conn, Control::Rejected { reason }));
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

    /// The connection `conn` closed.
    pub fn disconnected(&mut self, conn: ConnId) {
        self.pending.retain(|p| p.conn != conn);
        self.held.retain(|h| h.reg.conn != conn);
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
        tracing::warn!("{} is dead: {reason}", describe(id));
        self.broadcast_except(id, Control::NodeDead { id });
        self.events
            .push_back(SchedulerEvent::NodeDead { id, reason });
        self.recheck_barriers();
        self.check_all_left();
        // A registration held for a node of this role takes it over.
        if let Some(i) = self.held.iter().position(|h| Some(h.reg.role) == role) {
            let h = self.held.remove(i);
            let now = self.clock.unwrap_or(h.until);
            let Pending {
                conn,
                host,
                port,
                host_id,
                ..
            } = h.reg;
            self.take_over(id, conn, host, port, host_id, now);
        }
    }

    /// The scheduler itself arrives at a barrier of `group` (which must
    /// include the scheduler).
    pub fn barrier(&mut self, group: Group) {
        self.rounds.entry(group.0).or_default().me = true;
        self.check_round(group);
    }

    fn on_barrier(&mut self, id: NodeId, group: Group, seq: u64) {
        if !group.is_valid() {
            return;
        }
        self.rounds
            .entry(group.0)
            .or_default()
            .arrived
            .insert(id, seq);
        self.check_round(group);
    }

    fn recheck_barriers(&mut self) {
        let groups: Vec<u8> = self.rounds.keys().copied().collect();
        for g in groups {
            self.check_round(Group(g));
        }
    }

    fn check_round(&mut self, group: Group) {
        let Some(round) = self.rounds.get(&group.0) else {
            return;
        };
        let members: Vec<(NodeId, State)> = self
            .nodes
            .iter()
            .filter(|(_, e)| {
                Role::from_code(e.info.role).is_some_and(|r| group.has(r)) && e.state != State::Left
            })
            .map(|(id, e)| (*id, e.state))
            .collect();
        let dead: Vec<NodeId> = members
            .iter()
            .filter(|(_, s)| *s == State::Dead)
            .map(|(id, _)| *id)
            .collect();
        let error = if !dead.is_empty() {
            let names: Vec<String> = dead.iter().map(|d| describe(*d)).collect();
            Some(format!(
                "barrier of group {} cannot complete: {} dead",
                group.0,
                names.join(", ")
            ))
        } else {
            let all_nodes = members.iter().all(|(id, _)| round.arrived.contains_key(id));
            let me_ok = !group.has(Role::Scheduler) || round.me;
            if !(all_nodes && me_ok) {
                return;
            }
            None
        };
        let round = self.rounds.remove(&group.0).expect("checked above");
        for (id, seq) in round.arrived {
            if let Some(conn) = self.nodes.get(&id).and_then(|e| e.conn) {
                self.out.push_back((
                    conn,
                    Control::BarrierDone {
                        group: group.0,
                        seq,
                        error: error.clone(),
                    },
                ));
            }
        }
        if round.me {
            self.events
                .push_back(SchedulerEvent::BarrierDone { group, error });
        }
    }

    fn check_all_left(&mut self) {
        if !self.all_left_reported
            && self.started
            && self.nodes.values().all(|e| e.state != State::Alive)
        {
            self.all_left_reported = true;
            self.events.push_back(SchedulerEvent::AllLeft);
        }
    }

    /// The scheduler's own id.
    pub fn id(&self) -> NodeId {
        SCHEDULER_ID
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
