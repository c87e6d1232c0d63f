//! A simulated connection for the login handshake: the two machines of
//! `protocol::handshake` exchange messages over one ordered stream with a
//! fake clock. The stream can duplicate a message (a broken or hostile
//! peer), delay it (past the deadline, at times), reset, or go silent (a
//! lost peer: nothing more arrives in that direction). Deterministic per
//! seed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use pskv_transport::protocol::handshake::{
    Acceptor, AcceptorConfig, Action, Connector, ConnectorConfig, Done, HandshakeError,
};
use pskv_transport::protocol::NodeId;
use pskv_transport::wire::{Control, VanId};

use super::Rng;

/// Each side's deadline per message.
pub const HS_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong with each message.
#[derive(Clone, Copy)]
pub struct HsFaults {
    /// The connection breaks here: reset (both sides told) or silent (this
    /// and every later message of that direction never arrive).
    pub loss: f64,
    /// The message arrives twice.
    pub dup: f64,
    /// The message takes between half and twice the deadline.
    pub slow: f64,
    /// Every message takes up to this long.
    pub max_delay: Duration,
}

/// One side of the run, as it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    Done(Done),
    Failed(HandshakeError),
}

/// How a handshake ended on both sides.
pub struct HsRun {
    pub connector: End,
    pub acceptor: End,
    /// When the last side ended.
    pub ended: Instant,
    /// A fault touched a message or the connection.
    pub faulted: bool,
}

/// The driver's answers, and the two ids.
#[derive(Clone)]
pub struct HsSetup {
    pub connector_id: NodeId,
    pub acceptor_id: NodeId,
    pub token_c: Vec<u8>,
    pub token_a: Option<Vec<u8>>,
    /// The acceptor's admission verdict.
    pub admit: Result<(), String>,
    /// The acceptor's answer to the offer.
    pub answer: Result<Vec<u8>, String>,
}

impl HsSetup {
    pub fn plain(connector_id: NodeId, acceptor_id: NodeId) -> HsSetup {
        HsSetup {
            connector_id,
            acceptor_id,
            token_c: b"sim-token".to_vec(),
            token_a: Some(b"sim-token".to_vec()),
            admit: Ok(()),
            answer: Ok(b"rings mapped".to_vec()),
        }
    }
}

/// What travels: a message, or the connection's reset.
enum Item {
    Msg(Control),
    Reset,
}

/// Runs one handshake from `start`; panics if it does not end (a machine
/// that waits with no deadline: invariant H3).
pub fn run_handshake(rng: &mut Rng, f: HsFaults, setup: &HsSetup, start: Instant) -> HsRun {
    let mut nonce = || {
        let mut n = [0u8; 32];
        for b in n.iter_mut() {
            *b = rng.next() as u8;
        }
        n
    };
    let (nc, na) = (nonce(), nonce());
    let mut c = Connector::new(
        ConnectorConfig {
            me: setup.connector_id,
            peer: setup.acceptor_id,
            epoch: 0,
            token: setup.token_c.clone(),
            nonce: nc,
            timeout: HS_TIMEOUT,
        },
        start,
    );
    let mut a = Acceptor::new(
        AcceptorConfig {
            token: setup.token_a.clone(),
            loopback: true,
            nonce: na,
            timeout: HS_TIMEOUT,
        },
        start,
    );
    // Per direction (0: to the acceptor, 1: to the connector), FIFO.
    let mut q: [VecDeque<(Instant, Item)>; 2] = [VecDeque::new(), VecDeque::new()];
    let mut silent = [false; 2];
    let (mut c_end, mut a_end) = (None, None);
    let mut faulted = false;
    let mut now = start;
    let mut ended = start;
    let send = |q: &mut [VecDeque<(Instant, Item)>; 2],
                silent: &mut [bool; 2],
                faulted: &mut bool,
                rng: &mut Rng,
                dir: usize,
                msg: Control,
                now: Instant| {
        if silent[dir] {
            return;
        }
        let last = q[dir].back().map(|(t, _)| *t).unwrap_or(now);
        let mut delay = Duration::from_micros(rng.below(f.max_delay.as_micros() as u64 + 1));
        if rng.chance(f.slow) {
            *faulted = true;
            delay += HS_TIMEOUT / 2 + Duration::from_millis(rng.below(1500 * HS_TIMEOUT.as_secs()));
        }
        let at = (now + delay).max(last);
        if rng.chance(f.loss) {
            *faulted = true;
            if rng.chance(0.5) {
                // A reset: both sides see the end, after what is in flight.
                for d in q.iter_mut() {
                    let last = d.back().map(|(t, _)| *t).unwrap_or(now);
                    d.push_back((at.max(last), Item::Reset));
                }
            }
            silent[dir] = true;
            return;
        }
        let dup = rng.chance(f.dup);
        q[dir].push_back((at, Item::Msg(msg.clone())));
        if dup {
            *faulted = true;
            q[dir].push_back((at, Item::Msg(msg)));
        }
    };
    loop {
        // Each side acts on what it has.
        let mut progress = true;
        while progress {
            progress = false;
            while let Some(act) = a.poll() {
                progress = true;
                match act {
                    Action::Send(m) => send(&mut q, &mut silent, &mut faulted, rng, 1, m, now),
                    Action::Admit { node_id, .. } => {
                        assert_eq!(node_id, setup.connector_id, "H2: the proved id");
                        a.admit(setup.admit.clone(), now)
                    }
                    Action::Answer { van, offer } => {
                        assert_eq!((van, offer.as_slice()), (VanId::Shm, &b"offer"[..]));
                        a.answer(setup.answer.clone())
                    }
                    Action::Offer => panic!("an acceptor does not offer"),
                    Action::Done(d) => set_end(&mut a_end, End::Done(d), now, &mut ended),
                    Action::Failed(e) => set_end(&mut a_end, End::Failed(e), now, &mut ended),
                }
            }
            while let Some(act) = c.poll() {
                progress = true;
                match act {
                    Action::Send(m) => send(&mut q, &mut silent, &mut faulted, rng, 0, m, now),
                    Action::Offer => c.offer(VanId::Shm, b"offer".to_vec(), now),
                    Action::Admit { .. } | Action::Answer { .. } => {
                        panic!("a connector is not asked that")
                    }
                    Action::Done(d) => set_end(&mut c_end, End::Done(d), now, &mut ended),
                    Action::Failed(e) => set_end(&mut c_end, End::Failed(e), now, &mut ended),
                }
            }
        }
        if c.is_over() && a.is_over() {
            return HsRun {
                connector: c_end.expect("the connector ended"),
                acceptor: a_end.expect("the acceptor ended"),
                ended,
                faulted,
            };
        }
        // The next event: a delivery or a deadline.
        let next = [
            q[0].front().map(|(t, _)| *t),
            q[1].front().map(|(t, _)| *t),
            c.next_timeout(),
            a.next_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("H3: a side waits with nothing due and no deadline");
        now = now.max(next);
        for (dir, q) in q.iter_mut().enumerate() {
            while q.front().is_some_and(|(t, _)| *t <= now) {
                let (_, item) = q.pop_front().expect("checked");
                match (dir, item) {
                    (0, Item::Msg(m)) => a.handle(m, now),
                    (_, Item::Msg(m)) => c.handle(m, now),
                    (0, Item::Reset) => a.handle_closed("connection reset"),
                    (_, Item::Reset) => c.handle_closed("connection reset"),
                }
            }
        }
        c.handle_timeout(now);
        a.handle_timeout(now);
    }
}

fn set_end(slot: &mut Option<End>, e: End, now: Instant, ended: &mut Instant) {
    assert!(slot.is_none(), "a side ended twice: {e:?}");
    *slot = Some(e);
    *ended = (*ended).max(now);
}
