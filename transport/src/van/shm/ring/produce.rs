//! The producer end of a direction: records written into the ring (a frame
//! larger than a record in chunks, a large one through the heap), the head
//! published, the consumer woken if it sleeps.
//!
//! The consumer's index is read only when the room last seen is not enough
//! (`Producer::tail`): the consumer writes it after every record, so a read
//! per frame would move its cache line between the two cores twice per
//! frame. A stale index is safe: the consumer only ever moves it forward, so
//! the room it gives was free then and is free now.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{
    align64, free_room, heap, wait_until, wake_waiter, HeapWriter, Ring, CHUNK_BYTES, CONS_WAIT,
    CONT, DATA_SEQ, HEAD, HEAP_FLAG, PROD_WAIT, SPACE_SEQ, TAIL, WRAP,
};
use crate::spin::Spin;
use crate::van::{slice_parts, VanError};
use crate::wire::Frame;

/// The producer side of a direction.
pub(in crate::van::shm) struct Producer {
    pub(in crate::van::shm) ring: Arc<Ring>,
    head: u64,
    /// The consumer's index as last read (and checked): at most its value
    /// now, so `[head, tail + cap)` is free (see the module docs).
    tail: u64,
    heap: HeapWriter,
    spin: Spin,
    /// Frames sent through the heap.
    pub(in crate::van::shm) heap_frames: u64,
    /// Where a frame's header is encoded, kept from frame to frame.
    scratch: Vec<u8>,
}

impl Producer {
    pub(in crate::van::shm) fn new(ring: Arc<Ring>) -> Producer {
        Producer {
            heap: HeapWriter::new(ring.clone()),
            ring,
            head: 0,
            tail: 0,
            spin: Spin::new(),
            scratch: Vec::new(),
            heap_frames: 0,
        }
    }

    /// The largest record: larger frames go in chunks, so the receiver
    /// copies one chunk out while the sender copies the next one in.
    fn max_record(&self) -> usize {
        (self.ring.cap / 4).min(1 << 20)
    }

    /// The chunk size for a frame of `total` bytes that needs chunks: equal
    /// chunks of about `CHUNK_BYTES`, each fitting a record.
    fn chunk_len(&self, total: usize) -> usize {
        let room = self.max_record() - 64;
        let target = CHUNK_BYTES.min(room);
        let n = total.div_ceil(target);
        total.div_ceil(n).next_multiple_of(64).min(room)
    }

    /// Ring bytes a record of `len` body bytes needs at `head` (a wrap
    /// marker's skip included), and that skip.
    fn need(&self, len: usize) -> (u64, u64) {
        let cap = self.ring.cap as u64;
        let rec = align64(8 + len) as u64;
        let pos = self.head % cap;
        let wrap = if cap - pos < rec { cap - pos } else { 0 };
        (wrap + rec, wrap)
    }

    /// Appends one record (`CONT` or `HEAP` in `flags`).
    fn record(
        &mut self,
        parts: &[&[u8]],
        flags: u64,
        closed: &dyn Fn() -> bool,
    ) -> Result<(), VanError> {
        let cap = self.ring.cap as u64;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let (need, wrap) = self.need(len);
        if self.room_for(need)? < need {
            let tail = self.ring.u64_at(TAIL);
            let head = self.head;
            // An impossible index ends the wait too; `room` then reports it.
            wait_until(
                &self.ring,
                SPACE_SEQ,
                PROD_WAIT,
                &mut self.spin,
                &|| free_room(tail.load(Ordering::Acquire), head, cap).map_or(true, |r| r >= need),
                closed,
            )?;
            if self.room()? < need {
                return Err(VanError::protocol("the ring has less room than waited for"));
            }
        }
        self.publish(parts, flags, wrap, need - wrap);
        Ok(())
    }

    /// Free ring bytes by the consumer's index as last read.
    fn room_seen(&self) -> u64 {
        self.ring.cap as u64 - (self.head - self.tail)
    }

    /// Free ring bytes now (the consumer's index read again), or why that
    /// index is impossible.
    fn room(&mut self) -> Result<u64, VanError> {
        let tail = self.ring.u64_at(TAIL).load(Ordering::Acquire);
        free_room(tail, self.head, self.ring.cap as u64)?;
        // Subtle: an index the consumer moved back (a hostile peer) gives
        // no room back: the bytes below the last index seen were released.
        self.tail = self.tail.max(tail);
        Ok(self.room_seen())
    }

    /// Free ring bytes, reading the consumer's index again only if the last
    /// one seen leaves less than `need`.
    fn room_for(&mut self, need: u64) -> Result<u64, VanError> {
        match self.room_seen() {
            seen if seen >= need => Ok(seen),
            _ => self.room(),
        }
    }

    /// Writes a frame now if there is room for all of it; false (nothing
    /// written) otherwise.
    pub(in crate::van::shm) fn try_frame(&mut self, f: &Frame) -> bool {
        if self.ring.is_closed() {
            return false;
        }
        let total = f.wire_len();
        if self.heap.wants(total) {
            let need = self.need(heap::DESCRIPTOR).0;
            if self.room_for(need).is_ok_and(|r| r >= need) {
                if let Some(at) = self.heap.alloc(total) {
                    // The room was checked: this does not wait (it fails
                    // only if the ring closes meanwhile; the writer then
                    // fails too).
                    return self.heap_frame(f, at, &|| true).is_ok();
                }
            }
        }
        // The records `inline_frame` writes, plus one wrap's worth of slack
        // (at most one wrap per ring's worth of writes, shorter than a
        // record).
        let max = self.max_record();
        let records = if 8 + total <= max {
            align64(8 + total)
        } else {
            let chunk = self.chunk_len(total);
            total.div_ceil(chunk) * align64(8 + chunk)
        };
        let need = (records + max) as u64;
        if !self.room_for(need).is_ok_and(|r| r >= need) {
            return false;
        }
        // The space is there: the writes below never wait.
        self.inline_frame(f, &|| true).is_ok()
    }

    /// Writes a record at `head` (after a wrap marker if `wrap > 0`), into
    /// space the caller checked is free, and publishes it.
    fn publish(&mut self, parts: &[&[u8]], flags: u64, wrap: u64, rec: u64) {
        let cap = self.ring.cap as u64;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let data = self.ring.data();
        if wrap > 0 {
            let pos = self.head % cap;
            // SAFETY: [pos, pos+8) is free space of ours, below cap.
            unsafe { (data.add(pos as usize) as *mut u64).write(WRAP) };
            self.head += wrap;
        }
        let at = (self.head % cap) as usize;
        // SAFETY: [at, at + rec) is free space of ours within the ring (the
        // caller checked), and does not wrap.
        unsafe {
            (data.add(at) as *mut u64).write(len as u64 | flags);
            let mut o = at + 8;
            for p in parts {
                crate::copy::copy_to(data.add(o), p);
                o += p.len();
            }
        }
        self.head += rec;
        self.ring.u64_at(HEAD).store(self.head, Ordering::SeqCst);
        wake_waiter(&self.ring, DATA_SEQ, CONS_WAIT);
    }

    /// Writes a frame: into the heap if it is large and the heap has room,
    /// else through the ring (in chunks if it is large).
    pub(in crate::van::shm) fn frame(
        &mut self,
        f: &Frame,
        closed: &dyn Fn() -> bool,
    ) -> Result<(), VanError> {
        let total = f.wire_len();
        if self.heap.wants(total) {
            if let Some(at) = self.heap.alloc(total) {
                return self.heap_frame(f, at, closed);
            }
        }
        self.inline_frame(f, closed)
    }

    /// Copies a frame into heap blocks allocated at `at`, then publishes
    /// their descriptor.
    fn heap_frame(
        &mut self,
        f: &Frame,
        at: usize,
        closed: &dyn Fn() -> bool,
    ) -> Result<(), VanError> {
        let head = self.encode_head(f);
        self.heap.write(at, &[&head, &f.payload]);
        self.keep_scratch(head);
        let desc = heap::descriptor(at, f.wire_len());
        self.heap_frames += 1;
        self.record(&[&desc], HEAP_FLAG, closed)
    }

    /// Writes a frame through the ring: one record, or chunks.
    fn inline_frame(&mut self, f: &Frame, closed: &dyn Fn() -> bool) -> Result<(), VanError> {
        let head = self.encode_head(f);
        let r = self.inline_parts(&head, f, closed);
        self.keep_scratch(head);
        r
    }

    /// Puts the header buffer back, unless a frame of very many keys made
    /// it large (not kept for the small frames after it).
    fn keep_scratch(&mut self, head: Vec<u8>) {
        if head.capacity() <= 1 << 16 {
            self.scratch = head;
        }
    }

    /// `f`'s header in the scratch buffer, which the caller puts back.
    fn encode_head(&mut self, f: &Frame) -> Vec<u8> {
        let mut head = std::mem::take(&mut self.scratch);
        head.clear();
        head.reserve(f.head_len());
        f.encode_head_into(&mut head);
        head
    }

    /// Writes `head` then `f`'s payload through the ring.
    fn inline_parts(
        &mut self,
        head: &[u8],
        f: &Frame,
        closed: &dyn Fn() -> bool,
    ) -> Result<(), VanError> {
        let total = head.len() + f.payload.len();
        if 8 + total <= self.max_record() {
            return self.record(&[head, &f.payload], 0, closed);
        }
        let chunk = self.chunk_len(total);
        let whole: [&[u8]; 2] = [head, &f.payload[..]];
        let mut sent = 0;
        while sent < total {
            let n = chunk.min(total - sent);
            let pieces = slice_parts(&whole, sent, n);
            sent += n;
            let flags = if sent < total { CONT } else { 0 };
            self.record(&pieces, flags, closed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
impl Producer {
    /// Reads the consumer's index now (tests of a hostile peer).
    pub(in crate::van::shm) fn read_room(&mut self) -> Result<u64, VanError> {
        self.room()
    }

    /// Scribbles the published head (tests of a hostile peer).
    pub(in crate::van::shm) fn corrupt_head(&self, v: u64) {
        self.ring.u64_at(HEAD).store(v, Ordering::SeqCst);
    }

    /// Scribbles the consumer's index (tests of a hostile peer).
    pub(in crate::van::shm) fn corrupt_tail(&self, v: u64) {
        self.ring.u64_at(TAIL).store(v, Ordering::SeqCst);
    }

    /// Writes raw bytes into the ring's data at `at` (modulo its size) and
    /// sets a heap bitmap word, as a hostile peer might.
    pub(in crate::van::shm) fn scribble(&self, at: usize, bytes: &[u8], bitmap: u64) {
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: inside the ring's data (modulo its size).
            unsafe { self.ring.data().add((at + i) % self.ring.cap).write(*b) };
        }
        if self.ring.heap > 0 {
            self.ring.bitmap(0).store(bitmap, Ordering::SeqCst);
        }
    }

    /// Publishes a record as a hostile peer might.
    pub(in crate::van::shm) fn raw_record(&mut self, body: &[u8], flags: u64) {
        self.record(&[body], flags, &|| false).unwrap();
    }
}
