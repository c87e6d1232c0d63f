//! The login handshake of every connection, as two state machines with no
//! I/O: [`Connector`] (the side that dialed) and [`Acceptor`]. They take
//! the peer's messages and the time, and hand back [`Action`]s: messages
//! to write, questions for the driver (may this node join? which van to
//! offer? what to answer to an offer?), and the end.
//!
//! ```text
//!   acceptor                                       connector
//!      ── Challenge { nonce_a } ──────────────────────►
//!      ◄── Auth { nonce_c, node_id, epoch, mac_c } ────
//!    Admit? (fencing: a dead id, another epoch)
//!      ── AuthOk { mac_a } ───────────────────────────►  (checks mac_a)
//!         (or AuthRefused { reason }, then close)         Offer?
//!      ◄── VanOffer { van, offer } ──────────────────────
//!    Answer?
//!      ── VanAnswer { ok, reason, answer } ───────────►
//!    Done                                                Done
//! ```
//!
//! The proofs are `security`'s: both sides prove the cluster token over
//! both nonces, so a recorded exchange cannot be replayed. The van's offer
//! and answer are opaque bytes here: each van encodes its own.
//!
//! States. Connector: `AwaitChallenge` → `AwaitAuthOk` → `Offering` (the
//! driver's turn) → `AwaitAnswer` → `Over`. Acceptor: `AwaitAuth` →
//! `Admitting` (the driver's turn) → `AwaitOffer` → `Answering` (the
//! driver's turn) → `Over`. A machine is `Over` once it emitted
//! [`Action::Done`] or [`Action::Failed`], exactly one of them, once; after
//! that it ignores every input.
//!
//! Invariants:
//! - H1: a side is `Done` only after the whole exchange, in order: the
//!   acceptor only after it answered an offer from a peer that proved the
//!   token and was admitted; the connector only after the acceptor proved
//!   the token and answered its offer. So a connector that is done implies
//!   an acceptor that is done (the answer is the acceptor's last message).
//! - H2: the peer a side is done with is the one the proofs named: the
//!   acceptor's `peer` is the node id the connector's MAC covers.
//! - H3: every state that waits for the peer has a deadline (`timeout`
//!   after the state began); a state that waits for the driver has none
//!   (the driver answers at once). So a handshake ends in bounded time.
//! - H4: the connection is a reliable ordered stream, so a message out of
//!   place (a duplicate, a reorder, an unknown one) is a broken or hostile
//!   peer: the handshake fails, it never skips or repeats a step.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::NodeId;
use crate::wire::{Control, VanId};

mod acceptor;
mod connector;

pub use acceptor::{Acceptor, AcceptorConfig};
pub use connector::{Connector, ConnectorConfig};

/// What a handshake machine asks of its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write this message to the peer.
    Send(Control),
    /// The acceptor: the peer proved the token as `node_id` of `epoch`.
    /// May it connect? Answer with [`Acceptor::admit`].
    Admit {
        /// The id the peer proved.
        node_id: NodeId,
        /// The epoch it claims for that id.
        epoch: u32,
    },
    /// The connector: the peer is authenticated; which van to offer?
    /// Answer with [`Connector::offer`].
    Offer,
    /// The acceptor: the peer offers `van`; answer with
    /// [`Acceptor::answer`].
    Answer {
        /// The van offered.
        van: VanId,
        /// The van's offer bytes.
        offer: Vec<u8>,
    },
    /// The handshake is over: the link runs `van` if `answer` is `Ok` (the
    /// acceptor's answer bytes), TCP if the acceptor declined (the reason).
    Done(Done),
    /// The handshake failed: close the connection.
    Failed(HandshakeError),
}

/// How a handshake ended well.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    /// The authenticated peer (the acceptor's side: the id the connector
    /// proved; the connector's: the node it meant to reach).
    pub peer: NodeId,
    /// The van offered.
    pub van: VanId,
    /// The acceptor's answer bytes, or why it declined (the link then
    /// runs TCP).
    pub answer: Result<Vec<u8>, String>,
}

/// Why a handshake failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Before both sides were authenticated: a wrong token, a refusal, a
    /// peer that broke off or went silent.
    #[error("{0}")]
    Auth(String),
    /// After: the van offer or answer did not arrive or made no sense.
    #[error("{0}")]
    Van(String),
}

/// What both machines keep alike: the actions for the driver, and the
/// deadline of the peer's next message (None: the driver's turn, or over).
struct Io {
    out: VecDeque<Action>,
    deadline: Option<Instant>,
    timeout: Duration,
}

impl Io {
    fn new(timeout: Duration, now: Instant) -> Io {
        Io {
            out: VecDeque::new(),
            deadline: Some(now + timeout),
            timeout,
        }
    }

    fn send(&mut self, msg: Control) {
        self.out.push_back(Action::Send(msg));
    }

    /// The peer's turn, from `now`.
    fn wait_peer(&mut self, now: Instant) {
        self.deadline = Some(now + self.timeout);
    }

    /// The driver's turn: no deadline.
    fn ask(&mut self, question: Action) {
        self.deadline = None;
        self.out.push_back(question);
    }

    fn finish(&mut self, end: Action) {
        self.deadline = None;
        self.out.push_back(end);
    }

    /// Why the handshake ends, if the deadline has passed at `now`.
    fn silence(&self, now: Instant) -> Option<String> {
        let t = self.timeout;
        (self.deadline.is_some_and(|d| now >= d)).then(|| format!("nothing arrived within {t:?}"))
    }
}

/// What both sides have in common, so that one driver runs either.
pub trait Handshake {
    /// The next action, if any.
    fn poll(&mut self) -> Option<Action>;
    /// A message from the peer.
    fn handle(&mut self, msg: Control, now: Instant);
    /// The connection ended, or a message could not be read or decoded.
    fn handle_closed(&mut self, reason: &str);
    /// Fails the handshake if its deadline passed.
    fn handle_timeout(&mut self, now: Instant);
    /// When `handle_timeout` is due.
    fn next_timeout(&self) -> Option<Instant>;
}

macro_rules! handshake_impl {
    ($t:ty) => {
        impl Handshake for $t {
            fn poll(&mut self) -> Option<Action> {
                <$t>::poll(self)
            }
            fn handle(&mut self, msg: Control, now: Instant) {
                <$t>::handle(self, msg, now)
            }
            fn handle_closed(&mut self, reason: &str) {
                <$t>::handle_closed(self, reason)
            }
            fn handle_timeout(&mut self, now: Instant) {
                <$t>::handle_timeout(self, now)
            }
            fn next_timeout(&self) -> Option<Instant> {
                <$t>::next_timeout(self)
            }
        }
    };
}
handshake_impl!(Connector);
handshake_impl!(Acceptor);

/// A message's name, for errors (its fields may be large or secret).
fn name(c: &Control) -> String {
    let d = format!("{c:?}");
    d.split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests;
