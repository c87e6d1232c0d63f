//! Fuzzes the wire decoder: any bytes, fed whole or in two pieces, decode to
//! frames or to an error, never a panic, an overflow or an allocation the
//! bytes do not justify (a counting allocator checks it); every frame
//! decoded re-encodes to exactly the bytes it came from, and control
//! bodies decode or fail cleanly.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use libfuzzer_sys::fuzz_target;

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

#[path = "../common/frame_decoder.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    common::check(data, &|| ALLOCATED.load(Ordering::Relaxed));
});
