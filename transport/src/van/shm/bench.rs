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

/// Ring bytes of each direction: smaller than the van's default (16 MiB),
/// so that the untimed first lap is short. Both rings then fit in a
/// core's L2 cache (2 MiB per core on the VMs of BENCHMARKS.md), which 16
/// MiB ones do not: what large frames cost here is the cached case.
const CAP: usize = 1 << 20;

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

/// What a thread's wait says when the other thread ended first.
const OTHER_STOPPED: &str = "the other thread of the bench stopped";

/// Spins until `c` holds a frame, and returns it; an error once `stop`.
fn next(c: &mut Consumer, stop: &AtomicBool) -> Result<Bytes, VanError> {
    loop {
        if let Some(b) = c.try_next()? {
            return Ok(b);
        }
        if stop.load(Ordering::Acquire) {
            // Subtle: the other thread may have sent its last frame just
            // before it stopped (its stop is stored after): look once more.
            return c.try_next()?.ok_or(VanError::Closed(OTHER_STOPPED));
        }
        std::hint::spin_loop();
    }
}

/// Sets the flag when dropped: however a thread of the bench ends (an
/// error, a panic), the other one's spin ends too.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
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
    let echo = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<(), VanError> {
            let _stop = StopOnDrop(stop.clone());
            for _ in 0..warm + iters {
                next(&mut at_echo, &stop)?;
                from_echo.frame(&reply, &|| stop.load(Ordering::Relaxed))?;
            }
            Ok(())
        })
    };
    let mine = {
        let _stop = StopOnDrop(stop.clone());
        let mut start = Instant::now();
        let mut round = || {
            to_echo.frame(&f, &|| stop.load(Ordering::Relaxed))?;
            match next(&mut back, &stop)?.len() == f.wire_len() {
                true => Ok(()),
                false => Err(VanError::protocol("the echo came back with another length")),
            }
        };
        (0..warm + iters)
            .try_for_each(|i| {
                if i == warm {
                    start = Instant::now();
                }
                round()
            })
            .map(|_| start.elapsed())
    };
    let theirs = echo
        .join()
        .map_err(|_| VanError::protocol("the echo thread panicked"))?;
    // The first error is the one to tell: the other thread's then is
    // `OTHER_STOPPED`.
    let first = |e: &VanError| !matches!(e, VanError::Closed(w) if *w == OTHER_STOPPED);
    match (mine, theirs) {
        (Ok(took), Ok(())) => Ok(took),
        (Err(e), Ok(())) | (Ok(_), Err(e)) => Err(e),
        (Err(a), Err(b)) => Err(if first(&a) { a } else { b }),
    }
}
