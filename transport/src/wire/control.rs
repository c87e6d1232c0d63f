//! The bodies of control frames, encoded with postcard (compact, bounded by
//! the frame's meta length, which the decoder has already checked).

use serde::{Deserialize, Serialize};

use super::frame::{Frame, Kind, WireError};
use crate::status::{JobStatus, NodeStats};
use bytes::Bytes;

/// One node of the cluster as the scheduler announces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id (scheduler 1; server rank r: 8 + 2r; worker rank r: 9 + 2r).
    pub id: u32,
    /// 0 scheduler, 1 server, 2 worker.
    pub role: u8,
    /// Rank within its role.
    pub rank: u32,
    /// Host it listens on.
    pub host: String,
    /// Port it listens on.
    pub port: u16,
    /// A per-boot identifier of its host (shared-memory van: peers with the
    /// same value share memory).
    pub host_id: u64,
    /// Which process holds the id: 0 for the first, one more for each
    /// restart that took the id over. Peers refuse a connection that
    /// claims the id with another epoch (a fenced old process).
    pub epoch: u32,
}

/// What a node brings to a barrier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Vote {
    /// Arrives.
    Ready,
    /// Arrives, and every node that brings a digest must bring the same
    /// one (a setting every worker must share); `summary` names it in the
    /// error when they differ.
    Agree {
        /// A hash of the setting.
        digest: u64,
        /// A short human form of it.
        summary: String,
    },
    /// The collective failed on this node: the round fails on every node
    /// with this reason (and so does the arrival of a node that comes
    /// later to the same round).
    Fail {
        /// Why.
        reason: String,
    },
}

/// The van a link runs once its handshake is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VanId {
    /// The handshake's TCP stream itself.
    Tcp,
    /// Two shared-memory rings (peers on one host).
    Shm,
    /// RDMA verbs on a device.
    Rdma,
    /// RDMA verbs emulated in memory (tests).
    RdmaEmulated,
}

impl VanId {
    /// Its name, as `PSKV_VAN` spells it.
    pub fn name(self) -> &'static str {
        match self {
            VanId::Tcp => "tcp",
            VanId::Shm => "shm",
            VanId::Rdma => "rdma",
            VanId::RdmaEmulated => "rdma-emulated",
        }
    }

    /// Whether the two ends of a link over this van share memory, so that
    /// a [`Region`](crate::Region) one creates the other can map.
    pub fn shares_memory(self) -> bool {
        matches!(self, VanId::Shm)
    }
}

/// A control message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Handshake, server side: a fresh nonce to prove the token against.
    Challenge {
        /// 32 random bytes.
        nonce: [u8; 32],
    },
    /// Handshake, client side: the client's nonce and the HMAC proof.
    Auth {
        /// 32 random bytes.
        nonce: [u8; 32],
        /// The connector's node id (0 before it registered).
        node_id: u32,
        /// The connector's epoch for that id (see [`NodeInfo::epoch`]).
        epoch: u32,
        /// HMAC-SHA256 over the context, both nonces and the node id.
        mac: [u8; 32],
    },
    /// Handshake, server side: the server's proof (mutual authentication).
    AuthOk {
        /// HMAC-SHA256 over the context and both nonces, server direction.
        mac: [u8; 32],
    },
    /// Handshake refused; the connection closes after this.
    AuthRefused {
        /// Why.
        reason: String,
    },
    /// After authentication, the connector proposes the van for the link.
    VanOffer {
        /// The van.
        van: VanId,
        /// What that van needs from the acceptor's side (opaque here: the
        /// van's own encoding, e.g. ring names or a queue-pair endpoint).
        offer: Vec<u8>,
    },
    /// The acceptor's answer; if not `ok`, the link uses TCP.
    VanAnswer {
        /// The offer is taken.
        ok: bool,
        /// Why not, if not.
        reason: String,
        /// What the van needs back from the acceptor's side (opaque here).
        answer: Vec<u8>,
    },
    /// A node asks to join (or rejoin, after a restart).
    Register {
        /// 1 server, 2 worker.
        role: u8,
        /// Host it listens on.
        host: String,
        /// Port it listens on.
        port: u16,
        /// Its host's identifier.
        host_id: u64,
        /// The rank it asks for (`DMLC_SERVER_ID`, `DMLC_WORKER_ID`); None:
        /// any, in registration order.
        rank: Option<u32>,
    },
    /// The scheduler's answer: the registering node's id, and the cluster.
    Welcome {
        /// The id given to the receiver.
        your_id: u32,
        /// Every node.
        nodes: Vec<NodeInfo>,
        /// Each server's key range `[begin, end)`, by server rank.
        key_ranges: Vec<(u64, u64)>,
        /// The receiver replaces a dead node (it skips the start barrier).
        recovery: bool,
    },
    /// The scheduler refuses a registration.
    Rejected {
        /// Why.
        reason: String,
    },
    /// A node's address changed (it restarted and re-registered).
    NodeUpdate {
        /// The node's new entry.
        node: NodeInfo,
    },
    /// A node is dead: no heartbeat within the timeout, or its connection
    /// to the scheduler broke.
    NodeDead {
        /// Its id.
        id: u32,
    },
    /// A node arrives at a barrier of `group`.
    Barrier {
        /// Group bitmask (1 scheduler, 2 servers, 4 workers).
        group: u8,
        /// The node's barrier count for this group.
        seq: u64,
        /// What it brings.
        vote: Vote,
    },
    /// Everyone of the group arrived (or it cannot complete).
    BarrierDone {
        /// Group bitmask.
        group: u8,
        /// The barrier released.
        seq: u64,
        /// Why it failed, if it did (a member is dead).
        error: Option<String>,
    },
    /// A node is alive.
    Heartbeat,
    /// The scheduler is alive.
    HeartbeatAck,
    /// A node leaves in an orderly way (shutdown); the scheduler answers
    /// `LeaveAck`, and the node closes its connection only after that.
    Leave,
    /// The scheduler to a node it declared dead (or never knew) that
    /// still talks: its id is no longer its own; it must stop.
    Fenced {
        /// Why.
        reason: String,
    },
    /// The scheduler to the nodes left when every worker is gone: the job
    /// is over; `failed` says whether a worker died.
    JobEnded {
        /// Why.
        reason: String,
        /// A worker died (the job failed).
        failed: bool,
    },
    /// A node's counters, sent with each heartbeat (`pskv status`).
    Stats(Box<NodeStats>),
    /// An observer (a connection that proved the token and did not
    /// register) asks the scheduler for the job's status.
    StatusQuery,
    /// The scheduler's answer to `StatusQuery`.
    Status(Box<JobStatus>),
    /// The scheduler to a member that had not reached a barrier of `group`
    /// when the round failed (a member gave up waiting, or failed its part):
    /// its next arrival in the group gets the round's error; this says so
    /// at once, naming the members that had not reached it.
    BarrierMissed {
        /// Group bitmask.
        group: u8,
        /// Why the round failed.
        error: String,
    },
    /// The scheduler's answer to a node's `Stats`: its wall clock
    /// (`status::ClockOffset`).
    Clock {
        /// The `uptime_us` of the `Stats` answered.
        echo_us: u64,
        /// The scheduler's wall clock, µs since the Unix epoch.
        unix_us: u64,
    },
    /// The scheduler's answer to `Leave`: the node is marked as left, so
    /// its connection may close now without being taken for a death.
    /// (Last in the list: postcard numbers variants in order.)
    LeaveAck,
}

impl Control {
    /// This message as a control frame.
    pub fn to_frame(&self, sender: u32, recipient: u32) -> Frame {
        let mut f = Frame::new(Kind::Control);
        f.sender = sender;
        f.recipient = recipient;
        // Encoding into a Vec cannot fail for these types.
        f.meta = Bytes::from(postcard::to_allocvec(self).unwrap_or_default());
        f
    }

    /// The control message in a control frame.
    pub fn from_frame(f: &Frame) -> Result<Control, WireError> {
        if f.kind != Kind::Control {
            return Err(WireError::BadControl(format!(
                "a {:?} frame is not a control frame",
                f.kind
            )));
        }
        postcard::from_bytes(&f.meta).map_err(|e| WireError::BadControl(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn control_round_trips() {
        let msgs = vec![
            Control::Register {
                role: 2,
                host: "10.0.0.3".into(),
                port: 9000,
                host_id: 7,
                rank: Some(1),
            },
            Control::Welcome {
                your_id: 9,
                nodes: vec![NodeInfo {
                    id: 8,
                    role: 1,
                    rank: 0,
                    host: "h".into(),
                    port: 1,
                    host_id: 2,
                    epoch: 3,
                }],
                key_ranges: vec![(0, u64::MAX)],
                recovery: false,
            },
            Control::BarrierDone {
                group: 7,
                seq: 3,
                error: Some("node 8 is dead".into()),
            },
            Control::Barrier {
                group: 4,
                seq: 2,
                vote: Vote::Agree {
                    digest: 77,
                    summary: "sgd".into(),
                },
            },
            Control::Fenced {
                reason: "declared dead".into(),
            },
            Control::JobEnded {
                reason: "every worker left".into(),
                failed: false,
            },
            Control::Heartbeat,
            Control::Leave,
            Control::LeaveAck,
            Control::Stats(Box::new(NodeStats {
                pid: 4,
                hostname: "h".into(),
                rounds: 2,
                ..NodeStats::default()
            })),
            Control::StatusQuery,
            Control::BarrierMissed {
                group: 4,
                error: "gave up".into(),
            },
            Control::Clock {
                echo_us: 5,
                unix_us: 6,
            },
            Control::Status(Box::new(JobStatus {
                num_servers: 1,
                num_workers: 2,
                started: true,
                job_ended: false,
                heartbeat_ms: Some(1000),
                nodes: Vec::new(),
            })),
        ];
        for m in msgs {
            let f = m.to_frame(9, 1);
            assert_eq!(Control::from_frame(&f).unwrap(), m);
        }
    }

    proptest! {
        #[test]
        fn garbage_bodies_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut f = Frame::new(Kind::Control);
            f.meta = Bytes::from(bytes);
            let _ = Control::from_frame(&f);
        }
    }
}
