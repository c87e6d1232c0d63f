//! The receiving end of a shared-memory link: frames out of the ring and
//! to the sink, read by its reader thread (the node's, for all its links:
//! `group.rs`; or the link's own, `Reader::run`) or by a thread that waits
//! for an answer and polls meanwhile (leader/follower).
//!
//! A small round trip is a handful of microseconds of work and a few
//! hand-offs between threads; on a machine with fewer cores than spinning
//! threads each hand-off waits for its thread's turn. A caller waiting for
//! an answer spins anyway (the engine's latch), so it may as well read the
//! ring itself ([`Reader::poll`], reached through
//! `Postoffice::progress` and the engine's progress hooks): the answer is
//! then handled on the thread that waits for it, and the reader thread,
//! seeing that someone polls, stops spinning and naps instead, so one
//! thread spins per worker where there were two.
//!
//! # States and invariants
//!
//! - The [`Consumer`] is behind a mutex; whoever holds it reads whole
//!   frames and hands them to the sink *before* releasing it, so frames
//!   reach the sink in ring order, one at a time, whichever thread reads.
//!   Pollers only `try_lock` (a poller never waits for the reader, and a
//!   poll from inside a frame's handling on the same thread finds the lock
//!   held and returns).
//! - The reader thread waits for data without the lock ([`Watch`], or the
//!   group's wait on all its rings), from the position it last read; a
//!   poller may read meanwhile, which only makes its wait end early (the
//!   next look finds nothing and waits from the new position). A group's
//!   thread only `try_lock`s ([`Reader::step`]): a ring a poller is
//!   reading is skipped until the next look.
//! - `polled` is the time of the last poll (0: none since the last
//!   leave). While it is recent (`FRESH`), the reader does not spin: it
//!   naps (parked, or the group leaves the ring out of its wait, until the
//!   poll would be stale) and looks again. A poller that gives up
//!   (its wait is about to sleep: [`Poll::leave`]) clears `polled` and
//!   wakes the reader (unparks it, or rings its group's bell), which reads
//!   at once: the answer the poller waits
//!   for is then delivered by the reader and wakes it. Every wait that
//!   sleeps leaves first, polling or not (the engine's latch). A poller
//!   whose wait ended (its answer came) does not leave: it will likely
//!   wait again soon. Subtle: so a frame that arrives after the last poll
//!   may wait for the reader's nap to end (at most `FRESH` after that
//!   poll) when no thread waits in the engine's latch: a pure async
//!   caller, or a wait elsewhere (the transport's own, `wait_for_all`
//!   leaves too).
//! - Once a frame is malformed or the reader thread ends, the flag beside
//!   the consumer stops every thread from delivering more.
//! - A poller that meets a malformed frame does not end the link itself:
//!   it records why in `broken` and closes the ring, so the reader thread's
//!   wait ends and it ends the link with that reason, as for its own
//!   errors.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::group::Bell;
use super::ring::{Consumer, Ring, Watch};
use crate::link::Link;
use crate::van::{FrameSink, VanError};
use crate::wire::{decode_frame, Limits};

/// A poll this recent means someone polls: the reader thread naps until
/// the poll would be this old (or a leave wakes it).
const FRESH: Duration = Duration::from_millis(2);

/// The receiving end of one shared-memory link.
pub(super) struct Reader {
    /// The consumer, and whether reading has stopped for good (a
    /// malformed frame, or the reader thread ended): then nothing more is
    /// delivered, by any thread.
    consumer: Mutex<(Consumer, bool)>,
    ring: Arc<Ring>,
    link: Arc<Link>,
    sink: Arc<dyn FrameSink>,
    limits: Limits,
    /// The consumer's stream position after its last read (under the
    /// consumer's lock): the ring holds unread frames while the producer's
    /// head is past it.
    read_to: AtomicU64,
    /// Nanoseconds since `epoch` of the last poll (0: never).
    polled: AtomicU64,
    epoch: Instant,
    /// Why a poller found the ring unreadable.
    broken: Mutex<Option<VanError>>,
    /// Who reads the ring when nobody polls it (woken by `leave`).
    wake: OnceLock<Wake>,
}

/// The thread that reads a ring when nobody polls it: the link's own, or
/// its node's reader of all its links ([`super::group`]).
pub(super) enum Wake {
    /// Unparked.
    Thread(Thread),
    /// Rung.
    Group(Arc<Bell>),
}

impl Reader {
    pub(super) fn new(
        consumer: Consumer,
        ring: Arc<Ring>,
        link: Arc<Link>,
        sink: Arc<dyn FrameSink>,
        limits: Limits,
    ) -> Reader {
        Reader {
            consumer: Mutex::new((consumer, false)),
            ring,
            link,
            sink,
            limits,
            read_to: AtomicU64::new(0),
            polled: AtomicU64::new(0),
            epoch: Instant::now(),
            broken: Mutex::new(None),
            wake: OnceLock::new(),
        }
    }

    /// Hands the whole frames the ring holds now to the sink, at most
    /// `max` of them; whether there was one. An error stops reading for
    /// good (`rx.1`), under the lock, so no thread delivers a frame after
    /// it.
    fn drain(&self, rx: &mut (Consumer, bool), max: usize) -> Result<bool, VanError> {
        let r = self.drain_some(rx, max);
        self.read_to.store(rx.0.position(), Ordering::Release);
        r
    }

    /// `drain` without recording the position.
    fn drain_some(&self, rx: &mut (Consumer, bool), max: usize) -> Result<bool, VanError> {
        let (c, stopped) = rx;
        let mut any = false;
        for _ in 0..max {
            if *stopped {
                break;
            }
            let next = c.try_next().and_then(|b| {
                b.map(|b| decode_frame(b, &self.limits))
                    .transpose()
                    .map_err(VanError::from)
            });
            match next {
                Ok(Some(frame)) => {
                    self.sink.on_frame(&self.link, frame);
                    any = true;
                }
                Ok(None) => break,
                Err(e) => {
                    *stopped = true;
                    return Err(e);
                }
            }
        }
        Ok(any)
    }

    /// How long ago the last poll was, if one was (since the last leave).
    fn since_poll(&self) -> Option<Duration> {
        match self.polled.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_nanos(
                (self.epoch.elapsed().as_nanos() as u64).saturating_sub(at),
            )),
        }
    }

    pub(super) fn polled_recently(&self) -> bool {
        self.since_poll().is_some_and(|d| d < FRESH)
    }

    /// How long until the last poll is stale, if it is recent.
    pub(super) fn nap_left(&self) -> Option<Duration> {
        self.since_poll()
            .and_then(|age| FRESH.checked_sub(age))
            .filter(|d| !d.is_zero())
    }

    /// Whether the peer or the link is gone (the reader then ends the link
    /// once it has drained the ring).
    pub(super) fn gone(&self) -> bool {
        self.link.is_closed() || self.ring.is_closed()
    }

    /// Whether the producer published past what was read (a hint: exact
    /// once both sides rest).
    fn unread(&self) -> bool {
        self.ring.head() > self.read_to.load(Ordering::Acquire)
    }

    /// Whether a reader that does not poll should look at the ring now:
    /// unread frames that nobody is reading, or the end of the link to
    /// deliver. Subtle: against the consumer's own position (a hostile
    /// peer's tail cannot make a ring look unread for ever), and not while
    /// a poller holds the consumer (it reads them; a group's thread would
    /// find the lock taken and look again at once, spinning flat out).
    pub(super) fn wants_reading(&self) -> bool {
        (self.unread() && !self.busy()) || self.gone()
    }

    /// Whether a poller holds the consumer now.
    pub(super) fn busy(&self) -> bool {
        self.consumer.is_locked()
    }

    /// The ring, for a reader that waits on several at once.
    pub(super) fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Who reads the ring when nobody polls (set before the reader is
    /// registered as a poller).
    pub(super) fn set_wake(&self, w: Wake) {
        let _ = self.wake.set(w);
    }

    /// One look of a reader of several rings: delivers what the ring holds
    /// unless a poller is reading it (then `Ok(false)`); the error that
    /// ends the link once the peer or the link is gone (what the ring held
    /// delivered first) or a frame is malformed.
    pub(super) fn step(&self, max: usize) -> Result<bool, VanError> {
        let read = match self.consumer.try_lock() {
            Some(mut rx) => self.drain(&mut rx, max)?,
            None => false,
        };
        if let Some(e) = self.broken.lock().take() {
            return Err(e);
        }
        if self.gone() {
            return Err(VanError::Closed(super::ring::RING_CLOSED));
        }
        Ok(read)
    }

    /// Stops reading for good, delivering nothing more.
    pub(super) fn halt(&self) {
        self.consumer.lock().1 = true;
    }

    /// Stops reading for good, after delivering what the ring holds;
    /// `e` is why the reading ended, unless delivering fails or a poller
    /// found the ring unreadable.
    pub(super) fn stop(&self, e: VanError) -> VanError {
        // Subtle: a frame published just before the close is still read (a
        // poller may have read up to it meanwhile); then no thread delivers
        // more.
        let mut rx = self.consumer.lock();
        let drained = if rx.1 {
            Ok(false)
        } else {
            self.drain(&mut rx, usize::MAX)
        };
        rx.1 = true;
        drop(rx);
        match drained {
            Err(e2) => e2,
            Ok(_) => self.broken.lock().take().unwrap_or(e),
        }
    }

    /// The loop of a link's own reader thread (without a group): until
    /// the ring closes (what it held drained) or a frame is malformed; the
    /// error says why.
    pub(super) fn run(&self) -> VanError {
        let e = self.read_until_end();
        // Whatever ended it, no poller delivers after this.
        self.halt();
        e
    }

    fn read_until_end(&self) -> VanError {
        let mut watch = Watch::new(self.ring.clone());
        loop {
            let pos = {
                let mut rx = self.consumer.lock();
                if let Err(e) = self.drain(&mut rx, usize::MAX) {
                    return e;
                }
                rx.0.position()
            };
            if let Some(e) = self.broken.lock().take() {
                return e;
            }
            // Subtle: not while the ring is closed (the peer is gone):
            // the wait below then ends the link, failing its requests.
            if let Some(age) = self.since_poll().filter(|a| *a < FRESH) {
                if !self.gone() {
                    // Until the poll would be stale, unless a leave comes.
                    std::thread::park_timeout(FRESH - age);
                    continue;
                }
            }
            let stand_back = || self.polled_recently() && !self.gone();
            if let Err(e) = watch.wait_beyond(pos, &self.link, &stand_back) {
                // The wait looked once more before giving up.
                return self.stop(e);
            }
        }
    }
}

/// A thread that waits reads the link (see the module docs).
pub(crate) trait Poll: Send + Sync {
    /// Reads and delivers what the link holds now, if nobody else is
    /// reading it; whether a frame was delivered. Never blocks.
    fn poll(&self) -> bool;
    /// The polling thread stops polling (its wait goes to sleep): the
    /// link's own reader takes over at once.
    fn leave(&self);
}

impl Poll for Reader {
    fn poll(&self) -> bool {
        if self.gone() {
            // The peer is gone: the reader ends the link (now, not after
            // its nap), failing what waits on it.
            self.leave();
            return false;
        }
        let now = (self.epoch.elapsed().as_nanos() as u64).max(1);
        self.polled.store(now, Ordering::Relaxed);
        if !self.unread() {
            return false;
        }
        let Some(mut rx) = self.consumer.try_lock() else {
            return false;
        };
        match self.drain(&mut rx, usize::MAX) {
            Ok(any) => any,
            Err(e) => {
                drop(rx);
                self.broken.lock().get_or_insert(e);
                self.ring.close();
                self.leave();
                false
            }
        }
    }

    fn leave(&self) {
        if self.polled.swap(0, Ordering::Relaxed) != 0 {
            match self.wake.get() {
                Some(Wake::Thread(t)) => t.unpark(),
                Some(Wake::Group(b)) => b.ring(),
                None => {}
            }
        }
    }
}
