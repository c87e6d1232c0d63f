//! The server of a distributed kvstore: stores its share of every key,
//! sums the workers' pushes (in worker-rank order), runs the optimizer
//! once per round, answers pulls, and obeys commands.
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

mod checkpoint;
mod entry;
mod replica;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use pskv_engine::{Engine, OpSpec, Property, Var};
use pskv_gpu::cpu::CpuKernels;
use pskv_transport::protocol::{describe, role_rank};
use pskv_transport::{
    Config, KvRequest, NodeChange, NodeEnd, Postoffice, RequestHandler, Responder, Role,
};

use crate::dtype::DType;
use crate::error::{KvError, Result};
use crate::optimizer::{OptState, Optimizer};
use crate::updater::{KeyState, Rule};
use crate::wire::{command, decode_ps_key, split_rows, Head, Op};
use checkpoint::Checkpointer;
use entry::{Answer, EntryState};
use replica::{answer_all, Deferred, KeyWork, Replication};

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
    entries: RwLock<HashMap<u64, Arc<Entry>>>,
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
    /// Workers the scheduler declared dead (and not restarted since), with
    /// the message a sync push gets while any is: a round cannot complete.
    dead_workers: Mutex<std::collections::BTreeMap<u32, String>>,
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

/// Answers a request once every key of it is done.
struct Reply {
    responder: Mutex<Option<Responder>>,
    keys: Vec<u64>,
    remaining: AtomicUsize,
    values: Mutex<Vec<Option<Bytes>>>,
    error: Mutex<Option<String>>,
    pull: bool,
}

impl Reply {
    fn new(responder: Responder, keys: Vec<u64>, pull: bool) -> Arc<Reply> {
        let n = keys.len();
        Arc::new(Reply {
            responder: Mutex::new(Some(responder)),
            keys,
            remaining: AtomicUsize::new(n),
            values: Mutex::new(vec![None; n]),
            error: Mutex::new(None),
            pull,
        })
    }

    fn answer(self: &Arc<Reply>, i: usize) -> Answer {
        let me = self.clone();
        Box::new(move |r| me.done(i, r))
    }

    fn done(&self, i: usize, r: std::result::Result<Option<Bytes>, String>) {
        match r {
            Ok(v) => self.values.lock()[i] = v,
            Err(e) => {
                self.error.lock().get_or_insert(e);
            }
        }
        // AcqRel: the last one sees every value and error stored before.
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let Some(resp) = self.responder.lock().take() else {
            return;
        };
        if let Some(e) = self.error.lock().take() {
            resp.error(e);
            return;
        }
        if !self.pull {
            resp.ok();
            return;
        }
        let vals = std::mem::take(&mut *self.values.lock());
        let lens: Vec<u32> = vals
            .iter()
            .map(|v| v.as_ref().map_or(0, |b| b.len() as u32))
            .collect();
        let body = if vals.len() == 1 {
            vals.into_iter().next().flatten().unwrap_or_default()
        } else {
            let mut all = Vec::with_capacity(lens.iter().map(|&l| l as usize).sum());
            for v in vals.iter().flatten() {
                all.extend_from_slice(v);
            }
            Bytes::from(all)
        };
        resp.respond(self.keys.clone(), lens, body);
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
            entries: RwLock::new(HashMap::new()),
            rule: RwLock::new(None),
            generation: AtomicU64::new(0),
            multi_precision: AtomicBool::new(false),
            sync_mode: AtomicBool::new(false),
            compression_params: Mutex::new(None),
            controller: RwLock::new(None),
            stopped: Mutex::new(None),
            stop_cv: Condvar::new(),
            dead_workers: Mutex::new(std::collections::BTreeMap::new()),
            ckpt: std::sync::OnceLock::new(),
            held: Mutex::new(Some(Vec::new())),
            ready: AtomicBool::new(false),
            ranges: std::sync::OnceLock::new(),
            repl: std::sync::OnceLock::new(),
            fault: Mutex::new(None),
        });
        let replicas = cfg.replicas;
        let po = Postoffice::start(cfg, Some(Arc::new(Handler(inner.clone()))))?;
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
            )
            .map_err(KvError::invalid)?;
            let _ = server.inner.ckpt.set(c.clone());
            if server.po.is_recovery() {
                match c.load().map_err(KvError::invalid)? {
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
        if let Some(c) = self.inner.ckpt.get() {
            c.stop();
        }
        self.po.shutdown();
    }

    /// For tests: once the backup holds round `round` of a key, this
    /// server dies (as a crash) before answering the round's pushes: the
    /// workers then send them to the backup, which holds the round already.
    #[doc(hidden)]
    pub fn die_after_copying(&self, round: u64) {
        let po = self.po.clone();
        *self.inner.fault.lock() = Some((round, Box::new(move || po.kill())));
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

    /// Puts back the keys and settings of a checkpoint.
    fn restore(&self, file: checkpoint::File) {
        let g = file.globals;
        self.generation.store(g.generation, Ordering::Release);
        if let Some(opt) = g.optimizer {
            // num_update goes on from the restored counts.
            for (_, rec) in &file.keys {
                if let Some(s) = &rec.opt {
                    opt.note_count(s.count);
                }
            }
            *self.rule.write() = Some(Rule::Optimizer {
                opt: Arc::new(opt),
                generation: g.generation,
            });
        }
        self.sync_mode.store(g.sync, Ordering::Release);
        self.multi_precision
            .store(g.multi_precision, Ordering::Release);
        *self.compression_params.lock() = g.compression;
        let mut entries = self.entries.write();
        let n = file.keys.len();
        let mut rounds = (u64::MAX, 0u64);
        for (ps_key, rec) in file.keys {
            let mut st = EntryState::new(rec.key_id, rec.part, rec.dtype, &rec.value, self.workers);
            st.rounds = rec.rounds;
            st.master = rec.master;
            st.opt = KeyState {
                generation: g.generation,
                state: rec.opt,
            };
            rounds = (rounds.0.min(rec.rounds), rounds.1.max(rec.rounds));
            entries.insert(ps_key, Entry::new(st));
        }
        tracing::warn!(
            "server restarted: {n} keys back from the checkpoint, at rounds {} to {}",
            if n == 0 { 0 } else { rounds.0 },
            rounds.1
        );
    }

    /// The server-wide settings a checkpoint keeps.
    fn globals(&self) -> checkpoint::Globals {
        let (optimizer, generation) = match &*self.rule.read() {
            Some(Rule::Optimizer { opt, generation }) => (Some((**opt).clone()), *generation),
            _ => (None, self.generation.load(Ordering::Acquire)),
        };
        checkpoint::Globals {
            optimizer,
            generation,
            sync: self.sync_mode.load(Ordering::Acquire),
            multi_precision: self.multi_precision.load(Ordering::Acquire),
            compression: self.compression_params.lock().clone(),
        }
    }

    /// A key's state as the checkpoint keeps it (inside an op on the key,
    /// or under its lock).
    fn record(&self, ps_key: u64, st: &EntryState) {
        let Some(c) = self.ckpt.get() else { return };
        let generation = self.generation();
        let opt = match (&st.opt.state, generation) {
            (Some(s), Some(g)) if st.opt.generation == g => Some(s.clone()),
            _ => None,
        };
        c.record(
            ps_key,
            checkpoint::KeyRecord {
                key_id: st.key_id,
                part: st.part,
                dtype: st.dtype,
                rounds: st.rounds,
                value: st.snapshot(),
                opt,
                master: st.master.clone(),
            },
        );
    }

    /// Records every key and the settings, and waits until they are on disk.
    fn checkpoint_all(&self) -> std::result::Result<(), String> {
        let Some(c) = self.ckpt.get() else {
            return Ok(());
        };
        c.set_globals(self.globals());
        let entries = self.entries_snapshot();
        for (k, e) in entries.into_iter().filter(|(k, _)| self.serves(*k)) {
            let st = e.st.lock();
            self.record(k, &st);
        }
        c.flush(Duration::from_secs(120))
            .map_err(|e| format!("the checkpoint was not written: {e}"))
    }

    fn settings_changed(&self) {
        if let Some(c) = self.ckpt.get() {
            c.set_globals(self.globals());
        }
    }

    fn serve(self: &Arc<Self>, req: KvRequest, r: Responder) {
        if req.command {
            self.command(req, r);
            return;
        }
        let head = match Head::decode(req.cmd) {
            Ok(h) => h,
            Err(e) => return r.error(e),
        };
        let rank = match (req.worker_rank(), role_rank(req.sender)) {
            (Some(r), _) => r,
            // Copies come from the server whose keys this one backs up.
            (None, Some((Role::Server, r)))
                if head.op == Op::Replicate
                    && self
                        .repl
                        .get()
                        .is_some_and(|p| p.on && p.primary_of_copies() == r) =>
            {
                r
            }
            _ => {
                return r
                    .error("data requests come from workers (and copies from the primary server)")
            }
        };
        let tag = req.tag;
        let pull = matches!(head.op, Op::Pull | Op::PushPull | Op::RowPull | Op::Check);
        let reply = Reply::new(r, req.keys.clone(), pull);
        let mut at = 0usize;
        for (i, (&key, &len)) in req.keys.iter().zip(&req.lens).enumerate() {
            let vals = if head.op == Op::Pull {
                Bytes::new()
            } else {
                let v = req.vals.slice(at..at + len as usize);
                at += len as usize;
                v
            };
            self.key_request(KeyWork {
                key,
                head,
                vals,
                rank: rank as usize,
                tag,
                answer: reply.answer(i),
            });
        }
    }

    /// A worker died: every sync round in progress fails, naming it, and
    /// so does every sync push until it comes back (a round needs every
    /// worker). A restarted worker clears it.
    fn membership(self: &Arc<Self>, change: NodeChange) {
        match change {
            NodeChange::Dead(id) => {
                if let (Some((Role::Server, r)), Some(p)) = (role_rank(id), self.repl.get()) {
                    if p.on && r == p.primary_of_copies() {
                        self.promote();
                    }
                    if p.on && id == p.backup() {
                        tracing::warn!(
                            "server {}: its backup {} died; rounds go on without copies",
                            p.rank,
                            describe(id)
                        );
                        p.backup_died();
                    }
                    return;
                }
                let Some((Role::Worker, _)) = role_rank(id) else {
                    return;
                };
                let msg = format!(
                    "{} died (the scheduler declared it dead): a sync round cannot complete \
                     without it",
                    describe(id)
                );
                tracing::warn!("server: {msg}");
                self.dead_workers.lock().insert(id, msg.clone());
                let rank = role_rank(id).map_or(usize::MAX, |(_, r)| r as usize);
                for (_, e) in self.entries_snapshot() {
                    let mut st = e.st.lock();
                    st.fail_active_round(&msg);
                    st.worker_gone(rank);
                }
            }
            NodeChange::Restarted(id) => {
                self.dead_workers.lock().remove(&id);
            }
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

    /// Why a sync push cannot be taken now, if a worker is dead.
    fn dead_worker(&self) -> Option<String> {
        self.dead_workers.lock().values().next().cloned()
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

    /// A push of round `tag` (replicas) that the key holds already: the
    /// answer it gets without being applied again.
    fn already_applied(st: &EntryState, head: &Head, tag: u64) -> Option<Option<Bytes>> {
        let pushes = matches!(head.op, Op::Push | Op::PushPull | Op::RowPush);
        (pushes && tag != 0 && tag <= st.rounds)
            .then(|| (head.op == Op::PushPull).then(|| st.snapshot()))
    }

    /// A copy from the primary: taken before the promotion, ignored after
    /// (the copies are this server's to change then).
    fn take_copy(&self, key: u64, vals: Bytes, answer: Answer) {
        if !self.is_copy(key) {
            return answer(Err(format!(
                "{}: a copy of a key this server does not back up",
                self.describe(key)
            )));
        }
        let Some(repl) = self.repl.get() else {
            return answer(Err("a copy, but this server keeps no replicas".into()));
        };
        let (c, value) = match replica::Copy::decode(&vals) {
            Ok(x) => x,
            Err(e) => return answer(Err(e)),
        };
        let Some(dtype) = DType::from_code(c.dtype) else {
            return answer(Err("a copy of an unknown type".into()));
        };
        let mut result = Ok(());
        repl.unless_promoted(|| {
            let entry = {
                let mut entries = self.entries.write();
                entries
                    .entry(key)
                    .or_insert_with(|| {
                        Entry::new(EntryState::new(
                            c.key_id,
                            c.part,
                            dtype,
                            &value,
                            self.workers,
                        ))
                    })
                    .clone()
            };
            tracing::debug!(
                server = self.my_rank(),
                key,
                rounds = c.rounds,
                "copy taken"
            );
            result = entry.st.lock().take_copy(c, &value);
        });
        answer(result.map(|()| None))
    }

    /// The primary of this server's copies died: they are served from now
    /// on, and the requests that waited for that run.
    fn promote(self: &Arc<Self>) {
        let Some(p) = self.repl.get() else { return };
        let held = p.promote();
        tracing::warn!(
            "server {} now serves the keys of server {} (its backup), {} requests waited for that",
            p.rank,
            p.primary_of_copies(),
            held.len()
        );
        for h in held {
            self.key_request(h);
        }
    }

    /// Schedules the work on one ps key.
    fn key_request(self: &Arc<Self>, w: KeyWork) {
        match w.head.op {
            Op::Init => return self.init(w.key, w.head, w.vals, w.answer),
            Op::Replicate => return self.take_copy(w.key, w.vals, w.answer),
            _ => {}
        }
        let w = if self.is_copy(w.key) {
            // A worker came to the backup: served once the primary is
            // known dead (replica.rs).
            match self.repl.get().filter(|p| !p.is_promoted()) {
                Some(p) => match p.hold(w) {
                    None => return,
                    Some(w) => w,
                },
                None => w,
            }
        } else {
            w
        };
        let key = w.key;
        let Some(entry) = self.entries.read().get(&key).cloned() else {
            return (w.answer)(Err(format!(
                "{} was never initialized on this server: call init first",
                self.describe(key)
            )));
        };
        let size = entry.st.lock().nbytes().max(w.vals.len());
        let prop = if size <= INLINE_BYTES {
            Property::Async
        } else {
            Property::Normal
        };
        let me = self.clone();
        let e2 = entry.clone();
        let spec = OpSpec::new("server_key").write(&entry.var).property(prop);
        let pushes = matches!(w.head.op, Op::Push | Op::PushPull | Op::RowPush);
        let pushed = if pushes && self.copies(key) {
            // The round's answers wait for its copy at the backup; the
            // key's var is held until then, so its next request waits too.
            let w = KeyWork {
                answer: entry.defer.wrap(w.answer),
                ..w
            };
            self.engine.push_async(spec, move |_, completion| {
                let mut st = e2.st.lock();
                e2.defer.open();
                let before = st.rounds;
                me.key_op(&mut st, w);
                let kept = e2.defer.close();
                if st.rounds == before {
                    drop(st);
                    answer_all(kept);
                    return completion.complete();
                }
                let (copy, value) = st.copy();
                let (dtype, round) = (st.dtype, st.rounds);
                drop(st);
                let me2 = me.clone();
                match me.repl.get() {
                    Some(p) => p.send(key, dtype, copy, &value, move || {
                        let fault = {
                            let mut f = me2.fault.lock();
                            match f.as_ref() {
                                Some((r, _)) if *r == round => f.take(),
                                _ => None,
                            }
                        };
                        if let Some((_, die)) = fault {
                            die();
                            return completion.complete();
                        }
                        answer_all(kept);
                        completion.complete();
                    }),
                    None => {
                        answer_all(kept);
                        completion.complete();
                    }
                }
            })
        } else {
            self.engine.push_sync(spec, move |_| {
                let mut st = e2.st.lock();
                me.key_op(&mut st, w);
                Ok(())
            })
        };
        if let Err(e) = pushed {
            // The engine is shutting down; the answer was dropped with the
            // closure, which answers with an error.
            tracing::debug!("server op refused: {e}");
        }
    }

    /// The work on one ps key, inside an op that writes its var.
    fn key_op(&self, st: &mut EntryState, w: KeyWork) {
        let KeyWork {
            key,
            head,
            vals,
            rank,
            tag,
            answer,
        } = w;
        let pushes = matches!(head.op, Op::Push | Op::PushPull | Op::RowPush);
        let dead = if head.sync && pushes {
            self.dead_worker()
        } else {
            None
        };
        match head.op {
            _ if dead.is_some() => {
                let why = dead.as_deref().unwrap_or_default();
                answer(Err(format!("{}: {why}", st.name())));
            }
            _ if pushes && Self::already_applied(st, &head, tag).is_some() => {
                tracing::debug!(
                    server = self.my_rank(),
                    key,
                    rank,
                    tag,
                    rounds = st.rounds,
                    "a push of a round this key holds: answered"
                );
                // A retry of a round this key holds (replicas): answered,
                // not applied again.
                answer(Ok(Self::already_applied(st, &head, tag).flatten()));
            }
            Op::Push | Op::PushPull | Op::RowPush => {
                // A shared-memory push is in the worker's slot.
                let vals = if head.shm {
                    match st.shm_input(&head, &vals, rank) {
                        Ok(v) => {
                            st.shm_used(rank);
                            v
                        }
                        Err(e) => return answer(Err(e)),
                    }
                } else {
                    vals
                };
                let rule = self.rule.read().clone();
                let before = st.rounds;
                st.push(&self.kernels, rule.as_ref(), head, vals, rank, answer);
                if let Some(c) = self.ckpt.get() {
                    if st.rounds != before && st.rounds % c.every == 0 {
                        self.record(key, st);
                    }
                }
            }
            Op::Pull if head.shm => match st.check_shm(&head) {
                Ok(()) => {
                    st.shm_used(rank);
                    answer(Ok(Some(Bytes::new())))
                }
                Err(e) => answer(Err(e)),
            },
            Op::Pull => answer(Ok(Some(st.snapshot()))),
            Op::RowPull => answer(row_pull(st, &vals).map(Some)),
            Op::Check => answer(
                crate::wire::Check::decode(&vals)
                    .and_then(|c| st.check(&head, &c, rank))
                    .map(|p| Some(p.map(Bytes::from).unwrap_or_default())),
            ),
            Op::Init | Op::Replicate => unreachable!("handled in key_request"),
        }
    }

    fn init(&self, key: u64, head: Head, vals: Bytes, answer: Answer) {
        let (id, part) = decode_ps_key(key, self.range_begin.load(Ordering::Acquire));
        if head.compression != 0 || vals.len() % head.dtype.size() != 0 {
            return answer(Err(format!(
                "key id {id} part {part}: an init needs whole uncompressed {} elements, got {} bytes",
                head.dtype,
                vals.len()
            )));
        }
        let copy = {
            let mut entries = self.entries.write();
            if entries.contains_key(&key) {
                return answer(Err(format!(
                    "key id {id} part {part} is already initialized on this server"
                )));
            }
            let st = EntryState::new(id, part, head.dtype, &vals, self.workers);
            self.record(key, &st);
            let copy = self.copies(key).then(|| st.copy());
            entries.insert(key, Entry::new(st));
            copy
        };
        // With replicas the init is answered once the backup holds it.
        match (copy, self.repl.get()) {
            (Some((c, value)), Some(p)) => {
                p.send(key, head.dtype, c, &value, move || answer(Ok(None)))
            }
            _ => answer(Ok(None)),
        }
    }

    fn command(self: &Arc<Self>, req: KvRequest, r: Responder) {
        let body = &req.body[..];
        let result: std::result::Result<Vec<u8>, String> = match req.cmd {
            command::CONTROLLER if body.starts_with(b"{\"optimizer\"") => self.set_optimizer(body),
            command::SET_MULTI_PRECISION => {
                self.multi_precision.store(true, Ordering::Release);
                self.settings_changed();
                Ok(Vec::new())
            }
            // Stopping happens after the reply below.
            command::STOP_SERVER => Ok(Vec::new()),
            command::SYNC_MODE => {
                self.sync_mode.store(true, Ordering::Release);
                self.settings_changed();
                Ok(Vec::new())
            }
            command::SET_GRADIENT_COMPRESSION => {
                *self.compression_params.lock() = Some(String::from_utf8_lossy(body).into_owned());
                self.settings_changed();
                Ok(Vec::new())
            }
            command::CHECKPOINT => self.checkpoint_all().map(|()| Vec::new()),
            command::SET_PROFILER_PARAMS => self.profiler(body),
            command::GET_STATES => self.get_states(),
            command::SET_STATES => self.set_states(body),
            head => match self.controller.read().clone() {
                Some(c) => c(head, body),
                None => Err(format!(
                    "command {head} is not one pskv knows and the server has no controller"
                )),
            },
        };
        match result {
            Ok(b) => r.reply_body(Bytes::from(b)),
            Err(e) => r.error(e),
        }
        // Subtle: only once the reply is queued on its link may `wait`
        // return: the server's owner then shuts the node down, which flushes
        // queued replies but closes idle links, so a stop acknowledged
        // before its reply was queued could be lost (seen in CI as a
        // worker's "connection lost" on the stop command).
        if req.cmd == command::STOP_SERVER {
            let mut s = self.stopped.lock();
            if s.is_none() {
                *s = Some(None);
            }
            self.stop_cv.notify_all();
        }
    }

    fn set_optimizer(&self, body: &[u8]) -> std::result::Result<Vec<u8>, String> {
        #[derive(serde::Deserialize)]
        struct Msg {
            optimizer: Optimizer,
        }
        let m: Msg = serde_json::from_slice(body).map_err(|e| format!("bad optimizer: {e}"))?;
        m.optimizer.validate().map_err(|e| e.to_string())?;
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if m.optimizer.multi_precision {
            self.multi_precision.store(true, Ordering::Release);
        }
        *self.rule.write() = Some(Rule::Optimizer {
            opt: Arc::new(m.optimizer),
            generation,
        });
        self.settings_changed();
        Ok(Vec::new())
    }

    fn profiler(&self, body: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let text = String::from_utf8_lossy(body);
        match text.trim() {
            "start" => self.engine.start_profiling(),
            "stop" => self.engine.stop_profiling(),
            t if t.starts_with("dump:") => self
                .engine
                .write_profile(&t["dump:".len()..])
                .map_err(|e| e.to_string())?,
            t => {
                return Err(format!(
                    "unknown profiler command '{t}': expected start, stop or dump:<path>"
                ))
            }
        }
        Ok(Vec::new())
    }

    fn generation(&self) -> Option<u64> {
        match &*self.rule.read() {
            Some(Rule::Optimizer { generation, .. }) => Some(*generation),
            _ => None,
        }
    }

    fn get_states(&self) -> std::result::Result<Vec<u8>, String> {
        let generation = self
            .generation()
            .ok_or("the server has no optimizer, so no states")?;
        let entries = self.entries_snapshot();
        let mut out: Vec<(u64, OptState)> = Vec::new();
        for (k, e) in entries.into_iter().filter(|(k, _)| self.serves(*k)) {
            let st = e.st.lock();
            if st.opt.generation == generation {
                if let Some(s) = &st.opt.state {
                    let mut s = s.clone();
                    s.master = st.master.clone().or(s.master);
                    out.push((k, s));
                }
            }
        }
        out.sort_by_key(|(k, _)| *k);
        postcard::to_stdvec(&out).map_err(|e| e.to_string())
    }

    fn set_states(&self, body: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let generation = self
            .generation()
            .ok_or("set an optimizer before loading its states")?;
        let states: Vec<(u64, OptState)> =
            postcard::from_bytes(body).map_err(|e| format!("bad states: {e}"))?;
        // Every server gets the whole list and takes the keys of its range.
        let (begin, end) = (
            self.range_begin.load(Ordering::Acquire),
            self.range_end.load(Ordering::Acquire),
        );
        let states: Vec<(u64, OptState)> = states
            .into_iter()
            .filter(|(k, _)| *k >= begin && *k < end)
            .collect();
        let entries = self.entries.read();
        for (k, _) in &states {
            if !entries.contains_key(k) {
                return Err(format!(
                    "states for {} which this server does not hold",
                    self.describe(*k)
                ));
            }
        }
        let rule = self.rule.read().clone();
        for (k, mut s) in states {
            if let Some(Rule::Optimizer { opt, .. }) = &rule {
                opt.note_count(s.count);
            }
            let mut st = entries[&k].st.lock();
            if let Some(m) = s.master.take() {
                if m.len() != st.elems {
                    return Err(format!(
                        "master weights of {} have the wrong size",
                        self.describe(k)
                    ));
                }
                st.master = Some(m);
            }
            st.opt = KeyState {
                generation,
                state: Some(s),
            };
        }
        Ok(Vec::new())
    }
}

/// The rows a row pull asks for.
fn row_pull(st: &EntryState, vals: &[u8]) -> std::result::Result<Bytes, String> {
    let (h, rest) = split_rows(vals)?;
    if !rest.is_empty() {
        return Err(format!(
            "a row pull of {} has {} stray bytes",
            st.name(),
            rest.len()
        ));
    }
    if st.elems % h.row_len != 0 {
        return Err(format!(
            "{}: rows of {} elements do not divide its {} elements",
            st.name(),
            h.row_len,
            st.elems
        ));
    }
    let nrows = st.elems / h.row_len;
    let rb = h.row_len * st.dtype.size();
    let mut out = Vec::with_capacity(h.rows.len() * rb);
    let v = st.value_bytes();
    for &r in &h.rows {
        if r < 0 || r as usize >= nrows {
            return Err(format!(
                "{}: row {r} is outside its {nrows} rows",
                st.name()
            ));
        }
        let r = r as usize;
        out.extend_from_slice(&v[r * rb..(r + 1) * rb]);
    }
    Ok(Bytes::from(out))
}
