//! Receive buffers of large TCP bodies, reused from frame to frame.
//!
//! A body too large for a reader's small-frame buffer is read into a
//! buffer of its own, which the frame's `Bytes` then own (through a
//! [`Spare`]). When the last of them drops (a server has summed the push,
//! a worker is done with an answer), the buffer comes back to this
//! process-wide free list, and a later large body, on any link, is read
//! into it: no fresh pages to fault in and zero per message.
//!
//! # States and invariants
//!
//! A buffer is either *in use* (inside a [`Spare`]) or *free* (in the
//! list, sorted by length). [`take`] gives the smallest free buffer at
//! least as long as the body (best fit). On a miss, when no free buffer is
//! long enough, the longest free one (too short) is dropped before a new
//! one is made. So the buffers, free and in use together, grow in number
//! only while none is free: never more of them than the process once had
//! in use at the same time. The free ones also stay within
//! [`SPARE_BUFS`] and [`SPARE_BYTES`]: a returned buffer that passes them
//! drops the shortest free ones, or itself if it alone is longer than
//! `SPARE_BYTES`.
//!
//! The lock is held to take or return one buffer: a binary search and a
//! shift of at most `SPARE_BUFS` pointers. Buffers are made and freed
//! outside it.

use std::sync::Mutex;

use bytes::Bytes;

/// Most free buffers kept, and their most bytes in all.
const SPARE_BUFS: usize = 512;
const SPARE_BYTES: usize = 256 << 20;

/// A free list: its buffers, shortest first, their bytes, and its bounds.
struct Free {
    bufs: Vec<Box<[u8]>>,
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
            bufs: Vec::new(),
            bytes: 0,
            max_bufs,
            max_bytes,
        }
    }

    fn lock(home: Home) -> std::sync::MutexGuard<'static, Free> {
        // Nothing under the lock can panic midway (no allocation, no user
        // code), so a poisoned list is still consistent.
        home.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The best fit for `need`, or on a miss the longest free buffer,
    /// removed, for the caller to drop.
    fn take(&mut self, need: usize) -> Result<Box<[u8]>, Option<Box<[u8]>>> {
        let i = self.bufs.partition_point(|b| b.len() < need);
        let b = if i < self.bufs.len() {
            Ok(self.bufs.remove(i))
        } else {
            Err(self.bufs.pop())
        };
        if let Ok(b) | Err(Some(b)) = &b {
            self.bytes -= b.len();
        }
        b
    }

    /// Keeps `buf`, returning the buffers the bounds then drop (`buf`
    /// itself if it alone passes them).
    fn put(&mut self, buf: Box<[u8]>) -> Vec<Box<[u8]>> {
        if buf.len() > self.max_bytes {
            return vec![buf];
        }
        let i = self.bufs.partition_point(|b| b.len() < buf.len());
        self.bytes += buf.len();
        self.bufs.insert(i, buf);
        let mut dropped = Vec::new();
        while self.bufs.len() > self.max_bufs || self.bytes > self.max_bytes {
            let b = self.bufs.remove(0);
            self.bytes -= b.len();
            dropped.push(b);
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
    match taken {
        Ok(b) => b,
        Err(dropped) => {
            drop(dropped);
            vec![0u8; need].into_boxed_slice()
        }
    }
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
        assert_eq!(f.bytes, f.bufs.iter().map(|b| b.len()).sum::<usize>());
        f.bufs.iter().map(|b| b.len()).collect()
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

    /// On a miss the longest free buffer (too short) goes before a new one
    /// is made, so the buffers grow in number only when none is free.
    #[test]
    fn a_miss_drops_the_longest_free_buffer() {
        let h = home(8, 1 << 20);
        for (b, n) in [100, 300].map(|n| (take_from(h, n), n)) {
            drop(freeze_into(h, b, n));
        }
        assert_eq!(lens(h), [100, 300]);
        let big = take_from(h, 400);
        assert_eq!(big.len(), 400);
        assert_eq!(lens(h), [100]);
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
        // The miss dropped 400, then 200 went for the bytes.
        assert_eq!(lens(h), [300, 600], "at most 1000 bytes");
        let long = take_from(h, 2000);
        // The miss dropped 600.
        assert_eq!(lens(h), [300]);
        drop(freeze_into(h, long, 2000));
        assert_eq!(lens(h), [300], "one longer than the bound is not kept");
    }
}
