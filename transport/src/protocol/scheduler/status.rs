//! The scheduler's view for `pskv status`: each node's last two counter
//! snapshots, and the job's status built from the node table.

use std::time::Instant;

use super::{ConnId, Scheduler, State};
use crate::protocol::Role;
use crate::status::{JobStatus, NodeStats, NodeStatus, Rates};

impl Scheduler {
    /// A node's counters arrived on `conn` (ignored from a connection no
    /// node holds).
    pub(super) fn on_stats(&mut self, conn: ConnId, stats: NodeStats, now: Instant) {
        let Some(e) = self
            .conn_node
            .get(&conn)
            .and_then(|id| self.nodes.get_mut(id))
        else {
            return;
        };
        e.prev_stats = e.stats.take().map(|(_, s)| s);
        e.stats = Some((now, stats));
    }

    /// The job as the machine knows it at `now`: every node of the table,
    /// in id order (the driver adds the scheduler itself).
    pub fn status(&self, now: Instant) -> JobStatus {
        let ms = |t: Instant| {
            u64::try_from(now.saturating_duration_since(t).as_millis()).unwrap_or(u64::MAX)
        };
        let nodes = self
            .nodes
            .values()
            .map(|e| NodeStatus {
                id: e.info.id,
                role: Role::from_code(e.info.role).map_or("?".into(), |r| r.to_string()),
                rank: e.info.rank,
                host: e.info.host.clone(),
                port: e.info.port,
                state: match e.state {
                    State::Alive => "alive",
                    State::Dead => "dead",
                    State::Left => "left",
                }
                .into(),
                epoch: e.info.epoch,
                heard_ms_ago: Some(ms(e.last_seen)),
                stats: e.stats.as_ref().map(|(_, s)| s.clone()),
                stats_ms_ago: e.stats.as_ref().map(|(t, _)| ms(*t)),
                rates: e
                    .prev_stats
                    .as_ref()
                    .zip(e.stats.as_ref())
                    .and_then(|(a, (_, b))| Rates::between(a, b)),
            })
            .collect();
        JobStatus {
            num_servers: self.cfg.num_servers,
            num_workers: self.cfg.num_workers,
            started: self.started,
            job_ended: self.job_ended,
            heartbeat_ms: None,
            nodes,
        }
    }
}
