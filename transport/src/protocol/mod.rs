//! The protocol, as state machines that do no I/O (the quinn-proto
//! pattern): they take messages and the current time, and hand back the
//! messages to send, the events that happened and when to wake them next.
//! The driver (`crate::postoffice`) moves bytes through the vans; the tests
//! drive these machines through a simulated network with a fake clock.
//!
//! - [`scheduler::Scheduler`]: registration, ids and ranks, the node table,
//!   recovery of restarted nodes, barriers, heartbeats and dead nodes,
//!   ordered shutdown.
//! - [`member::Member`]: the same conversation from a server or worker.
//! - [`tracker::Tracker`]: requests fanned out to servers, completed once
//!   every server answered, or failed naming the node that died.
//! - [`handshake::Connector`] and [`handshake::Acceptor`]: the login of
//!   every connection (the token's proofs, admission, the van offer).
//! - [`resender::Resender`]: acknowledgement, resend and duplicate removal
//!   for vans that can lose messages (`PS_RESEND`).

pub mod handshake;
pub mod member;
pub mod resender;
pub mod scheduler;
pub mod tracker;

use std::fmt;
use std::time::Duration;

/// A node id: the scheduler is 1; server rank r is 8 + 2r; worker rank r is
/// 9 + 2r (ps-lite's numbering, so MXNet-era tools read the same ids).
pub type NodeId = u32;

/// The scheduler's id.
pub const SCHEDULER_ID: NodeId = 1;

/// A gap between two timeout calls longer than this means the process did
/// not run meanwhile (with heartbeat timeout `t`).
pub(crate) fn stall_gap(t: Duration) -> Duration {
    (t / 4).max(Duration::from_millis(500))
}

/// How often a machine with heartbeat timeout `t` asks for a timeout call
/// (its `next_timeout`) even with nothing due, so that a longer gap can
/// only be a stall of the process.
pub(crate) fn stall_probe(t: Duration) -> Duration {
    stall_gap(t) / 2
}

/// What a node does.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Assigns ids, runs barriers, watches heartbeats.
    Scheduler,
    /// Holds a range of keys.
    Server,
    /// Pushes and pulls.
    Worker,
}

impl Role {
    /// The wire code (0, 1, 2).
    pub fn code(self) -> u8 {
        match self {
            Role::Scheduler => 0,
            Role::Server => 1,
            Role::Worker => 2,
        }
    }

    /// The role of a wire code.
    pub fn from_code(c: u8) -> Option<Role> {
        Some(match c {
            0 => Role::Scheduler,
            1 => Role::Server,
            2 => Role::Worker,
            _ => return None,
        })
    }

    /// The id of rank `rank` in this role.
    pub fn id_of(self, rank: u32) -> NodeId {
        match self {
            Role::Scheduler => SCHEDULER_ID,
            Role::Server => 8 + 2 * rank,
            Role::Worker => 9 + 2 * rank,
        }
    }

    /// The group bit of this role.
    pub fn group(self) -> Group {
        match self {
            Role::Scheduler => Group::SCHEDULER,
            Role::Server => Group::SERVERS,
            Role::Worker => Group::WORKERS,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Scheduler => "scheduler",
            Role::Server => "server",
            Role::Worker => "worker",
        })
    }
}

/// The role and rank of an id, if it is one of a valid shape.
pub fn role_rank(id: NodeId) -> Option<(Role, u32)> {
    match id {
        SCHEDULER_ID => Some((Role::Scheduler, 0)),
        8.. if id % 2 == 0 => Some((Role::Server, (id - 8) / 2)),
        9.. => Some((Role::Worker, (id - 9) / 2)),
        _ => None,
    }
}

/// The error of a barrier round of `group` that failed because node `id`
/// voted `Fail` with `reason` (what every node of the round reports).
pub fn vote_failure(group: Group, id: NodeId, reason: &str) -> String {
    format!(
        "barrier of group {} failed on {}: {reason}",
        group.0,
        describe(id)
    )
}

/// A human name for a node: `server 1 (id 10)`.
pub fn describe(id: NodeId) -> String {
    match role_rank(id) {
        Some((Role::Scheduler, _)) => "the scheduler (id 1)".to_string(),
        Some((role, rank)) => format!("{role} {rank} (id {id})"),
        None => format!("node {id}"),
    }
}

/// A set of roles, as ps-lite's group ids: 1 scheduler, 2 servers,
/// 4 workers, and their unions (7: everyone).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Group(pub u8);

impl Group {
    /// The scheduler.
    pub const SCHEDULER: Group = Group(1);
    /// All servers.
    pub const SERVERS: Group = Group(2);
    /// All workers.
    pub const WORKERS: Group = Group(4);
    /// Everyone.
    pub const ALL: Group = Group(7);

    /// Whether `role` belongs to this group.
    pub fn has(self, role: Role) -> bool {
        self.0 & role.group().0 != 0
    }

    /// Whether this is a valid, non-empty group.
    pub fn is_valid(self) -> bool {
        (1..=7).contains(&self.0)
    }
}

impl std::ops::BitOr for Group {
    type Output = Group;
    fn bitor(self, rhs: Group) -> Group {
        Group(self.0 | rhs.0)
    }
}

/// The key ranges of `num_servers` servers: `[0, 2^64 - 1)` cut into equal
/// contiguous parts, server rank r owning part r (ps-lite's division). The
/// last key, `u64::MAX`, belongs to no server.
pub fn key_ranges(num_servers: u32) -> Vec<(u64, u64)> {
    let n = num_servers.max(1) as u64;
    let step = u64::MAX / n;
    (0..n)
        .map(|r| (r * step, if r + 1 == n { u64::MAX } else { (r + 1) * step }))
        .collect()
}

/// The rank of the server whose range of [`key_ranges`] holds `key` (the
/// last key, `u64::MAX`, which belongs to no server, gives the last one),
/// without making the list.
pub fn server_of_key(key: u64, num_servers: u32) -> u32 {
    let n = num_servers.max(1) as u64;
    (key / (u64::MAX / n)).min(n - 1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keys_server_is_the_one_whose_range_holds_it() {
        for n in [1u32, 2, 3, 7, 64, 4096] {
            let ranges = key_ranges(n);
            for (r, &(lo, hi)) in ranges.iter().enumerate() {
                for k in [lo, lo + 1, lo + (hi - lo) / 2, hi - 1] {
                    assert_eq!(server_of_key(k, n), r as u32, "key {k} of {n} servers");
                }
            }
        }
        assert_eq!(server_of_key(u64::MAX, 3), 2);
        assert_eq!(server_of_key(5, 0), 0);
    }

    #[test]
    fn ids_and_ranks_round_trip() {
        for r in 0..100 {
            assert_eq!(role_rank(Role::Server.id_of(r)), Some((Role::Server, r)));
            assert_eq!(role_rank(Role::Worker.id_of(r)), Some((Role::Worker, r)));
        }
        assert_eq!(role_rank(1), Some((Role::Scheduler, 0)));
        assert_eq!(role_rank(0), None);
        assert_eq!(role_rank(4), None);
        assert_eq!(describe(10), "server 1 (id 10)");
    }

    #[test]
    fn key_ranges_cover_the_key_space_in_order() {
        for s in 1..9 {
            let r = key_ranges(s);
            assert_eq!(r.len(), s as usize);
            assert_eq!(r[0].0, 0);
            assert_eq!(r[r.len() - 1].1, u64::MAX);
            for w in r.windows(2) {
                assert_eq!(w[0].1, w[1].0);
                assert!(w[0].0 < w[0].1);
            }
        }
    }
}
