//! The side that accepted the connection: its settings and its state
//! machine (the exchange and the invariants are in the parent module's
//! docs).

use std::time::{Duration, Instant};

use super::{name, Action, Done, HandshakeError, Io};
use crate::protocol::NodeId;
use crate::security::{self, Side};
use crate::wire::{Control, VanId};

/// The acceptor's settings.
#[derive(Clone, Debug)]
pub struct AcceptorConfig {
    /// The cluster token; None: only loopback peers may connect.
    pub token: Option<Vec<u8>>,
    /// The peer connected from a loopback address.
    pub loopback: bool,
    /// A fresh random nonce.
    pub nonce: [u8; 32],
    /// How long each of the peer's messages may take.
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AState {
    AwaitAuth,
    Admitting { peer: NodeId, nonce_c: [u8; 32] },
    AwaitOffer { peer: NodeId },
    Answering { peer: NodeId, van: VanId },
    Over,
}

/// The side that accepted the connection.
pub struct Acceptor {
    cfg: AcceptorConfig,
    state: AState,
    io: Io,
}

impl Acceptor {
    /// An acceptor for a connection just accepted, at `now`: its first
    /// action sends the challenge (or refuses a non-loopback peer when no
    /// token is set).
    pub fn new(cfg: AcceptorConfig, now: Instant) -> Acceptor {
        let mut a = Acceptor {
            state: AState::AwaitAuth,
            io: Io::new(cfg.timeout, now),
            cfg,
        };
        if a.cfg.token.is_none() && !a.cfg.loopback {
            a.refuse(
                "no cluster token is set on this node, so only loopback peers are accepted; \
                 set PSKV_TOKEN on every node"
                    .into(),
            );
        } else {
            a.io.send(Control::Challenge { nonce: a.cfg.nonce });
        }
        a
    }

    /// The next action, if any.
    pub fn poll(&mut self) -> Option<Action> {
        self.io.out.pop_front()
    }

    /// When [`Acceptor::handle_timeout`] is due.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.io.deadline
    }

    /// True once done or failed.
    pub fn is_over(&self) -> bool {
        self.state == AState::Over
    }

    /// A message from the peer.
    pub fn handle(&mut self, msg: Control, _now: Instant) {
        match (self.state, msg) {
            (AState::Over, _) => {}
            (
                AState::AwaitAuth,
                Control::Auth {
                    nonce: nonce_c,
                    node_id,
                    epoch,
                    mac,
                },
            ) => {
                let token = self.cfg.token.as_deref().unwrap_or(&[]);
                let nonce_a = self.cfg.nonce;
                if security::verify(token, Side::Connector, (&nonce_a, &nonce_c), node_id, &mac) {
                    self.state = AState::Admitting {
                        peer: node_id,
                        nonce_c,
                    };
                    self.io.ask(Action::Admit { node_id, epoch });
                } else {
                    self.refuse("wrong cluster token".into());
                }
            }
            (AState::AwaitOffer { peer }, Control::VanOffer { van, offer }) => {
                self.state = AState::Answering { peer, van };
                self.io.ask(Action::Answer { van, offer });
            }
            (AState::AwaitAuth, other) => self.refuse(format!(
                "expected a proof of the token, got {}",
                name(&other)
            )),
            (AState::Admitting { .. }, other) => {
                self.refuse(format!("a {} before the proof was checked", name(&other)))
            }
            (AState::AwaitOffer { .. } | AState::Answering { .. }, other) => self.fail(
                HandshakeError::Van(format!("expected a van offer, got {}", name(&other))),
            ),
        }
    }

    /// The driver's answer to [`Action::Admit`].
    pub fn admit(&mut self, verdict: Result<(), String>, now: Instant) {
        let AState::Admitting { peer, nonce_c } = self.state else {
            return;
        };
        match verdict {
            Ok(()) => {
                let token = self.cfg.token.as_deref().unwrap_or(&[]);
                let mac = security::proof(token, Side::Acceptor, &self.cfg.nonce, &nonce_c, peer);
                self.io.send(Control::AuthOk { mac });
                self.state = AState::AwaitOffer { peer };
                self.io.wait_peer(now);
            }
            Err(reason) => self.refuse(reason),
        }
    }

    /// The driver's answer to [`Action::Answer`]: the van's answer bytes,
    /// or why this node declines the offer (the link then runs TCP).
    pub fn answer(&mut self, answer: Result<Vec<u8>, String>) {
        let AState::Answering { peer, van } = self.state else {
            return;
        };
        let msg = match &answer {
            Ok(bytes) => Control::VanAnswer {
                ok: true,
                reason: String::new(),
                answer: bytes.clone(),
            },
            Err(reason) => Control::VanAnswer {
                ok: false,
                reason: reason.clone(),
                answer: Vec::new(),
            },
        };
        self.io.send(msg);
        self.finish(Action::Done(Done { peer, van, answer }));
    }

    /// The connection ended, or a message could not be read or decoded.
    pub fn handle_closed(&mut self, reason: &str) {
        let e = match self.state {
            AState::Over => return,
            AState::AwaitAuth | AState::Admitting { .. } => {
                HandshakeError::Auth(format!("no proof: {reason}"))
            }
            AState::AwaitOffer { .. } | AState::Answering { .. } => {
                HandshakeError::Van(format!("no van offer: {reason}"))
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

    /// Tells the peer why, then fails.
    fn refuse(&mut self, reason: String) {
        self.io.send(Control::AuthRefused {
            reason: reason.clone(),
        });
        self.fail(HandshakeError::Auth(reason));
    }

    fn fail(&mut self, e: HandshakeError) {
        self.finish(Action::Failed(e));
    }

    fn finish(&mut self, a: Action) {
        self.state = AState::Over;
        self.io.finish(a);
    }
}
