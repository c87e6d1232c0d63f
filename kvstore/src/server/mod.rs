//! The server of a distributed kvstore: stores its share of every key,
//! sums the workers' pushes (in worker-rank order), runs the optimizer
//! once per round, answers pulls, and obeys commands. A part (of at most
//! `PSKV_WORKER_SUM_BYTES`: by default every part) whose rounds need
//! nothing of the server (no optimizer, checkpoints or
//! replicas) and whose workers all share its segment is handed to them:
//! they sum its rounds at the segment's gate (`crate::gate`) until the
//! server closes it (`set_optimizer`).
//!
//! Requests arrive on the transport's I/O threads. Each ps key has an
//! engine var; the work on a key is an engine op that writes it, so a key's
//! requests are handled one at a time and in arrival order, and different
//! keys in parallel. Ops on small values run at once on the I/O thread
//! (`Property::Async`: a memcpy-sized job is cheaper than a thread hop);
//! larger ones on the server engine's CPU workers.
//!
//! Every bad request (unknown key, wrong size or type, a malformed body)
//! is answered with an error naming the key; the server keeps serving.
//!
//! With `PSKV_CHECKPOINT_DIR`, the server checkpoints its keys (see
//! `checkpoint.rs` for when, and what a crash can lose), and a server that
//! restarts into its old rank loads them before it serves: requests that
//! arrive meanwhile are held (`Inner::held`) and handled, in order, once
//! the keys are back.
//!
//! Rooms: this file is the server's API and its state (a request is
//! handed to `keys.rs`, which sends a command to `commands.rs`);
//! `keys.rs` a request's keys and the op on each; `entry/` one ps key's
//! state and round (its shared segment in `entry/segment.rs`, the update
//! in `entry/update.rs`); `acc.rs` a round's running sum; `reply.rs` a
//! request's answer; `commands.rs` the workers' commands; `recovery.rs` checkpoint
//! records, restore and deaths; `checkpoint.rs` the file; `replica.rs`
//! replicas.

mod acc;
mod checkpoint;
mod commands;
mod entry;
mod keys;
mod recovery;
mod replica;
mod reply;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use pskv_engine::{Engine, Var};
use pskv_gpu::cpu::CpuKernels;
use pskv_transport::status::RoundLog;
use pskv_transport::{Config, KvRequest, NodeEnd, Postoffice, RequestHandler, Responder, Role};

use crate::error::{KvError, Result};
use crate::updater::Rule;
use crate::wire::decode_ps_key;
pub use checkpoint::CheckpointError;
use checkpoint::Checkpointer;
use entry::EntryState;
use replica::{Deferred, Replication};

/// Values at most this large are handled on the I/O thread.
const INLINE_BYTES: usize = 1 << 20;

/// A ps key: its var and its state.
struct Entry {
    var: Var,
    st: Mutex<EntryState>,
    /// Answers kept while a round's copy goes to the backup (replicas).
    defer: Deferred,
}

impl Entry {
    fn new(st: EntryState) -> Arc<Entry> {
        Arc::new(Entry {
            var: Var::named(format!("server key {}.{}", st.key_id, st.part)),
            st: Mutex::new(st),
            defer: Deferred::default(),
        })
    }
}

/// What the server's controller gets: a command's head and body; its
/// answer body goes back to the sender.
pub type Controller = dyn Fn(i32, &[u8]) -> std::result::Result<Vec<u8>, String> + Send + Sync;

struct Inner {
    engine: Engine,
    kernels: Arc<CpuKernels>,
    workers: usize,
    range_begin: AtomicU64,
    range_end: AtomicU64,
    entries: RwLock<HashMap<u64, Arc<Entry>, crate::hash::IdHash>>,
    rule: RwLock<Option<Rule>>,
    generation: AtomicU64,
    multi_precision: AtomicBool,
    sync_mode: AtomicBool,
    compression_params: Mutex<Option<String>>,
    controller: RwLock<Option<Arc<Controller>>>,
    /// Set by a worker's stop command, or when the node ends (fenced, the
    /// scheduler lost, the job over): then with why.
    stopped: Mutex<Option<Option<NodeEnd>>>,
    stop_cv: Condvar,
    /// Workers the scheduler declared dead (and not restarted since), in
    /// the order they died: while any is, a sync push fails naming them (a
    /// round cannot complete).
    dead_workers: Mutex<Vec<pskv_transport::NodeId>>,
    /// The checkpoints, when `PSKV_CHECKPOINT_DIR` is set.
    ckpt: std::sync::OnceLock<Arc<Checkpointer>>,
    /// Requests that arrived before the server was ready (a restarted
    /// server loading its checkpoint): `Some` until then.
    held: Mutex<Option<Vec<(KvRequest, Responder)>>>,
    /// `held` is `None` for good: requests skip its lock.
    ready: AtomicBool,
    /// Every server's key range, by rank.
    ranges: std::sync::OnceLock<Vec<(u64, u64)>>,
    /// Replicas (`PSKV_REPLICAS=2`): copies to the backup, and of the
    /// previous server's keys.
    repl: std::sync::OnceLock<Arc<Replication>>,
    /// A fault for tests: once the backup holds this round of a key, the
    /// server dies before answering it (`Server::die_after_copying`).
    fault: Mutex<Option<(u64, replica::Once)>>,
    /// A fault for tests: the round (0: none) whose pushes but rank 0's
    /// are never answered, the server dying instead
    /// (`Server::die_after_answering_rank_0`), and how it dies.
    cut_round: AtomicU64,
    cut: Mutex<Option<replica::Once>>,
    /// Where completed rounds are reported (`pskv status`), once the
    /// transport started.
    rounds: std::sync::OnceLock<Arc<RoundLog>>,
    /// Parts of at most this many bytes may be summed by their workers
    /// (`gate/mod.rs`; `PSKV_WORKER_SUM_BYTES`, 0: never).
    worker_sum_bytes: AtomicUsize,
}

/// `PSKV_WORKER_SUM_BYTES` unset: parts up to this size (the default part
/// size over shared memory, the only van of this fast path: every part)
/// are summed by their workers when the server has
/// nothing to add (BENCHMARKS.md, "Small rounds summed by the workers" and
/// "Large rounds summed by the workers together").
pub const DEFAULT_WORKER_SUM_BYTES: usize = crate::options::DEFAULT_PARTITION_BYTES;

/// `PSKV_WORKER_SUM_BYTES`, or its default.
fn worker_sum_bytes_from_env() -> Result<usize> {
    match std::env::var("PSKV_WORKER_SUM_BYTES") {
        Err(_) => Ok(DEFAULT_WORKER_SUM_BYTES),
        Ok(v) => v.trim().parse::<usize>().map_err(|_| {
            KvError::invalid(format!(
                "PSKV_WORKER_SUM_BYTES={v}: expected a whole number of bytes (0: the servers sum every round)"
            ))
        }),
    }
}

/// Where and how often a server checkpoints (`PSKV_CHECKPOINT_DIR`,
/// `PSKV_CHECKPOINT_ROUNDS`).
#[derive(Clone, Debug, Default)]
pub struct CheckpointSettings {
    /// The directory; `None`: no checkpoints.
    pub dir: Option<std::path::PathBuf>,
    /// A key is recorded after every this many of its rounds.
    pub every_rounds: u64,
}

impl CheckpointSettings {
    /// From `PSKV_CHECKPOINT_DIR` and `PSKV_CHECKPOINT_ROUNDS` (default 10).
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<CheckpointSettings> {
        let every_rounds = match get("PSKV_CHECKPOINT_ROUNDS") {
            None => 10,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(KvError::invalid(format!(
                        "PSKV_CHECKPOINT_ROUNDS={v}: expected a whole number of rounds above 0"
                    )))
                }
            },
        };
        Ok(CheckpointSettings {
            dir: get("PSKV_CHECKPOINT_DIR")
                .filter(|d| !d.trim().is_empty())
                .map(Into::into),
            every_rounds,
        })
    }
}

/// A running server.
///
/// ```no_run
/// // In a process started with DMLC_ROLE=server and the DMLC_* variables:
/// pskv_kvstore::Server::run_from_env()?;
/// # Ok::<(), pskv_kvstore::KvError>(())
/// ```
pub struct Server {
    inner: Arc<Inner>,
    po: Postoffice,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("rank", &self.po.my_rank())
            .finish()
    }
}

struct Handler(Arc<Inner>);

impl RequestHandler for Handler {
    fn handle(&self, req: KvRequest, r: Responder) {
        self.0.handle(req, r)
    }
}

impl Server {
    /// Starts a server with this transport configuration (role server) and
    /// its own engine; checkpoints as the environment says
    /// (`PSKV_CHECKPOINT_DIR`, `PSKV_CHECKPOINT_ROUNDS`).
    pub fn start(cfg: Config, engine: Engine) -> Result<Server> {
        let ckpt = CheckpointSettings::from_lookup(&|k| std::env::var(k).ok())?;
        Server::start_with(cfg, engine, ckpt)
    }

    /// Starts a server with explicit checkpoint settings.
    pub fn start_with(cfg: Config, engine: Engine, ckpt: CheckpointSettings) -> Result<Server> {
        if cfg.role != Role::Server {
            return Err(KvError::invalid(format!(
                "a server needs a server configuration, got role {:?}",
                cfg.role
            )));
        }
        let threads = engine.config().cpu_threads.max(1);
        let inner = Arc::new(Inner {
            engine,
            kernels: Arc::new(CpuKernels::with_threads(threads)?),
            workers: cfg.num_workers as usize,
            range_begin: AtomicU64::new(0),
            range_end: AtomicU64::new(0),
            entries: RwLock::new(HashMap::default()),
            rule: RwLock::new(None),
            generation: AtomicU64::new(0),
            multi_precision: AtomicBool::new(false),
            sync_mode: AtomicBool::new(false),
            compression_params: Mutex::new(None),
            controller: RwLock::new(None),
            stopped: Mutex::new(None),
            stop_cv: Condvar::new(),
            dead_workers: Mutex::new(Vec::new()),
            ckpt: std::sync::OnceLock::new(),
            held: Mutex::new(Some(Vec::new())),
            ready: AtomicBool::new(false),
            ranges: std::sync::OnceLock::new(),
            repl: std::sync::OnceLock::new(),
            fault: Mutex::new(None),
            cut_round: AtomicU64::new(0),
            cut: Mutex::new(None),
            rounds: std::sync::OnceLock::new(),
            worker_sum_bytes: AtomicUsize::new(worker_sum_bytes_from_env()?),
        });
        let replicas = cfg.replicas;
        let cfg = crate::store::for_engine(cfg, &inner.engine);
        let po = Postoffice::start(cfg, Some(Arc::new(Handler(inner.clone()))))?;
        let log = po.round_log();
        let weak = Arc::downgrade(&inner);
        // Rounds the workers sum at a gate reach no op here until the key's
        // next request: counted at each snapshot for `pskv status`.
        log.set_refresh(move || {
            if let Some(inner) = weak.upgrade() {
                inner.count_gate_rounds();
            }
        });
        let _ = inner.rounds.set(log);
        let weak = Arc::downgrade(&inner);
        po.watch_end(Arc::new(move |end| {
            if let Some(inner) = weak.upgrade() {
                if matches!(end, NodeEnd::Fenced(_)) {
                    // A replacement may own the checkpoint file by now.
                    if let Some(c) = inner.ckpt.get() {
                        c.abandon();
                    }
                }
                let mut s = inner.stopped.lock();
                if s.is_none() {
                    *s = Some(Some(end.clone()));
                }
                inner.stop_cv.notify_all();
            }
        }));
        let weak = Arc::downgrade(&inner);
        po.watch_nodes(Arc::new(move |change| {
            if let Some(inner) = weak.upgrade() {
                inner.membership(change);
            }
        }));
        let rank = po.my_rank() as usize;
        let ranges = po.server_key_ranges();
        let (begin, end) = ranges[rank];
        inner.range_begin.store(begin, Ordering::Release);
        inner.range_end.store(end, Ordering::Release);
        let _ = inner.ranges.set(ranges);
        let repl = Replication::new(rank as u32, po.num_servers(), replicas);
        if repl.on {
            if po.is_recovery() {
                return Err(KvError::invalid(format!(
                    "server {rank} restarted, but the job keeps replicas (PSKV_REPLICAS=2): its keys are served by its backup now, and a restarted server cannot take them back"
                )));
            }
            repl.set_client(Some(pskv_transport::KvWorker::new(&po)));
        }
        let _ = inner.repl.set(Arc::new(repl));
        let server = Server { inner, po };
        if let Some(dir) = &ckpt.dir {
            let c = Checkpointer::start(
                dir,
                rank as u32,
                server.inner.workers as u32,
                ckpt.every_rounds,
            )?;
            let _ = server.inner.ckpt.set(c.clone());
            if server.po.is_recovery() {
                match c.load()? {
                    Some(file) => server.inner.restore(file),
                    None => tracing::warn!(
                        "server {rank} restarted, but {} holds no checkpoint: its keys are gone",
                        c.path().display()
                    ),
                }
            }
        }
        server.inner.release_held();
        Ok(server)
    }

    /// Starts a server from the `DMLC_*` / `PSKV_*` environment.
    pub fn start_from_env() -> Result<Server> {
        let cfg = Config::from_env()?;
        let engine = Engine::new()?;
        Server::start(cfg, engine)
    }

    /// Runs a server from the environment until a worker stops it.
    pub fn run_from_env() -> Result<()> {
        let s = Server::start_from_env()?;
        s.wait(None)?;
        s.shutdown();
        Ok(())
    }

    /// Sets the controller for commands pskv does not handle itself.
    pub fn set_controller(
        &self,
        f: impl Fn(i32, &[u8]) -> std::result::Result<Vec<u8>, String> + Send + Sync + 'static,
    ) {
        *self.inner.controller.write() = Some(Arc::new(f));
    }

    /// Parts of at most `bytes` bytes may be summed by their workers, in
    /// their shared segment, while this server has nothing to add to their
    /// rounds (0: this server sums every round). Overrides
    /// `PSKV_WORKER_SUM_BYTES`; parts over the new size come back to this
    /// server from their next round.
    pub fn set_worker_sum_bytes(&self, bytes: usize) {
        self.inner.worker_sum_bytes.store(bytes, Ordering::Release);
        self.inner.close_gates(|st| st.nbytes() > bytes);
    }

    /// This server's rank.
    pub fn rank(&self) -> u32 {
        self.po.my_rank()
    }

    /// The transport node underneath.
    pub fn postoffice(&self) -> &Postoffice {
        &self.po
    }

    /// Blocks until a worker sends the stop command (or `timeout` passes),
    /// or this node can no longer serve: fenced (the scheduler declared it
    /// dead: a restart may hold its rank), the scheduler lost, or every
    /// worker gone (an error if one died, `Ok` if they all left).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<()> {
        let mut stopped = self.inner.stopped.lock();
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            match &*stopped {
                Some(None) => return Ok(()),
                Some(Some(end)) if !end.is_failure() => return Ok(()),
                Some(Some(end)) => {
                    return Err(KvError::Transport(
                        pskv_transport::TransportError::NotRunning(format!(
                            "server {}: {end}",
                            self.po.my_rank()
                        )),
                    ))
                }
                None => {}
            }
            match deadline {
                None => self.inner.stop_cv.wait(&mut stopped),
                Some(d) => {
                    if self.inner.stop_cv.wait_until(&mut stopped, d).timed_out()
                        && stopped.is_none()
                    {
                        return Err(KvError::Timeout {
                            what: "a worker to stop the server".into(),
                            after: timeout.unwrap_or_default(),
                        });
                    }
                }
            }
        }
    }

    /// Whether a worker sent the stop command (or the node ended).
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.lock().is_some()
    }

    /// Finishes the server's ops and leaves the cluster; the shared
    /// segments' files go.
    pub fn shutdown(&self) {
        let _ = self
            .inner
            .engine
            .wait_for_all_timeout(Duration::from_secs(30));
        for (_, e) in self.inner.entries_snapshot() {
            e.st.lock().unlink_segment();
        }
        if let Some(r) = self.inner.repl.get() {
            r.set_client(None);
            r.stop();
        }
        self.inner.fault.lock().take();
        self.inner.cut.lock().take();
        if let Some(c) = self.inner.ckpt.get() {
            c.stop();
        }
        self.po.shutdown();
        // The transport's handler may keep the engine past the process's
        // end: its profile (PSKV_PROFILE) is written now.
        if let Err(e) = self.inner.engine.flush_profile() {
            tracing::warn!("server shutdown: {e}");
        }
    }

    /// For tests: once the backup holds round `round` of a key, this
    /// server dies (as a crash) before answering the round's pushes: the
    /// workers then send them to the backup, which holds the round already.
    #[doc(hidden)]
    pub fn die_after_copying(&self, round: u64) {
        let po = self.po.clone();
        *self.inner.fault.lock() = Some((round, Box::new(move || po.kill())));
    }

    /// For tests: the first push of a rank other than 0 that a key of this
    /// server takes into round `round` is never answered, and the server
    /// dies (as a crash) 300 ms after that answer was due. With 2
    /// workers, rank 0 has seen the round complete and rank 1 has not:
    /// what a crash between two answers leaves.
    #[doc(hidden)]
    pub fn die_after_answering_rank_0(&self, round: u64) {
        let po = self.po.clone();
        *self.inner.cut.lock() = Some(Box::new(move || po.kill()));
        self.inner.cut_round.store(round, Ordering::Release);
    }

    /// Where this server checkpoints, if it does.
    pub fn checkpoint_path(&self) -> Option<std::path::PathBuf> {
        self.inner.ckpt.get().map(|c| c.path())
    }
}

impl Inner {
    fn handle(self: &Arc<Self>, req: KvRequest, r: Responder) {
        // Subtle: `ready` is set (Release) only after `held` became `None`
        // under its lock, so a request that sees it (Acquire) has nothing
        // held left to overtake; one that does not takes the lock and finds
        // out.
        if !self.ready.load(Ordering::Acquire) {
            let mut held = self.held.lock();
            if let Some(h) = held.as_mut() {
                h.push((req, r));
                return;
            }
        }
        self.serve(req, r);
    }

    /// Handles the requests held while the server was not ready, in
    /// arrival order, then lets requests through.
    fn release_held(self: &Arc<Self>) {
        loop {
            let batch = {
                let mut held = self.held.lock();
                match held.as_mut() {
                    Some(h) if !h.is_empty() => std::mem::take(h),
                    _ => {
                        *held = None;
                        self.ready.store(true, Ordering::Release);
                        return;
                    }
                }
            };
            for (req, r) in batch {
                self.serve(req, r);
            }
        }
    }

    fn settings_changed(&self) {
        if let Some(c) = self.ckpt.get() {
            c.set_globals(self.globals());
        }
    }

    /// Closes the gates (`gate/mod.rs`) of the entries `which` picks: their
    /// rounds come to this server again (a round gathering at a gate is
    /// handed over by its workers; one being summed ends there first).
    fn close_gates(&self, which: impl Fn(&EntryState) -> bool) {
        for (_, e) in self.entries_snapshot() {
            // Subtle: under the entry's lock, which a round that opens the
            // gate holds while it reads the rule and opens: so a gate opened
            // before a new rule is closed here, and one opened after it saw
            // the rule (and did not open).
            let st = e.st.lock();
            if which(&st) {
                st.close_gate();
            }
        }
    }

    /// Reports to the round log the rounds the workers summed at the
    /// entries' gates since their last look. Never waits: an entry whose
    /// lock an op holds is left to that op (`keys.rs` counts first thing
    /// and reports what it counts), and the whole look to the next one while
    /// the map is being written (a restore may hold it long, and a
    /// heartbeat waits for this).
    fn count_gate_rounds(&self) {
        let Some(entries) = self.entries.try_read() else {
            return;
        };
        for (key, e) in entries.iter() {
            if let Some(mut st) = e.st.try_lock() {
                self.count_gate_rounds_of(*key, &mut st);
            }
        }
    }

    /// Counts into ps key `key`'s rounds those its workers summed at its
    /// gate since the last look, and reports them to the round log (under
    /// the entry's lock, as its ops report their rounds).
    fn count_gate_rounds_of(&self, key: u64, st: &mut EntryState) {
        let n = st.count_gate_rounds();
        if let Some(log) = self.rounds.get() {
            log.rounds_done(key, n);
        }
    }

    /// Every entry, with its ps key, taken out of the map's lock.
    fn entries_snapshot(&self) -> Vec<(u64, Arc<Entry>)> {
        self.entries
            .read()
            .iter()
            .map(|(k, e)| (*k, e.clone()))
            .collect()
    }

    fn describe(&self, key: u64) -> String {
        let (id, part) = decode_ps_key(key, self.range_begin_of(key));
        format!("key id {id} part {part}")
    }

    /// The first key of the range `key` falls in.
    fn range_begin_of(&self, key: u64) -> u64 {
        self.ranges
            .get()
            .and_then(|r| r.iter().find(|(b, e)| key >= *b && key < *e))
            .map_or(self.range_begin.load(Ordering::Acquire), |(b, _)| *b)
    }

    /// This server's rank (for logs).
    fn my_rank(&self) -> u32 {
        self.repl.get().map_or(u32::MAX, |p| p.rank)
    }

    /// Whether `key` is a copy of the previous server's (replicas).
    fn is_copy(&self, key: u64) -> bool {
        match (self.repl.get(), self.ranges.get()) {
            (Some(p), Some(r)) if p.on => {
                let (b, e) = r[p.primary_of_copies() as usize];
                key >= b && key < e
            }
            _ => false,
        }
    }

    /// Whether this server answers for `key` (its own, or a copy after the
    /// promotion).
    fn serves(&self, key: u64) -> bool {
        !self.is_copy(key) || self.repl.get().is_some_and(|p| p.is_promoted())
    }

    /// Whether this server copies `key`'s rounds to its backup (its own
    /// key, and the backup alive).
    fn copies(&self, key: u64) -> bool {
        self.repl.get().is_some_and(|p| p.copies_rounds()) && !self.is_copy(key)
    }
}
