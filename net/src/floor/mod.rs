//! `pskv-net floor`: the floor of a parameter-server round over TCP
//! loopback, in Rust (the twin of `scripts/raw_tcp_ps.py` that issue 16
//! allows), with the server's sum or without it.
//!
//! ```text
//! pskv-net floor [--workers 2] [--servers 1] [--sizes 4MiB,32MiB | --tensors FILE]
//!     [--rounds 30] [--sndbuf 262144] [--part 1MiB] [--sum]
//! ```
//!
//! W worker processes each push their tensors to S server processes and
//! get an answer of the same size back, over plain blocking sockets; no
//! parameter server over TCP moves fewer bytes. What it adds to the
//! Python floor, so that it is a floor for a pipelined server too:
//!
//! - Each server's share of a tensor is cut into parts of at most `--part`
//!   bytes (0: whole shares), as pskv cuts its keys
//!   (`PSKV_PARTITION_BYTES`, 1 MiB over TCP by default); a server answers
//!   a part as soon as every worker's push of it is in, while later parts
//!   still arrive, in whatever order parts complete (a header names the
//!   part).
//! - Every connection has a reading thread and a writing thread at both
//!   ends (a worker reads its answers while it still pushes), so nothing
//!   waits on a socket that another thread could serve.
//! - `--sum`: the server's answer is the sum of the workers' pushes
//!   (float32, added in rank order, one pass per part by the thread whose
//!   read completed the part, in cache-sized chunks); without it each
//!   worker gets its own push back once every worker's is in (the
//!   dependency of a round, without its arithmetic).
//!
//! Workloads, sharding and alignment are the Python floor's: `--sizes`,
//! one tensor a round per size; `--tensors` (`pskv bench --model NAME
//! --print-tensors`), every tensor in one round, the last first; each
//! tensor's elements split evenly over the servers; a 64-byte header per
//! message and payloads padded to 64 bytes, from and into buffers on
//! 64-byte bounds (`scripts/raw_tcp_ps.py`'s "Alignment"). A worker's
//! round is timed from the moment its threads start it to the moment its
//! last answer is in; each worker reports the median of its rounds after
//! the first fifth, and the line and the `RESULT {json}` give the mean
//! over workers, with the fields of `pskv bench`'s cases.
//!
//! Processes: this command starts the servers (`floor-server`, which print
//! their port) and then the workers (`floor-worker --rank R`), all this
//! binary, and waits for them; a process that fails (a thread that fails
//! or panics ends its process) exits 1 with its reason, and the others are
//! then stopped. A child also ends when its standard input closes: the
//! driver holds the other end, so children never outlive it, even when it
//! is killed. Every socket read and write, every wait for a connection or
//! a port, and the whole run have a time bound.

mod server;
mod wire;
mod worker;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{parse_size, Args, NetError};

pub(crate) use server::floor_server;
pub(crate) use worker::floor_worker;

/// How long one socket read or write, or one wait of a thread for another,
/// may take before the process gives up.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one workload's processes may run in all.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// One workload, as every process of a run sees it.
#[derive(Clone, Debug)]
struct Workload {
    workers: usize,
    servers: usize,
    /// Bytes of each tensor, in send order (a multiple of 4).
    sizes: Vec<usize>,
    rounds: usize,
    /// `SO_SNDBUF` of every socket (0: the kernel's autotuning).
    sndbuf: usize,
    /// The largest part (0: whole shares).
    part: usize,
    sum: bool,
}

impl Workload {
    fn parse(args: &Args, sizes: Vec<usize>) -> Result<Workload, NetError> {
        let w = Workload {
            workers: args.num("--workers", 2usize)?,
            servers: args.num("--servers", 1usize)?,
            sizes,
            rounds: args.num("--rounds", 30usize)?,
            sndbuf: args.num("--sndbuf", 262_144usize)?,
            part: match args.value("--part") {
                None => 1 << 20,
                Some(v) => parse_size(&v)
                    .ok_or_else(|| NetError::Usage(format!("--part: '{v}' is not a size")))?,
            },
            sum: args.rest.iter().any(|a| a == "--sum"),
        };
        if w.workers == 0 || w.servers == 0 || w.rounds == 0 {
            return Err(NetError::Usage(
                "--workers, --servers and --rounds take 1 or more".into(),
            ));
        }
        if w.sizes.is_empty() || w.sizes.iter().any(|&n| n == 0 || n % 4 != 0) {
            return Err(NetError::Usage(
                "every tensor needs a size that is a positive multiple of 4 bytes (float32)".into(),
            ));
        }
        if w.part % wire::ALIGN != 0 {
            return Err(NetError::Usage(format!(
                "--part must be a multiple of {} bytes",
                wire::ALIGN
            )));
        }
        Ok(w)
    }

    /// The arguments that describe this workload to a child process.
    fn to_args(&self) -> Vec<String> {
        let sizes: Vec<String> = self.sizes.iter().map(|n| n.to_string()).collect();
        let mut a = vec![
            "--workers".into(),
            self.workers.to_string(),
            "--servers".into(),
            self.servers.to_string(),
            "--sizes".into(),
            sizes.join(","),
            "--rounds".into(),
            self.rounds.to_string(),
            "--sndbuf".into(),
            self.sndbuf.to_string(),
            "--part".into(),
            self.part.to_string(),
        ];
        if self.sum {
            a.push("--sum".into());
        }
        a
    }

    /// The byte lengths of the parts exchanged with server `k` in a round,
    /// in send order: each tensor's share of the server (its elements split
    /// evenly, the first servers taking one more), cut into parts of at
    /// most `part` bytes.
    fn parts(&self, k: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for &n in &self.sizes {
            let elems = n / 4;
            let share = 4 * (elems / self.servers + usize::from(k < elems % self.servers));
            if share == 0 {
                continue;
            }
            if self.part == 0 {
                out.push(share);
                continue;
            }
            let mut at = 0;
            while at < share {
                let len = self.part.min(share - at);
                out.push(len);
                at += len;
            }
        }
        out
    }
}

/// A child process of a run, stopped (killed and reaped) when dropped.
struct Proc {
    what: String,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Starts `cmd` of this binary; its standard input is a pipe the `Proc`
/// holds (`watchdog`: the child ends when it closes).
fn spawn(what: String, cmd: &str, args: Vec<String>) -> Result<Proc, NetError> {
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .arg(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    Ok(Proc { what, child })
}

/// The port a server prints first, read within `IO_TIMEOUT`.
fn port_of(p: &mut Proc) -> Result<u16, NetError> {
    let out = p.child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    // The thread ends when the server prints its line or its stdout closes
    // (it exits, or is stopped with the run).
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(BufReader::new(out).read_line(&mut line).map(|_| line));
    });
    let line = rx.recv_timeout(IO_TIMEOUT).map_err(|_| {
        NetError::Failed(format!(
            "{} did not say its port within {} s",
            p.what,
            IO_TIMEOUT.as_secs()
        ))
    })??;
    line.trim()
        .strip_prefix("port=")
        .and_then(|v| v.parse::<u16>().ok())
        .ok_or_else(|| NetError::Failed(format!("{} did not say its port", p.what)))
}

/// Runs one workload; the mean over workers of their median round, in
/// seconds.
fn run(w: &Workload) -> Result<f64, NetError> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut servers = Vec::new();
    let mut ports = Vec::new();
    for k in 0..w.servers {
        let mut args = w.to_args();
        args.extend(["--index".into(), k.to_string()]);
        let mut p = spawn(format!("server {k}"), "floor-server", args)?;
        ports.push(port_of(&mut p)?.to_string());
        servers.push(p);
    }
    let mut args = w.to_args();
    args.push("--ports".into());
    args.push(ports.join(","));
    let mut workers = Vec::new();
    for r in 0..w.workers {
        let mut args = args.clone();
        args.extend(["--rank".into(), r.to_string()]);
        workers.push(spawn(format!("worker {r}"), "floor-worker", args)?);
    }
    // Every process must exit 0 in time; the first that does not ends the
    // run (the `Proc`s left are stopped when dropped).
    let mut left: Vec<&mut Proc> = workers.iter_mut().chain(servers.iter_mut()).collect();
    while !left.is_empty() {
        let mut i = 0;
        while i < left.len() {
            match left[i].child.try_wait()? {
                None => i += 1,
                Some(st) if st.success() => {
                    left.swap_remove(i);
                }
                Some(st) => {
                    return Err(NetError::Failed(format!("{} failed ({st})", left[i].what)));
                }
            }
        }
        if Instant::now() > deadline {
            let who: Vec<&str> = left.iter().map(|p| p.what.as_str()).collect();
            return Err(NetError::Failed(format!(
                "the run took more than {} s; still running: {}",
                RUN_TIMEOUT.as_secs(),
                who.join(", ")
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut medians = Vec::new();
    for p in &mut workers {
        let mut text = String::new();
        p.child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut text)?;
        let m = text
            .lines()
            .find_map(|l| l.strip_prefix("median_s="))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| NetError::Failed(format!("{} printed no median", p.what)))?;
        medians.push(m);
    }
    Ok(medians.iter().sum::<f64>() / medians.len() as f64)
}

/// The tensors' sizes in bytes from a `--print-tensors` file, the last
/// tensor first (the order a framework pushes gradients in).
fn tensor_sizes(path: &str) -> Result<Vec<usize>, NetError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| NetError::Usage(format!("--tensors {path}: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| NetError::Usage(format!("--tensors {path}: {e}")))?;
    let list = v
        .as_array()
        .ok_or_else(|| NetError::Usage(format!("--tensors {path}: not a JSON list")))?;
    let mut sizes = Vec::with_capacity(list.len());
    for t in list.iter().rev() {
        let shape = t
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| NetError::Usage(format!("--tensors {path}: a tensor has no shape")))?;
        let mut n = 4usize;
        for d in shape {
            let d = d.as_u64().ok_or_else(|| {
                NetError::Usage(format!("--tensors {path}: a shape holds a non-number"))
            })?;
            n = n
                .checked_mul(d as usize)
                .ok_or_else(|| NetError::Usage(format!("--tensors {path}: a tensor too large")))?;
        }
        sizes.push(n);
    }
    Ok(sizes)
}

/// `pskv-net floor`: runs each workload and prints its line and the
/// `RESULT` line.
pub(crate) fn floor(args: &Args) -> Result<(), NetError> {
    let mut loads: Vec<(String, Vec<usize>)> = Vec::new();
    if let Some(path) = args.value("--tensors") {
        let name = std::path::Path::new(&path)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tensors".into());
        loads.push((name, tensor_sizes(&path)?));
    } else {
        let sizes = match args.value("--sizes") {
            None => vec![4 << 20, 32 << 20],
            Some(_) => args.sizes()?,
        };
        loads.extend(sizes.into_iter().map(|n| (format!("{n}B"), vec![n])));
    }
    // Every workload checked before the first runs.
    let loads = loads
        .into_iter()
        .map(|(name, sizes)| Ok((name, Workload::parse(args, sizes)?)))
        .collect::<Result<Vec<_>, NetError>>()?;
    let mut cases = Vec::new();
    for (name, w) in &loads {
        let m = run(w)?;
        let total: usize = w.sizes.iter().sum();
        println!(
            "rust tcp floor{}, {} clients, {} servers, {name} ({total} bytes in {} tensors): {:.2} ms per round ({:.3} GB/s per client)",
            if w.sum { " with sums" } else { "" },
            w.workers,
            w.servers,
            w.sizes.len(),
            m * 1e3,
            total as f64 / m / 1e9
        );
        cases.push(serde_json::json!({
            "case": name, "bytes": total, "nkeys": w.sizes.len(), "iters": w.rounds,
            "check_ok": true, "median_us": m * 1e6, "algbw_gbps_median": total as f64 / m / 1e9,
        }));
    }
    // `--workers` and `--servers` are the same in every workload.
    let w = &loads.first().expect("at least one workload").1;
    println!(
        "RESULT {}",
        serde_json::json!({"num_workers": w.workers, "num_servers": w.servers, "cases": cases})
    );
    Ok(())
}

/// A child's guards: it ends (exit status 1, with the reason) when any of
/// its threads panics, when its standard input closes (the driver that
/// holds the other end is gone), or when it runs longer than a whole run
/// may.
fn watchdog(who: &'static str) {
    std::panic::set_hook(Box::new(move |info| wire::die(who, info)));
    std::thread::spawn(move || {
        // Nothing is ever written; the read returns at the pipe's end.
        let _ = std::io::stdin().read(&mut [0u8; 1]);
        wire::die(who, "the driver is gone (its pipe to this process closed)");
    });
    std::thread::spawn(move || {
        std::thread::sleep(RUN_TIMEOUT + Duration::from_secs(30));
        wire::die(who, "ran past the run's time bound");
    });
}

/// The workload of a child process (`--sizes` in bytes, as `to_args`
/// wrote them: required here, not defaulted).
fn child_workload(args: &Args) -> Result<Workload, NetError> {
    if args.value("--sizes").is_none() {
        return Err(NetError::Usage("--sizes is needed".into()));
    }
    Workload::parse(args, args.sizes()?)
}

/// A child's place among `count` of its kind (`--index` of a server,
/// `--rank` of a worker), required and checked.
fn place(args: &Args, flag: &str, count: usize, kind: &str) -> Result<usize, NetError> {
    let at: usize = args.num(flag, usize::MAX)?;
    if at >= count {
        return Err(NetError::Usage(format!(
            "{flag} must name one of the {count} {kind}"
        )));
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(servers: usize, part: usize, sizes: Vec<usize>) -> Workload {
        Workload {
            workers: 2,
            servers,
            sizes,
            rounds: 1,
            sndbuf: 0,
            part,
            sum: true,
        }
    }

    #[test]
    fn parts_split_elements_over_servers_then_cut() {
        // 10 elements over 3 servers: 4, 3, 3 elements.
        let w = load(3, 8, vec![40]);
        assert_eq!(w.parts(0), vec![8, 8]);
        assert_eq!(w.parts(1), vec![8, 4]);
        assert_eq!(w.parts(2), vec![8, 4]);
        // Whole shares; a tensor smaller than the servers skips the last.
        let w = load(2, 0, vec![4, 4 << 20]);
        assert_eq!(w.parts(0), vec![4, 2 << 20]);
        assert_eq!(w.parts(1), vec![2 << 20]);
        // Every byte is in exactly one part.
        let w = load(2, 1 << 20, vec![4 << 20, 12, 33_554_436]);
        let total: usize = (0..2).flat_map(|k| w.parts(k)).sum();
        assert_eq!(total, (4 << 20) + 12 + 33_554_436);
        assert!((0..2).flat_map(|k| w.parts(k)).all(|p| p <= 1 << 20));
    }

    #[test]
    fn child_arguments_round_trip() {
        let w = load(2, 1 << 20, vec![4096, 8]);
        let back = child_workload(&Args { rest: w.to_args() }).unwrap();
        assert_eq!(format!("{w:?}"), format!("{back:?}"));
    }

    #[test]
    fn bad_workloads_are_refused() {
        let args = |v: &[&str]| Args {
            rest: v.iter().map(|s| s.to_string()).collect(),
        };
        assert!(Workload::parse(&args(&[]), vec![6]).is_err());
        assert!(Workload::parse(&args(&["--workers", "0"]), vec![8]).is_err());
        assert!(Workload::parse(&args(&["--part", "100"]), vec![8]).is_err());
        assert!(Workload::parse(&args(&[]), vec![8]).is_ok());
    }
}
