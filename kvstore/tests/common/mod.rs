//! The in-process cluster the kvstore tests run on: a scheduler, servers
//! and workers on 127.0.0.1, each with its own engine and sockets; and the
//! value generators.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use pskv_engine::{Context, Engine};
use pskv_kvstore::{Elem, KvStore, Options, Server, Tensor};
use pskv_transport::status::RoundLog;
use pskv_transport::{Config, Postoffice, Role, VanKind};

pub const T: Duration = Duration::from_secs(30);

pub fn config(role: Role, port: u16, s: u32, w: u32) -> Config {
    config_van(role, port, s, w, VanKind::Tcp)
}

pub fn config_van(role: Role, port: u16, s: u32, w: u32, van: VanKind) -> Config {
    Config::new(role, "127.0.0.1", port, s, w)
        .van(van)
        .heartbeat(
            Some(Duration::from_millis(200)),
            Some(Duration::from_secs(5)),
        )
        .connect_timeout(Duration::from_secs(20))
}

pub fn engine() -> Engine {
    Engine::builder()
        .cpu_threads(2)
        .gpu_threads(1)
        .build()
        .unwrap()
}

pub struct Cluster {
    pub sched: Postoffice,
    pub port: u16,
    pub s: u32,
    pub w: u32,
    pub van: VanKind,
    /// The servers' `set_worker_sum_bytes` (None: their default).
    pub worker_sum_bytes: Option<usize>,
    /// The servers' round logs (what `pskv status` shows of them), as
    /// they start.
    pub server_rounds: Arc<std::sync::Mutex<Vec<Arc<RoundLog>>>>,
}

pub fn cluster(s: u32, w: u32) -> Cluster {
    cluster_van(s, w, VanKind::Tcp)
}

pub fn cluster_van(s: u32, w: u32, van: VanKind) -> Cluster {
    let sched = Postoffice::start(config_van(Role::Scheduler, 0, s, w, van), None).unwrap();
    let port = sched.local_addr().port();
    Cluster {
        sched,
        port,
        s,
        w,
        van,
        worker_sum_bytes: None,
        server_rounds: Arc::default(),
    }
}

impl Cluster {
    /// Starts the servers (they join once every node has connected); each
    /// runs until a worker stops it.
    pub fn servers(&self) -> Vec<std::thread::JoinHandle<()>> {
        (0..self.s)
            .map(|_| {
                let c = config_van(Role::Server, self.port, self.s, self.w, self.van);
                let sum_bytes = self.worker_sum_bytes;
                let logs = self.server_rounds.clone();
                std::thread::spawn(move || {
                    let s = Server::start(c, engine()).unwrap();
                    if let Some(n) = sum_bytes {
                        s.set_worker_sum_bytes(n);
                    }
                    logs.lock().unwrap().push(s.postoffice().round_log());
                    s.wait(Some(T)).unwrap();
                    s.shutdown();
                })
            })
            .collect()
    }

    /// Runs `f` on every worker (each its own thread, engine and store),
    /// returns the results by rank, after the servers stopped.
    pub fn run<R: Send + 'static>(
        self,
        kind: &'static str,
        opts: Options,
        f: impl Fn(&KvStore, &Engine) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let mut out = self.run_each(kind, opts, move |_, kv, e| {
            let r = f(kv, e);
            (kv.rank(), r)
        });
        for (_, _, closed) in &out {
            closed.as_ref().unwrap();
        }
        out.sort_by_key(|((rank, _), _, _)| *rank);
        out.into_iter().map(|((_, r), _, _)| r).collect()
    }

    /// Runs `f(i, store, engine)` on worker thread `i` (which is not its
    /// rank: ranks follow registration order); returns, by thread, what
    /// `f` gave, the worker's rank (None if the store could not be made)
    /// and what `close` said, after the servers stopped.
    pub fn run_each<R: Send + 'static>(
        self,
        kind: &'static str,
        opts: Options,
        f: impl Fn(usize, &KvStore, &Engine) -> R + Send + Sync + 'static,
    ) -> Vec<(R, u32, pskv_kvstore::Result<()>)> {
        self.run_each_opts(kind, move |_| opts.clone(), f)
    }

    /// As `run_each`, worker thread `i` with options `opts(i)` (their
    /// transport settings replaced by the cluster's).
    pub fn run_each_opts<R: Send + 'static>(
        self,
        kind: &'static str,
        opts: impl Fn(usize) -> Options,
        f: impl Fn(usize, &KvStore, &Engine) -> R + Send + Sync + 'static,
    ) -> Vec<(R, u32, pskv_kvstore::Result<()>)> {
        let servers = self.servers();
        let f = Arc::new(f);
        let hs: Vec<_> = (0..self.w)
            .map(|i| {
                let (f, mut o) = (f.clone(), opts(i as usize));
                o.transport = Some(config_van(
                    Role::Worker,
                    self.port,
                    self.s,
                    self.w,
                    self.van,
                ));
                std::thread::spawn(move || {
                    let e = engine();
                    let kv = KvStore::create_with(kind, &e, o).unwrap();
                    let r = f(i as usize, &kv, &e);
                    let rank = kv.rank();
                    let closed = kv.close();
                    (r, rank, closed)
                })
            })
            .collect();
        let out: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        for s in servers {
            s.join().unwrap();
        }
        self.sched.shutdown();
        out
    }
}

#[allow(unused_imports)] // not every test file draws values
pub use pskv_test_support::values;

pub fn tensor<T: Elem>(e: &Engine, v: &[T]) -> Tensor {
    Tensor::from_slice(e, &[v.len()], v, Context::Cpu).unwrap()
}
