//! A node's part in `pskv status` (`crate::status`): the snapshot of its
//! counters that goes with each heartbeat, and the scheduler's answer to
//! an observer.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::link::Link;
use crate::protocol::{Role, SCHEDULER_ID};
use crate::status::{self, JobStatus, NodeStats, NodeStatus, RoundLog};
use crate::wire::Control;

use super::{Ctl, Inner, Postoffice};

impl Postoffice {
    /// Where the layer above reports the rounds it completes, which
    /// `pskv status` shows (a worker: each key's push answered; a server:
    /// each key's round summed and answered, and the rounds its workers
    /// summed in shared memory, from the log's refresh).
    pub fn round_log(&self) -> Arc<RoundLog> {
        self.owner.inner.rounds.clone()
    }

    /// This node's counters now, as the scheduler gets them.
    pub fn stats(&self) -> NodeStats {
        self.owner.inner.node_stats()
    }

    /// This node's wall clock against the scheduler's, from the heartbeats
    /// (None: the scheduler itself, or no heartbeat answered yet).
    pub fn clock_offset(&self) -> Option<status::ClockOffset> {
        self.owner.inner.clock.lock().offset()
    }
}

impl Inner {
    /// This node's counters now.
    pub(super) fn node_stats(&self) -> NodeStats {
        let traffic = {
            let links = self.links.lock();
            status::total(
                links
                    .by_id
                    .values()
                    .map(|l| l.traffic.counts())
                    .chain([self.retired.counts()]),
            )
        };
        let (rounds, slowest) = self.rounds.latest();
        NodeStats {
            pid: std::process::id(),
            hostname: hostname().to_string(),
            uptime_us: u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX),
            traffic,
            rounds,
            slowest,
            clock: self.clock.lock().offset(),
        }
    }

    /// The scheduler answers a node's snapshot, taken at its uptime
    /// `echo_us`, with its wall clock (`status::clock`).
    pub(super) fn answer_clock(&self, link: &Arc<Link>, echo_us: u64) {
        // Only a node's own connection (not a fenced or unknown one).
        let known = match &*self.ctl.lock() {
            Ctl::Scheduler(s) => s.node_of(link.id).is_some(),
            Ctl::Member(_) => false,
        };
        if !known {
            return;
        }
        let clock = Control::Clock {
            echo_us,
            unix_us: status::unix_us(),
        };
        self.send_on(link, clock.to_frame(self.my_id(), link.peer()));
    }

    /// Answers an observer's `StatusQuery` on `link` (the scheduler; other
    /// nodes ignore it). Sent straight on the link, never through the
    /// resender: an observer does not acknowledge.
    pub(super) fn answer_status(&self, link: &Arc<Link>) {
        let now = Instant::now();
        let mut job: JobStatus = match &*self.ctl.lock() {
            Ctl::Scheduler(s) => s.status(now),
            Ctl::Member(_) => return,
        };
        job.heartbeat_ms = self
            .cfg
            .heartbeat_interval
            .map(|i| u64::try_from(i.as_millis()).unwrap_or(u64::MAX));
        job.nodes.insert(
            0,
            NodeStatus {
                id: SCHEDULER_ID,
                role: Role::Scheduler.to_string(),
                rank: 0,
                host: self.announce.clone(),
                port: self.listen.port(),
                state: "alive".into(),
                epoch: 0,
                heard_ms_ago: None,
                stats: Some(self.node_stats()),
                stats_ms_ago: Some(0),
                rates: None,
            },
        );
        let frame = Control::Status(Box::new(job)).to_frame(self.my_id(), link.peer());
        if let Err(e) = link.send(frame) {
            tracing::debug!("a status query's connection closed before its answer: {e}");
        }
    }
}

/// This host's name (read once).
pub(crate) fn hostname() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    })
}
