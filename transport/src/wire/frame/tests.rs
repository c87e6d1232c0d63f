use super::*;
use proptest::prelude::*;

fn arb_frame() -> impl Strategy<Value = Frame> {
    (
        prop_oneof![
            Just(Kind::Request),
            Just(Kind::Response),
            Just(Kind::Control),
            Just(Kind::Ack)
        ],
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<i32>(),
        any::<i32>(),
        proptest::collection::btree_map(any::<u64>(), 0u32..64, 0..20),
        proptest::collection::vec(any::<u8>(), 0..100),
        any::<bool>(),
    )
        .prop_map(
            |(kind, sender, recipient, msg_id, request_id, cmd, priority, kv, meta, push)| {
                let mut f = Frame::new(kind);
                f.sender = sender;
                f.recipient = recipient;
                f.msg_id = msg_id;
                f.request_id = request_id;
                f.cmd = cmd;
                f.priority = priority;
                match kind {
                    Kind::Request | Kind::Response => {
                        f.keys = kv.keys().copied().collect();
                        f.lens = kv.values().copied().collect();
                        let total: u32 = f.lens.iter().sum();
                        f.payload = Bytes::from((0..total).map(|i| i as u8).collect::<Vec<u8>>());
                        f.meta = Bytes::from(meta);
                        if kind == Kind::Request {
                            f.flags = if push { Flags::PUSH } else { Flags::PULL };
                            if !push {
                                f.payload = Bytes::new();
                            }
                        }
                    }
                    Kind::Control => f.meta = Bytes::from(meta),
                    Kind::Ack => {}
                }
                f
            },
        )
}

proptest! {
    #[test]
    fn frames_round_trip(frames in proptest::collection::vec(arb_frame(), 1..5), split in 0usize..400) {
        let mut wire = BytesMut::new();
        for f in &frames {
            wire.extend_from_slice(&f.encode());
        }
        // Feed in two pieces at an arbitrary split point.
        let split = split.min(wire.len());
        let mut buf = BytesMut::from(&wire[..split]);
        let mut dec = Decoder::new(Limits::default());
        let mut got = Vec::new();
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            got.push(f);
        }
        buf.extend_from_slice(&wire[split..]);
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            got.push(f);
        }
        prop_assert_eq!(got, frames);
        prop_assert!(buf.is_empty());
    }

    /// Arbitrary bytes: an error or a frame, never a panic, and never a
    /// buffer reserved beyond what arrived.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let mut dec = Decoder::new(Limits { max_keys: 16, max_meta: 64, max_payload: 256 });
        for _ in 0..4 {
            match dec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        prop_assert!(buf.capacity() <= bytes.len().max(64));
    }
}

#[test]
fn malformed_headers_are_errors() {
    let mut f = Frame::new(Kind::Request);
    f.flags = Flags::PUSH;
    f.keys = vec![1, 2];
    f.lens = vec![2, 2];
    f.payload = Bytes::from_static(b"abcd");
    let good = f.encode().to_vec();
    let limits = Limits {
        max_keys: 4,
        max_meta: 16,
        max_payload: 16,
    };
    let check = |bytes: &[u8], want: &dyn Fn(&WireError) -> bool| {
        let mut dec = Decoder::new(limits);
        let mut buf = BytesMut::from(bytes);
        let err = dec.decode(&mut buf).expect_err("must fail");
        assert!(want(&err), "{err:?}");
    };
    let mut b = good.clone();
    b[0] = b'X';
    check(&b, &|e| matches!(e, WireError::BadMagic(_)));
    let mut b = good.clone();
    b[4] = VERSION + 1;
    check(
        &b,
        &|e| matches!(e, WireError::UnsupportedVersion { got } if *got == VERSION + 1),
    );
    let mut b = good.clone();
    b[5] = 9;
    check(&b, &|e| matches!(e, WireError::BadKind(9)));
    let mut b = good.clone();
    b[6] = 0x80;
    check(&b, &|e| matches!(e, WireError::BadFlags(_)));
    let mut b = good.clone();
    b[40] = 5; // 5 keys > 4
    check(&b, &|e| {
        matches!(
            e,
            WireError::TooLarge {
                what: "key count",
                ..
            }
        )
    });
    let mut b = good.clone();
    b[48..56].copy_from_slice(&u64::MAX.to_le_bytes());
    check(&b, &|e| {
        matches!(
            e,
            WireError::TooLarge {
                what: "payload length",
                ..
            }
        )
    });
    let mut b = good.clone();
    b[56] = 1;
    check(&b, &|e| matches!(e, WireError::Reserved));
    let mut b = good.clone();
    b[64..72].copy_from_slice(&5u64.to_le_bytes()); // keys 5, 2
    check(&b, &|e| matches!(e, WireError::KeysNotSorted { index: 1 }));
    let mut b = good.clone();
    b[80..84].copy_from_slice(&3u32.to_le_bytes()); // lens 3 + 2 != 4
    check(&b, &|e| {
        matches!(e, WireError::LensMismatch { sum: 5, payload: 4 })
    });
    // A control frame with keys.
    let mut c = Frame::new(Kind::Control);
    c.keys = vec![1];
    c.lens = vec![0];
    check(&c.encode(), &|e| {
        matches!(e, WireError::Unexpected { what: "keys", .. })
    });
    // A header alone claiming a large body allocates nothing.
    let mut dec = Decoder::new(Limits::default());
    let mut b = good.clone();
    b[48..56].copy_from_slice(&(1u64 << 30).to_le_bytes());
    let mut buf = BytesMut::from(&b[..HEADER_LEN]);
    assert!(dec.decode(&mut buf).unwrap().is_none());
    assert!(buf.capacity() < 1024);
}
