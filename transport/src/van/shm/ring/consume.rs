//! The consumer end of a direction: records read in order (chunks
//! reassembled, heap descriptors followed), each released as soon as it is
//! copied; and `Watch`, a wait for data without the consumer.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::{
    align64, heap, wait_until, wake_waiter, Ring, CONS_WAIT, CONT, DATA_SEQ, HEAD, HEAP_FLAG,
    LEN_MASK, PROD_WAIT, SPACE_SEQ, TAIL, WRAP,
};
use crate::link::Link;
use crate::spin::Spin;
use crate::van::VanError;
use crate::wire::{decode_header, Limits, HEADER_LEN};

/// The consumer side of a direction.
pub(in crate::van::shm) struct Consumer {
    ring: Arc<Ring>,
    cur: u64,
    /// A chunked frame being reassembled, and its total size.
    partial: Option<(BytesMut, usize)>,
    max_frame: u64,
    /// Receive buffer, reclaimed once the frames cut from it are dropped.
    pool: BytesMut,
    spin: Spin,
}

impl Consumer {
    pub(in crate::van::shm) fn new(ring: Arc<Ring>, max_frame: u64) -> Consumer {
        Consumer {
            ring,
            cur: 0,
            partial: None,
            max_frame,
            pool: BytesMut::new(),
            spin: Spin::new(),
        }
    }

    fn release(&self, upto: u64) {
        let ring = &self.ring;
        ring.u64_at(TAIL).store(upto, Ordering::SeqCst);
        wake_waiter(ring, SPACE_SEQ, PROD_WAIT);
    }

    /// The next frame's bytes: copied out of the ring, or leased from the
    /// heap; waits for them (the tests' reader; the van's waits without
    /// the consumer, `reader.rs`).
    #[cfg(test)]
    pub(in crate::van::shm) fn next(&mut self, link: &Link) -> Result<Bytes, VanError> {
        loop {
            if let Some(b) = self.read(Some(link))? {
                return Ok(b);
            }
        }
    }

    /// The next frame's bytes if the ring holds the rest of it now, else
    /// None (the chunks of a frame read so far are kept for the next
    /// call). Never waits.
    pub(in crate::van::shm) fn try_next(&mut self) -> Result<Option<Bytes>, VanError> {
        self.read(None)
    }

    /// The ring it reads (tests that wait on it without the consumer).
    #[cfg(test)]
    pub(in crate::van::shm) fn ring(&self) -> Arc<Ring> {
        self.ring.clone()
    }

    /// Where this consumer reads next (bytes of the stream; see
    /// [`Watch::wait_beyond`]).
    pub(in crate::van::shm) fn position(&self) -> u64 {
        self.cur
    }

    /// Reads records until a frame is whole. With `wait` (the link, whose
    /// close ends the wait), waits for each; without, returns None as soon
    /// as the ring holds no more.
    fn read(&mut self, wait: Option<&Link>) -> Result<Option<Bytes>, VanError> {
        let ring = self.ring.clone();
        let cap = ring.cap as u64;
        loop {
            let head_at = ring.u64_at(HEAD);
            let cur = self.cur;
            match wait {
                Some(link) => wait_until(
                    &ring,
                    DATA_SEQ,
                    CONS_WAIT,
                    &mut self.spin,
                    &|| head_at.load(Ordering::Acquire) > cur,
                    &|| link.is_closed(),
                )?,
                None if head_at.load(Ordering::Acquire) > cur => {}
                None => return Ok(None),
            }
            let head = head_at.load(Ordering::Acquire);
            if head < cur || head - cur > cap {
                return Err(VanError::Protocol(format!(
                    "corrupt ring indices (head {head}, read position {cur})"
                )));
            }
            let pos = cur % cap;
            // SAFETY: [pos, pos+8) is inside the ring and published (cur < head).
            let word = unsafe { (ring.data().add(pos as usize) as *const u64).read_volatile() };
            if word & WRAP != 0 {
                if cur + (cap - pos) > head {
                    return Err(VanError::Protocol(format!("corrupt wrap marker at {pos}")));
                }
                self.cur += cap - pos;
                self.release(self.cur);
                continue;
            }
            let len = word & LEN_MASK;
            let rec = align64(8 + len as usize) as u64;
            if rec > cap - pos || cur + rec > head {
                return Err(VanError::Protocol(format!(
                    "corrupt ring record of {len} bytes at {pos}"
                )));
            }
            // SAFETY: the record [pos+8, pos+8+len) is published and not
            // written by the producer until released below.
            let bytes = unsafe {
                std::slice::from_raw_parts(ring.data().add(pos as usize + 8), len as usize)
            };
            let chunk = word & CONT != 0;
            if word & HEAP_FLAG != 0 {
                if chunk || self.partial.is_some() {
                    return Err(VanError::protocol("a heap record inside a chunked frame"));
                }
                // The descriptor is read: its record can go at once.
                let b = heap::lease(&ring, bytes, self.max_frame)?;
                self.cur += rec;
                self.release(self.cur);
                return Ok(Some(b));
            }
            let out = match (self.partial.as_mut(), chunk) {
                (None, false) => {
                    self.pool.clear();
                    // Reserves, reclaiming the pool's buffer if it is free.
                    crate::copy::extend(&mut self.pool, bytes);
                    Some(self.pool.split().freeze())
                }
                (None, true) => {
                    // The first chunk holds the header: size the buffer once.
                    if bytes.len() < HEADER_LEN {
                        return Err(VanError::protocol(
                            "a chunked frame's first chunk is shorter than a header",
                        ));
                    }
                    let h = decode_header(
                        &bytes[..HEADER_LEN],
                        &Limits {
                            max_keys: u32::MAX,
                            max_meta: u32::MAX,
                            max_payload: self.max_frame,
                        },
                    )
                    .map_err(VanError::from)?;
                    let total = HEADER_LEN as u64 + h.body_len();
                    if total > self.max_frame {
                        return Err(VanError::Protocol(format!(
                            "a {total}-byte frame exceeds the message limit"
                        )));
                    }
                    self.pool.clear();
                    self.pool.reserve(total as usize);
                    // All of the pool's room goes to this frame.
                    let mut buf = self.pool.split_off(0);
                    crate::copy::extend(&mut buf, bytes);
                    self.partial = Some((buf, total as usize));
                    None
                }
                (Some((buf, total)), more) => {
                    if buf.len() + bytes.len() > *total {
                        return Err(VanError::protocol("chunks add up to more than their frame"));
                    }
                    crate::copy::extend(buf, bytes);
                    if more {
                        None
                    } else {
                        Some(self.partial.take().expect("present").0.freeze())
                    }
                }
            };
            self.cur += rec;
            self.release(self.cur);
            if let Some(b) = out {
                return Ok(Some(b));
            }
        }
    }
}

/// Waits for data on a ring without holding its [`Consumer`] (which a
/// thread that polls the ring may hold meanwhile: see `shm/mod.rs`).
pub(in crate::van::shm) struct Watch {
    ring: Arc<Ring>,
    spin: Spin,
}

impl Watch {
    pub(in crate::van::shm) fn new(ring: Arc<Ring>) -> Watch {
        Watch {
            ring,
            spin: Spin::new(),
        }
    }

    /// Waits until the producer published beyond stream position `pos`,
    /// or `stop()` (checked while spinning and between sleeps), or the
    /// ring closes (an error, once nothing beyond `pos` is published).
    pub(in crate::van::shm) fn wait_beyond(
        &mut self,
        pos: u64,
        link: &Link,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), VanError> {
        let head_at = self.ring.u64_at(HEAD);
        wait_until(
            &self.ring,
            DATA_SEQ,
            CONS_WAIT,
            &mut self.spin,
            &|| head_at.load(Ordering::Acquire) > pos || stop(),
            &|| link.is_closed(),
        )
    }
}
