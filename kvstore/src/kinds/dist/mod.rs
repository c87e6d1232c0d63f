//! The worker of `dist_sync`, `dist_async` and `dist_sync_device`: the part
//! MXNet's `kvstore_dist.h` plays, on pskv's engine and transport.
//!
//! A push reduces the key's local values (CPU, or devices), then one engine
//! op sends every part of the key (zero-copy slices of the reduced buffer,
//! or 2-bit/1-bit codes with the key's residual; from a GPU, each part
//! staged through pinned memory as it is sent, see `staging`) and
//! completes when every server answered. It writes the key's var, so the next push or pull of
//! the key waits for it; in sync mode the server answers a push only when
//! the round of all workers is summed and applied, so a pull after a push
//! sees that round's result.
//!
//! Two server modes:
//! - **server optimizer** (default; [`Flavor::set_optimizer`]): servers sum
//!   and run the optimizer; a pull fetches the weights.
//! - **summation only** ([`Flavor::set_updater`]): servers sum; every push
//!   is a push-pull that brings the sum back, and the worker's updater
//!   applies it to the worker's own copy of the weights, which a pull
//!   reads. All workers apply the same sums, so the copies stay equal.
//!
//! # Invariants of an op in flight ([`Inflight`])
//!
//! An op with `n` parts completes exactly once: when the last part's answer
//! arrives, or when the watchdog finds it past its deadline. Answers copy
//! into the op's output under the read lock of `done`; the finisher takes
//! the completion under its write lock. So once an op has finished, no late
//! answer writes into a tensor that the next op may already own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use pskv_engine::{Completion, Engine, OpSpec, Property, Var};
use pskv_transport::{Group, KvResponse, KvWorker, Postoffice, RequestOptions, TransportError};

use crate::comm::Comm;
use crate::compression::Compression;
use crate::dtype::DType;
use crate::error::{KvError, Result};
use crate::key::Key;
use crate::kinds::local::{check_outs, check_row_sparse_pull, check_values, LocalKey};
use crate::kinds::{split_pushpull, Batch, Batch2, Flavor, Kind};
use crate::optimizer::{OptState, Optimizer, StateVals};
use crate::registry::{Meta, Registry};
use crate::shm::Segment;
use crate::store::Options;
use crate::tensor::{check_rows, gpu_of, Buf, Storage, Tensor};
use crate::updater::{Rule, Updater};
use crate::wire::{command, plan, rows_header, Head, Op, Part};
use staging::{Staging, Way};

mod collective;
mod segments;
mod staging;

/// Ops on at most this many bytes run at once on the thread that makes
/// them ready (they only hand buffers to the transport).
const INLINE_BYTES: usize = 1 << 20;

/// A mutable pointer to a buffer that several answers fill (disjoint
/// ranges), moved into the answers' callbacks.
#[derive(Clone, Copy)]
struct OutPtr(*mut u8, usize);
// SAFETY: the pointer targets a buffer the op owns for writing until it
// completes; callbacks write disjoint ranges, under `Inflight::done`'s
// read lock, and never after the op finished (see the module docs).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Copies `src` to `at` (bounds checked against the buffer).
    fn write(&self, at: usize, src: &[u8]) -> std::result::Result<(), String> {
        if at + src.len() > self.1 {
            return Err(format!(
                "an answer of {} bytes at {at} overruns the {}-byte output",
                src.len(),
                self.1
            ));
        }
        // SAFETY: in bounds (checked); see the type's docs for exclusivity.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.add(at), src.len()) };
        Ok(())
    }
}

/// An op waiting for its parts' answers.
struct Inflight {
    done: RwLock<Option<Completion>>,
    remaining: AtomicUsize,
    error: Mutex<Option<String>>,
    deadline: Instant,
    op: &'static str,
    key: String,
    /// Device lanes that carry the op's staging copies (`staging`): the op
    /// completes only once they are drained, so no copy of its outlives it.
    settle: staging::Lanes,
}

impl Inflight {
    fn new(
        c: Completion,
        parts: usize,
        timeout: Duration,
        op: &'static str,
        key: &Key,
        settle: staging::Lanes,
    ) -> Arc<Inflight> {
        Arc::new(Inflight {
            done: RwLock::new(Some(c)),
            remaining: AtomicUsize::new(parts),
            error: Mutex::new(None),
            deadline: Instant::now() + timeout,
            op,
            key: key.to_string(),
            settle,
        })
    }

    /// One part answered: `on_ok` stores its values (under the read lock).
    fn part_done(
        &self,
        r: std::result::Result<KvResponse, TransportError>,
        on_ok: impl FnOnce(&KvResponse) -> std::result::Result<(), String>,
    ) {
        {
            let g = self.done.read();
            if g.is_none() {
                return;
            }
            let res = r.map_err(|e| e.to_string()).and_then(|resp| on_ok(&resp));
            if let Err(e) = res {
                self.error.lock().get_or_insert(e);
            }
        }
        // AcqRel: the last answer sees every earlier answer's writes.
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish(None);
        }
    }

    /// Completes the op (with `timeout` as the error if given).
    fn finish(&self, timeout: Option<Duration>) {
        let Some(c) = self.done.write().take() else {
            return;
        };
        let err = match timeout {
            Some(after) => Some(KvError::Timeout {
                what: format!(
                    "the servers to answer a {} of key {} ({} of its parts unanswered)",
                    self.op,
                    self.key,
                    self.remaining.load(Ordering::Acquire)
                ),
                after,
            }),
            None => self.error.lock().take().map(|message| KvError::Server {
                op: self.op,
                key: self.key.clone(),
                message,
            }),
        };
        // Subtle: every staging copy of the op was queued under the read
        // lock of `done` (answers) or before its part was sent, so all are
        // queued by now (the lock was just taken for writing, or every part
        // answered): draining the lanes covers them.
        staging::settle(self.settle.clone(), move |drained| match (err, drained) {
            (None, Ok(())) => c.complete(),
            (Some(e), _) => c.fail(e),
            (None, Err(e)) => c.fail(KvError::from(e)),
        });
    }
}

/// Fails ops past their deadline.
struct Watchdog {
    list: Mutex<Vec<Weak<Inflight>>>,
    stop: AtomicBool,
    timeout: Duration,
}

impl Watchdog {
    fn start(timeout: Duration) -> Arc<Watchdog> {
        let w = Arc::new(Watchdog {
            list: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            timeout,
        });
        let weak = Arc::downgrade(&w);
        let _ = std::thread::Builder::new()
            .name("pskv-kv-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(50));
                let Some(w) = weak.upgrade() else { return };
                if w.stop.load(Ordering::Acquire) {
                    return;
                }
                let now = Instant::now();
                let mut expired = Vec::new();
                w.list.lock().retain(|x| match x.upgrade() {
                    Some(i) if i.done.read().is_none() => false,
                    Some(i) if i.deadline <= now => {
                        expired.push(i);
                        false
                    }
                    Some(_) => true,
                    None => false,
                });
                for i in expired {
                    i.finish(Some(w.timeout));
                }
            });
        w
    }

    fn add(&self, i: &Arc<Inflight>) {
        self.list.lock().push(Arc::downgrade(i));
    }
}

/// One key of a distributed store.
struct DistKey {
    local: Arc<LocalKey>,
    parts: Vec<Part>,
    /// Elements per unit of the parts (the row length of keys of two or
    /// more dimensions, else 1).
    unit: usize,
    /// The key's var: pushes write it, pulls read it.
    var: Var,
    /// The compression residual of pushes from the host (f32, the key's
    /// size; pushes from a GPU keep theirs on it, `staging`); touched only
    /// by ops that write `var`.
    residual: Mutex<Vec<f32>>,
    /// Where the servers' sums land in summation-only mode.
    sum: Mutex<Option<Tensor>>,
    /// Per part, the shared segment of a co-located server (sync mode).
    segs: RwLock<Vec<Option<Arc<Segment>>>>,
    /// Pushes of this key so far (replicas: each push carries its round,
    /// this count after it); changed only by ops that write `var`.
    pushes: AtomicU64,
    /// Host buffers for values on a GPU (`staging`).
    stage: Staging,
}

/// Whether a request could not even start because its node cannot be
/// reached (no link, and making one failed).
fn unreachable(e: &TransportError) -> bool {
    matches!(
        e,
        TransportError::Auth { .. }
            | TransportError::Io { .. }
            | TransportError::NotRunning(_)
            | TransportError::Request(_)
    )
}

/// One part's request, as sent (and as sent again to a backup).
#[derive(Clone)]
struct PartSend {
    i: usize,
    part: Part,
    head: Head,
    priority: i32,
    tag: u64,
    payload: Bytes,
}

/// What answers of a part request are handed to: part index and answer.
type OnAnswer = Arc<dyn Fn(usize, &KvResponse) -> std::result::Result<(), String> + Send + Sync>;

/// What the part requests of one op share.
#[derive(Clone)]
struct Round {
    head: Head,
    priority: i32,
    /// The push's round (replicas), or 0.
    tag: u64,
    /// The op, for errors (`push`, `pull`, ...).
    name: &'static str,
    on_answer: OnAnswer,
}

impl Round {
    /// Answers that carry nothing to keep.
    fn ignore_answers(head: Head, priority: i32, tag: u64, name: &'static str) -> Round {
        Round {
            head,
            priority,
            tag,
            name,
            on_answer: Arc::new(|_, _| Ok(())),
        }
    }
}

/// The distributed worker.
pub(crate) struct DistStore {
    engine: Engine,
    comm: Comm,
    opts: Options,
    po: Postoffice,
    kv: KvWorker,
    sync: bool,
    device: bool,
    keys: Registry<DistKey>,
    compression: RwLock<Compression>,
    worker_rule: RwLock<Option<Rule>>,
    server_mp: AtomicBool,
    server_opt: AtomicBool,
    watchdog: Arc<Watchdog>,
    /// Failures already reported to a caller by `dist_key` (the last few):
    /// `close` does not report them a second time.
    reported: Mutex<Vec<Arc<pskv_engine::OpFailure>>>,
    /// Per server rank, how many times it restarted: a thread mapping a
    /// restarted server's segments installs them only if no later restart
    /// happened meanwhile.
    restarts: Vec<AtomicU64>,
    /// Copies of each server's keys (`PSKV_REPLICAS`; see
    /// `server/replica.rs`): with 2, a part whose server died is sent to
    /// the next server, the backup.
    replicas: u32,
    me: Weak<DistStore>,
}

impl DistStore {
    pub(crate) fn start(
        kind: Kind,
        engine: Engine,
        comm: Comm,
        opts: Options,
    ) -> Result<Arc<DistStore>> {
        let cfg = match &opts.transport {
            Some(c) => c.clone(),
            None => pskv_transport::Config::from_env()?,
        };
        if cfg.role != pskv_transport::Role::Worker {
            return Err(KvError::invalid(format!(
                "a {} kvstore is created on workers; this process is a {:?} \
                 (servers run pskv_kvstore::Server, schedulers `pskv scheduler`)",
                kind.name(),
                cfg.role
            )));
        }
        let replicas = if cfg.num_servers > 1 { cfg.replicas } else { 1 };
        let sync = kind != Kind::DistAsync;
        let mut opts = opts;
        if replicas > 1 {
            if !sync {
                return Err(KvError::Unsupported {
                    what: format!("PSKV_REPLICAS={replicas} with {}", kind.name()),
                    why: "replicas keep the rounds of a sync store; use dist_sync".into(),
                });
            }
            // A push must be re-sendable to the backup: no shared slots.
            opts.shm_direct = false;
        }
        let po = Postoffice::start(cfg, None)?;
        let kv = KvWorker::new(&po);
        let store = Arc::new_cyclic(|me| DistStore {
            replicas,
            me: me.clone(),
            server_opt: AtomicBool::new(false),
            watchdog: Watchdog::start(opts.timeout),
            reported: Mutex::new(Vec::new()),
            restarts: (0..po.num_servers()).map(|_| AtomicU64::new(0)).collect(),
            engine,
            comm,
            po,
            kv,
            sync,
            device: kind == Kind::DistSyncDevice,
            keys: Registry::default(),
            compression: RwLock::new(Compression::None),
            worker_rule: RwLock::new(None),
            server_mp: AtomicBool::new(false),
            opts,
        });
        segments::watch_restarts(&store);
        Ok(store)
    }

    fn head(&self, op: Op, dtype: DType, compression: Compression) -> Head {
        Head {
            op,
            dtype,
            compression: compression.code(),
            sync: self.sync,
            multi_precision: self.server_mp.load(Ordering::Acquire),
            shm: false,
            shm_tag: 0,
        }
    }

    fn request_opts(&self, head: Head, priority: i32) -> RequestOptions {
        RequestOptions {
            cmd: head.encode(),
            priority,
            ..RequestOptions::default()
        }
    }

    /// Starts the bookkeeping of an op of `n` part requests: None (and the
    /// op completed) when there are none.
    fn inflight(
        &self,
        dk: &DistKey,
        n: usize,
        completion: Completion,
        name: &'static str,
        settle: staging::Lanes,
    ) -> Option<Arc<Inflight>> {
        if n == 0 {
            staging::settle(settle, move |r| match r {
                Ok(()) => completion.complete(),
                Err(e) => completion.fail(KvError::from(e)),
            });
            return None;
        }
        let inf = Inflight::new(
            completion,
            n,
            self.opts.timeout,
            name,
            &dk.local.key,
            settle,
        );
        self.watchdog.add(&inf);
        Some(inf)
    }

    /// Sends one request per part of `parts` (indices into the key's
    /// parts). `prepare(i)` gives part `i`'s values and, if they travel
    /// through its shared slot, the segment's tag (0: they do not); it runs
    /// just before the part is sent, so a part's copy overlaps the transfer
    /// of the ones before.
    fn send_parts(
        &self,
        dk: &DistKey,
        parts: &[usize],
        round: &Round,
        completion: Completion,
        settle: staging::Lanes,
        mut prepare: impl FnMut(usize) -> std::result::Result<(Bytes, u16), String>,
    ) {
        let Some(inf) = self.inflight(dk, parts.len(), completion, round.name, settle) else {
            return;
        };
        for &i in parts {
            self.send_prepared(dk, &inf, round, i, prepare(i));
        }
    }

    /// Sends part `i` of an op with the values `prepared` gave (or counts
    /// the part failed).
    fn send_prepared(
        &self,
        dk: &DistKey,
        inf: &Arc<Inflight>,
        round: &Round,
        i: usize,
        prepared: std::result::Result<(Bytes, u16), String>,
    ) {
        let (payload, shm_tag) = match prepared {
            Ok(x) => x,
            Err(e) => return inf.part_done(Err(TransportError::Invalid(e)), |_| Ok(())),
        };
        let head = round.head;
        let send = PartSend {
            i,
            part: dk.parts[i],
            head: Head {
                shm: shm_tag != 0,
                shm_tag,
                ..head
            },
            priority: round.priority,
            tag: round.tag,
            payload,
        };
        // An init is not sent again elsewhere: the backup holds a key only
        // once its primary copied it there.
        let failover = self.replicas > 1 && head.op != Op::Init;
        self.send_part(send, failover, false, inf.clone(), round.on_answer.clone());
    }

    /// The node that serves a part of server rank `server`: the server, or
    /// (replicas) its backup once it is known dead or `to_backup`.
    fn route(&self, server: u32, to_backup: bool) -> pskv_transport::NodeId {
        let primary = pskv_transport::Role::Server.id_of(server);
        if self.replicas > 1 && (to_backup || self.po.is_dead(primary)) {
            pskv_transport::Role::Server.id_of((server + 1) % self.po.num_servers())
        } else {
            primary
        }
    }

    /// Sends one part; with `failover`, a part that fails because its
    /// server died (or its connection broke) is sent once more, to the
    /// backup, with the same values and round.
    fn send_part(
        &self,
        p: PartSend,
        failover: bool,
        to_backup: bool,
        inf: Arc<Inflight>,
        cb: OnAnswer,
    ) {
        let target = self.route(p.part.server, to_backup);
        let opts = RequestOptions {
            cmd: p.head.encode(),
            priority: p.priority,
            target: (self.replicas > 1).then_some(target),
            tag: p.tag,
        };
        let me = self.handle();
        let again = failover.then(|| p.clone());
        let retry = failover.then(|| p.clone());
        let (inf2, cb2) = (inf.clone(), cb.clone());
        let i = p.i;
        let died = move |r: &TransportError| {
            matches!(
                r,
                TransportError::Request(
                    pskv_transport::TrackError::NodeDead { node }
                        | pskv_transport::TrackError::ConnectionLost { node, .. }
                ) if *node == target
            )
        };
        let done = move |r: std::result::Result<KvResponse, TransportError>| {
            let died = r.as_ref().err().is_some_and(died);
            if let (true, Some(p), Some(me)) = (died, again, me.upgrade()) {
                tracing::warn!(
                    "key part {}: {} is gone; sending to its backup",
                    p.part.ps_key,
                    pskv_transport::protocol::describe(target)
                );
                return me.send_part(p, false, true, inf2, cb2);
            }
            inf2.part_done(r, |resp| cb2(i, resp))
        };
        let keys = [p.part.ps_key];
        let lens = [p.payload.len() as u32];
        let sent = match p.head.op {
            Op::Pull => self.kv.pull_with(&keys, opts, done),
            Op::Push | Op::RowPush | Op::Init => {
                self.kv.push_with(&keys, &lens, p.payload, opts, done)
            }
            _ => self.kv.push_pull_with(&keys, &lens, p.payload, opts, done),
        };
        match (sent, retry) {
            // The server died between the routing and the send, or cannot
            // be reached (its link is gone and a new one fails).
            (Err(e), Some(p)) if died(&e) || unreachable(&e) => {
                self.send_part(p, false, true, inf, cb)
            }
            (Err(e), _) => inf.part_done(Err(e), |_| Ok(())),
            (Ok(()), _) => {}
        }
    }

    /// Which parts of a key travel through shared memory now.
    fn shm_parts(&self, dk: &DistKey) -> Vec<Option<Arc<Segment>>> {
        if !self.sync {
            return vec![None; dk.parts.len()];
        }
        dk.segs.read().clone()
    }

    /// Builds the values of part `i` of a push of `grad` (inside an op that
    /// reads `grad` and writes the key's var): shared-slot copy, 2-bit or
    /// 1-bit codes, row-sparse rows, or a zero-copy slice.
    fn push_part(
        &self,
        dk: &DistKey,
        grad: &Tensor,
        compression: Compression,
        seg: Option<&Arc<Segment>>,
        i: usize,
    ) -> std::result::Result<(Bytes, u16), String> {
        // SAFETY: called inside an op that reads `grad` (T1).
        let d = unsafe { grad.data() };
        let size = dk.local.meta.dtype.size();
        let p = dk.parts[i];
        let ub = dk.unit * size;
        if grad.storage() == Storage::RowSparse {
            let rb = dk.unit * size;
            let lo = d.rows.partition_point(|&r| (r as usize) < p.start);
            let hi = d.rows.partition_point(|&r| (r as usize) < p.start + p.len);
            let rel: Vec<i64> = d.rows[lo..hi].iter().map(|r| r - p.start as i64).collect();
            let mut v = rows_header(&rel, dk.unit);
            v.extend_from_slice(&d.bytes()[lo * rb..hi * rb]);
            return Ok((Bytes::from(v), 0));
        }
        let range = p.start * dk.unit..(p.start + p.len) * dk.unit;
        if compression.is_on() {
            let grad: &[f32] = d.typed();
            let mut res = dk.residual.lock();
            if res.len() != grad.len() {
                *res = vec![0.0; grad.len()];
            }
            return compression
                .encode(&self.comm.kernels, &grad[range.clone()], &mut res[range])
                .map(|b| (b, 0))
                .map_err(|e| e.to_string());
        }
        let range = p.start * ub..(p.start + p.len) * ub;
        self.dense_payload(seg, &d.bytes()[range.clone()], || d.share(range))
    }

    /// The payload of a dense part of values `bytes`: a copy into this
    /// worker's shared slot when the part travels through `seg` (then the
    /// payload is the count, with the segment's tag), else `share()`, the
    /// bytes themselves without a copy.
    fn dense_payload(
        &self,
        seg: Option<&Arc<Segment>>,
        bytes: &[u8],
        share: impl FnOnce() -> Bytes,
    ) -> std::result::Result<(Bytes, u16), String> {
        match seg {
            Some(seg) => {
                // SAFETY: this worker's own slot, which the server reads
                // only after the push below (see `shm`).
                unsafe { seg.slot_mut(self.po.my_rank() as usize) }.copy_from_slice(bytes);
                // The server checks the count against the key's size, as it
                // checks a message's length.
                let count = (bytes.len() as u64).to_le_bytes();
                Ok((Bytes::copy_from_slice(&count), seg.tag()))
            }
            None => Ok((share(), 0)),
        }
    }

    /// Pushes the op that sends `grad` to the servers; with `into`, as a
    /// push-pull whose answers (the new values) land in `into`. Either may
    /// be a dense tensor on a GPU: the op then stages it through the key's
    /// pinned buffers part by part (`staging`), each part's copy
    /// overlapping the transfer of the others.
    fn push_op(
        &self,
        dk: &Arc<DistKey>,
        grad: &Tensor,
        into: Option<&Tensor>,
        priority: i32,
    ) -> Result<()> {
        let compression = *self.compression.read();
        let meta = &dk.local.meta;
        let rows = grad.storage() == Storage::RowSparse;
        let on_gpu = gpu_of(grad.ctx()).is_some();
        if rows && on_gpu {
            return Err(KvError::invalid(
                "a row-sparse push from a GPU is staged whole first (a dist bug)",
            ));
        }
        // The pinned send buffer of an uncompressed push from a GPU.
        let send = if on_gpu && !compression.is_on() {
            Some(dk.stage.host_for(grad, Way::Send)?)
        } else {
            None
        };
        let land = into.map(|o| dk.stage.landing(o)).transpose()?;
        let prop = if meta.bytes() <= INLINE_BYTES && !compression.is_on() && !on_gpu {
            Property::Async
        } else {
            Property::Normal
        };
        let name = if into.is_some() { "pushpull" } else { "push" };
        let mut spec = OpSpec::new(if into.is_some() {
            "kvstore_dist_pushpull"
        } else {
            "kvstore_dist_push"
        })
        .priority(priority)
        .property(prop)
        .read(grad.var())
        .write(&dk.var);
        for t in send.iter().chain(
            land.iter()
                .flat_map(|l| [Some(&l.host), l.device.as_ref()])
                .flatten(),
        ) {
            spec = spec.write(t.var());
        }
        let me = self.handle();
        let (dk2, g) = (dk.clone(), grad.clone());
        self.engine.push_async(spec, move |_, completion| {
            let Some(me) = me.upgrade() else {
                completion.fail("the kvstore was closed");
                return;
            };
            let dtype = dk2.local.meta.dtype;
            let segs = if rows || compression.is_on() {
                vec![None; dk2.parts.len()]
            } else {
                me.shm_parts(&dk2)
            };
            let op = match (rows, &land) {
                (true, _) => Op::RowPush,
                (false, None) => Op::Push,
                (false, Some(_)) => Op::PushPull,
            };
            // Replicas: the push's round, so that a backup answers a retry
            // of a round it holds without applying it again.
            let tag = if me.replicas > 1 {
                dk2.pushes.fetch_add(1, Ordering::AcqRel) + 1
            } else {
                0
            };
            let mut round =
                Round::ignore_answers(me.head(op, dtype, compression), priority, tag, name);
            let mut settle = Vec::new();
            if let Some(l) = &land {
                match me.landing(&dk2, l, segs.clone()) {
                    Ok((on_answer, lanes)) => (round.on_answer, settle) = (on_answer, lanes),
                    Err(e) => return completion.fail(e),
                }
            }
            match (&send, on_gpu) {
                (Some(h), _) => me.send_staged(&dk2, &g, h, segs, round, completion, settle),
                (None, true) => me.send_quantized(&dk2, &g, compression, round, completion, settle),
                (None, false) => {
                    let all: Vec<usize> = (0..dk2.parts.len()).collect();
                    let prepare =
                        |i: usize| me.push_part(&dk2, &g, compression, segs[i].as_ref(), i);
                    me.send_parts(&dk2, &all, &round, completion, settle, prepare)
                }
            }
        })?;
        Ok(())
    }

    /// Pushes the op that pulls the key's value into `out` (dense; on a
    /// GPU, through the key's pinned receive buffer, part by part).
    fn pull_op(&self, dk: &Arc<DistKey>, out: &Tensor, priority: i32) -> Result<()> {
        let meta = &dk.local.meta;
        let land = dk.stage.landing(out)?;
        let prop = if meta.bytes() <= INLINE_BYTES && land.device.is_none() {
            Property::Async
        } else {
            Property::Normal
        };
        let mut spec = OpSpec::new("kvstore_dist_pull")
            .priority(priority)
            .property(prop)
            .read(&dk.var)
            .write(land.host.var());
        if let Some(d) = &land.device {
            spec = spec.write(d.var());
        }
        let me = self.handle();
        let dk2 = dk.clone();
        self.engine.push_async(spec, move |_, completion| {
            let Some(me) = me.upgrade() else {
                completion.fail("the kvstore was closed");
                return;
            };
            let dtype = dk2.local.meta.dtype;
            let segs = me.shm_parts(&dk2);
            let (on_answer, settle) = match me.landing(&dk2, &land, segs.clone()) {
                Ok(x) => x,
                Err(e) => return completion.fail(e),
            };
            let round = Round {
                on_answer,
                ..Round::ignore_answers(
                    me.head(Op::Pull, dtype, Compression::None),
                    priority,
                    0,
                    "pull",
                )
            };
            let all: Vec<usize> = (0..dk2.parts.len()).collect();
            me.send_parts(&dk2, &all, &round, completion, settle, |i| {
                Ok((Bytes::new(), segs[i].as_ref().map_or(0, |s| s.tag())))
            });
        })?;
        Ok(())
    }

    /// Pushes the op that pulls rows `row_ids` into the row-sparse `out`.
    fn pull_rows_op(
        &self,
        dk: &Arc<DistKey>,
        out: &Tensor,
        row_ids: &Tensor,
        priority: i32,
    ) -> Result<()> {
        let spec = OpSpec::new("kvstore_dist_pull_row_sparse")
            .priority(priority)
            .property(Property::Normal)
            .read(&dk.var)
            .read(row_ids.var())
            .write(out.var());
        let me = self.handle();
        let (dk2, o, r) = (dk.clone(), out.clone(), row_ids.clone());
        self.engine.push_async(spec, move |_, completion| {
            let Some(me) = me.upgrade() else {
                completion.fail("the kvstore was closed");
                return;
            };
            let meta = &dk2.local.meta;
            // SAFETY: reads `r`, writes `o` (T1).
            let mut rows: Vec<i64> = unsafe { r.data() }.typed::<i64>().to_vec();
            rows.sort_unstable();
            rows.dedup();
            if let Err(e) = check_rows(
                &rows,
                meta.shape[0],
                &format!("pull_row_sparse of key {}", dk2.local.key),
            ) {
                return completion.fail(e);
            }
            let rl = dk2.unit;
            let rb = rl * meta.dtype.size();
            let od = unsafe { o.data_mut() };
            od.set(rows.clone(), Buf::zeroed(rows.len() * rb));
            let buf = od.bytes_mut();
            let ptr = OutPtr(buf.as_mut_ptr(), buf.len());
            // Each part's requested rows are a run of the sorted list.
            let mut payloads = Vec::new();
            let mut offsets = vec![0usize; dk2.parts.len()];
            let mut counts = vec![0usize; dk2.parts.len()];
            let mut at = 0;
            for (i, p) in dk2.parts.iter().enumerate() {
                let lo = at;
                while at < rows.len() && (rows[at] as usize) < p.start + p.len {
                    at += 1;
                }
                if at > lo {
                    let rel: Vec<i64> = rows[lo..at].iter().map(|x| x - p.start as i64).collect();
                    offsets[i] = lo * rb;
                    counts[i] = at - lo;
                    payloads.push((i, Bytes::from(rows_header(&rel, rl))));
                }
            }
            let head = me.head(Op::RowPull, meta.dtype, Compression::None);
            // The answers write into `o`'s buffer: they keep it.
            let keep = o.clone();
            let which: Vec<usize> = payloads.iter().map(|(i, _)| *i).collect();
            let mut bodies: Vec<Option<Bytes>> = vec![None; dk2.parts.len()];
            for (i, b) in payloads {
                bodies[i] = Some(b);
            }
            let round = Round {
                on_answer: Arc::new(move |i, resp| {
                    let _keep = &keep;
                    check_len(resp, counts[i] * rb)?;
                    copy_parts(&ptr, offsets[i], resp)
                }),
                ..Round::ignore_answers(head, priority, 0, "pull_row_sparse")
            };
            me.send_parts(&dk2, &which, &round, completion, Vec::new(), |i| {
                Ok((bodies[i].take().unwrap_or_default(), 0))
            });
        })?;
        Ok(())
    }

    /// A weak handle for ops (an op must not keep the store alive).
    fn handle(&self) -> Weak<DistStore> {
        self.me.clone()
    }

    /// The key, unless an earlier operation on it failed (its server died,
    /// say) and nobody has been told: then that failure, once, and the key
    /// is usable again, so a caller can push again after a server restart.
    fn dist_key(&self, key: &Key) -> Result<Arc<DistKey>> {
        let dk = self.keys.get(key)?;
        if let Some(f) = dk.var.take_failure() {
            let mut r = self.reported.lock();
            if r.len() >= 64 {
                r.remove(0);
            }
            r.push(f.clone());
            return Err(KvError::Engine(pskv_engine::EngineError::Op(f)));
        }
        Ok(dk)
    }

    /// The sum buffer of summation-only mode.
    fn sum_buffer(&self, dk: &DistKey) -> Result<Tensor> {
        let mut s = dk.sum.lock();
        if let Some(t) = s.as_ref() {
            return Ok(t.clone());
        }
        let m = &dk.local.meta;
        let t = Tensor::zeros(&self.engine, &m.shape, m.dtype, pskv_engine::Context::Cpu)?;
        *s = Some(t.clone());
        Ok(t)
    }

    /// Waits for the writes on `vars`, returning the first failure.
    fn wait_vars<'a>(&self, vars: impl IntoIterator<Item = &'a Var>) -> Result<()> {
        let mut first = None;
        for v in vars {
            if let Err(e) = self.engine.wait_for_var_timeout(v, self.opts.timeout) {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn command(&self, head: i32, body: Bytes) -> Result<KvResponse> {
        let pending = if self.replicas > 1 {
            // A dead server's keys are its backup's now: commands go to the
            // servers alive.
            let alive: Vec<pskv_transport::NodeId> = (0..self.po.num_servers())
                .map(|r| pskv_transport::Role::Server.id_of(r))
                .filter(|id| !self.po.is_dead(*id))
                .collect();
            self.kv
                .request_nodes(head, body, &alive, "the servers alive")?
        } else {
            self.kv.request(head, body, Group::SERVERS)?
        };
        Ok(pending.wait(self.opts.timeout)?)
    }

    /// Pushes the op that sends rank 0's initial value of a key.
    fn init_op(&self, dk: &Arc<DistKey>, value: &Tensor) -> Result<()> {
        let spec = OpSpec::new("kvstore_dist_init")
            .property(Property::Normal)
            .read(value.var())
            .write(&dk.var);
        let me = self.handle();
        let (dk2, v) = (dk.clone(), value.clone());
        self.engine.push_async(spec, move |_, completion| {
            let Some(me) = me.upgrade() else {
                completion.fail("the kvstore was closed");
                return;
            };
            let meta = &dk2.local.meta;
            let ub = dk2.unit * meta.dtype.size();
            // SAFETY: reads `v` (T1).
            let d = unsafe { v.data() };
            let dense: Bytes = match v.storage() {
                Storage::Dense => d.share(0..d.bytes().len()),
                Storage::RowSparse => {
                    let mut b = vec![0u8; meta.bytes()];
                    for (i, &r) in d.rows.iter().enumerate() {
                        let r = r as usize;
                        b[r * ub..(r + 1) * ub].copy_from_slice(&d.bytes()[i * ub..(i + 1) * ub]);
                    }
                    Bytes::from(b)
                }
            };
            let payloads: Vec<(usize, Bytes)> = dk2
                .parts
                .iter()
                .enumerate()
                .map(|(i, p)| (i, dense.slice(p.start * ub..(p.start + p.len) * ub)))
                .collect();
            let head = me.head(Op::Init, meta.dtype, Compression::None);
            let all: Vec<usize> = (0..payloads.len()).collect();
            let mut bodies: Vec<Option<Bytes>> =
                payloads.into_iter().map(|(_, b)| Some(b)).collect();
            let round = Round::ignore_answers(head, 0, 0, "init");
            me.send_parts(&dk2, &all, &round, completion, Vec::new(), |i| {
                Ok((bodies[i].take().unwrap_or_default(), 0))
            });
        })?;
        Ok(())
    }
}

fn check_len(resp: &KvResponse, want: usize) -> std::result::Result<(), String> {
    if resp.len() != want {
        return Err(format!(
            "the server answered {} bytes, expected {want}",
            resp.len()
        ));
    }
    Ok(())
}

fn copy_parts(ptr: &OutPtr, at: usize, resp: &KvResponse) -> std::result::Result<(), String> {
    let mut off = at;
    for p in &resp.parts {
        ptr.write(off, p)?;
        off += p.len();
    }
    Ok(())
}

/// What stores the answers of a pull or push-pull in `out`: a part's
/// values from the answer, or from the part's value slot when it went
/// through shared memory. The callback keeps `out` alive.
fn answer_into(
    dk: &DistKey,
    out: &Tensor,
    ptr: OutPtr,
    segs: Vec<Option<Arc<Segment>>>,
    workers: u32,
) -> OnAnswer {
    let ub = dk.unit * dk.local.meta.dtype.size();
    let parts = dk.parts.clone();
    let keep = out.clone();
    Arc::new(move |i, resp| {
        let _keep = &keep;
        let p = parts[i];
        match &segs[i] {
            Some(seg) => {
                check_len(resp, 0)?;
                // SAFETY: the server wrote the value slot before answering
                // and writes it again only in a round this worker has not
                // pushed to yet (see `shm`).
                ptr.write(p.start * ub, unsafe { seg.slot(workers as usize) })
            }
            None => {
                check_len(resp, p.len * ub)?;
                copy_parts(&ptr, p.start * ub, resp)
            }
        }
    })
}

/// Concatenates the states of a key's parts (in part order).
fn join_states(parts: Vec<OptState>) -> Option<OptState> {
    let first = parts.first()?.clone();
    let mut out = OptState {
        count: first.count,
        bufs: first
            .bufs
            .iter()
            .map(|b| match b {
                StateVals::F32(_) => StateVals::F32(Vec::new()),
                StateVals::F64(_) => StateVals::F64(Vec::new()),
            })
            .collect(),
        master: first.master.as_ref().map(|_| Vec::new()),
    };
    for p in parts {
        if p.bufs.len() != out.bufs.len() {
            return None;
        }
        for (o, b) in out.bufs.iter_mut().zip(p.bufs) {
            match (o, b) {
                (StateVals::F32(o), StateVals::F32(b)) => o.extend(b),
                (StateVals::F64(o), StateVals::F64(b)) => o.extend(b),
                _ => return None,
            }
        }
        match (&mut out.master, p.master) {
            (Some(o), Some(m)) => o.extend(m),
            (None, None) => {}
            _ => return None,
        }
    }
    Some(out)
}

/// The state of elements `range` of a key's state.
fn slice_state(s: &OptState, range: std::ops::Range<usize>) -> OptState {
    OptState {
        count: s.count,
        bufs: s
            .bufs
            .iter()
            .map(|b| match b {
                StateVals::F32(v) => StateVals::F32(v[range.clone()].to_vec()),
                StateVals::F64(v) => StateVals::F64(v[range.clone()].to_vec()),
            })
            .collect(),
        master: s.master.as_ref().map(|m| m[range.clone()].to_vec()),
    }
}

impl DistStore {
    /// Adds the keys of an `init` call to this worker's registry (after
    /// the local checks).
    fn register(&self, items: &[(Key, Tensor)]) -> Result<Vec<(Arc<DistKey>, Tensor)>> {
        for (i, (key, _)) in items.iter().enumerate() {
            self.keys.check_new(key)?;
            if items[..i].iter().any(|(k, _)| k == key) {
                return Err(KvError::AlreadyInitialized {
                    key: key.to_string(),
                });
            }
        }
        let ranges = self.po.server_key_ranges();
        let mut added = Vec::with_capacity(items.len());
        for (key, value) in items {
            let meta = Meta::of(value);
            // Keys of two or more dimensions are cut in whole rows, so that
            // row-sparse pushes and pulls map onto parts.
            let (unit, units) = if meta.shape.len() >= 2 && meta.row_len() > 0 {
                (meta.row_len(), meta.shape[0])
            } else {
                (1, meta.len())
            };
            let parts = plan(
                key.id(),
                units,
                unit * meta.dtype.size(),
                meta.len() >= self.opts.bigarray_bound,
                self.opts.partition_bytes,
                &ranges,
            )?;
            let stored = Tensor::zeros(
                &self.engine,
                &meta.shape,
                meta.dtype,
                pskv_engine::Context::Cpu,
            )?;
            let dk = self.keys.insert(
                key,
                DistKey {
                    local: Arc::new(LocalKey::new(key.clone(), meta, stored)),
                    parts,
                    unit,
                    var: Var::named(format!("kvstore key {key}")),
                    residual: Mutex::new(Vec::new()),
                    sum: Mutex::new(None),
                    segs: RwLock::new(Vec::new()),
                    pushes: AtomicU64::new(0),
                    stage: Staging::default(),
                },
            )?;
            added.push((dk, value.clone()));
        }
        Ok(added)
    }

    /// The collective steps of `init`: the workers agree on the keys; rank
    /// 0 sends the values; every worker checks its parts with the servers
    /// (and maps the shared segments). Each step fails on every worker if
    /// it fails on one.
    fn init_together(
        &self,
        items: &[(Key, Tensor)],
        added: &[(Arc<DistKey>, Tensor)],
    ) -> Result<()> {
        let metas: Vec<(Key, Meta)> = items
            .iter()
            .map(|(k, v)| (k.clone(), Meta::of(v)))
            .collect();
        self.collective("init", Ok(()), Some(collective::keys_setting(&metas)))?;
        let mut sent = Ok(());
        if self.po.my_rank() == 0 {
            for (dk, value) in added {
                if let Err(e) = staging::host_once(value, 0).and_then(|v| self.init_op(dk, &v)) {
                    sent = Err(e);
                    break;
                }
            }
            if sent.is_ok() {
                sent = self.wait_vars(added.iter().map(|(dk, _)| &dk.var));
            }
        }
        self.collective("init", sent, None)?;
        let mut checked = Ok(());
        for (dk, _) in added {
            if let Err(e) = self.check_parts(dk, |_| true) {
                checked = Err(e);
                break;
            }
        }
        self.collective("init", checked, None)
    }
}

impl Flavor for DistStore {
    fn init(&self, items: &[(Key, Tensor)]) -> Result<()> {
        let added = match self.register(items) {
            Ok(a) => a,
            Err(e) => return self.collective("init", Err(e), None),
        };
        if let Err(e) = self.init_together(items, &added) {
            // The keys are unusable on every worker (the same error
            // everywhere); the others of the store are not touched.
            for (key, _) in items {
                self.keys.remove(key);
            }
            return Err(e);
        }
        if self.worker_rule.read().is_some() {
            for (dk, _) in &added {
                self.pull_op(dk, &dk.local.stored, 0)?;
            }
            self.wait_vars(added.iter().map(|(dk, _)| dk.local.stored.var()))?;
        }
        Ok(())
    }

    fn push(&self, items: &Batch, priority: i32) -> Result<()> {
        let compression = *self.compression.read();
        let rule = self.worker_rule.read().clone();
        let mut dks = Vec::with_capacity(items.len());
        for (key, values) in items {
            let dk = self.dist_key(key)?;
            check_values(key, &dk.local.meta, values, compression)?;
            if rule.is_some() && values.iter().any(|v| v.storage() == Storage::RowSparse) {
                return Err(KvError::Unsupported {
                    what: format!("row-sparse push of key {key} with a worker-side updater"),
                    why: "summation-only servers send dense sums back; use set_optimizer (server-side)".into(),
                });
            }
            dks.push(dk);
        }
        for (dk, (_, values)) in dks.iter().zip(items) {
            let grad =
                dk.local
                    .reduce(&self.comm, values, Compression::None, self.device, priority)?;
            // Row-sparse values from a GPU are staged whole (their rows are
            // host data); dense ones part by part inside the push.
            let grad = if grad.storage() == Storage::RowSparse {
                dk.stage.send(&grad, priority)?
            } else {
                grad
            };
            match &rule {
                None => self.push_op(dk, &grad, None, priority)?,
                Some(rule) => {
                    let sum = self.sum_buffer(dk)?;
                    self.push_op(dk, &grad, Some(&sum), priority)?;
                    dk.local.apply(&sum, Some(rule), priority)?;
                }
            }
        }
        Ok(())
    }

    fn pull(&self, items: &Batch, priority: i32) -> Result<()> {
        let local = self.worker_rule.read().is_some();
        let mut dks = Vec::with_capacity(items.len());
        for (key, outs) in items {
            let dk = self.dist_key(key)?;
            check_outs(key, &dk.local.meta, outs, "pull")?;
            dks.push(dk);
        }
        for (dk, (_, outs)) in dks.iter().zip(items) {
            if local {
                self.comm.broadcast(&dk.local.stored, outs, priority)?;
            } else {
                self.pull_op(dk, &outs[0], priority)?;
                self.comm.broadcast(&outs[0], outs, priority)?;
            }
        }
        Ok(())
    }

    fn pushpull(&self, items: &Batch2, priority: i32) -> Result<()> {
        let compression = *self.compression.read();
        let local = self.worker_rule.read().is_some();
        let mut dks = Vec::with_capacity(items.len());
        for (key, values, outs) in items {
            let dk = self.dist_key(key)?;
            check_values(key, &dk.local.meta, values, compression)?;
            check_outs(key, &dk.local.meta, outs, "pushpull")?;
            if values.iter().any(|v| v.storage() == Storage::RowSparse) {
                return Err(KvError::Unsupported {
                    what: format!("pushpull of row-sparse values of key {key}"),
                    why: "push row-sparse gradients with push, then pull_row_sparse".into(),
                });
            }
            dks.push(dk);
        }
        if local {
            let (pushes, pulls) = split_pushpull(items);
            self.push(&pushes, priority)?;
            return self.pull(&pulls, priority);
        }
        for (dk, (_, values, outs)) in dks.iter().zip(items) {
            let grad =
                dk.local
                    .reduce(&self.comm, values, Compression::None, self.device, priority)?;
            self.push_op(dk, &grad, Some(&outs[0]), priority)?;
            self.comm.broadcast(&outs[0], outs, priority)?;
        }
        Ok(())
    }

    fn pull_row_sparse(&self, items: &Batch2, priority: i32) -> Result<()> {
        let local = self.worker_rule.read().is_some();
        let mut dks = Vec::with_capacity(items.len());
        for (key, outs, rows) in items {
            let dk = self.dist_key(key)?;
            check_row_sparse_pull(key, &dk.local.meta, outs, rows)?;
            dks.push(dk);
        }
        for (dk, (key, outs, rows)) in dks.iter().zip(items) {
            for (o, r) in outs.iter().zip(rows) {
                if local {
                    crate::kinds::local::gather_rows(key, &dk.local.stored, o, r, priority)?;
                } else {
                    let (h, r) = (
                        dk.stage.host_for(o, Way::Recv)?,
                        staging::host_once(r, priority)?,
                    );
                    self.pull_rows_op(dk, &h, &r, priority)?;
                    crate::comm::copy_prio(&h, o, priority)?;
                }
            }
        }
        Ok(())
    }

    fn set_optimizer(&self, opt: Optimizer) -> Result<()> {
        #[derive(serde::Serialize)]
        struct Msg<'a> {
            optimizer: &'a Optimizer,
        }
        // Collective: a worker whose optimizer cannot be used fails the call
        // on every worker, and the workers' optimizers must be equal.
        let local = (|| -> Result<Vec<u8>> {
            opt.validate()?;
            if self.worker_rule.read().is_some() {
                return Err(KvError::invalid(
                    "this store runs its updater on the workers (set_updater); create a new store to run an optimizer on the servers",
                ));
            }
            // Pushes made before this call on any worker finish under the
            // old rule: wait for this worker's ops (the barrier waits for
            // every worker).
            self.engine.wait_for_all()?;
            serde_json::to_vec(&Msg { optimizer: &opt })
                .map_err(|e| KvError::invalid(format!("encoding the optimizer: {e}")))
        })();
        let body = match local {
            Ok(b) => b,
            Err(e) => return self.collective("set_optimizer", Err(e), None),
        };
        self.collective(
            "set_optimizer",
            Ok(()),
            Some(collective::json_setting(opt.name(), &body)),
        )?;
        let mut result = Ok(());
        if self.po.my_rank() == 0 {
            result = self
                .command(command::CONTROLLER, Bytes::from(body))
                .map(|_| ());
        }
        self.server_mp.store(opt.multi_precision, Ordering::Release);
        self.server_opt.store(true, Ordering::Release);
        self.collective("set_optimizer", result, None)
    }

    fn set_updater(&self, updater: Arc<dyn Updater>) -> Result<()> {
        if self.server_opt.load(Ordering::Acquire) {
            return Err(KvError::invalid(
                "the servers of this store run an optimizer (set_optimizer); create a new store to update on the workers",
            ));
        }
        let first = self.worker_rule.read().is_none();
        *self.worker_rule.write() = Some(Rule::Custom(updater));
        if first {
            // The workers' copies start from the servers' values.
            let all = self.keys.all();
            for (_, dk) in &all {
                self.pull_op(dk, &dk.local.stored, 0)?;
            }
            self.wait_vars(all.iter().map(|(_, dk)| dk.local.stored.var()))?;
        }
        Ok(())
    }

    fn set_compression(&self, c: Compression) -> Result<()> {
        c.validate()?;
        *self.compression.write() = c;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.po.barrier(Group::WORKERS, self.opts.timeout)?;
        // Servers that checkpoint record every key now (rank 0 asks, once,
        // and is answered once the files are written); the second barrier
        // holds every worker until then, so no round completed before a
        // barrier returned can be lost to a server crash. A checkpoint
        // that cannot be written fails the barrier on every worker.
        let mut recorded = Ok(());
        if self.po.my_rank() == 0 {
            recorded = self.command(command::CHECKPOINT, Bytes::new()).map(|_| ());
        }
        self.collective("barrier", recorded, None)
    }

    fn rank(&self) -> u32 {
        self.po.my_rank()
    }

    fn num_workers(&self) -> u32 {
        self.po.num_workers()
    }

    fn num_dead_nodes(&self, timeout: Duration) -> Result<usize> {
        Ok(self.po.dead_nodes(timeout).len())
    }

    fn send_command_to_servers(&self, head: i32, body: &[u8]) -> Result<()> {
        self.command(head, Bytes::copy_from_slice(body)).map(|_| ())
    }

    fn optimizer_states(&self) -> Result<Vec<(Key, OptState)>> {
        if self.worker_rule.read().is_some() {
            return Err(KvError::Unsupported {
                what: "saving the states of a worker-side updater".into(),
                why: "a custom updater keeps its own state".into(),
            });
        }
        self.engine.wait_for_all()?;
        let resp = self.command(command::GET_STATES, Bytes::new())?;
        let mut by_ps: HashMap<u64, OptState> = HashMap::new();
        for (node, body) in resp.bodies {
            let v: Vec<(u64, OptState)> = postcard::from_bytes(&body).map_err(|e| {
                KvError::invalid(format!("node {node} sent unreadable optimizer states: {e}"))
            })?;
            by_ps.extend(v);
        }
        let mut out = Vec::new();
        for (key, dk) in self.keys.all() {
            let parts: Option<Vec<OptState>> =
                dk.parts.iter().map(|p| by_ps.remove(&p.ps_key)).collect();
            if let Some(s) = parts.and_then(join_states) {
                out.push((key, s));
            }
        }
        Ok(out)
    }

    fn set_optimizer_states(&self, states: Vec<(Key, OptState)>) -> Result<()> {
        let mut list: Vec<(u64, OptState)> = Vec::new();
        for (key, s) in &states {
            let dk = self.dist_key(key)?;
            let n = dk.local.meta.len();
            let lens_ok = s.bufs.iter().all(|b| match b {
                StateVals::F32(v) => v.len() == n,
                StateVals::F64(v) => v.len() == n,
            }) && s.master.as_ref().is_none_or(|m| m.len() == n);
            if !lens_ok {
                return Err(KvError::mismatch(
                    key,
                    format!("the saved optimizer state does not have the key's {n} elements"),
                ));
            }
            for p in &dk.parts {
                let r = p.start * dk.unit..(p.start + p.len) * dk.unit;
                list.push((p.ps_key, slice_state(s, r)));
            }
        }
        self.engine.wait_for_all()?;
        let body = postcard::to_stdvec(&list)
            .map_err(|e| KvError::invalid(format!("encoding optimizer states: {e}")))?;
        self.command(command::SET_STATES, Bytes::from(body))
            .map(|_| ())
    }

    fn abort_collective(&self, call: &'static str, e: KvError) -> Result<()> {
        self.collective(call, Err(e), None)
    }

    fn shared_memory_parts(&self) -> usize {
        self.keys
            .all()
            .iter()
            .map(|(_, dk)| dk.segs.read().iter().filter(|s| s.is_some()).count())
            .sum()
    }

    fn close(&self) -> Result<()> {
        // Subtle: an op queued behind a failed one inherits its failure and
        // may store it on the key's var again after a caller was told of
        // it; such a failure is not news.
        let result = match self.engine.wait_for_all() {
            Err(pskv_engine::EngineError::Op(f))
                if self.reported.lock().iter().any(|r| Arc::ptr_eq(r, &f)) =>
            {
                Ok(())
            }
            r => r,
        };
        let barrier = self.barrier();
        if self.po.my_rank() == 0 && barrier.is_ok() {
            if let Err(e) = self.command(command::STOP_SERVER, Bytes::new()) {
                tracing::warn!("stopping the servers: {e}");
            }
        }
        self.watchdog.stop.store(true, Ordering::Release);
        self.po.shutdown();
        result?;
        barrier
    }
}
