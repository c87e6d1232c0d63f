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
use crate::security::{self, Side};
use crate::wire::{Control, VanId};

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
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn pair(token_c: &[u8], token_a: Option<&[u8]>) -> (Connector, Acceptor, Instant) {
        let now = Instant::now();
        let c = Connector::new(
            ConnectorConfig {
                me: 9,
                peer: 8,
                epoch: 0,
                token: token_c.to_vec(),
                nonce: [1; 32],
                timeout: T,
            },
            now,
        );
        let a = Acceptor::new(
            AcceptorConfig {
                token: token_a.map(|t| t.to_vec()),
                loopback: true,
                nonce: [2; 32],
                timeout: T,
            },
            now,
        );
        (c, a, now)
    }

    /// Runs both to the end, answering the driver's questions with `admit`
    /// and `answer`; the actions each side ended with.
    fn run(
        c: &mut Connector,
        a: &mut Acceptor,
        now: Instant,
        admit: Result<(), String>,
        answer: Result<Vec<u8>, String>,
    ) -> (Option<Action>, Option<Action>) {
        let (mut c_end, mut a_end) = (None, None);
        for _ in 0..20 {
            while let Some(act) = a.poll() {
                match act {
                    Action::Send(m) => c.handle(m, now),
                    Action::Admit { .. } => a.admit(admit.clone(), now),
                    Action::Answer { .. } => a.answer(answer.clone()),
                    end => a_end = Some(end),
                }
            }
            while let Some(act) = c.poll() {
                match act {
                    Action::Send(m) => a.handle(m, now),
                    Action::Offer => c.offer(VanId::Shm, b"rings".to_vec(), now),
                    end => c_end = Some(end),
                }
            }
        }
        (c_end, a_end)
    }

    #[test]
    fn a_clean_exchange_ends_done_on_both_sides_with_the_proved_id() {
        let (mut c, mut a, now) = pair(b"tok", Some(b"tok"));
        let (ce, ae) = run(&mut c, &mut a, now, Ok(()), Ok(b"ok".to_vec()));
        let want = |peer| {
            Some(Action::Done(Done {
                peer,
                van: VanId::Shm,
                answer: Ok(b"ok".to_vec()),
            }))
        };
        assert_eq!(ce, want(8));
        assert_eq!(ae, want(9));
        assert!(c.is_over() && a.is_over());
        assert_eq!((c.next_timeout(), a.next_timeout()), (None, None));
    }

    #[test]
    fn a_declined_offer_is_done_on_tcp_with_the_reason() {
        let (mut c, mut a, now) = pair(b"", Some(b""));
        let (ce, _) = run(&mut c, &mut a, now, Ok(()), Err("no shm here".into()));
        let Some(Action::Done(d)) = ce else {
            panic!("{ce:?}")
        };
        assert_eq!(d.answer, Err("no shm here".to_string()));
    }

    #[test]
    fn wrong_tokens_and_refusals_fail_both_sides() {
        let (mut c, mut a, now) = pair(b"tok", Some(b"other"));
        let (ce, ae) = run(&mut c, &mut a, now, Ok(()), Ok(vec![]));
        let auth = |r: &str| Some(Action::Failed(HandshakeError::Auth(r.into())));
        assert_eq!(ce, auth("wrong cluster token"));
        assert_eq!(ae, auth("wrong cluster token"));

        let (mut c, mut a, now) = pair(b"tok", Some(b"tok"));
        let (ce, ae) = run(&mut c, &mut a, now, Err("fenced".into()), Ok(vec![]));
        assert_eq!(ce, auth("fenced"));
        assert_eq!(ae, auth("fenced"));

        // No token and not loopback: refused before the challenge.
        let mut a = Acceptor::new(
            AcceptorConfig {
                token: None,
                loopback: false,
                nonce: [2; 32],
                timeout: T,
            },
            now,
        );
        assert!(matches!(
            a.poll(),
            Some(Action::Send(Control::AuthRefused { .. }))
        ));
        assert!(matches!(
            a.poll(),
            Some(Action::Failed(HandshakeError::Auth(_)))
        ));
    }

    #[test]
    fn an_acceptor_without_the_token_cannot_pass_as_one() {
        // A peer that answers the proof with its own MAC over another token.
        let (mut c, _, now) = pair(b"tok", Some(b"tok"));
        c.handle(Control::Challenge { nonce: [2; 32] }, now);
        assert!(matches!(c.poll(), Some(Action::Send(Control::Auth { .. }))));
        let mac = security::proof(b"guess", Side::Acceptor, &[2; 32], &[1; 32], 9);
        c.handle(Control::AuthOk { mac }, now);
        assert_eq!(
            c.poll(),
            Some(Action::Failed(HandshakeError::Auth(
                "the peer could not prove the cluster token".into()
            )))
        );
    }

    #[test]
    fn silence_fails_each_waiting_state_at_its_deadline_and_not_before() {
        let (mut c, mut a, now) = pair(b"", Some(b""));
        c.handle_timeout(now + T / 2);
        assert!(!c.is_over());
        c.handle_timeout(now + T);
        let Some(Action::Failed(HandshakeError::Auth(r))) = c.poll() else {
            panic!()
        };
        assert!(r.starts_with("no challenge"), "{r}");
        // The acceptor waits for the offer after admitting.
        let _challenge = a.poll();
        let mac = security::proof(b"", Side::Connector, &[2; 32], &[7; 32], 11);
        a.handle(
            Control::Auth {
                nonce: [7; 32],
                node_id: 11,
                epoch: 0,
                mac,
            },
            now,
        );
        assert!(matches!(a.poll(), Some(Action::Admit { node_id: 11, .. })));
        assert_eq!(a.next_timeout(), None, "the driver's turn has no deadline");
        a.admit(Ok(()), now);
        assert_eq!(a.next_timeout(), Some(now + T));
        a.handle_timeout(now + T);
        let _ok = a.poll();
        let Some(Action::Failed(HandshakeError::Van(r))) = a.poll() else {
            panic!()
        };
        assert!(r.starts_with("no van offer"), "{r}");
    }

    #[test]
    fn a_message_out_of_place_fails_and_nothing_runs_after_the_end() {
        let (mut c, _, now) = pair(b"", Some(b""));
        c.handle(Control::Challenge { nonce: [2; 32] }, now);
        let _auth = c.poll();
        // A second challenge (a duplicate) is not an AuthOk.
        c.handle(Control::Challenge { nonce: [2; 32] }, now);
        assert!(matches!(
            c.poll(),
            Some(Action::Failed(HandshakeError::Auth(_)))
        ));
        c.handle(Control::Challenge { nonce: [2; 32] }, now);
        c.handle_closed("eof");
        c.offer(VanId::Tcp, vec![], now);
        assert_eq!(c.poll(), None);
    }
}
