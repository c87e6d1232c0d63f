//! Push-pull round trips over the transport, beside a raw-socket baseline
//! measured in the same run: two processes exchanging the same bytes over a
//! plain TCP socket (`pskv-net raw-echo` / `raw-client`).
//!
//! Run: `cargo bench -p pskv-net --bench pushpull`
//! (`PSKV_BENCH_SIZES=4,4K,1M` narrows the sweep; `PSKV_BENCH_REPEAT=n`
//! runs every configuration n times (default 3) and keeps, per size, the run
//! with the median result; `PSKV_BENCH_JSON=path` writes the lines as JSON.)
//!
//! For each van (tcp, shm) and cluster shape (1 worker and 1 server, 4
//! workers and 2 servers), every worker times push-pull rounds of each size against an
//! echoing server (values of 1 MiB and more are split over all servers, as
//! the kvstore splits big arrays). Reported: the median round trip across
//! workers, and the aggregate bandwidth (bytes each way per round, summed
//! over workers, over each worker's median round trip).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use pskv_test_support::{port_of, PortPipe, Procs};

const BIN: &str = env!("CARGO_BIN_EXE_pskv-net");

#[derive(Clone, Debug)]
struct Line {
    bytes: usize,
    median_us: f64,
}

fn parse(line: &str) -> Option<Line> {
    let field = |name: &str| -> Option<f64> {
        let at = line.find(&format!("\"{name}\":"))? + name.len() + 3;
        let rest = &line[at..];
        let end = rest.find([',', '}'])?;
        rest[..end].parse().ok()
    };
    Some(Line {
        bytes: field("bytes")? as usize,
        median_us: field("median_us")?,
    })
}

fn sizes() -> String {
    std::env::var("PSKV_BENCH_SIZES").unwrap_or_else(|_| "4,4K,64K,256K,1M,4M,16M,64M".into())
}

/// Per worker, per size: the median across repetitions.
fn run_pskv(van: &str, servers: u32, workers: u32) -> Vec<Vec<Line>> {
    let runs: Vec<Vec<Vec<Line>>> = (0..repeat())
        .map(|_| run_pskv_once(van, servers, workers))
        .collect();
    (0..workers as usize)
        .map(|w| median_run(runs.iter().map(|r| r[w].clone()).collect()))
        .collect()
}

fn run_pskv_once(van: &str, servers: u32, workers: u32) -> Vec<Vec<Line>> {
    let cmd = |role: &str, port: u16| {
        let mut c = Command::new(BIN);
        c.arg("node")
            .env("DMLC_ROLE", role)
            .env("DMLC_PS_ROOT_URI", "127.0.0.1")
            .env("DMLC_PS_ROOT_PORT", port.to_string())
            .env("DMLC_NUM_SERVER", servers.to_string())
            .env("DMLC_NUM_WORKER", workers.to_string())
            .env("PSKV_VAN", van)
            .env("PSKV_SHM_BYTES", (64u64 << 20).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        c
    };
    let mut procs = Procs(Vec::new());
    // The scheduler takes any free port and says which.
    let mut sched = cmd("scheduler", 0);
    let pipe = PortPipe::new().unwrap();
    pipe.attach(&mut sched);
    procs.0.push(sched.spawn().unwrap());
    let port = port_of(pipe);
    for _ in 0..servers {
        procs.0.push(cmd("server", port).spawn().unwrap());
    }
    for _ in 0..workers {
        procs.0.push(
            cmd("worker", port)
                .args(["--mode", "pushpull", "--sizes", &sizes()])
                .spawn()
                .unwrap(),
        );
    }
    let mut out = Vec::new();
    for c in procs.0.iter_mut().skip(1 + servers as usize) {
        let lines: Vec<Line> = BufReader::new(c.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| parse(&l))
            .collect();
        let status = c.wait().unwrap();
        assert!(status.success(), "a {van} worker failed");
        out.push(lines);
    }
    out
}

fn repeat() -> usize {
    std::env::var("PSKV_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1)
}

/// Per size, the line of the run with the median round trip.
fn median_run(runs: Vec<Vec<Line>>) -> Vec<Line> {
    (0..runs[0].len())
        .map(|i| {
            let mut at: Vec<Line> = runs.iter().map(|r| r[i].clone()).collect();
            at.sort_by(|a, b| a.median_us.total_cmp(&b.median_us));
            at[at.len() / 2].clone()
        })
        .collect()
}

fn run_raw() -> Vec<Line> {
    median_run((0..repeat()).map(|_| run_raw_once()).collect())
}

fn run_raw_once() -> Vec<Line> {
    let mut echo = Command::new(BIN)
        .args(["raw-echo", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(echo.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let port = first.trim().trim_start_matches("listening=").to_string();
    let client = Command::new(BIN)
        .args([
            "raw-client",
            &format!("127.0.0.1:{port}"),
            "--sizes",
            &sizes(),
        ])
        .output()
        .unwrap();
    let _ = echo.kill();
    let _ = echo.wait();
    String::from_utf8_lossy(&client.stdout)
        .lines()
        .filter_map(parse)
        .collect()
}

/// One configuration's results: van, workers, servers, and per size the
/// bytes, the median round trip (µs) and the aggregate bandwidth (GB/s).
type Config = (String, u32, u32, Vec<(usize, f64, f64)>);

fn human(n: usize) -> String {
    match n {
        n if n >= 1 << 20 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn main() {
    // cargo bench passes --bench; a filter argument is not supported here.
    let mut json = Vec::new();
    println!("raw socket baseline (1 pair)...");
    let raw = run_raw();
    for l in &raw {
        json.push(format!(
            "{{\"system\":\"raw_tcp\",\"workers\":1,\"servers\":1,\"bytes\":{},\"median_us\":{:.2},\"GBps\":{:.4}}}",
            l.bytes,
            l.median_us,
            l.bytes as f64 / l.median_us / 1e3
        ));
    }
    let mut table: Vec<Config> = Vec::new();
    for (servers, workers) in [(1u32, 1u32), (2, 4)] {
        for van in ["tcp", "shm"] {
            println!("pskv {van}, {workers} worker(s), {servers} server(s)...");
            let per_worker = run_pskv(van, servers, workers);
            let mut rows = Vec::new();
            for (i, first) in per_worker[0].iter().enumerate() {
                let mut medians: Vec<f64> = per_worker.iter().map(|w| w[i].median_us).collect();
                medians.sort_by(|a, b| a.total_cmp(b));
                let median = medians[medians.len() / 2];
                let agg: f64 = per_worker
                    .iter()
                    .map(|w| w[i].bytes as f64 / w[i].median_us / 1e3)
                    .sum();
                rows.push((first.bytes, median, agg));
                json.push(format!(
                    "{{\"system\":\"pskv\",\"van\":\"{van}\",\"workers\":{workers},\"servers\":{servers},\"bytes\":{},\"median_us\":{median:.2},\"GBps\":{agg:.4}}}",
                    first.bytes
                ));
            }
            table.push((van.to_string(), workers, servers, rows));
        }
    }
    println!();
    println!("| size | raw tcp | tcp 1w1s | shm 1w1s | tcp 4w2s | shm 4w2s | tcp/raw 1w1s | shm/tcp 1w1s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (i, r) in raw.iter().enumerate() {
        let raw_bw = r.bytes as f64 / r.median_us / 1e3;
        let cell = |t: &Config| {
            let (_, us, bw) = t.3[i];
            if r.bytes < 65536 {
                format!("{us:.1} µs")
            } else {
                format!("{bw:.2} GB/s")
            }
        };
        let raw_cell = if r.bytes < 65536 {
            format!("{:.1} µs", r.median_us)
        } else {
            format!("{raw_bw:.2} GB/s")
        };
        let tcp1 = table[0].3[i].2;
        let shm1 = table[1].3[i].2;
        println!(
            "| {} | {raw_cell} | {} | {} | {} | {} | {:.2} | {:.2} |",
            human(r.bytes),
            cell(&table[0]),
            cell(&table[1]),
            cell(&table[2]),
            cell(&table[3]),
            tcp1 / raw_bw,
            shm1 / tcp1
        );
    }
    if let Ok(path) = std::env::var("PSKV_BENCH_JSON") {
        let mut f = std::fs::File::create(&path).unwrap();
        for l in json {
            writeln!(f, "{l}").unwrap();
        }
        println!("JSON: {path}");
    }
    std::thread::sleep(Duration::from_millis(10));
}
