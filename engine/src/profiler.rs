//! The op profiler: every op's name, thread, start and duration, written as
//! Chrome trace JSON (the "Trace Event Format"), which Perfetto and
//! chrome://tracing open.
//!
//! Cost: when off, one relaxed load per op start and end. When on, a clock
//! read at start and end and one short lock to append the finished event.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use parking_lot::Mutex;

use crate::error::EngineError;
use crate::op::Op;

static NEXT_TID: AtomicU64 = AtomicU64::new(1);

/// Thread ids and names, for the trace's thread-name metadata.
static THREAD_NAMES: Mutex<BTreeMap<u64, String>> = Mutex::new(BTreeMap::new());

thread_local! {
    static TID: u64 = {
        let tid = NEXT_TID.fetch_add(1, Ordering::Relaxed);
        let name = std::thread::current()
            .name()
            .map(str::to_string)
            .unwrap_or_else(|| format!("thread-{tid}"));
        THREAD_NAMES.lock().insert(tid, name);
        tid
    };
}

/// Gives the calling thread its trace id now (workers call it at start so
/// their names are known even before their first op).
pub(crate) fn register_thread() {
    TID.with(|_| {});
}

fn current_tid() -> u64 {
    TID.with(|t| *t)
}

/// The process-wide clock origin of every trace, and the wall-clock time
/// (microseconds since the Unix epoch) it stands for, so that traces of
/// several processes can be put on one timeline (`pskv trace merge`).
fn origin() -> (Instant, u64) {
    static EPOCH: OnceLock<(Instant, u64)> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        (Instant::now(), wall)
    })
}

fn epoch() -> Instant {
    origin().0
}

fn now_ns() -> u64 {
    // Never 0, so that 0 can mean "not started".
    (epoch().elapsed().as_nanos() as u64).max(1)
}

/// One finished op.
#[derive(Clone, Debug)]
pub struct TraceEvent {
    /// The op's name.
    pub name: String,
    /// The trace id of the thread that started it.
    pub tid: u64,
    /// Start, in nanoseconds since the process's trace epoch.
    pub start_ns: u64,
    /// Duration in nanoseconds (until its completion, for async ops).
    pub dur_ns: u64,
    /// The op's priority.
    pub priority: i32,
    /// The op's context, as text.
    pub ctx: String,
    /// Whether the op failed or was skipped.
    pub failed: bool,
}

/// Events kept before new ones are dropped (about 100 bytes each), so that a
/// profile left on in a long job cannot eat the memory.
pub(crate) const MAX_EVENTS: usize = 4_000_000;

pub(crate) struct Profiler {
    enabled: AtomicBool,
    /// The configured file was written (it is written once).
    flushed: AtomicBool,
    events: Mutex<Vec<TraceEvent>>,
    dropped: AtomicU64,
}

impl Profiler {
    pub(crate) fn new(enabled: bool) -> Profiler {
        epoch();
        Profiler {
            enabled: AtomicBool::new(enabled),
            flushed: AtomicBool::new(false),
            events: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub(crate) fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub(crate) fn start(&self, op: &Op) {
        let tid = u32::try_from(current_tid()).unwrap_or(u32::MAX);
        op.start_tid.store(tid, Ordering::Relaxed);
        op.start_ns.store(now_ns(), Ordering::Release);
    }

    pub(crate) fn end(&self, op: &Op, failed: bool) {
        let start = op.start_ns.load(Ordering::Acquire);
        let (start, tid) = if start == 0 {
            // Skipped or stopped: never started; record a zero-length event.
            (now_ns(), current_tid())
        } else {
            (start, u64::from(op.start_tid.load(Ordering::Relaxed)))
        };
        let event = TraceEvent {
            name: op.name.to_string(),
            tid,
            start_ns: start,
            dur_ns: now_ns().saturating_sub(start),
            priority: op.priority,
            ctx: op.ctx.get().to_string(),
            failed,
        };
        self.push(event);
    }

    /// A part of the op running on this thread (`RunContext::record`).
    pub(crate) fn part(
        &self,
        name: &str,
        detail: &str,
        start: Instant,
        end: Instant,
        priority: i32,
    ) {
        let ns = |t: Instant| (t.saturating_duration_since(epoch()).as_nanos() as u64).max(1);
        self.push(TraceEvent {
            name: name.to_string(),
            tid: current_tid(),
            start_ns: ns(start),
            dur_ns: end.saturating_duration_since(start).as_nanos() as u64,
            priority,
            ctx: detail.to_string(),
            failed: false,
        });
    }

    fn push(&self, event: TraceEvent) {
        let mut events = self.events.lock();
        if events.len() < MAX_EVENTS {
            events.push(event);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// True the first time only: whoever gets it writes the configured
    /// file.
    pub(crate) fn mark_flushed(&self) -> bool {
        !self.flushed.swap(true, Ordering::AcqRel)
    }

    /// The events recorded so far, taken.
    pub(crate) fn take(&self) -> Vec<TraceEvent> {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!("profiler: {dropped} op events dropped beyond {MAX_EVENTS}; take the profile more often");
        }
        std::mem::take(&mut *self.events.lock())
    }
}

/// Writes `events` as Chrome trace JSON to `path`.
pub fn write_chrome_trace(events: &[TraceEvent], path: &Path) -> Result<(), EngineError> {
    let io = |source| EngineError::Io {
        what: "the profile",
        path: path.display().to_string(),
        source,
    };
    // A profile directory (`PSKV_PROFILE=DIR/`) is made if missing.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let file = std::fs::File::create(path).map_err(io)?;
    let mut out = std::io::BufWriter::new(file);
    out.write_all(chrome_trace_json(events).as_bytes())
        .and_then(|_| out.flush())
        .map_err(io)
}

/// The Chrome trace JSON of `events`: one complete ("X") event per op, in
/// microseconds since this process's trace origin, a thread-name metadata
/// event per thread, the process's name (its `DMLC_ROLE` and pid), and in
/// `otherData` the origin's wall-clock time (`pskv_origin_unix_us`).
pub fn chrome_trace_json(events: &[TraceEvent]) -> String {
    use serde_json::{json, Value};
    let pid = std::process::id();
    let role = std::env::var("DMLC_ROLE")
        .ok()
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "process".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut list: Vec<Value> = Vec::with_capacity(events.len() + 8);
    list.push(json!({"name": "process_name", "ph": "M", "pid": pid,
                     "args": {"name": format!("{role} (pid {pid})")}}));
    let names = THREAD_NAMES.lock().clone();
    for (tid, name) in names {
        list.push(
            json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                         "args": {"name": name}}),
        );
    }
    for e in events {
        list.push(json!({
            "name": e.name, "cat": "op", "ph": "X", "pid": pid, "tid": e.tid,
            "ts": e.start_ns as f64 / 1000.0, "dur": e.dur_ns as f64 / 1000.0,
            "args": {"priority": e.priority, "ctx": e.ctx, "failed": e.failed},
        }));
    }
    json!({
        "traceEvents": list,
        "displayTimeUnit": "ms",
        "otherData": {"pskv_origin_unix_us": origin().1, "pskv_role": role, "pskv_pid": pid,
                      "pskv_host": host},
    })
    .to_string()
}
