//! The shared-memory van's tests, in one process: frames through the ring
//! and the heap, a full heap, leases, wake-ups, corrupt records and indices.

use super::*;
use crate::wire::decode_frame;
use bytes::Bytes;
use std::time::{Duration, Instant};

fn pair(cap: usize, heap: usize) -> (Producer, Consumer, Arc<Link>) {
    let (a, _) = ring_paths();
    let w = Ring::create(&a, cap, heap).unwrap();
    let r = Ring::open(&a, cap).unwrap();
    std::fs::remove_file(&a).unwrap();
    let p = Producer::new(Arc::new(w));
    let c = Consumer::new(Arc::new(r), 1 << 30);
    (p, c, Arc::new(Link::new(1, 0, VanId::Shm)))
}

fn frame(n: usize, tag: u8) -> Frame {
    let mut f = Frame::new(crate::wire::Kind::Request);
    f.flags = crate::wire::Flags::PUSH;
    f.keys = vec![tag as u64];
    f.lens = vec![n as u32];
    f.payload = Bytes::from(vec![tag; n]);
    f
}

/// Sends 20 rounds of frames of every size class and checks them in
/// order at the reader, which keeps the first large payload for good
/// and the two latest others a while; returns how many went through the
/// heap.
fn cross(cap: usize, heap: usize) -> u64 {
    let (mut p, mut c, link) = pair(cap, heap);
    let sizes = [
        0usize, 1, 100, 4000, 16_000, 70_000, 200_000, 5, 16_300, 300_000,
    ];
    let l2 = link.clone();
    let writer = std::thread::spawn(move || {
        for round in 0..20u8 {
            for (i, &n) in sizes.iter().enumerate() {
                p.frame(
                    &frame(n, round.wrapping_mul(31).wrapping_add(i as u8)),
                    &|| l2.is_closed(),
                )
                .unwrap();
            }
        }
        p.heap_frames
    });
    let mut kept: Option<(u8, Bytes)> = None;
    let mut held: Vec<(u8, Bytes)> = Vec::new();
    for round in 0..20u8 {
        for (i, &n) in sizes.iter().enumerate() {
            let f = decode_frame(c.next(&link).unwrap(), &Limits::default()).unwrap();
            let tag = round.wrapping_mul(31).wrapping_add(i as u8);
            assert_eq!(f.keys, vec![tag as u64]);
            assert_eq!(f.payload.len(), n);
            assert!(
                f.payload.iter().all(|&b| b == tag),
                "frame {i} of round {round}"
            );
            // Keep payloads (one large one for good): the link must
            // still flow, and what is kept must stay intact.
            if kept.is_none() && n >= heap::MIN_FRAME {
                kept = Some((tag, f.payload));
            } else {
                held.push((tag, f.payload));
                if held.len() > 2 {
                    held.remove(0);
                }
            }
            for (t, h) in kept.iter().chain(&held) {
                assert!(h.iter().all(|b| b == t), "a kept payload changed");
            }
        }
    }
    writer.join().unwrap()
}

/// Frames of every size class cross a small ring, in order, including
/// chunked ones, while the reader keeps some of them.
#[test]
fn frames_cross_the_ring_whole_and_in_order() {
    assert_eq!(cross(1 << 16, 0), 0);
}

/// The same with heaps: a small one (whether it fills up depends on how
/// far the writer runs ahead) and a roomy one that takes every large
/// frame.
#[test]
fn frames_cross_the_heap_whole_and_in_order() {
    assert!(cross(1 << 16, 640 << 10) > 0);
    assert_eq!(cross(1 << 16, 64 << 20), 60);
}

/// A full heap sends through the ring; kept leases stay intact; a
/// dropped lease's blocks serve the next frame.
#[test]
fn a_full_heap_falls_back_to_the_ring() {
    // 16 blocks of heap; a 100 kB frame takes 7; a record holds it.
    let (mut p, mut c, link) = pair(1 << 20, 256 << 10);
    let mut next = |p: &mut Producer, tag: u8| {
        assert!(p.try_frame(&frame(100_000, tag)), "frame {tag} not sent");
        decode_frame(c.next(&link).unwrap(), &Limits::default())
            .unwrap()
            .payload
    };
    let a = next(&mut p, 1);
    let b = next(&mut p, 2);
    assert_eq!(p.heap_frames, 2);
    let c3 = next(&mut p, 3);
    assert_eq!(p.heap_frames, 2, "the third frame cannot fit the heap");
    drop(a);
    let d = next(&mut p, 4);
    assert_eq!(p.heap_frames, 3, "the first frame's blocks serve again");
    for (tag, x) in [(2u8, &b), (3, &c3), (4, &d)] {
        assert!(x.iter().all(|&v| v == tag), "frame {tag} changed");
    }
}

/// Dropped leases give their blocks back: a heap that holds one frame
/// carries many in turn. (The ring alone could not take these frames
/// at once, so `try_frame` would say no if the heap were full.)
#[test]
fn dropped_leases_free_their_blocks() {
    let (mut p, mut c, link) = pair(1 << 16, 128 << 10);
    for i in 0..50u8 {
        assert!(p.try_frame(&frame(100_000, i)), "frame {i} not sent");
        assert_eq!(p.heap_frames, i as u64 + 1);
        let f = decode_frame(c.next(&link).unwrap(), &Limits::default()).unwrap();
        assert!(f.payload.iter().all(|&b| b == i));
    }
}

/// A hostile producer's descriptors are errors, not reads out of bounds.
#[test]
fn bad_heap_descriptors_are_errors() {
    for (desc, want) in [
        (heap::descriptor(1 << 40, 100), "out of bounds"),
        (heap::descriptor(0, 1 << 20), "out of bounds"),
        (heap::descriptor(100, 100), "out of bounds"),
        (heap::descriptor(0, 0), "out of bounds"),
        (
            heap::descriptor(usize::MAX & !(heap::BLOCK - 1), 1 << 20),
            "out of bounds",
        ),
        (heap::descriptor(0, 100), "free blocks"),
    ] {
        let (mut p, mut c, link) = pair(1 << 16, 256 << 10);
        p.raw_record(&desc, ring::HEAP_FLAG);
        let err = c.next(&link).unwrap_err();
        assert!(
            matches!(&err, VanError::Protocol(m) if m.contains(want)),
            "{err}"
        );
    }
}

/// A consumer's impossible index fails the sender, on either path,
/// instead of wrapping around or waiting forever: as soon as the
/// sender reads it, which is when the room it last saw runs short.
#[test]
fn a_corrupt_read_index_is_an_error_for_the_sender() {
    for bad in [u64::MAX, 1 << 40] {
        let (mut p, mut c, link) = pair(1 << 16, 0);
        p.frame(&frame(10, 1), &|| false).unwrap();
        // Read: an honest index would now give the whole ring.
        c.next(&link).unwrap();
        p.corrupt_tail(bad);
        assert!(
            matches!(p.read_room(), Err(VanError::Protocol(m)) if m.contains("corrupt")),
            "reading the index must find it impossible"
        );
        // The room last seen (the index was 0 then) is free, and used;
        // then the sender reads the index, where an honest one would
        // still give room, and refuses. A 10-byte frame takes a 128-byte
        // record (and `try_frame` asks for a record's worth to spare).
        let sent = (0..1024u32)
            .take_while(|i| p.try_frame(&frame(10, *i as u8)))
            .count();
        assert!(
            (300..400).contains(&sent),
            "{sent} frames went before the index was read"
        );
        // The blocking path: an error, not a wait.
        let err = (0..1024)
            .find_map(|_| p.frame(&frame(10, 4), &|| false).err())
            .expect("the sender never read the corrupt index");
        assert!(
            matches!(&err, VanError::Protocol(m) if m.contains("corrupt")),
            "{err}"
        );
    }
}

/// Waits (up to 10 s) until `ready()`; whether it came.
fn until(ready: impl Fn() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while !ready() {
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    true
}

/// The ring's wait protocol (`ring/mod.rs`): a side that sleeps is
/// woken by the other's next index, not by the end of its sleep's
/// slice (100 ms, so a lost wake-up shows as tens of milliseconds).
/// The producer waiting for room first: the consumer reads once the
/// producer has said it sleeps.
#[test]
fn a_producer_waiting_for_room_wakes_when_the_consumer_reads() {
    let (mut p, mut c, link) = pair(1 << 16, 0);
    while p.try_frame(&frame(1000, 1)) {}
    let ring = c.ring();
    let reader = std::thread::spawn(move || {
        let slept = until(|| ring.sleepers().1);
        let read_at = Instant::now();
        while c.try_next().unwrap().is_some() {}
        (slept, read_at, c, link)
    });
    // Fills the rest of the ring, then waits for room (or gives up if
    // the reader thread is gone).
    for _ in 0..32 {
        p.frame(&frame(1000, 2), &|| reader.is_finished()).unwrap();
    }
    let woke = Instant::now();
    let (slept, read_at, _c, _link) = reader.join().unwrap();
    assert!(slept, "the producer never slept: nothing was tested");
    let late = woke.saturating_duration_since(read_at);
    assert!(
        late < Duration::from_millis(50),
        "woke {late:?} after the read"
    );
}

/// The consumer's side of the same: a reader's wait (`Watch`) ends at
/// the producer's next frame, sent once the reader has said it sleeps.
#[test]
fn a_reader_waiting_for_data_wakes_at_the_next_frame() {
    let (mut p, c, link) = pair(1 << 16, 0);
    let ring = c.ring();
    let waiter = {
        let ring = ring.clone();
        std::thread::spawn(move || {
            let mut w = ring::Watch::new(ring);
            w.wait_beyond(0, &link, &|| false).unwrap();
            Instant::now()
        })
    };
    assert!(
        until(|| ring.sleepers().0),
        "the reader never slept: nothing was tested"
    );
    let sent_at = Instant::now();
    p.frame(&frame(10, 1), &|| false).unwrap();
    let woke = waiter.join().unwrap();
    let late = woke.saturating_duration_since(sent_at);
    assert!(
        late < Duration::from_millis(50),
        "woke {late:?} after the frame"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    /// Whatever a hostile peer writes into the ring (records of any
    /// flags and lengths, heap descriptors, bitmap bits, an impossible
    /// head), the reader returns frames or an error: no panic, no read
    /// outside the mapping, no hang (the link is closed, so waits end).
    #[test]
    fn hostile_ring_contents_are_frames_or_errors(
        records in proptest::collection::vec(
            (0u8..6, 0usize..400, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..48)),
            1..10,
        ),
        head in 0u64..(1 << 17),
        bits in proptest::prelude::any::<u64>(),
        raw in proptest::prelude::any::<u64>(),
    ) {
        let (p, mut c, link) = pair(1 << 16, 256 << 10);
        link.close("a test of hostile contents");
        let mut at = 0usize;
        for (kind, len, body) in &records {
            let word = match kind {
                0 => *len as u64,
                1 => *len as u64 | ring::CONT,
                2 => heap::DESCRIPTOR as u64 | ring::HEAP_FLAG,
                3 => ring::WRAP,
                4 => *len as u64 | ring::HEAP_FLAG,
                _ => raw,
            };
            p.scribble(at, &word.to_le_bytes(), bits);
            let body: Vec<u8> = if *kind == 2 {
                // A descriptor: offset and length from the body's bytes.
                let off = (body.first().copied().unwrap_or(0) as usize) * heap::BLOCK;
                heap::descriptor(off, *len * 97).to_vec()
            } else {
                body.clone()
            };
            p.scribble(at + 8, &body, bits);
            at += (8 + body.len().max(*len)).next_multiple_of(64);
        }
        p.corrupt_head(head);
        for _ in 0..32 {
            match c.next(&link) {
                Ok(b) => {
                    let _ = decode_frame(b, &Limits::default());
                }
                Err(_) => break,
            }
        }
    }
}

#[test]
fn corrupt_indices_are_an_error_not_a_crash() {
    let (mut p, mut c, link) = pair(1 << 16, 0);
    p.frame(&frame(10, 1), &|| link.is_closed()).unwrap();
    // The peer scribbles an impossible head.
    p.corrupt_head(u64::MAX / 2);
    let err = c.next(&link).unwrap_err();
    assert!(
        matches!(&err, VanError::Protocol(m) if m.contains("corrupt")),
        "{err}"
    );
}
