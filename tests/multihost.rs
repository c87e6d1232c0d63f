//! Two "hosts" on one machine: network namespaces joined through this test
//! process by veth pairs. Host A runs the scheduler and a server, host B
//! two workers; every connection from B to A goes through a proxy here
//! that delays each direction by 20 ms, and both hosts drop 2% of the
//! packets they receive (nftables `numgen random`). The demo's training
//! across them must give the same weights, to the bit, as on loopback.
//!
//! ```text
//!   ns B (workers) 10.231.1.2 ── veth ── 10.231.1.1 [this test: proxy] 10.231.2.1 ── veth ── 10.231.2.2 ns A (scheduler, server)
//! ```
//!
//! Needs root (namespaces, veth, nftables); without it the test says so
//! and skips, unless `PSKV_REQUIRE_MULTIHOST=1` (CI sets it: there a skip
//! would pass for a success), which makes that a failure. It removes its
//! namespaces and links however it ends.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Procs;

const DELAY: Duration = Duration::from_millis(20);
const LOSS_PERCENT: u32 = 2;

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespaces and links; removed on drop.
struct Net {
    a: String,
    b: String,
    va: String,
    vb: String,
}

impl Net {
    /// `Err` when this machine cannot make namespaces (not root, say): the
    /// test skips. Any later step that fails is a failure.
    fn new() -> Result<Net, String> {
        let id = std::process::id() % 100_000;
        let net = Net {
            a: format!("pskv-a-{id}"),
            b: format!("pskv-b-{id}"),
            va: format!("pka{id}"),
            vb: format!("pkb{id}"),
        };
        let probe = format!("pskv-probe-{id}");
        sh(&["ip", "netns", "add", &probe])?;
        let _ = sh(&["ip", "netns", "del", &probe]);
        if let Err(e) = Command::new("nft").arg("--version").output() {
            return Err(format!("nft (nftables) is not installed: {e}"));
        }
        if let Err(e) = net.build() {
            panic!("building the test network: {e}");
        }
        Ok(net)
    }

    fn build(&self) -> Result<(), String> {
        let (a, b, va, vb) = (&self.a, &self.b, &self.va, &self.vb);
        let (pa, pb) = (format!("{va}p"), format!("{vb}p"));
        for ns in [a, b] {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        for (v, p, ns, here, there) in [
            (va, &pa, a, "10.231.2.1/24", "10.231.2.2/24"),
            (vb, &pb, b, "10.231.1.1/24", "10.231.1.2/24"),
        ] {
            sh(&["ip", "link", "add", v, "type", "veth", "peer", "name", p])?;
            sh(&["ip", "link", "set", p, "netns", ns])?;
            sh(&["ip", "addr", "add", here, "dev", v])?;
            sh(&["ip", "link", "set", v, "up"])?;
            sh(&["ip", "-n", ns, "addr", "add", there, "dev", p])?;
            sh(&["ip", "-n", ns, "link", "set", p, "up"])?;
            // Each host drops LOSS_PERCENT% of what reaches it over the link.
            let rules = format!(
                "table inet pskvloss {{\n  chain input {{\n    type filter hook input priority 0;\n    \
                 iifname \"{p}\" numgen random mod 100 < {LOSS_PERCENT} counter drop\n  }}\n}}\n"
            );
            let file = std::env::temp_dir().join(format!("{p}.nft"));
            std::fs::write(&file, rules).map_err(|e| e.to_string())?;
            let r = sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "nft",
                "-f",
                &file.display().to_string(),
            ]);
            let _ = std::fs::remove_file(&file);
            r?;
        }
        Ok(())
    }

    /// Packets the loss rules dropped so far, on both hosts.
    fn dropped(&self) -> u64 {
        [&self.a, &self.b]
            .iter()
            .map(|ns| {
                let out = Command::new("ip")
                    .args([
                        "netns", "exec", ns, "nft", "list", "table", "inet", "pskvloss",
                    ])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                out.split_whitespace()
                    .skip_while(|w| *w != "packets")
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    fn exec(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = sh(&["ip", "link", "del", &self.va]);
        let _ = sh(&["ip", "link", "del", &self.vb]);
        let _ = sh(&["ip", "netns", "del", &self.a]);
        let _ = sh(&["ip", "netns", "del", &self.b]);
    }
}

/// Copies `from` to `to`, each chunk `DELAY` after it was read.
fn delayed_pump(mut from: TcpStream, mut to: TcpStream) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((Instant::now() + DELAY, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// A delaying proxy from `listener` (host B's side) to `target` (host A).
fn proxy(listener: TcpListener, target: SocketAddr) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client) = conn else { return };
            // Host A's node may not listen yet: keep trying a while.
            let end = Instant::now() + Duration::from_secs(30);
            let server = loop {
                match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                    Ok(s) => break Some(s),
                    Err(_) if Instant::now() < end => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    Err(_) => break None,
                }
            };
            let Some(server) = server else { continue };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || delayed_pump(client, server));
            std::thread::spawn(move || delayed_pump(s2, c2));
        }
    });
}

/// The demo's workers: 2 workers, 1 server, one epoch of 128-sample steps.
fn demo_args(weights: &Path) -> Vec<String> {
    common::DEMO_WORKER_2X1
        .iter()
        .chain(&["--batch", "128", "--weights-out"])
        .map(|s| s.to_string())
        .chain(std::iter::once(weights.display().to_string()))
        .collect()
}

#[test]
fn training_across_lossy_delayed_hosts_equals_loopback() {
    let pskv = env!("CARGO_BIN_EXE_pskv");
    let dir = std::env::temp_dir().join(format!("pskv-multihost-{}", std::process::id()));
    let net = match Net::new() {
        Ok(n) => n,
        Err(e) => {
            assert!(
                std::env::var("PSKV_REQUIRE_MULTIHOST").as_deref() != Ok("1"),
                "PSKV_REQUIRE_MULTIHOST=1, but the network namespaces cannot be built here: {e}"
            );
            eprintln!("skipped: cannot build the network namespaces here ({e})");
            return;
        }
    };
    std::fs::create_dir_all(&dir).unwrap();
    let token = format!("multihost-{}", std::process::id());

    // The reference: the same job on loopback.
    let loopback = dir.join("loopback.f32");
    let out = Command::new(pskv)
        .args(["launch", "-n", "2", "-s", "1", "--timeout", "120", "--env"])
        .arg("PSKV_VAN=tcp")
        .arg("--")
        .arg(pskv)
        .args(demo_args(&loopback))
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Host A listens on ports the proxy also listens on, on host B's side.
    let sched_l = TcpListener::bind("10.231.1.1:0").unwrap();
    let server_l = TcpListener::bind("10.231.1.1:0").unwrap();
    let (sp, vp) = (
        sched_l.local_addr().unwrap().port(),
        server_l.local_addr().unwrap().port(),
    );
    proxy(sched_l, format!("10.231.2.2:{sp}").parse().unwrap());
    proxy(server_l, format!("10.231.2.2:{vp}").parse().unwrap());
    let common = |c: &mut Command| {
        c.env("DMLC_NUM_WORKER", "2")
            .env("DMLC_NUM_SERVER", "1")
            .env("DMLC_PS_ROOT_PORT", sp.to_string())
            .env("PSKV_TOKEN", &token)
            .env("PSKV_VAN", "tcp")
            .env("PSKV_CONNECT_TIMEOUT", "60")
            .env("PSKV_KVSTORE_TIMEOUT", "120")
            .stdout(Stdio::null());
    };
    let (pa, pb) = (format!("{}p", net.va), format!("{}p", net.vb));
    let mut hosts = Procs(Vec::new());
    for role in ["scheduler", "server"] {
        let mut c = net.exec(&net.a, pskv);
        c.arg(role);
        common(&mut c);
        c.env("DMLC_ROLE", role)
            .env("DMLC_PS_ROOT_URI", "10.231.2.2")
            .env("DMLC_INTERFACE", &pa);
        if role == "server" {
            // Reached from host B through the proxy.
            c.env("DMLC_PORT", vp.to_string())
                .env("DMLC_NODE_HOST", "10.231.1.1");
        }
        hosts.0.push(c.spawn().unwrap());
    }
    let across = dir.join("across.f32");
    let t0 = Instant::now();
    let mut workers = Procs(Vec::new());
    for _ in 0..2 {
        let mut c = net.exec(&net.b, pskv);
        c.args(demo_args(&across));
        common(&mut c);
        c.env("DMLC_ROLE", "worker")
            .env("DMLC_PS_ROOT_URI", "10.231.1.1")
            .env("DMLC_INTERFACE", &pb);
        workers.0.push(c.spawn().unwrap());
    }
    workers.wait_success(Duration::from_secs(240), "the workers");
    let took = t0.elapsed();
    hosts.wait_success(Duration::from_secs(30), "the scheduler and server");
    let (a, b) = (
        std::fs::read(&loopback).unwrap(),
        std::fs::read(&across).unwrap(),
    );
    assert!(!a.is_empty());
    assert!(
        a == b,
        "the weights trained across the lossy, delayed link differ from loopback's"
    );
    let dropped = net.dropped();
    eprintln!(
        "{} bytes of weights equal; the run across hosts took {took:?} \
         ({LOSS_PERCENT}% loss: {dropped} packets dropped; {DELAY:?} each way)",
        a.len()
    );
    assert!(
        dropped > 0,
        "the loss rules dropped nothing: is the test testing?"
    );
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}
