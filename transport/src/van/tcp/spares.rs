//! Receive buffers of large TCP bodies, reused from frame to frame.
//!
//! A body of 16 KiB or more (`read.rs`'s `SPARE_MIN`) is read into a
//! buffer of its own, which the frame's `Bytes` then own (through a
//! [`Spare`]). When the last of them drops (a server has summed the push,
//! a worker is done with an answer), the buffer comes back to this
//! process-wide free list, and a later large body, on any link, is read
//! into it: once the list holds a fitting buffer, no fresh pages to fault
//! in and zero per message.
//!
//! # States and invariants
//!
//! A buffer is either *in use* (inside a [`Spare`]) or *free* (in the
//! list, by length). [`take`] gives the smallest free buffer at least as
//! long as the body and at most twice as long (best fit; a longer one
//! would hold idle memory for as long as the frame lives), or on a miss a
//! new one. The free ones stay
//! within [`SPARE_BUFS`] and [`SPARE_BYTES`]: a returned buffer that
//! passes them drops the shortest free ones (the least useful: any body
//! they fit, a longer one fits too), or itself if it alone is longer than
//! `SPARE_BYTES`. (A first version dropped the longest free buffer on
//! every miss, to keep no more buffers than were ever in use at once: with
//! the mix of sizes a server holds, that faulted in 2 to 4 MB of fresh
//! pages per round of the model with 4 workers and 2 servers.)
//!
//! Memory: the free buffers stay resident for the life of the process,
//! also after every link has closed (at most `SPARE_BYTES`; about the
//! largest set of large bodies that were in use at once, since a buffer is
//! made only when none free fits).
//!
//! The lock is held to take or return one buffer: a lookup in a map
//! ordered by length. Buffers are made and freed outside it.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;

/// Most free buffers kept, and their most bytes in all. A server holds a
/// round's pushes until every worker's is in: the model's round with 4
/// workers is over 200 MB and 600 large bodies on one server.
const SPARE_BUFS: usize = 4096;
const SPARE_BYTES: usize = 512 << 20;

/// A free list: its buffers by length, how many and their bytes, and its
/// bounds.
struct Free {
    bufs: BTreeMap<usize, Vec<Box<[u8]>>>,
    count: usize,
    bytes: usize,
    max_bufs: usize,
    max_bytes: usize,
}

type Home = &'static Mutex<Free>;

/// The process's free list.
static FREE: Mutex<Free> = Mutex::new(Free::new(SPARE_BUFS, SPARE_BYTES));

impl Free {
    const fn new(max_bufs: usize, max_bytes: usize) -> Free {
        Free {
            bufs: BTreeMap::new(),
            count: 0,
            bytes: 0,
            max_bufs,
            max_bytes,
        }
    }

    fn lock(home: Home) -> std::sync::MutexGuard<'static, Free> {
        // Nothing under the lock can panic midway (no user code; an
        // allocation that fails aborts), so a poisoned list is consistent.
        home.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes a free buffer of length `len` (one is listed).
    fn remove(&mut self, len: usize) -> Box<[u8]> {
        let same = self.bufs.get_mut(&len).expect("a listed length");
        let b = same.pop().expect("no length is listed without a buffer");
        if same.is_empty() {
            self.bufs.remove(&len);
        }
        self.count -= 1;
        self.bytes -= len;
        b
    }

    /// The best fit for `need` (at most twice as long), removed; None on
    /// a miss.
    fn take(&mut self, need: usize) -> Option<Box<[u8]>> {
        let (&len, _) = self.bufs.range(need..=need.saturating_mul(2)).next()?;
        Some(self.remove(len))
    }

    /// Keeps `buf`, returning the buffers the bounds then drop (`buf`
    /// itself if it alone passes them).
    fn put(&mut self, buf: Box<[u8]>) -> Vec<Box<[u8]>> {
        if buf.len() > self.max_bytes {
            return vec![buf];
        }
        self.count += 1;
        self.bytes += buf.len();
        self.bufs.entry(buf.len()).or_default().push(buf);
        let mut dropped = Vec::new();
        while self.count > self.max_bufs || self.bytes > self.max_bytes {
            let (&shortest, _) = self
                .bufs
                .first_key_value()
                .expect("over a bound: not empty");
            dropped.push(self.remove(shortest));
        }
        dropped
    }
}

/// A buffer of at least `need` bytes (module docs): a free one, or a new
/// zeroed one.
pub(crate) fn take(need: usize) -> Box<[u8]> {
    take_from(&FREE, need)
}

fn take_from(home: Home, need: usize) -> Box<[u8]> {
    let taken = Free::lock(home).take(need);
    taken.unwrap_or_else(|| vec![0u8; need].into_boxed_slice())
}

/// The first `len` bytes of `buf` as a frame's bytes; `buf` comes back to
/// the free list when the last of them drops.
pub(crate) fn freeze(buf: Box<[u8]>, len: usize) -> Bytes {
    freeze_into(&FREE, buf, len)
}

fn freeze_into(home: Home, buf: Box<[u8]>, len: usize) -> Bytes {
    debug_assert!(len <= buf.len());
    Bytes::from_owner(Spare { buf, len, home })
}

/// The owner of a large body's bytes: its buffer, how much of it the body
/// fills, and the free list it goes back to.
struct Spare {
    buf: Box<[u8]>,
    len: usize,
    home: Home,
}

impl AsRef<[u8]> for Spare {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let dropped = Free::lock(self.home).put(buf);
        drop(dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home(max_bufs: usize, max_bytes: usize) -> Home {
        Box::leak(Box::new(Mutex::new(Free::new(max_bufs, max_bytes))))
    }

    fn lens(h: Home) -> Vec<usize> {
        let f = Free::lock(h);
        let lens: Vec<usize> = f.bufs.values().flatten().map(|b| b.len()).collect();
        assert_eq!(f.bytes, lens.iter().sum::<usize>());
        assert_eq!(f.count, lens.len());
        assert!(f
            .bufs
            .iter()
            .all(|(&n, same)| !same.is_empty() && same.iter().all(|b| b.len() == n)));
        lens
    }

    /// A body's buffer is free once its last slice drops, and then the
    /// best fit: the shortest free one long enough.
    #[test]
    fn a_dropped_body_gives_its_buffer_to_the_next_body_that_fits() {
        let h = home(8, 1 << 20);
        // Taken together, so each is new.
        let [mut a, b, c] = [1000, 5000, 200].map(|n| take_from(h, n));
        a[..3].copy_from_slice(b"abc");
        let at = a.as_ptr();
        let body = freeze_into(h, a, 1000);
        let part = body.slice(1..3);
        assert_eq!(&part[..], b"bc");
        drop(body);
        assert!(lens(h).is_empty(), "a slice still holds the buffer");
        drop(part);
        assert_eq!(lens(h), [1000]);
        drop(freeze_into(h, b, 5000));
        drop(freeze_into(h, c, 200));
        assert_eq!(lens(h), [200, 1000, 5000]);
        let fit = take_from(h, 900);
        assert_eq!((fit.as_ptr(), fit.len()), (at, 1000));
        assert_eq!(lens(h), [200, 5000]);
    }

    /// A free buffer more than twice as long as the body is left for a
    /// longer one.
    #[test]
    fn a_body_takes_no_buffer_over_twice_its_length() {
        let h = home(8, 1 << 20);
        let b = take_from(h, 1000);
        drop(freeze_into(h, b, 1000));
        assert_eq!(take_from(h, 499).len(), 499, "a new one");
        assert_eq!(lens(h), [1000]);
        assert_eq!(take_from(h, 500).len(), 1000, "the free one");
    }

    /// A miss makes a new buffer and keeps the free ones that were too
    /// short.
    #[test]
    fn a_miss_makes_a_new_buffer() {
        let h = home(8, 1 << 20);
        for (b, n) in [100, 300].map(|n| (take_from(h, n), n)) {
            drop(freeze_into(h, b, n));
        }
        assert_eq!(lens(h), [100, 300]);
        let big = take_from(h, 400);
        assert_eq!(big.len(), 400);
        assert_eq!(lens(h), [100, 300]);
    }

    /// Returned buffers beyond the bounds drop the shortest ones.
    #[test]
    fn the_free_list_keeps_within_its_bounds() {
        let h = home(3, 1000);
        let bufs: Vec<_> = [100, 200, 300, 400].map(|n| take_from(h, n)).into();
        for b in bufs {
            let n = b.len();
            drop(freeze_into(h, b, n));
        }
        assert_eq!(lens(h), [200, 300, 400], "at most 3 buffers");
        drop(freeze_into(h, take_from(h, 600), 600));
        assert_eq!(lens(h), [400, 600], "at most 1000 bytes");
        drop(freeze_into(h, take_from(h, 2000), 2000));
        assert_eq!(lens(h), [400, 600], "one longer than the bound is not kept");
    }
}
