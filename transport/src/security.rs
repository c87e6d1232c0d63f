//! The cluster token and the challenge-response that every connection runs
//! before any other message.
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

fn mac(
    token: &[u8],
    side: &[u8],
    nonce_a: &[u8; 32],
    nonce_c: &[u8; 32],
    node_id: u32,
) -> HmacSha256 {
    // new_from_slice accepts keys of any length for HMAC.
    let mut m = HmacSha256::new_from_slice(token).expect("HMAC takes any key length");
    m.update(side);
    m.update(nonce_a);
    m.update(nonce_c);
    m.update(&node_id.to_le_bytes());
    m
}

/// The connector's proof.
pub(crate) fn connector_mac(
    token: &[u8],
    nonce_a: &[u8; 32],
    nonce_c: &[u8; 32],
    node_id: u32,
) -> [u8; 32] {
    mac(token, b"pskv-v1 c", nonce_a, nonce_c, node_id)
        .finalize()
        .into_bytes()
        .into()
}

/// The acceptor's proof.
pub(crate) fn acceptor_mac(
    token: &[u8],
    nonce_a: &[u8; 32],
    nonce_c: &[u8; 32],
    node_id: u32,
) -> [u8; 32] {
    mac(token, b"pskv-v1 a", nonce_a, nonce_c, node_id)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a connector's proof in constant time.
pub(crate) fn verify_connector(
    token: &[u8],
    nonce_a: &[u8; 32],
    nonce_c: &[u8; 32],
    node_id: u32,
    got: &[u8; 32],
) -> bool {
    mac(token, b"pskv-v1 c", nonce_a, nonce_c, node_id)
        .verify_slice(got)
        .is_ok()
}

/// Checks an acceptor's proof in constant time.
pub(crate) fn verify_acceptor(
    token: &[u8],
    nonce_a: &[u8; 32],
    nonce_c: &[u8; 32],
    node_id: u32,
    got: &[u8; 32],
) -> bool {
    mac(token, b"pskv-v1 a", nonce_a, nonce_c, node_id)
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
        let m = connector_mac(b"tok", &a, &c, 9);
        assert!(verify_connector(b"tok", &a, &c, 9, &m));
        assert!(!verify_connector(b"tik", &a, &c, 9, &m));
        assert!(!verify_connector(b"tok", &c, &a, 9, &m));
        assert!(!verify_connector(b"tok", &a, &c, 11, &m));
        // The two directions differ: a connector's proof is not an acceptor's.
        assert!(!verify_acceptor(b"tok", &a, &c, 9, &m));
        assert!(verify_acceptor(
            b"tok",
            &a,
            &c,
            9,
            &acceptor_mac(b"tok", &a, &c, 9)
        ));
    }
}
