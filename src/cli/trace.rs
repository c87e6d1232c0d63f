//! `pskv trace merge DIR -o job.json`: the profiles of a job's processes
//! (`PSKV_PROFILE=DIR/` gives one file per process) on one timeline that
//! Perfetto and chrome://tracing open, one track group per process.
//!
//! Each file's times count from its own process's trace origin; the file
//! says what wall-clock time that origin was (`otherData.
//! pskv_origin_unix_us`), and the merge shifts every file onto the earliest
//! origin. That aligns the processes of one host exactly (they share a
//! clock). Other hosts are put on the scheduler's clock: a server's or
//! worker's transport file says how far its host's clock is from the
//! scheduler's (`pskv_clock_offset_us`, measured over the heartbeats, right
//! to within half the sample's round trip, `pskv_clock_rtt_us`), and every
//! file of that host takes the estimate with the shortest round trip among
//! them, so the host's processes stay aligned with each other. The
//! scheduler's own host takes none; so does a host none of whose files has
//! an estimate (processes that ended before a heartbeat was answered).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::error::{CliError, CliResult};

/// One file's trace, read.
struct Trace {
    file: PathBuf,
    origin_us: u64,
    /// Its host's clock against the scheduler's, and the round trip of
    /// that estimate, if the file says.
    offset_us: Option<(i64, u64)>,
    /// The process it came from (host, role and pid), when the file says:
    /// the engine's and the transport's files of one process share a track
    /// group.
    process: Option<(String, String, u64)>,
    events: Vec<Value>,
}

/// What the files of one host say of its clock.
#[derive(Default)]
struct HostClock {
    /// The scheduler runs there: its clock is the reference.
    scheduler: bool,
    /// The estimate with the shortest round trip: offset and round trip.
    best: Option<(i64, u64)>,
}

/// The trace of `file`; None for the output of an earlier merge.
fn read(file: &Path) -> CliResult<Option<Trace>> {
    let text = std::fs::read_to_string(file)
        .map_err(CliError::io(format!("reading {}", file.display())))?;
    let bad = |why: &str| CliError::Usage(format!("{}: {why}", file.display()));
    let v: Value =
        serde_json::from_str(&text).map_err(|e| bad(&format!("not a JSON trace ({e})")))?;
    if v.pointer("/otherData/pskv_merged") == Some(&Value::Bool(true)) {
        return Ok(None);
    }
    let events = v
        .get("traceEvents")
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| bad("no traceEvents array"))?;
    let origin_us = v
        .pointer("/otherData/pskv_origin_unix_us")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("no pskv_origin_unix_us (not a pskv profile, or an old one)"))?;
    let field = |f: &str| {
        v.pointer(&format!("/otherData/{f}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let process = v
        .pointer("/otherData/pskv_pid")
        .and_then(Value::as_u64)
        .map(|pid| (field("pskv_host"), field("pskv_role"), pid));
    Ok(Some(Trace {
        file: file.to_path_buf(),
        origin_us,
        offset_us: v
            .pointer("/otherData/pskv_clock_offset_us")
            .and_then(Value::as_i64)
            .map(|o| {
                let rtt = v.pointer("/otherData/pskv_clock_rtt_us");
                (o, rtt.and_then(Value::as_u64).unwrap_or(u64::MAX))
            }),
        process,
        events,
    }))
}

/// The merged trace of every `*.json` file in `dir` (other files are left
/// alone; `out` is skipped if it lies there).
pub fn merge(dir: &Path, out: &Path) -> CliResult<Value> {
    let out = out.canonicalize().ok();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(CliError::io(format!(
            "reading the directory {}",
            dir.display()
        )))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter(|p| p.canonicalize().ok() != out)
        .collect();
    files.sort();
    if files.is_empty() {
        let d = dir.display();
        let why = format!("{d} holds no profile (*.json); run the job with PSKV_PROFILE={d}/");
        return Err(CliError::Usage(why));
    }
    let traces: Vec<Trace> = files
        .iter()
        .map(|f| read(f))
        .collect::<CliResult<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    if traces.is_empty() {
        return Err(CliError::Usage(format!(
            "{} holds only merged traces, no process's profile",
            dir.display()
        )));
    }
    // Each origin on the scheduler's clock, one correction per host (its
    // processes share a clock): none on the scheduler's own host, else the
    // estimate with the shortest round trip among the host's files. A file
    // that names no host is taken as it is.
    let mut hosts: BTreeMap<&str, HostClock> = BTreeMap::new();
    for t in &traces {
        let Some((host, role, _)) = &t.process else {
            continue;
        };
        let h = hosts.entry(host).or_default();
        h.scheduler |= role == "scheduler";
        if let Some(o) = t.offset_us.filter(|o| h.best.is_none_or(|b| o.1 < b.1)) {
            h.best = Some(o);
        }
    }
    let correction = |t: &Trace| {
        let host = t.process.as_ref().and_then(|p| hosts.get(p.0.as_str()));
        match host {
            Some(HostClock {
                scheduler: false,
                best: Some((offset, _)),
            }) => *offset,
            _ => 0,
        }
    };
    let origins: Vec<i128> = traces
        .iter()
        .map(|t| t.origin_us as i128 + correction(t) as i128)
        .collect();
    let first = origins.iter().copied().min().unwrap_or(0);
    let mut all = Vec::new();
    // Processes of several hosts may share pids: number them instead, one
    // number per process (its files share it), named once.
    let mut numbers: Vec<Option<(String, String, u64)>> = Vec::new();
    let mut named = std::collections::HashSet::new();
    for (t, origin) in traces.into_iter().zip(origins) {
        let pid = match t
            .process
            .as_ref()
            .and_then(|p| numbers.iter().position(|n| n.as_ref() == Some(p)))
        {
            Some(i) => i as u64 + 1,
            None => {
                numbers.push(t.process.clone());
                numbers.len() as u64
            }
        };
        let shift = (origin - first) as f64;
        for mut e in t.events {
            if let Some(o) = e.as_object_mut() {
                if o.get("name").and_then(Value::as_str) == Some("process_name")
                    && !named.insert(pid)
                {
                    continue;
                }
                o.insert("pid".into(), json!(pid));
                if let Some(ts) = o.get("ts").and_then(Value::as_f64) {
                    o.insert("ts".into(), json!(ts + shift));
                }
            }
            all.push(e);
        }
        if named.insert(pid) {
            let name = t
                .file
                .file_stem()
                .map_or_else(|| format!("process {pid}"), |s| s.to_string_lossy().into());
            all.push(json!({"name": "process_name", "ph": "M", "pid": pid,
                            "args": {"name": name}}));
        }
    }
    Ok(json!({
        "traceEvents": all,
        "displayTimeUnit": "ms",
        "otherData": {"pskv_origin_unix_us": u64::try_from(first).unwrap_or(0),
                      "pskv_merged": true},
    }))
}

/// `pskv trace merge`: writes the merged trace of `dir` to `out`; how many
/// processes it holds.
pub fn merge_to(dir: &Path, out: &Path) -> CliResult<usize> {
    let merged = merge(dir, out)?;
    let processes = merged["traceEvents"].as_array().map_or(0, |a| {
        a.iter().filter(|e| e["name"] == "process_name").count()
    });
    let text = serde_json::to_string(&merged)
        .map_err(|e| CliError::Failed(format!("encoding the merged trace: {e}")))?;
    std::fs::write(out, text).map_err(CliError::io(format!("writing {}", out.display())))?;
    Ok(processes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The merged trace's slices: (pid, start).
    fn slices(v: &Value) -> Vec<(u64, f64)> {
        v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ph"] == "X")
            .map(|e| (e["pid"].as_u64().unwrap(), e["ts"].as_f64().unwrap()))
            .collect()
    }

    fn trace(origin_us: u64, pid: u64, ts: f64) -> Value {
        json!({
            "traceEvents": [
                {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": format!("p{pid}")}},
                {"name": "op", "ph": "X", "pid": pid, "tid": 1, "ts": ts, "dur": 5.0},
            ],
            "otherData": {"pskv_origin_unix_us": origin_us},
        })
    }

    /// Two processes (with the same pid, as on two hosts) on one
    /// timeline: each its own track group, times shifted by their origins.
    #[test]
    fn traces_of_several_processes_share_one_timeline() {
        let dir = std::env::temp_dir().join(format!("pskv-trace-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.json"), trace(1_000, 7, 10.0).to_string()).unwrap();
        std::fs::write(dir.join("b.json"), trace(1_500, 7, 10.0).to_string()).unwrap();
        std::fs::write(dir.join("notes.txt"), "not a trace").unwrap();
        let out = dir.join("job.json");
        assert_eq!(merge_to(&dir, &out).unwrap(), 2);
        // Outputs in the same directory are not read back on a rerun, under
        // this name or another.
        assert_eq!(merge_to(&dir, &out).unwrap(), 2);
        assert_eq!(merge_to(&dir, &dir.join("again.json")).unwrap(), 2);
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let ops = slices(&v);
        assert_eq!(ops, vec![(1, 10.0), (2, 510.0)]);
        // Not a pskv profile: a clear error naming the file.
        std::fs::write(dir.join("c.json"), "{\"traceEvents\": []}").unwrap();
        let e = merge(&dir, &out).unwrap_err().to_string();
        assert!(
            e.contains("c.json") && e.contains("pskv_origin_unix_us"),
            "{e}"
        );
        std::fs::write(dir.join("c.json"), "garbage").unwrap();
        assert!(merge(&dir, &out)
            .unwrap_err()
            .to_string()
            .contains("c.json"));
        std::fs::remove_dir_all(&dir).unwrap();
        let e = merge(&dir, &out).unwrap_err().to_string();
        assert!(e.contains("reading the directory"), "{e}");
    }

    /// A host whose clock is 4 s ahead of the scheduler's: every file of
    /// it takes its best estimate (the shortest round trip), so its
    /// processes stay aligned with each other; the scheduler's own host
    /// takes no correction.
    #[test]
    fn clocks_of_other_hosts_are_corrected_by_their_offsets() {
        let dir = std::env::temp_dir().join(format!("pskv-trace-clock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str,
                     origin: u64,
                     (pid, role, host): (u64, &str, &str),
                     ts: f64,
                     clock: Option<(i64, u64)>| {
            let mut v = trace(origin, pid, ts);
            v["otherData"]["pskv_pid"] = json!(pid);
            v["otherData"]["pskv_host"] = json!(host);
            v["otherData"]["pskv_role"] = json!(role);
            if let Some((o, rtt)) = clock {
                v["otherData"]["pskv_clock_offset_us"] = json!(o);
                v["otherData"]["pskv_clock_rtt_us"] = json!(rtt);
            }
            std::fs::write(dir.join(name), v.to_string()).unwrap();
        };
        write("s.json", 1_000_000, (1, "scheduler", "h1"), 5.0, None);
        // On the scheduler's host: its estimate (off by its round trip) is
        // not used.
        write(
            "a.json",
            1_000_000,
            (3, "worker", "h1"),
            10.0,
            Some((250, 500)),
        );
        write(
            "b-transport.json",
            5_000_100,
            (3, "worker", "h2"),
            20.0,
            Some((-4_000_000, 100)),
        );
        write("b.json", 5_000_200, (3, "worker", "h2"), 30.0, None);
        write(
            "c.json",
            5_000_300,
            (4, "server", "h2"),
            40.0,
            Some((-4_000_400, 900)),
        );
        let v = merge(&dir, &dir.join("job.json")).unwrap();
        let mut ops = slices(&v);
        ops.sort_by(|a, b| a.1.total_cmp(&b.1));
        // Without the offsets, h2's events would sit 4 s later; with each
        // process's own, c's would sit 400 µs early.
        assert_eq!(
            ops,
            vec![(4, 5.0), (1, 10.0), (2, 120.0), (2, 230.0), (3, 340.0)]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
