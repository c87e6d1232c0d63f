//! The frame decoder's properties, shared by the fuzz target
//! (`fuzz_targets/frame_decoder.rs`) and the regression test over the saved
//! inputs (`transport/tests/fuzz_regression.rs`).

use bytes::BytesMut;
use pskv_transport::wire::{Control, Decoder, Kind, Limits};

/// Decodes `data`, fed in two pieces (the split point is its first byte),
/// and checks: no panic; `allocated()` grows by at most the input's size
/// (plus small vector overheads) per decode call, whatever a header
/// claims; every frame decoded re-encodes to exactly the bytes it came
/// from; control bodies decode or fail cleanly.
pub fn check(data: &[u8], allocated: &dyn Fn() -> usize) {
    let limits = Limits {
        max_keys: 1024,
        max_meta: 1 << 16,
        max_payload: 1 << 20,
    };
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut dec = Decoder::new(limits);
    let mut buf = BytesMut::from(&data[..split]);
    let mut consumed = Vec::with_capacity(data.len() + 64);
    for piece in [&data[split..], &[][..]] {
        loop {
            let before = allocated();
            let r = dec.decode(&mut buf);
            let spent = allocated() - before;
            assert!(
                spent <= data.len() + 256,
                "decode allocated {spent} bytes for {} input bytes",
                data.len()
            );
            match r {
                Ok(Some(frame)) => {
                    consumed.extend_from_slice(&frame.encode());
                    if frame.kind == Kind::Control {
                        let _ = Control::from_frame(&frame);
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        buf.extend_from_slice(piece);
    }
    // Whatever decoded is exactly a prefix of the input, re-encoded.
    assert_eq!(&consumed[..], &data[..consumed.len()]);
}
