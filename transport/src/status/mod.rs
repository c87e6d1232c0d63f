//! What `pskv status` shows of a running job, and how it is gathered
//! without disturbing the job.
//!
//! ```text
//!   worker / server                     scheduler                      observer
//!   Traffic (per link, atomics)
//!   RoundLog (the layer above)
//!      ── Heartbeat, Stats(NodeStats) ──►  keeps the last two
//!                                          snapshots of each node
//!                                        ◄── handshake (token), no Register ──
//!                                        ◄── StatusQuery ──────────────────────
//!                                          ── Status(JobStatus) ──────────────►
//! ```
//!
//! Each server and worker counts the frames and bytes its links carry
//! (`Traffic`, relaxed atomics: statistics, never synchronisation) and the
//! rounds the layer above reports ([`RoundLog`]). With every heartbeat it
//! sends the scheduler a [`NodeStats`] snapshot; the scheduler's state
//! machine keeps the latest two of each node, so rates are the difference
//! of two snapshots over the node's own clock.
//!
//! An observer ([`query`]) proves the cluster token in the ordinary
//! handshake, never registers, and asks once. The scheduler answers from
//! its node table on the I/O thread that read the question, and its state
//! machine never sees the observer: no barrier, heartbeat, death or
//! registration depends on it. Without heartbeats (`PS_HEARTBEAT_INTERVAL=0`)
//! nodes send no snapshots, and the status has only the node table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

mod clock;
mod query;

pub use clock::ClockOffset;
pub(crate) use clock::{unix_us, ClockSync};
pub use query::query;

/// Frames and bytes a node's links carried, since the node started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficCounts {
    /// Frames received.
    pub frames_in: u64,
    /// Bytes received (headers included).
    pub bytes_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Bytes sent (headers included).
    pub bytes_out: u64,
}

impl TrafficCounts {
    fn plus(self, o: TrafficCounts) -> TrafficCounts {
        TrafficCounts {
            frames_in: self.frames_in + o.frames_in,
            bytes_in: self.bytes_in + o.bytes_in,
            frames_out: self.frames_out + o.frames_out,
            bytes_out: self.bytes_out + o.bytes_out,
        }
    }
}

/// A link's counters. Relaxed: each is a statistic read on its own; no
/// other memory is published through them.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    frames_in: AtomicU64,
    bytes_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_out: AtomicU64,
}

impl Traffic {
    pub(crate) fn sent(&self, bytes: usize) {
        self.frames_out.fetch_add(1, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Takes back a frame counted by `sent` that never left (withdrawn
    /// from the queue, or dropped when its link closed).
    pub(crate) fn unsent(&self, bytes: usize) {
        self.frames_out.fetch_sub(1, Ordering::Relaxed);
        self.bytes_out.fetch_sub(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn received(&self, bytes: usize) {
        self.frames_in.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A payload received into a landing (its frame is counted without
    /// it by `received`).
    pub(crate) fn landed(&self, bytes: u64) {
        self.bytes_in.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn counts(&self) -> TrafficCounts {
        TrafficCounts {
            frames_in: self.frames_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            frames_out: self.frames_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }

    /// Adds `c` (a closed link's counts, kept in the node's total).
    pub(crate) fn absorb(&self, c: TrafficCounts) {
        self.frames_in.fetch_add(c.frames_in, Ordering::Relaxed);
        self.bytes_in.fetch_add(c.bytes_in, Ordering::Relaxed);
        self.frames_out.fetch_add(c.frames_out, Ordering::Relaxed);
        self.bytes_out.fetch_add(c.bytes_out, Ordering::Relaxed);
    }
}

/// The sum of `counts`.
pub(crate) fn total(counts: impl IntoIterator<Item = TrafficCounts>) -> TrafficCounts {
    counts
        .into_iter()
        .fold(TrafficCounts::default(), TrafficCounts::plus)
}

/// The slowest key of a node's latest round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlowKey {
    /// The key, as the layer above names it.
    pub key: String,
    /// The round.
    pub round: u64,
    /// How long the key's round took, in microseconds (a worker: from
    /// its push to the last answer; a server: from the round's first push
    /// to its answers).
    pub micros: u64,
}

/// The rounds a node completed, as the layer above reports them with
/// [`RoundLog::round_done`] (or, untimed, [`RoundLog::rounds_done`]): each
/// key counts its own rounds; the node's round is the highest of them, and
/// its slowest key is the slowest of the keys that reached that round so
/// far. Rounds the layer above learns of only when it looks (a server's
/// rounds that its workers summed in shared memory) it reports from the
/// function it gives [`RoundLog::set_refresh`], which every snapshot calls
/// first.
#[derive(Default)]
pub struct RoundLog {
    state: Mutex<Rounds>,
    refresh: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for RoundLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundLog")
            .field("state", &self.state)
            .field("refresh", &self.refresh.get().is_some())
            .finish()
    }
}

#[derive(Debug, Default)]
struct Rounds {
    per_key: HashMap<u64, u64>,
    latest: u64,
    /// The slowest key of the latest round, with its id: the same key
    /// slowest again (a job of one key, every round) keeps its name, not
    /// made again.
    slowest: Option<(u64, SlowKey)>,
}

impl RoundLog {
    /// Key `key` completed a round that took `took`; `name` names the key
    /// (called only when the key becomes the slowest of its round so far
    /// and the slowest was another key: it must name `key` alone).
    pub fn round_done(&self, key: u64, took: Duration, name: impl FnOnce() -> String) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let mut s = self.state.lock();
        let n = s.per_key.entry(key).or_insert(0);
        *n += 1;
        let round = *n;
        let slower = match &s.slowest {
            _ if round > s.latest => true,
            Some((_, k)) => round == s.latest && micros > k.micros,
            None => round == s.latest,
        };
        s.latest = s.latest.max(round);
        if slower {
            match &mut s.slowest {
                Some((id, k)) if *id == key => {
                    k.round = round;
                    k.micros = micros;
                }
                slowest => {
                    let k = SlowKey {
                        key: name(),
                        round,
                        micros,
                    };
                    *slowest = Some((key, k));
                }
            }
        }
    }

    /// Key `key` completed `n` more rounds that nobody timed. They count
    /// like timed ones; a round past the node's latest leaves it without a
    /// slowest key until a timed round names one.
    pub fn rounds_done(&self, key: u64, n: u64) {
        if n == 0 {
            return;
        }
        let mut s = self.state.lock();
        let k = s.per_key.entry(key).or_insert(0);
        *k += n;
        let round = *k;
        if round > s.latest {
            s.latest = round;
            s.slowest = None;
        }
    }

    /// Sets the function that reports the rounds not reported yet (with
    /// [`RoundLog::round_done`] or [`RoundLog::rounds_done`]), called at
    /// the start of every [`RoundLog::latest`], outside the log's lock; it
    /// must not wait long (a snapshot waits for it). Once per log: false
    /// if one was set already.
    pub fn set_refresh(&self, f: impl Fn() + Send + Sync + 'static) -> bool {
        self.refresh.set(Box::new(f)).is_ok()
    }

    /// The node's round, and the slowest key of it so far.
    pub fn latest(&self) -> (u64, Option<SlowKey>) {
        if let Some(f) = self.refresh.get() {
            f();
        }
        let s = self.state.lock();
        (s.latest, s.slowest.as_ref().map(|(_, k)| k.clone()))
    }
}

/// What a server or worker tells the scheduler with each heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    /// Its process id.
    pub pid: u32,
    /// Its host's name.
    pub hostname: String,
    /// Microseconds since the node started, on its own clock.
    pub uptime_us: u64,
    /// What its links carried.
    pub traffic: TrafficCounts,
    /// Rounds completed (see [`RoundLog`]).
    pub rounds: u64,
    /// The slowest key of its latest round.
    pub slowest: Option<SlowKey>,
    /// Its clock against the scheduler's (None: no sample yet).
    pub clock: Option<ClockOffset>,
}

/// Bytes and frames per second, in and out, between a node's last two
/// snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rates {
    /// Bytes received per second.
    pub bytes_in: u64,
    /// Bytes sent per second.
    pub bytes_out: u64,
    /// Frames received per second.
    pub frames_in: u64,
    /// Frames sent per second.
    pub frames_out: u64,
}

impl Rates {
    /// The rates between snapshots `a` and a later `b` (None: no time
    /// passed between them, or `b` is of a restarted process).
    pub fn between(a: &NodeStats, b: &NodeStats) -> Option<Rates> {
        let dt = b.uptime_us.checked_sub(a.uptime_us).filter(|&d| d > 0)? as f64 / 1e6;
        let per_s = |x: u64, y: u64| (y.saturating_sub(x) as f64 / dt).round() as u64;
        let (x, y) = (a.traffic, b.traffic);
        Some(Rates {
            bytes_in: per_s(x.bytes_in, y.bytes_in),
            bytes_out: per_s(x.bytes_out, y.bytes_out),
            frames_in: per_s(x.frames_in, y.frames_in),
            frames_out: per_s(x.frames_out, y.frames_out),
        })
    }
}

/// One node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node id.
    pub id: u32,
    /// `scheduler`, `server` or `worker`.
    pub role: String,
    /// Rank within its role.
    pub rank: u32,
    /// The address it listens on.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// `alive`, `dead` or `left`.
    pub state: String,
    /// Which process holds the id (0 the first, one more per restart).
    pub epoch: u32,
    /// Milliseconds since the scheduler last heard from it (None: the
    /// scheduler itself).
    pub heard_ms_ago: Option<u64>,
    /// Its latest snapshot (None: none came yet, or heartbeats are off).
    pub stats: Option<NodeStats>,
    /// Milliseconds since that snapshot arrived.
    pub stats_ms_ago: Option<u64>,
    /// Its rates between its last two snapshots.
    pub rates: Option<Rates>,
}

/// The job as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// Servers expected.
    pub num_servers: u32,
    /// Workers expected.
    pub num_workers: u32,
    /// Every expected node registered.
    pub started: bool,
    /// Every worker is gone.
    pub job_ended: bool,
    /// Milliseconds between heartbeats (None: off).
    pub heartbeat_ms: Option<u64>,
    /// Every node, the scheduler first.
    pub nodes: Vec<NodeStatus>,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_slowest_key_is_of_the_latest_round() {
        let log = RoundLog::default();
        let ms = Duration::from_millis;
        log.round_done(1, ms(5), || "a".into());
        log.round_done(2, ms(9), || "b".into());
        assert_eq!(log.latest().0, 1);
        assert_eq!(log.latest().1.unwrap().key, "b");
        // Round 2 begins: its first key is its slowest so far, however
        // fast, and a slower key of round 1 no longer counts.
        log.round_done(1, ms(1), || "a".into());
        log.round_done(3, ms(50), || "c".into());
        let (round, slow) = log.latest();
        assert_eq!(round, 2);
        assert_eq!(
            slow,
            Some(SlowKey {
                key: "a".into(),
                round: 2,
                micros: 1000
            })
        );
        log.round_done(2, ms(3), || "b".into());
        assert_eq!(log.latest().1.unwrap().key, "b");
        log.round_done(3, ms(2), || unreachable!("not the slowest"));
        assert_eq!(log.latest().0, 2);
        // Key 2 again, the slowest of round 3 too: its name is kept, not
        // asked for again; the round and the time are the new ones.
        log.round_done(2, ms(4), || unreachable!("named already"));
        assert_eq!(
            log.latest().1,
            Some(SlowKey {
                key: "b".into(),
                round: 3,
                micros: 4000
            })
        );
        // Another key slowest: named.
        log.round_done(1, ms(7), || "a".into());
        assert_eq!(log.latest().1.unwrap().key, "a");
    }

    /// Untimed rounds count like timed ones; one past the latest leaves
    /// no slowest key (its time is unknown); the refresh reports before
    /// each look.
    #[test]
    fn untimed_rounds_count_and_the_refresh_reports_them_first() {
        let log = Arc::new(RoundLog::default());
        log.round_done(1, Duration::from_millis(3), || "a".into());
        log.rounds_done(2, 0);
        assert_eq!(log.latest().0, 1);
        log.rounds_done(2, 1);
        assert_eq!(log.latest().0, 1);
        assert_eq!(
            log.latest().1.unwrap().key,
            "a",
            "a round of the same number"
        );
        log.rounds_done(2, 4);
        let (round, slow) = log.latest();
        assert_eq!((round, slow), (5, None));
        let pending = Arc::new(AtomicU64::new(0));
        let (l, p) = (Arc::downgrade(&log), pending.clone());
        assert!(log.set_refresh(move || {
            if let Some(l) = l.upgrade() {
                l.rounds_done(1, p.swap(0, Ordering::Relaxed));
            }
        }));
        assert!(!log.set_refresh(|| {}), "a second refresh is refused");
        pending.store(9, Ordering::Relaxed);
        assert_eq!(
            log.latest().0,
            10,
            "key 1: 1 timed and 9 reported at the look"
        );
        assert_eq!(log.latest().0, 10, "reported once");
    }

    #[test]
    fn rates_are_per_second_of_the_nodes_clock() {
        let snap = |us: u64, bytes: u64| NodeStats {
            uptime_us: us,
            traffic: TrafficCounts {
                bytes_out: bytes,
                frames_out: bytes / 100,
                ..TrafficCounts::default()
            },
            ..NodeStats::default()
        };
        let r = Rates::between(&snap(1_000_000, 0), &snap(1_500_000, 1000)).unwrap();
        assert_eq!((r.bytes_out, r.frames_out, r.bytes_in), (2000, 20, 0));
        // A restarted process's clock starts over: no rate.
        assert_eq!(Rates::between(&snap(9_000_000, 0), &snap(1, 5)), None);
    }

    #[test]
    fn a_closed_links_counts_stay_in_the_total() {
        let (node, link) = (Traffic::default(), Traffic::default());
        link.sent(100);
        link.received(64);
        node.absorb(link.counts());
        let live = Traffic::default();
        live.sent(1);
        let t = total([node.counts(), live.counts()]);
        assert_eq!((t.frames_out, t.bytes_out, t.bytes_in), (2, 101, 64));
    }
}
