//! The transport's part of a profile (`PSKV_PROFILE`): every request and
//! answer a node sends or takes, as a short slice on the thread that did it,
//! with flow events that link a worker's request to the server's handling
//! of it and the answer back to the worker (Perfetto draws them as arrows
//! once `pskv trace merge` has joined the processes' files).
//!
//! Off unless `PSKV_PROFILE` is set: then one relaxed load per frame. The
//! events go to `<role>-<pid>-transport.json` next to the engine's file when
//! the node shuts down (see [`write`]); the scheduler, which runs no engine,
//! writes one too.
//!
//! A flow's id is computed alike on both ends from what both know: the
//! requester's and the responder's node ids, the request id, and which way
//! the frame goes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use parking_lot::Mutex;

use crate::protocol::{describe, NodeId, Role};
use crate::status::ClockOffset;

/// Events kept before new ones are dropped (about 64 bytes each).
const MAX_EVENTS: usize = 4_000_000;

/// What happened to a frame here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hop {
    /// This node sent a request (the flow to the responder starts).
    RequestOut,
    /// This node took a request (the flow from the requester ends).
    RequestIn,
    /// This node sent an answer (the flow back starts).
    AnswerOut,
    /// This node took an answer (the flow back ends).
    AnswerIn,
}

struct Event {
    hop: Hop,
    peer: NodeId,
    request_id: u64,
    flow: u64,
    ts_ns: u64,
    tid: u64,
}

struct Recorder {
    /// The process's trace origin and the wall-clock time (µs since the
    /// Unix epoch) it stands for.
    origin: (Instant, u64),
    events: Mutex<Vec<Event>>,
    dropped: AtomicU64,
}

fn recorder() -> Option<&'static Recorder> {
    static REC: OnceLock<Option<Recorder>> = OnceLock::new();
    REC.get_or_init(|| {
        crate::config::profile_spec().map(|_| Recorder {
            origin: (Instant::now(), crate::status::unix_us()),
            events: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
        })
    })
    .as_ref()
}

/// Transport thread ids start here, clear of the engine's (which count
/// from 1), since a process's two files share one track group.
static NEXT_TID: AtomicU64 = AtomicU64::new(1 << 20);
static THREAD_NAMES: Mutex<BTreeMap<u64, String>> = Mutex::new(BTreeMap::new());

thread_local! {
    static TID: u64 = {
        let tid = NEXT_TID.fetch_add(1, Ordering::Relaxed);
        let name = std::thread::current().name().unwrap_or("thread").to_string();
        THREAD_NAMES.lock().insert(tid, format!("{name} (transport)"));
        tid
    };
}

/// The id of the flow of request `request_id` from `requester` to
/// `responder` (`back`: its answer's way).
fn flow_id(requester: NodeId, responder: NodeId, request_id: u64, back: bool) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in [requester as u64, responder as u64, request_id, back as u64] {
        for b in x.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    // Chrome trace ids must fit a double exactly.
    h >> 11
}

/// Records `hop` of request `request_id` between this node (`me`) and
/// `peer`; nothing when profiling is off.
pub(crate) fn record(hop: Hop, me: NodeId, peer: NodeId, request_id: u64) {
    let Some(rec) = recorder() else { return };
    let (requester, responder) = match hop {
        Hop::RequestOut | Hop::AnswerIn => (me, peer),
        Hop::RequestIn | Hop::AnswerOut => (peer, me),
    };
    let back = matches!(hop, Hop::AnswerOut | Hop::AnswerIn);
    let event = Event {
        hop,
        peer,
        request_id,
        flow: flow_id(requester, responder, request_id, back),
        ts_ns: rec.origin.0.elapsed().as_nanos() as u64,
        tid: TID.with(|t| *t),
    };
    let mut events = rec.events.lock();
    if events.len() < MAX_EVENTS {
        events.push(event);
    } else {
        rec.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// This process's transport profile file for `spec`: as the engine's
/// (`<role>-<pid>.json` in a directory, `{role}`/`{pid}` replaced in a
/// path) with `-transport` before the extension.
pub(crate) fn path_for(spec: &str, role: &str, pid: u32) -> PathBuf {
    if spec.ends_with('/') || std::path::Path::new(spec).is_dir() {
        return PathBuf::from(spec).join(format!("{role}-{pid}-transport.json"));
    }
    let p = PathBuf::from(
        spec.replace("{role}", role)
            .replace("{pid}", &pid.to_string()),
    );
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = p
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    p.with_file_name(format!("{stem}-transport{ext}"))
}

/// The Chrome trace JSON of the recorded events: a 1 µs slice per hop on
/// its thread, with a flow start or end bound to it.
fn json(rec: &Recorder, role: &str, me: NodeId) -> serde_json::Value {
    use serde_json::json;
    let pid = std::process::id();
    let mut list = vec![json!({"name": "process_name", "ph": "M", "pid": pid,
                               "args": {"name": format!("{role} (pid {pid})")}})];
    for (tid, name) in THREAD_NAMES.lock().iter() {
        list.push(
            json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                         "args": {"name": name}}),
        );
    }
    for e in rec.events.lock().iter() {
        let ts = e.ts_ns as f64 / 1000.0;
        let (name, flow_ph) = match e.hop {
            Hop::RequestOut => ("request out", "s"),
            Hop::RequestIn => ("request in", "f"),
            Hop::AnswerOut => ("answer out", "s"),
            Hop::AnswerIn => ("answer in", "f"),
        };
        let args = json!({"peer": describe(e.peer), "request_id": e.request_id});
        list.push(
            json!({"name": name, "cat": "transport", "ph": "X", "pid": pid,
                         "tid": e.tid, "ts": ts, "dur": 1.0, "args": args}),
        );
        let mut flow = json!({"name": "request", "cat": "transport", "ph": flow_ph,
                              "pid": pid, "tid": e.tid, "ts": ts, "id": e.flow});
        if flow_ph == "f" {
            flow["bp"] = json!("e");
        }
        list.push(flow);
    }
    json!({
        "traceEvents": list,
        "displayTimeUnit": "ms",
        "otherData": {"pskv_origin_unix_us": rec.origin.1, "pskv_role": role,
                      "pskv_pid": pid, "pskv_node": describe(me),
                      "pskv_host": crate::postoffice::hostname()},
    })
}

/// Writes this process's transport profile (once a node of `role`, id
/// `me`, shuts down); nothing when profiling is off.
pub(crate) fn write(role: Role, me: NodeId, clock: Option<ClockOffset>) {
    let (Some(rec), Some(spec)) = (recorder(), crate::config::profile_spec()) else {
        return;
    };
    let dropped = rec.dropped.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        tracing::warn!("transport profile: {dropped} events dropped beyond {MAX_EVENTS}");
    }
    let role = role.to_string();
    let path = path_for(spec, &role, std::process::id());
    let mut v = json(rec, &role, me);
    if let Some(c) = clock {
        v["otherData"]["pskv_clock_offset_us"] = c.offset_us.into();
        v["otherData"]["pskv_clock_rtt_us"] = c.rtt_us.into();
    }
    let text = v.to_string();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&path, text) {
        tracing::warn!("writing the transport profile {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends of a hop compute the same flow id; the way back differs.
    #[test]
    fn both_ends_name_a_flow_alike() {
        let (w, s, r) = (9, 8, 1234);
        let out = flow_id(w, s, r, false);
        assert_eq!(out, flow_id(w, s, r, false));
        assert_ne!(out, flow_id(w, s, r, true));
        assert_ne!(out, flow_id(w, s, r + 1, false));
        assert_ne!(out, flow_id(s, w, r, false));
        assert!(out < 1 << 53);
    }

    #[test]
    fn transport_files_sit_beside_the_engines() {
        assert_eq!(
            path_for("/no/such/dir/", "worker", 3),
            PathBuf::from("/no/such/dir/worker-3-transport.json")
        );
        assert_eq!(
            path_for("/t/{role}-{pid}.json", "server", 4),
            PathBuf::from("/t/server-4-transport.json")
        );
        assert_eq!(
            path_for("/t/trace", "scheduler", 5),
            PathBuf::from("/t/trace-transport")
        );
    }
}
