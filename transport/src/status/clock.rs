//! This node's wall clock against the scheduler's, from the heartbeats, so
//! that `pskv trace merge` can put the profiles of several hosts on one
//! timeline.
//!
//! ```text
//!   node                                   scheduler
//!   Stats { uptime_us: t1 } ──────────────►
//!                            ◄──────────── Clock { echo_us: t1, unix_us: s }
//!   (arrives at uptime t2)
//! ```
//!
//! The scheduler read its clock (`s`) somewhere between `t1` and `t2`;
//! taking the middle, the node's wall clock then read `born + t1 +
//! (t2 - t1) / 2`, and the offset is `s` minus that, wrong by at most half
//! the round trip. The node keeps the sample with the shortest round trip
//! (the tightest bound), replaced by any sample once it is older than
//! `MAX_AGE` (clocks drift). Echoing `t1` makes a sample exact even when an
//! answer is late or a heartbeat was lost: no send time is remembered.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long the best sample stands before any newer one replaces it.
const MAX_AGE: Duration = Duration::from_secs(30);

/// This node's clock against the scheduler's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockOffset {
    /// Microseconds to add to this node's wall clock to read the
    /// scheduler's.
    pub offset_us: i64,
    /// The round trip of the sample: the offset is right to within half.
    pub rtt_us: u64,
}

/// The estimate (see the module docs).
#[derive(Debug)]
pub(crate) struct ClockSync {
    /// The node's start, and its wall-clock time then (µs since the epoch).
    born: (Instant, u64),
    best: Option<(ClockOffset, Instant)>,
}

impl ClockSync {
    pub(crate) fn new(born: Instant, born_unix_us: u64) -> ClockSync {
        ClockSync {
            born: (born, born_unix_us),
            best: None,
        }
    }

    /// The scheduler answered the snapshot sent at uptime `echo_us` with
    /// its clock `unix_us`; the answer came at `now`.
    pub(crate) fn answered(&mut self, echo_us: u64, unix_us: u64, now: Instant) {
        let now_us = u64::try_from(now.saturating_duration_since(self.born.0).as_micros())
            .unwrap_or(u64::MAX);
        // An echo from the future is not ours (a restarted process's id).
        let Some(rtt_us) = now_us.checked_sub(echo_us) else {
            return;
        };
        let middle = self.born.1 as i128 + echo_us as i128 + rtt_us as i128 / 2;
        let offset_us = (unix_us as i128 - middle).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        let sample = ClockOffset { offset_us, rtt_us };
        let take = match self.best {
            None => true,
            Some((b, at)) => rtt_us <= b.rtt_us || now.saturating_duration_since(at) > MAX_AGE,
        };
        if take {
            self.best = Some((sample, now));
        }
    }

    pub(crate) fn offset(&self) -> Option<ClockOffset> {
        self.best.map(|(o, _)| o)
    }
}

/// Microseconds since the Unix epoch, now.
pub(crate) fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_the_middle_of_the_round_trip_and_the_shortest_wins() {
        let born = Instant::now();
        let mut c = ClockSync::new(born, 1_000_000);
        let at = |us| born + Duration::from_micros(us);
        assert_eq!(c.offset(), None);
        // Sent at uptime 100 (wall 1_000_100), answered at 300: the
        // scheduler read 5_000_200 in the middle, when this clock read
        // 1_000_200.
        c.answered(100, 5_000_200, at(300));
        assert_eq!(
            c.offset(),
            Some(ClockOffset {
                offset_us: 4_000_000,
                rtt_us: 200
            })
        );
        // A longer round trip does not replace it; a shorter one does.
        c.answered(1000, 9_999_999, at(2000));
        assert_eq!(c.offset().unwrap().rtt_us, 200);
        c.answered(3000, 4_003_040, at(3080));
        assert_eq!(
            c.offset(),
            Some(ClockOffset {
                offset_us: 3_000_000,
                rtt_us: 80
            })
        );
        // Echoes from the future are not this process's.
        c.answered(10_000_000, 1, at(3100));
        assert_eq!(c.offset().unwrap().rtt_us, 80);
        // An old best gives way to any newer sample.
        let late = 3080 + MAX_AGE.as_micros() as u64 + 1000;
        c.answered(late - 500, 7, at(late));
        assert_eq!(c.offset().unwrap().rtt_us, 500);
    }
}
