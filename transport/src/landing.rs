//! [`Landing`]: memory of the application's where the payload of one
//! request's answer is received straight from the socket (a van that can:
//! TCP), so that a pull's values are not copied out of a receive buffer.
//!
//! # States
//!
//! ```text
//!   OPEN ──claim (reader)──► WRITING ──done──► FILLED
//!    │  ▲                       │  └──failed──► OPEN
//!    │  └───────────────────────┘
//!    │ close (application)      │ close while writing
//!    ▼                          ▼
//!  CLOSED ◄──done or failed── CLOSING
//! ```
//!
//! - A van's reader may write the memory only between a successful
//!   [`Landing::claim`] and its [`Landing::release`]; it claims only a
//!   landing that is `OPEN`, so an answer lands at most once, and a late or
//!   duplicate answer takes the ordinary path (a receive buffer) instead.
//! - The application calls [`Landing::close`] before it lets anything else
//!   touch the memory (before the op that owns it completes): from `OPEN`
//!   or `FILLED` the landing closes at once and the `then` it was given
//!   runs on the caller's thread; from `WRITING` it goes to `CLOSING`, and
//!   the reader's release closes it and runs `then` on the reader's thread.
//!
//! Subtle: a closing landing waits for the reader, which waits for the
//! socket. That wait is bounded by the link: a link that stalls is closed
//! by the transport (a dead peer, a heartbeat timeout), and closing it shuts
//! the socket down, which ends the reader's read and releases the landing.
//!
//! Orderings: the reader's writes to the memory happen before its release
//! stores `FILLED` (Release); the application reads the state with
//! Acquire before it reads the memory.

use std::sync::atomic::{AtomicU8, Ordering};

use parking_lot::Mutex;

const OPEN: u8 = 0;
const WRITING: u8 = 1;
const FILLED: u8 = 2;
const CLOSING: u8 = 3;
const CLOSED: u8 = 4;

type Then = Box<dyn FnOnce() + Send>;

/// Where one answer's payload may land (see the module docs).
pub struct Landing {
    ptr: *mut u8,
    len: usize,
    state: AtomicU8,
    /// What `close` left to run at the reader's release.
    then: Mutex<Option<Then>>,
}

// SAFETY: the pointer is written only by the one reader that claimed the
// landing, and read by the application only once that reader released it
// (the state machine above); `Landing::new`'s caller keeps it valid.
unsafe impl Send for Landing {}
unsafe impl Sync for Landing {}

impl std::fmt::Debug for Landing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Landing")
            .field("len", &self.len)
            .field("state", &self.state.load(Ordering::Relaxed))
            .finish()
    }
}

impl Landing {
    /// A landing of `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// The memory is valid for writes of `len` bytes, and nothing else
    /// reads or writes it from this call until [`Landing::close`] reports
    /// the landing closed (returns true, or runs its `then`).
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Landing {
        Landing {
            ptr,
            len,
            state: AtomicU8::new(OPEN),
            then: Mutex::new(None),
        }
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether an answer's payload landed in it (then the answer's frame
    /// carries no payload of its own).
    pub fn is_filled(&self) -> bool {
        self.state.load(Ordering::Acquire) == FILLED
    }

    /// A reader takes the landing for `len` bytes: the memory to write, or
    /// None when it is not open or not of that size.
    // The memory is the caller's, not `self`'s: the claim (a compare and
    // swap from OPEN) makes this reader its only writer until `release`.
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn claim(&self, len: u64) -> Option<&mut [u8]> {
        if len != self.len as u64 {
            return None;
        }
        self.state
            .compare_exchange(OPEN, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        // SAFETY: claimed: this reader is the only writer until `release`,
        // and the application leaves the memory alone (`new`'s contract).
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) })
    }

    /// The reader is done with the memory: `filled` if the whole payload
    /// landed. Runs what a `close` left, if one came meanwhile.
    pub(crate) fn release(&self, filled: bool) {
        let to = if filled { FILLED } else { OPEN };
        if self
            .state
            .compare_exchange(WRITING, to, Ordering::Release, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
        // CLOSING: the application is waiting for this release. Subtle:
        // `then` runs after the lock is dropped, since it may close this
        // landing again (a failed op closes every landing of its parts).
        let then = {
            let mut slot = self.then.lock();
            self.state.store(CLOSED, Ordering::Release);
            slot.take()
        };
        if let Some(then) = then {
            then();
        }
    }

    /// The application takes the memory back (see the module docs), then
    /// runs `then`: at once, on this thread (returns true), or, if a reader
    /// is writing, on the reader's thread when it is done (returns false).
    /// Closing a closed landing runs `then` at once.
    pub fn close(&self, then: impl FnOnce() + Send + 'static) -> bool {
        let mut slot = self.then.lock();
        loop {
            match self.state.load(Ordering::Acquire) {
                WRITING => {
                    // Subtle: `then` is stored before the state says CLOSING,
                    // under the lock the release takes after it sees CLOSING.
                    *slot = Some(Box::new(then));
                    if self
                        .state
                        .compare_exchange(WRITING, CLOSING, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        return false;
                    }
                    // Released meanwhile: look again.
                    let then = slot.take().expect("stored above");
                    drop(slot);
                    return self.close(then);
                }
                CLOSING => {
                    // A second close while the reader writes: both run at
                    // the release (the state is read under the lock the
                    // release takes to set CLOSED, so this one cannot miss
                    // it).
                    let first = slot.take();
                    *slot = Some(Box::new(move || {
                        if let Some(f) = first {
                            f();
                        }
                        then();
                    }));
                    return false;
                }
                s => {
                    if self
                        .state
                        .compare_exchange(s, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        drop(slot);
                        then();
                        return true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn landing(buf: &mut [u8]) -> Landing {
        // SAFETY: the tests keep `buf` alive and untouched until closed.
        unsafe { Landing::new(buf.as_mut_ptr(), buf.len()) }
    }

    #[test]
    fn an_answer_lands_once_and_a_second_takes_the_ordinary_path() {
        let mut buf = [0u8; 4];
        let l = landing(&mut buf);
        assert!(l.claim(3).is_none(), "wrong size");
        l.claim(4).unwrap().copy_from_slice(&[1, 2, 3, 4]);
        assert!(l.claim(4).is_none(), "claimed already");
        l.release(true);
        assert!(l.is_filled());
        assert!(l.claim(4).is_none(), "filled");
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        assert!(l.close(move || r.store(true, Ordering::SeqCst)));
        assert!(ran.load(Ordering::SeqCst), "closed at once: then ran");
        assert_eq!(buf, [1, 2, 3, 4]);
    }

    #[test]
    fn a_failed_write_reopens_and_a_closed_landing_refuses() {
        let mut buf = [0u8; 4];
        let l = landing(&mut buf);
        assert!(l.claim(4).is_some());
        l.release(false);
        assert!(!l.is_filled());
        assert!(l.close(|| {}));
        assert!(l.claim(4).is_none());
    }

    #[test]
    fn closing_while_a_reader_writes_waits_for_its_release() {
        let mut buf = [0u8; 4];
        let l = landing(&mut buf);
        assert!(l.claim(4).is_some());
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        assert!(!l.close(move || assert!(!r.swap(true, Ordering::SeqCst))));
        let r = ran.clone();
        assert!(
            !l.close(move || assert!(r.load(Ordering::SeqCst), "after the first")),
            "still closing"
        );
        assert!(!ran.load(Ordering::SeqCst));
        l.release(true);
        assert!(ran.load(Ordering::SeqCst));
        assert!(!l.is_filled(), "closed, not filled: the answer is not used");
    }

    /// A `then` run at the release may close the same landing again (an op
    /// that fails closes every landing of its parts): no deadlock.
    #[test]
    fn a_then_that_closes_the_landing_again_runs() {
        let mut buf = [0u8; 4];
        let l = Arc::new(landing(&mut buf));
        assert!(l.claim(4).is_some());
        let (l2, ran) = (l.clone(), Arc::new(AtomicBool::new(false)));
        let r = ran.clone();
        assert!(!l.close(move || {
            assert!(l2.close(move || r.store(true, Ordering::SeqCst)));
        }));
        l.release(true);
        assert!(ran.load(Ordering::SeqCst));
    }

    /// Races of release against close on two threads: `then` runs exactly
    /// once either way.
    #[test]
    fn close_and_release_race_without_losing_the_then() {
        for _ in 0..2000 {
            let mut buf = [0u8; 1];
            let l = Arc::new(landing(&mut buf));
            let claimed = l.claim(1).is_some();
            let l2 = l.clone();
            let reader = std::thread::spawn(move || l2.release(true));
            let ran = Arc::new(AtomicBool::new(false));
            let r = ran.clone();
            l.close(move || assert!(!r.swap(true, Ordering::SeqCst)));
            reader.join().unwrap();
            assert!(claimed);
            assert!(ran.load(Ordering::SeqCst));
        }
    }
}
