//! The side that dialed: its settings and its state machine (the
//! exchange and the invariants are in the parent module's docs).

use std::time::{Duration, Instant};

use super::{name, Action, Done, HandshakeError, Io};
use crate::protocol::NodeId;
use crate::security::{self, Side};
use crate::wire::{Control, VanId};

/// The connector's settings.
#[derive(Clone, Debug)]
pub struct ConnectorConfig {
    /// This node's id (0 before it registered).
    pub me: NodeId,
    /// The node it dials.
    pub peer: NodeId,
    /// This node's epoch for its id.
    pub epoch: u32,
    /// The cluster token (empty: none).
    pub token: Vec<u8>,
    /// A fresh random nonce.
    pub nonce: [u8; 32],
    /// How long each of the peer's messages may take.
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CState {
    AwaitChallenge,
    AwaitAuthOk { nonce_a: [u8; 32] },
    Offering,
    AwaitAnswer { van: VanId },
    Over,
}

/// The side that dialed.
pub struct Connector {
    cfg: ConnectorConfig,
    state: CState,
    io: Io,
}

impl Connector {
    /// A connector that has just connected, at `now`.
    pub fn new(cfg: ConnectorConfig, now: Instant) -> Connector {
        Connector {
            io: Io::new(cfg.timeout, now),
            cfg,
            state: CState::AwaitChallenge,
        }
    }

    /// The next action, if any.
    pub fn poll(&mut self) -> Option<Action> {
        self.io.out.pop_front()
    }

    /// When [`Connector::handle_timeout`] is due (None: the driver's turn,
    /// or over).
    pub fn next_timeout(&self) -> Option<Instant> {
        self.io.deadline
    }

    /// True once done or failed.
    pub fn is_over(&self) -> bool {
        self.state == CState::Over
    }

    /// A message from the peer.
    pub fn handle(&mut self, msg: Control, now: Instant) {
        let token = self.cfg.token.clone();
        match (self.state, msg) {
            (CState::Over, _) => {}
            (CState::AwaitChallenge, Control::Challenge { nonce: nonce_a }) => {
                let (me, nonce_c) = (self.cfg.me, self.cfg.nonce);
                let mac = security::proof(&token, Side::Connector, &nonce_a, &nonce_c, me);
                self.io.send(Control::Auth {
                    nonce: nonce_c,
                    node_id: me,
                    epoch: self.cfg.epoch,
                    mac,
                });
                self.state = CState::AwaitAuthOk { nonce_a };
                self.io.wait_peer(now);
            }
            (CState::AwaitAuthOk { nonce_a }, Control::AuthOk { mac }) => {
                let (me, nonce_c) = (self.cfg.me, self.cfg.nonce);
                if security::verify(&token, Side::Acceptor, (&nonce_a, &nonce_c), me, &mac) {
                    self.state = CState::Offering;
                    self.io.ask(Action::Offer);
                } else {
                    self.fail(HandshakeError::Auth(
                        "the peer could not prove the cluster token".into(),
                    ));
                }
            }
            (
                CState::AwaitChallenge | CState::AwaitAuthOk { .. },
                Control::AuthRefused { reason },
            ) => self.fail(HandshakeError::Auth(reason)),
            (CState::AwaitAnswer { van }, Control::VanAnswer { ok, reason, answer }) => {
                let answer = if ok { Ok(answer) } else { Err(reason) };
                let peer = self.cfg.peer;
                self.finish(Action::Done(Done { peer, van, answer }));
            }
            (CState::AwaitChallenge, other) => self.fail(HandshakeError::Auth(format!(
                "expected a challenge, got {}",
                name(&other)
            ))),
            (CState::AwaitAuthOk { .. }, other) => self.fail(HandshakeError::Auth(format!(
                "expected AuthOk, got {}",
                name(&other)
            ))),
            (CState::Offering | CState::AwaitAnswer { .. }, other) => self.fail(
                HandshakeError::Van(format!("expected a van answer, got {}", name(&other))),
            ),
        }
    }

    /// The driver's answer to [`Action::Offer`]: offer `van` with `offer`.
    pub fn offer(&mut self, van: VanId, offer: Vec<u8>, now: Instant) {
        if self.state != CState::Offering {
            return;
        }
        self.io.send(Control::VanOffer { van, offer });
        self.state = CState::AwaitAnswer { van };
        self.io.wait_peer(now);
    }

    /// The driver could make no offer (the configured van is unavailable).
    pub fn abandon(&mut self, reason: String) {
        if !self.is_over() {
            self.fail(HandshakeError::Van(reason));
        }
    }

    /// The connection ended, or a message could not be read or decoded.
    pub fn handle_closed(&mut self, reason: &str) {
        let e = match self.state {
            CState::Over => return,
            CState::AwaitChallenge => HandshakeError::Auth(format!("no challenge: {reason}")),
            CState::AwaitAuthOk { .. } => {
                HandshakeError::Auth(format!("no answer to the proof: {reason}"))
            }
            CState::Offering | CState::AwaitAnswer { .. } => {
                HandshakeError::Van(format!("no van answer: {reason}"))
            }
        };
        self.fail(e);
    }

    /// Fails the handshake if its deadline passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(why) = self.io.silence(now) {
            self.handle_closed(&why);
        }
    }

    fn fail(&mut self, e: HandshakeError) {
        self.finish(Action::Failed(e));
    }

    fn finish(&mut self, a: Action) {
        self.state = CState::Over;
        self.io.finish(a);
    }
}
