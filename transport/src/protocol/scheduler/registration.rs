//! Registration: ranks given once every expected node has registered (the
//! ones asked for first), and after the start, recovery: a node that
//! registers takes over a dead node's id and rank with the next epoch, or
//! is held until one dies, or is refused.

use std::collections::HashMap;
use std::time::Instant;

use super::{
    key_ranges, ConnId, Entry, Held, NodeId, Pending, Role, Scheduler, SchedulerEvent, State,
    HOLD_WITHOUT_HEARTBEATS, SCHEDULER_ID,
};
use crate::wire::{Control, NodeInfo};

impl Scheduler {
    pub(super) fn on_register(&mut self, conn: ConnId, mut reg: Pending, role: u8, now: Instant) {
        reg.role = match Role::from_code(role) {
            Some(r @ (Role::Server | Role::Worker)) => r,
            _ => {
                self.reject(
                    conn,
                    format!("role code {role} cannot register (1: server, 2: worker)"),
                );
                return;
            }
        };
        let role = reg.role;
        if self.conn_node.contains_key(&conn)
            || self.pending.iter().any(|p| p.conn == conn)
            || self.held.iter().any(|h| h.reg.conn == conn)
        {
            return; // a duplicate of a registration already handled
        }
        let expected = match role {
            Role::Server => self.cfg.num_servers,
            _ => self.cfg.num_workers,
        };
        if let Some(r) = reg.rank {
            if r >= expected {
                self.reject(
                    conn,
                    format!(
                        "asked for {role} rank {r} (DMLC_{}_ID), but the cluster has {expected} {role}s (ranks 0 to {})",
                        if role == Role::Server { "SERVER" } else { "WORKER" },
                        expected.saturating_sub(1)
                    ),
                );
                return;
            }
        }
        if self.started {
            self.on_recovery(reg, now);
            return;
        }
        let have = self.pending.iter().filter(|p| p.role == role).count() as u32;
        if have >= expected {
            self.reject(
                conn,
                format!("the cluster expects {expected} {role}s and all have registered"),
            );
            return;
        }
        if let Some(r) = reg.rank {
            if self
                .pending
                .iter()
                .any(|p| p.role == role && p.rank == Some(r))
            {
                self.reject(
                    conn,
                    format!("two {role}s asked for rank {r}: each DMLC_*_ID must be unique"),
                );
                return;
            }
        }
        self.pending.push(reg);
        if self.pending.len() as u32 == self.cfg.num_servers + self.cfg.num_workers {
            self.start(now);
        }
    }

    fn start(&mut self, now: Instant) {
        // Asked-for ranks first; the others take the free ones in
        // registration order.
        let pending = std::mem::take(&mut self.pending);
        let taken: std::collections::HashSet<(Role, u32)> = pending
            .iter()
            .filter_map(|p| p.rank.map(|r| (p.role, r)))
            .collect();
        let mut next: HashMap<Role, u32> = HashMap::new();
        for p in pending {
            let rank = match p.rank {
                Some(r) => r,
                None => {
                    let n = next.entry(p.role).or_insert(0);
                    while taken.contains(&(p.role, *n)) {
                        *n += 1;
                    }
                    *n += 1;
                    *n - 1
                }
            };
            let id = p.role.id_of(rank);
            let info = NodeInfo {
                id,
                role: p.role.code(),
                rank,
                host: p.host,
                port: p.port,
                host_id: p.host_id,
                epoch: 0,
            };
            self.conn_node.insert(p.conn, id);
            self.nodes.insert(
                id,
                Entry {
                    info,
                    conn: Some(p.conn),
                    last_seen: now,
                    state: State::Alive,
                    stats: None,
                    prev_stats: None,
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

    fn on_recovery(&mut self, reg: Pending, now: Instant) {
        let role = reg.role;
        let fits = |id: &NodeId, e: &Entry| {
            Role::from_code(e.info.role) == Some(role)
                && reg.rank.is_none_or(|r| e.info.rank == r)
                && *id != SCHEDULER_ID
        };
        let dead = self
            .nodes
            .iter()
            .find(|(id, e)| e.state == State::Dead && fits(id, e))
            .map(|(id, _)| *id);
        let Some(id) = dead else {
            // Only a live node it could replace could die and be taken over.
            let could_die = self
                .nodes
                .iter()
                .any(|(id, e)| e.state == State::Alive && fits(id, e));
            let which = match reg.rank {
                Some(r) => format!("{role} {r}"),
                None => format!("no {role}"),
            };
            if !could_die {
                self.reject(
                    reg.conn,
                    match reg.rank {
                        Some(_) => format!("the cluster is complete and {which} is not dead (it left): nothing to recover"),
                        None => format!("the cluster is complete and {which} is dead: nothing to recover"),
                    },
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
                conn = reg.conn,
                "a {role} registers while {} is dead: held up to {:?} for one to die",
                if reg.rank.is_some() {
                    format!("{which} is alive, not")
                } else {
                    which.clone()
                },
                until - now
            );
            self.held.push(Held { reg, until });
            return;
        };
        self.take_over(id, reg, now);
    }

    /// A restarted node (registration `reg`) takes over dead node `id`.
    pub(super) fn take_over(&mut self, id: NodeId, reg: Pending, now: Instant) {
        let conn = reg.conn;
        let info = {
            let e = self.nodes.get_mut(&id).expect("found above");
            if let Some(old) = e.conn.take() {
                self.conn_node.remove(&old);
            }
            e.info.host = reg.host;
            e.info.port = reg.port;
            e.info.host_id = reg.host_id;
            e.info.epoch += 1;
            e.conn = Some(conn);
            e.last_seen = now;
            e.state = State::Alive;
            // A new process: its counters start over.
            (e.stats, e.prev_stats) = (None, None);
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

    pub(super) fn reject(&mut self, conn: ConnId, reason: String) {
        tracing::warn!(conn, "registration refused: {reason}");
        self.out.push_back((conn, Control::Rejected { reason }));
    }
}
