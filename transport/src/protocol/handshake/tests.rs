use super::*;
use crate::security::{self, Side};

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
