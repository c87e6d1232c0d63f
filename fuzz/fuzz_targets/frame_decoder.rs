//! Fuzzes the wire decoder: any bytes, fed whole or in two pieces, decode to
//! frames or to an error, never a panic, an overflow or an allocation the
//! bytes do not justify (a counting allocator checks it); every frame
//! decoded re-encodes to exactly the bytes it came from, and control
//! bodies decode or fail cleanly.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pskv_transport::wire::{Control, Decoder, Kind, Limits};

/// Counts bytes allocated, so the target can bound what decoding asks for.
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fuzz_target!(|data: &[u8]| {
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
            let before = ALLOCATED.load(Ordering::Relaxed);
            let r = dec.decode(&mut buf);
            // Decoding allocates keys and lengths for what actually arrived:
            // at most the input's size (plus small vector overheads).
            let spent = ALLOCATED.load(Ordering::Relaxed) - before;
            assert!(spent <= data.len() + 256, "decode allocated {spent} bytes for {} input bytes", data.len());
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
});
