//! `pskv-net`: a transport node for tests and benchmarks, and the raw-socket
//! baseline the benchmarks compare against.
//!
//! ```text
//! pskv-net node [--rounds N] [--seed S] [--sizes a,b,..] [--mode random|pushpull|idle]
//!     A node whose role and cluster come from the DMLC_* environment.
//!     Servers store values (cmd 1 adds bytes to what is stored) until a
//!     worker sends the stop command; workers run the workload and print
//!     `digest=<hex>` (random) or one JSON line per size (pushpull).
//! pskv-net raw-echo PORT         echo back every message (length-prefixed)
//! pskv-net raw-client ADDR --sizes a,b,.. [--rounds N]
//!     time round trips of each size against raw-echo; one JSON line per size
//! pskv-net floor [--workers W] [--servers S] [--sizes a,b | --tensors FILE] [--sum] ...
//!     the floor of a parameter-server round over plain sockets (`floor/`)
//! ```
//! Exit status: 0 when the workload checked out; 1 with a message otherwise.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod floor;

use bytes::Bytes;
use parking_lot::Mutex;
use pskv_transport::{
    Config, Group, KvRequest, KvWorker, Postoffice, RequestHandler, RequestOptions, Responder,
    Role, TransportError,
};

/// The command that stops the servers.
const CMD_STOP: i32 = -1;
/// Push: add bytes (wrapping) to what is stored instead of replacing it.
const CMD_ADD: i32 = 1;
/// Push-pull: answer with the values just pushed (the benchmark's echo).
const CMD_ECHO: i32 = 2;

const WAIT: Duration = Duration::from_secs(120);

/// Why a command failed (printed before the exit status 1).
#[derive(Debug, thiserror::Error)]
enum NetError {
    /// Arguments that cannot work.
    #[error("{0}")]
    Usage(String),
    /// A socket or the system refused.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The transport refused or failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The workload did not check out.
    #[error("{0}")]
    Failed(String),
}

struct Args {
    rest: Vec<String>,
}

impl Args {
    fn value(&self, name: &str) -> Option<String> {
        self.rest
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.rest.get(i + 1).cloned())
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, NetError> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| NetError::Usage(format!("{name}: '{v}' is not a number"))),
        }
    }

    fn sizes(&self) -> Result<Vec<usize>, NetError> {
        match self.value("--sizes") {
            None => Ok(vec![4, 4096, 65536, 1 << 20]),
            Some(v) => v
                .split(',')
                .map(|s| {
                    parse_size(s.trim())
                        .ok_or_else(|| NetError::Usage(format!("--sizes: '{s}' is not a size")))
                })
                .collect(),
        }
    }
}

/// "4", "4K", "4KiB", "64M", "64MiB".
fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim_end_matches("iB").trim_end_matches('B');
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1usize << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().ok().map(|n| n * mult)
}

#[derive(Default)]
struct Store {
    vals: Mutex<HashMap<u64, Vec<u8>>>,
    stop: Arc<pskv_sync::Flag>,
}

mod pskv_sync {
    use parking_lot::{Condvar, Mutex};
    use std::time::Duration;

    /// A flag a thread can wait on.
    #[derive(Default)]
    pub struct Flag {
        set: Mutex<bool>,
        cv: Condvar,
    }

    impl Flag {
        pub fn set(&self) {
            *self.set.lock() = true;
            self.cv.notify_all();
        }

        pub fn wait(&self, timeout: Duration) -> bool {
            let mut s = self.set.lock();
            if !*s {
                self.cv.wait_for(&mut s, timeout);
            }
            *s
        }
    }
}

impl RequestHandler for Store {
    fn handle(&self, req: KvRequest, r: Responder) {
        if req.command {
            // Answer first: the stop lets the server's main thread shut down.
            r.ok();
            if req.cmd == CMD_STOP {
                self.stop.set();
            }
            return;
        }
        if req.cmd == CMD_ECHO {
            r.respond(req.keys, req.lens, req.vals);
            return;
        }
        let mut vals = self.vals.lock();
        if req.push {
            let mut at = 0;
            for (k, l) in req.keys.iter().zip(&req.lens) {
                let v = &req.vals[at..at + *l as usize];
                at += *l as usize;
                if req.cmd == CMD_ADD {
                    let cur = vals.entry(*k).or_insert_with(|| vec![0; v.len()]);
                    if cur.len() != v.len() {
                        let msg = format!(
                            "key {k}: {} bytes pushed onto {} stored",
                            v.len(),
                            cur.len()
                        );
                        drop(vals);
                        r.error(msg);
                        return;
                    }
                    for (a, b) in cur.iter_mut().zip(v) {
                        *a = a.wrapping_add(*b);
                    }
                } else {
                    vals.insert(*k, v.to_vec());
                }
            }
        }
        if req.pull {
            let mut lens = Vec::with_capacity(req.keys.len());
            let mut out = Vec::new();
            for k in &req.keys {
                let Some(v) = vals.get(k) else {
                    drop(vals);
                    r.error(format!("key {k} was never pushed"));
                    return;
                };
                lens.push(v.len() as u32);
                out.extend_from_slice(v);
            }
            drop(vals);
            r.respond(req.keys, lens, Bytes::from(out));
        } else {
            drop(vals);
            r.ok();
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x0100_0000_01b3);
    }
}

/// Random pushes and pulls of this worker's own keys, every pull checked;
/// then all workers add into one shared key and check the sum.
fn random_workload(po: &Postoffice, args: &Args) -> Result<(), NetError> {
    let kv = KvWorker::new(po);
    let rounds: u64 = args.num("--rounds", 50)?;
    let seed: u64 = args.num("--seed", 1)?;
    let rank = po.my_rank() as u64;
    let ranges = po.server_key_ranges();
    let mut rng = Rng((seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (rank + 1)) | 1);
    let mut digest = 0xcbf2_9ce4_8422_2325u64;
    let mut stored: std::collections::BTreeMap<u64, Vec<u8>> = std::collections::BTreeMap::new();
    for round in 0..rounds {
        let n = 1 + (rng.next() % 8) as usize;
        let mut keys: Vec<u64> = (0..n)
            .map(|_| {
                let r = &ranges[(rng.next() % ranges.len() as u64) as usize];
                r.0 + rank * 1_000_000 + rng.next() % 1000
            })
            .collect();
        keys.sort();
        keys.dedup();
        let lens: Vec<u32> = keys
            .iter()
            .map(|_| match rng.next() % 10 {
                0 => (rng.next() % (2 << 20)) as u32,
                1..=3 => 0,
                _ => (rng.next() % 5000) as u32,
            })
            .collect();
        let total: usize = lens.iter().map(|&l| l as usize).sum();
        let vals: Vec<u8> = (0..total)
            .map(|i| (i as u64 ^ round ^ rank) as u8)
            .collect();
        let opts = RequestOptions {
            cmd: 0,
            priority: (rng.next() % 3) as i32,
            ..Default::default()
        };
        kv.push(&keys, &lens, Bytes::from(vals.clone()), opts)?
            .wait(WAIT)
            .map_err(|e| NetError::Failed(format!("push: {e}")))?;
        let mut at = 0;
        for (k, l) in keys.iter().zip(&lens) {
            stored.insert(*k, vals[at..at + *l as usize].to_vec());
            at += *l as usize;
        }
        // Pull these keys and a few older ones; check every byte.
        let mut pull: Vec<u64> = keys.clone();
        for k in stored.keys().take(3) {
            pull.push(*k);
        }
        pull.sort();
        pull.dedup();
        let got = kv
            .pull(&pull, opts)?
            .wait(WAIT)
            .map_err(|e| NetError::Failed(format!("pull: {e}")))?;
        let bytes = got.to_bytes();
        let mut at = 0;
        for (k, l) in got.keys.iter().zip(&got.lens) {
            let v = &bytes[at..at + *l as usize];
            at += *l as usize;
            if stored.get(k).map(|s| &s[..]) != Some(v) {
                return Err(NetError::Failed(format!(
                    "round {round}: key {k} pulled {} bytes that differ from those pushed",
                    v.len()
                )));
            }
            fnv(&mut digest, &k.to_le_bytes());
            fnv(&mut digest, v);
        }
    }
    // Every worker adds its rank + 1 into one shared key, in both servers'
    // ranges; after a barrier every worker checks the sum.
    po.barrier(Group::WORKERS, WAIT)?;
    let shared: Vec<u64> = ranges.iter().map(|r| r.0 + 999_999_999).collect();
    let lens = vec![1000u32; shared.len()];
    let mine = vec![(rank + 1) as u8; 1000 * shared.len()];
    if rank == 0 {
        kv.push(
            &shared,
            &lens,
            Bytes::from(vec![0u8; 1000 * shared.len()]),
            RequestOptions::default(),
        )?
        .wait(WAIT)?;
    }
    po.barrier(Group::WORKERS, WAIT)?;
    kv.push(
        &shared,
        &lens,
        Bytes::from(mine),
        RequestOptions {
            cmd: CMD_ADD,
            priority: 0,
            ..Default::default()
        },
    )?
    .wait(WAIT)?;
    po.barrier(Group::WORKERS, WAIT)?;
    let w = po.num_workers() as u64;
    let want = (w * (w + 1) / 2) as u8;
    let got = kv.pull(&shared, RequestOptions::default())?.wait(WAIT)?;
    if got.to_bytes().iter().any(|&b| b != want) {
        return Err(NetError::Failed(format!(
            "the shared sum is wrong: want {want} in every byte"
        )));
    }
    println!("digest={digest:016x}");
    Ok(())
}

/// Times push-pull round trips (echo) of each size; one JSON line per size.
fn pushpull_workload(po: &Postoffice, args: &Args) -> Result<(), NetError> {
    let kv = KvWorker::new(po);
    let sizes = args.sizes()?;
    let rank = po.my_rank() as u64;
    let ranges = po.server_key_ranges();
    po.barrier(Group::WORKERS, WAIT)?;
    for size in sizes {
        // Large values are split over every server, as the kvstore does.
        let keys: Vec<u64> = if size >= 1 << 20 {
            ranges.iter().map(|r| r.0 + rank).collect()
        } else {
            vec![ranges[(rank as usize) % ranges.len()].0 + rank]
        };
        let per = size / keys.len();
        let mut lens = vec![per as u32; keys.len()];
        *lens.last_mut().expect("a key") += (size - per * keys.len()) as u32;
        let vals = Bytes::from(vec![7u8; size]);
        let rounds: usize = args.num("--rounds", 0usize)?;
        let rounds = if rounds > 0 {
            rounds
        } else {
            ((512usize << 20) / size.max(1)).clamp(10, 2000)
        };
        let opts = RequestOptions {
            cmd: CMD_ECHO,
            priority: 0,
            ..Default::default()
        };
        let mut times = Vec::with_capacity(rounds);
        for i in 0..rounds + 3 {
            let t = Instant::now();
            let got = kv.push_pull(&keys, &lens, vals.clone(), opts)?.wait(WAIT)?;
            if got.len() != size {
                return Err(NetError::Failed(format!(
                    "echo of {size} bytes came back with {}",
                    got.len()
                )));
            }
            if i >= 3 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        po.barrier(Group::WORKERS, WAIT)?;
        print_stats("pskv", po.my_rank(), size, &mut times);
    }
    Ok(())
}

fn print_stats(system: &str, rank: u32, size: usize, times: &mut [f64]) {
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let p90 = times[(times.len() * 9 / 10).min(times.len() - 1)];
    println!(
        "{{\"system\":\"{system}\",\"rank\":{rank},\"bytes\":{size},\"rounds\":{},\"median_us\":{:.2},\"p90_us\":{:.2},\"algbw_GBps\":{:.4}}}",
        times.len(),
        median * 1e6,
        p90 * 1e6,
        size as f64 / median / 1e9
    );
}

fn node(args: &Args) -> Result<(), NetError> {
    let cfg = Config::from_env()?;
    let role = cfg.role;
    let store = Arc::new(Store::default());
    let handler: Option<Arc<dyn RequestHandler>> =
        (role == Role::Server).then(|| store.clone() as Arc<dyn RequestHandler>);
    let po = Postoffice::start(cfg, handler)?;
    match role {
        Role::Scheduler => Ok(po.wait_all_left(Duration::from_secs(3600))?),
        Role::Server => {
            while !store.stop.wait(Duration::from_secs(1)) {}
            po.shutdown();
            Ok(())
        }
        Role::Worker => {
            let mode = args.value("--mode").unwrap_or_else(|| "random".into());
            let r = match mode.as_str() {
                "random" => random_workload(&po, args),
                "pushpull" => pushpull_workload(&po, args),
                "idle" => {
                    // Stay up until killed; report the dead nodes seen.
                    println!("ready id={}", po.my_id());
                    let _ = std::io::stdout().flush();
                    let start = Instant::now();
                    let mut seen = Vec::new();
                    loop {
                        std::thread::sleep(Duration::from_millis(20));
                        for d in po.dead_nodes(Duration::from_secs(3600)) {
                            if !seen.contains(&d) {
                                seen.push(d);
                                println!("dead={d} after_ms={}", start.elapsed().as_millis());
                                let _ = std::io::stdout().flush();
                            }
                        }
                        if args.value("--exit-on-death").is_some() && !seen.is_empty() {
                            break Ok(());
                        }
                    }
                }
                m => Err(NetError::Usage(format!(
                    "--mode {m}: expected random, pushpull or idle"
                ))),
            };
            if r.is_ok() && args.value("--no-stop").is_none() {
                // Workers finish together; rank 0 stops the servers.
                po.barrier(Group::WORKERS, WAIT)?;
                if po.my_rank() == 0 {
                    let kv = KvWorker::new(&po);
                    kv.request(CMD_STOP, Bytes::new(), Group::SERVERS)?
                        .wait(WAIT)?;
                }
            }
            po.shutdown();
            r
        }
    }
}

fn read_msg(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut len = [0u8; 8];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    let n = u64::from_le_bytes(len) as usize;
    if n > 1 << 30 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "message too large",
        ));
    }
    buf.resize(n, 0);
    s.read_exact(buf)?;
    Ok(true)
}

/// Writes a length-prefixed message with one vectored write where possible
/// (two writes would cost the baseline a delayed-ACK round on small sizes).
fn write_msg(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = (msg.len() as u64).to_le_bytes();
    write_all_vectored(
        s,
        &mut [std::io::IoSlice::new(&len), std::io::IoSlice::new(msg)],
    )
}

/// Writes every byte of `parts`, in as few vectored writes as the socket
/// takes.
fn write_all_vectored(
    s: &mut TcpStream,
    parts: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    let mut rest: &mut [std::io::IoSlice<'_>] = parts;
    while !rest.is_empty() {
        let n = s.write_vectored(rest)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "the socket took no bytes",
            ));
        }
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

fn raw_echo(port: u16) -> Result<(), NetError> {
    let l = TcpListener::bind(("127.0.0.1", port))?;
    println!("listening={}", l.local_addr()?.port());
    let _ = std::io::stdout().flush();
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let mut buf = Vec::new();
    while read_msg(&mut s, &mut buf)? {
        write_msg(&mut s, &buf)?;
    }
    Ok(())
}

fn raw_client(addr: &str, args: &Args) -> Result<(), NetError> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut back = Vec::new();
    for size in args.sizes()? {
        let msg = vec![7u8; size];
        let rounds: usize = args.num("--rounds", 0usize)?;
        let rounds = if rounds > 0 {
            rounds
        } else {
            ((512usize << 20) / size.max(1)).clamp(10, 2000)
        };
        let mut times = Vec::with_capacity(rounds);
        for i in 0..rounds + 3 {
            let t = Instant::now();
            write_msg(&mut s, &msg)?;
            if !read_msg(&mut s, &mut back)? || back.len() != size {
                return Err(NetError::Failed("the echo server went away".into()));
            }
            if i >= 3 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        print_stats("raw_tcp", 0, size, &mut times);
    }
    Ok(())
}

fn main() {
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() {
        eprintln!("usage: pskv-net node|raw-echo PORT|raw-client ADDR|floor [options] (see the source's header)");
        std::process::exit(2);
    }
    let cmd = argv.remove(0);
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let r = match cmd.as_str() {
        "node" => node(&Args { rest: argv }),
        "raw-echo" => argv
            .first()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| NetError::Usage("raw-echo PORT".into()))
            .and_then(raw_echo),
        "raw-client" => match argv.first().cloned() {
            Some(addr) => raw_client(&addr, &Args { rest: argv }),
            None => Err(NetError::Usage("raw-client ADDR".into())),
        },
        "floor" => floor::floor(&Args { rest: argv }),
        "floor-server" => floor::floor_server(&Args { rest: argv }),
        "floor-worker" => floor::floor_worker(&Args { rest: argv }),
        other => Err(NetError::Usage(format!("unknown command '{other}'"))),
    };
    if let Err(e) = r {
        eprintln!("pskv-net {cmd}: {e}");
        std::process::exit(1);
    }
}
