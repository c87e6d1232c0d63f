//! The rings alone, for `benches/shm_ring.rs`: round trips of one frame
//! between two threads of this process over a pair of rings (one each
//! way), each thread spinning on its consumer. What a shared-memory link
//! costs below the van's readers and the postoffice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::ring::{Consumer, Producer, Ring};
use crate::van::VanError;
use crate::wire::{Flags, Frame, Kind};

/// Ring bytes of each direction (the van's default).
const CAP: usize = 16 << 20;

/// A producer and the consumer of one new ring (its file already removed).
fn direction() -> Result<(Producer, Consumer), VanError> {
    let (path, _) = super::ring_paths();
    let made = Ring::create(&path, CAP, 0).and_then(|w| Ok((w, Ring::open(&path, CAP)?)));
    let _ = std::fs::remove_file(&path);
    let (w, r) = made.map_err(|e| VanError::system("making a benchmark ring", e))?;
    Ok((
        Producer::new(Arc::new(w)),
        Consumer::new(Arc::new(r), 1 << 30),
    ))
}

/// Spins until `c` holds a frame, and returns it; an error once `stop`.
fn next(c: &mut Consumer, stop: &AtomicBool) -> Result<Bytes, VanError> {
    loop {
        if let Some(b) = c.try_next()? {
            return Ok(b);
        }
        if stop.load(Ordering::Relaxed) {
            return Err(VanError::protocol("the other thread stopped"));
        }
        std::hint::spin_loop();
    }
}

/// The time of `iters` round trips of a frame of `bytes` value bytes: this
/// thread sends and waits for the echo of a second thread; an echo of
/// another length is an error (said in words: the van's error type is the
/// crate's own).
pub fn ring_round_trips(iters: u64, bytes: usize) -> Result<Duration, String> {
    round_trips(iters, bytes).map_err(|e| e.to_string())
}

fn round_trips(iters: u64, bytes: usize) -> Result<Duration, VanError> {
    let (mut to_echo, mut at_echo) = direction()?;
    let (mut from_echo, mut back) = direction()?;
    let mut f = Frame::new(Kind::Request);
    f.flags = Flags::PUSH;
    f.keys = vec![1];
    f.lens = vec![bytes as u32];
    f.payload = Bytes::from(vec![7u8; bytes]);
    let reply = f.clone();
    // One lap of the rings first, untimed: every page of them has been
    // touched on both sides, as in a link that has run a while.
    let warm = (CAP / (8 + f.wire_len()).next_multiple_of(64)) as u64 + 1;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let echo = std::thread::spawn(move || -> Result<(), VanError> {
        for _ in 0..warm + iters {
            next(&mut at_echo, &stop2)?;
            from_echo.frame(&reply, &|| stop2.load(Ordering::Relaxed))?;
        }
        Ok(())
    });
    let mut start = Instant::now();
    let mut mine = Ok(());
    for i in 0..warm + iters {
        if i == warm {
            start = Instant::now();
        }
        let round = to_echo
            .frame(&f, &|| false)
            .and_then(|_| next(&mut back, &stop))
            .and_then(|b| match b.len() == f.wire_len() {
                true => Ok(()),
                false => Err(VanError::protocol("the echo came back with another length")),
            });
        if round.is_err() {
            mine = round;
            break;
        }
    }
    let took = start.elapsed();
    // Ends the echo's wait if this side stopped early.
    stop.store(true, Ordering::Relaxed);
    let theirs = echo
        .join()
        .map_err(|_| VanError::protocol("the echo thread panicked"))?;
    mine.and(theirs).map(|_| took)
}
