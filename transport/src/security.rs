//! The cluster token's proofs, for the challenge-response that every
//! connection runs before any other message (the exchange itself is the
//! state machine in `protocol::handshake`).
//!
//! ```text
//!   acceptor                               connector
//!      ── Challenge { nonce_a } ──────────────►
//!      ◄── Auth { nonce_c, node_id, mac_c } ───    mac_c = HMAC(token, "pskv-v1 c" | a | c | id)
//!      ── AuthOk { mac_a } ───────────────────►    mac_a = HMAC(token, "pskv-v1 a" | a | c | id)
//!         (or AuthRefused { reason }, then close)
//! ```
//!
//! Both sides prove the token, with fresh nonces from both, so a recorded
//! exchange cannot be replayed and neither side can be impersonated. The
//! token itself never crosses the wire. With no token configured, peers
//! are accepted only from loopback addresses (and a warning is logged).

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A 32-byte random nonce.
pub(crate) fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    // getrandom only fails on platforms without an entropy source.
    if getrandom::getrandom(&mut n).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        n[..16].copy_from_slice(&t.to_le_bytes());
    }
    n
}

/// Which side of the handshake proves the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// The side that dialed.
    Connector,
    /// The side that accepted.
    Acceptor,
}

fn mac(
    token: &[u8],
    side: Side,
    nonce_a: &[u8; 32],
    nonce_c: &[u8; 32],
    node_id: u32,
) -> HmacSha256 {
    // new_from_slice accepts keys of any length for HMAC.
    let mut m = HmacSha256::new_from_slice(token).expect("HMAC takes any key length");
    // The two directions differ, so one side's proof is never the other's.
    m.update(match side {
        Side::Connector => b"pskv-v1 c",
        Side::Acceptor => b"pskv-v1 a",
    });
    m.update(nonce_a);
    m.update(nonce_c);
    m.update(&node_id.to_le_bytes());
    m
}

/// `side`'s proof of the token over both nonces and the connector's id.
pub(crate) fn proof(
    token: &[u8],
    side: Side,
    nonce_a: &[u8; 32],
    nonce_c: &[u8; 32],
    node_id: u32,
) -> [u8; 32] {
    mac(token, side, nonce_a, nonce_c, node_id)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks `side`'s proof in constant time.
pub(crate) fn verify(
    token: &[u8],
    side: Side,
    (nonce_a, nonce_c): (&[u8; 32], &[u8; 32]),
    node_id: u32,
    got: &[u8; 32],
) -> bool {
    mac(token, side, nonce_a, nonce_c, node_id)
        .verify_slice(got)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_check_out_only_with_the_same_token_and_nonces() {
        let (a, c) = (nonce(), nonce());
        assert_ne!(a, c);
        let m = proof(b"tok", Side::Connector, &a, &c, 9);
        assert!(verify(b"tok", Side::Connector, (&a, &c), 9, &m));
        assert!(!verify(b"tik", Side::Connector, (&a, &c), 9, &m));
        assert!(!verify(b"tok", Side::Connector, (&c, &a), 9, &m));
        assert!(!verify(b"tok", Side::Connector, (&a, &c), 11, &m));
        // The two directions differ: a connector's proof is not an acceptor's.
        assert!(!verify(b"tok", Side::Acceptor, (&a, &c), 9, &m));
        let m = proof(b"tok", Side::Acceptor, &a, &c, 9);
        assert!(verify(b"tok", Side::Acceptor, (&a, &c), 9, &m));
    }
}
