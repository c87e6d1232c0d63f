//! Acknowledgement, resend and duplicate removal, with no I/O: for vans
//! that can lose messages (ps-lite's `PS_RESEND`).
//!
//! Each sender numbers its frames per destination from 1 and asks for an
//! acknowledgement (`NEEDS_ACK`). An unacknowledged frame is sent again after
//! the resend timeout, up to `max_tries` times, then the destination is
//! reported unreachable. A receiver acknowledges every such frame (again for
//! a duplicate, whose ack may have been lost) and delivers each msg_id once:
//! it keeps, per sender, the lowest id not yet seen and the ids seen above it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::wire::{Flags, Frame, Kind};

#[derive(Debug)]
struct Unacked {
    frame: Frame,
    sent: Instant,
    tries: u32,
}

#[derive(Debug)]
struct Seen {
    /// Every id below this was delivered.
    floor: u64,
    /// Ids at or above `floor` that were delivered.
    above: BTreeSet<u64>,
}

impl Default for Seen {
    fn default() -> Self {
        Seen {
            floor: 1,
            above: BTreeSet::new(),
        }
    }
}

impl Seen {
    /// Records `id`; false if it was seen before.
    fn insert(&mut self, id: u64) -> bool {
        if id < self.floor || !self.above.insert(id) {
            return false;
        }
        while self.above.remove(&self.floor) {
            self.floor += 1;
        }
        true
    }
}

/// What to do with a received frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Deliver it; send `ack` back if there is one.
    Deliver {
        /// The acknowledgement to send.
        ack: Option<Frame>,
    },
    /// A duplicate: drop it, but acknowledge again.
    Duplicate {
        /// The acknowledgement to send.
        ack: Frame,
    },
    /// An acknowledgement, consumed here.
    Consumed,
}

/// Who a frame goes to or comes from, as the driver names its links (a node
/// id, or a connection id before registration).
pub type Peer = u64;

/// The resender of one node.
#[derive(Debug)]
pub struct Resender {
    me: u32,
    timeout: Duration,
    max_tries: u32,
    next_id: HashMap<Peer, u64>,
    unacked: BTreeMap<(Peer, u64), Unacked>,
    seen: HashMap<Peer, Seen>,
}

impl Resender {
    /// A resender for node `me`: resend after `timeout`, give up after
    /// `max_tries` sends.
    pub fn new(me: u32, timeout: Duration, max_tries: u32) -> Resender {
        Resender {
            me,
            timeout,
            max_tries: max_tries.max(1),
            next_id: HashMap::new(),
            unacked: BTreeMap::new(),
            seen: HashMap::new(),
        }
    }

    /// Sets the id this node signs its acks with (known after registration).
    pub fn set_me(&mut self, me: u32) {
        self.me = me;
    }

    /// Numbers `frame` for `dest`, asks for an ack, and keeps a copy (cheap:
    /// the payload is shared) to send again.
    pub fn stamp(&mut self, dest: Peer, frame: &mut Frame, now: Instant) {
        let id = self.next_id.entry(dest).or_insert(1);
        frame.msg_id = *id;
        frame.flags = frame.flags | Flags::NEEDS_ACK;
        *id += 1;
        self.unacked.insert(
            (dest, frame.msg_id),
            Unacked {
                frame: frame.clone(),
                sent: now,
                tries: 1,
            },
        );
    }

    /// Requests `request_ids` (sorted) to `dest` failed (timed out, an
    /// error answer, a lost node): their frames not acknowledged yet go
    /// out, when resent, as [`Flags::VOID`] frames that carry only their
    /// message numbers, so the receiver's count of numbers has no gap and a
    /// request its caller was told failed is not delivered by a resend
    /// after the caller sent it again. Returns how many frames it voided.
    pub fn void(&mut self, dest: Peer, request_ids: &[u64]) -> usize {
        let mut n = 0;
        for (_, u) in self.unacked.range_mut((dest, 0)..=(dest, u64::MAX)) {
            let f = &u.frame;
            if f.kind != Kind::Request
                || f.flags.contains(Flags::VOID)
                || request_ids.binary_search(&f.request_id).is_err()
            {
                continue;
            }
            u.frame = void_of(f);
            n += 1;
        }
        n
    }

    /// A frame arrived from `from`.
    pub fn on_receive(&mut self, from: Peer, frame: &Frame) -> Received {
        if frame.kind == Kind::Ack {
            self.unacked.remove(&(from, frame.msg_id));
            return Received::Consumed;
        }
        if !frame.flags.contains(Flags::NEEDS_ACK) {
            return Received::Deliver { ack: None };
        }
        let mut ack = Frame::new(Kind::Ack);
        ack.sender = self.me;
        ack.recipient = frame.sender;
        ack.msg_id = frame.msg_id;
        if self.seen.entry(from).or_default().insert(frame.msg_id) {
            Received::Deliver { ack: Some(ack) }
        } else {
            Received::Duplicate { ack }
        }
    }

    /// When `handle_timeout` must run next.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.unacked.values().map(|u| u.sent + self.timeout).min()
    }

    /// Time passed: frames to send again, and destinations given up on.
    pub fn handle_timeout(&mut self, now: Instant) -> (Vec<(Peer, Frame)>, Vec<Peer>) {
        let mut again = Vec::new();
        let mut lost = BTreeSet::new();
        for ((dest, _), u) in self.unacked.iter_mut() {
            if now.duration_since(u.sent) < self.timeout {
                continue;
            }
            if u.tries >= self.max_tries {
                lost.insert(*dest);
                continue;
            }
            u.tries += 1;
            u.sent = now;
            again.push((*dest, u.frame.clone()));
        }
        for d in &lost {
            self.forget(*d);
        }
        (again, lost.into_iter().collect())
    }

    /// Drops everything owed to `dest` (it died, or was given up on).
    pub fn forget(&mut self, dest: Peer) {
        self.unacked.retain(|(d, _), _| *d != dest);
    }

    /// Frames not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }
}

/// The `VOID` frame that stands for request frame `f` (same number, no
/// keys, no values): what goes out instead of a failed request's frame.
pub fn void_of(f: &Frame) -> Frame {
    let mut v = Frame::new(Kind::Request);
    v.flags = Flags::NEEDS_ACK | Flags::VOID;
    v.sender = f.sender;
    v.recipient = f.recipient;
    v.msg_id = f.msg_id;
    v.request_id = f.request_id;
    v.priority = f.priority;
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_window_delivers_each_id_once() {
        let mut s = Seen::default();
        let ids = [3, 1, 2, 2, 5, 1, 4, 3];
        let first = [true, true, true, false, true, false, true, false];
        for (id, want) in ids.into_iter().zip(first) {
            assert_eq!(s.insert(id), want, "id {id}");
        }
        assert_eq!(s.floor, 6);
        assert!(s.above.is_empty());
        assert!(!s.insert(4));
        assert!(s.insert(6));
    }

    #[test]
    fn a_voided_request_is_resent_as_its_number_only() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut tx = Resender::new(8, s, 5);
        let mut rx = Resender::new(10, s, 5);
        let mut req = Frame::new(Kind::Request);
        req.sender = 8;
        req.recipient = 10;
        req.request_id = 42;
        req.keys = vec![3];
        req.lens = vec![4];
        req.payload = bytes::Bytes::from_static(&[1, 2, 3, 4]);
        let mut other = req.clone();
        other.request_id = 43;
        tx.stamp(10, &mut req, t0);
        tx.stamp(10, &mut other, t0);
        assert_eq!(tx.void(10, &[42]), 1);
        assert_eq!(tx.void(10, &[42]), 0, "voided once");
        assert_eq!(tx.void(11, &[43]), 0, "another destination's");
        let (again, lost) = tx.handle_timeout(t0 + s);
        assert!(lost.is_empty());
        let void = &again
            .iter()
            .find(|(_, f)| f.msg_id == req.msg_id)
            .unwrap()
            .1;
        assert!(void.flags.contains(Flags::VOID | Flags::NEEDS_ACK));
        assert!(void.keys.is_empty() && void.payload.is_empty());
        let kept = &again
            .iter()
            .find(|(_, f)| f.msg_id == other.msg_id)
            .unwrap()
            .1;
        assert_eq!(kept.payload, other.payload);
        // The receiver counts its number (no gap) and acknowledges it; the
        // sender then forgets it.
        let Received::Deliver { ack: Some(ack) } = rx.on_receive(8, void) else {
            panic!("a void frame is acknowledged")
        };
        assert_eq!(
            rx.on_receive(8, kept),
            Received::Deliver {
                ack: Some({
                    let mut a = Frame::new(Kind::Ack);
                    a.sender = 10;
                    a.recipient = 8;
                    a.msg_id = kept.msg_id;
                    a
                })
            }
        );
        assert_eq!(rx.seen[&8].floor, 3);
        assert_eq!(tx.on_receive(10, &ack), Received::Consumed);
        assert_eq!(tx.unacked(), 1);
    }
}
