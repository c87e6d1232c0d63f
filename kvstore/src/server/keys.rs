//! A request's keys: a data request split into its keys (`serve`), the
//! engine op on each key's var (one at a time per key, in arrival order),
//! its checks, and what it does to the key's state (init, push into the
//! round, pull, row-sparse pull).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use pskv_engine::{OpSpec, Property, RunContext};
use pskv_transport::protocol::role_rank;
use pskv_transport::{KvRequest, Responder, Role};

use super::entry::{Answer, EntryState};
use super::replica::{answer_all, KeyWork};
use super::reply::{self, Reply};
use super::{Entry, Inner, INLINE_BYTES};
use crate::error::Fault;
use crate::wire::{decode_ps_key, split_rows, Head, Op};

impl Inner {
    /// Serves a request: a command goes to `commands.rs`; a data request
    /// has its head and sender checked, each of its keys handed to
    /// `key_request`, and is answered once every key is done (`reply.rs`).
    pub(super) fn serve(self: &Arc<Self>, mut req: KvRequest, r: Responder) {
        if req.command {
            self.command(req, r);
            return;
        }
        let head = match Head::decode(req.cmd) {
            Ok(h) => h,
            Err(e) => return r.error(e.to_string()),
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
        // The transport checks the lengths only of a frame flagged as a
        // push; the head's op is ours to check.
        if head.op != Op::Pull
            && req.lens.iter().map(|&l| l as u64).sum::<u64>() != req.vals.len() as u64
        {
            return r.error(format!(
                "the request's value lengths do not add up to its {} bytes of values",
                req.vals.len()
            ));
        }
        let work = |key, vals, answer| KeyWork {
            key,
            head,
            vals,
            rank: rank as usize,
            tag,
            answer,
        };
        if let [key] = req.keys[..] {
            // Any other op's values are the key's whole (checked above).
            let vals = if head.op == Op::Pull {
                Bytes::new()
            } else {
                std::mem::take(&mut req.vals)
            };
            let answer = reply::one(
                r,
                std::mem::take(&mut req.keys),
                std::mem::take(&mut req.lens),
                pull,
            );
            return self.key_request(work(key, vals, answer));
        }
        let reply = Reply::new(r, std::mem::take(&mut req.keys), pull);
        let mut at = 0usize;
        for (i, (&key, &len)) in reply.keys().iter().zip(&req.lens).enumerate() {
            let vals = if head.op == Op::Pull {
                Bytes::new()
            } else {
                let v = req.vals.slice(at..at + len as usize);
                at += len as usize;
                v
            };
            self.key_request(work(key, vals, reply.answer(i)));
        }
    }

    /// Schedules the work on one ps key.
    pub(super) fn key_request(self: &Arc<Self>, w: KeyWork) {
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
            return (w.answer)(Err(Fault::Mismatch(format!(
                "{} was never initialized on this server: call init first",
                self.describe(key)
            ))));
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
            self.engine.push_async(spec, move |rc, completion| {
                let mut st = e2.st.lock();
                e2.defer.open();
                let before = st.rounds;
                me.key_op(&rc, &mut st, w);
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
            self.engine.push_sync(spec, move |rc| {
                let mut st = e2.st.lock();
                me.key_op(&rc, &mut st, w);
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
    pub(super) fn key_op(&self, rc: &RunContext<'_>, st: &mut EntryState, w: KeyWork) {
        let KeyWork {
            key,
            head,
            vals,
            rank,
            tag,
            answer,
        } = w;
        let pushes = matches!(head.op, Op::Push | Op::PushPull | Op::RowPush);
        self.count_gate_rounds_of(key, st);
        // A sync push of a round this key holds complete (the count learned
        // from the push itself first: `entry/cut_short.rs`).
        let done = pushes && head.sync && st.round_done(tag);
        let dead = if head.sync && pushes {
            self.dead_worker()
        } else {
            None
        };
        match head.op {
            _ if dead.is_some() => {
                let why = dead.as_deref().unwrap_or_default();
                answer(Err(Fault::Unavailable(format!("{}: {why}", st.name()))));
            }
            _ if done => {
                tracing::debug!(
                    server = self.my_rank(),
                    key,
                    rank,
                    tag,
                    rounds = st.rounds,
                    "a push of a round this key holds: answered"
                );
                // A push of a completed round (a retry whose answer was
                // lost; at a backup, of a round the primary copied there):
                // answered, not applied again.
                answer(st.answer_done(&head));
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
                // (Only for pushes through a slot: no lock on other paths.)
                st.gate_ok =
                    head.sync && head.shm && self.gate_ok(key, st.nbytes(), rule.is_none());
                let before = st.rounds;
                // Profiling: the push taken in (and folded, where it can
                // be) or the round summed, then the
                // update, as slices of their own in the op's.
                let t0 = rc.profiling().then(Instant::now);
                st.time_update = t0.is_some();
                let answer = self.maybe_cut(st, rank, answer);
                st.push(&self.kernels, rule.as_ref(), head, vals, rank, answer);
                if let Some(t0) = t0 {
                    let name = st.name();
                    match st.update_span.take() {
                        Some((a, b)) => {
                            rc.record("server sum", &name, t0, a);
                            let step = if rule.is_some() {
                                "server optimizer step"
                            } else {
                                "server store sum"
                            };
                            rc.record(step, &name, a, b);
                        }
                        None if st.rounds != before => {
                            rc.record("server sum", &name, t0, Instant::now())
                        }
                        None => rc.record("server push in", &name, t0, Instant::now()),
                    }
                }
                if let (true, Some(log), Some(began)) =
                    (st.rounds != before, self.rounds.get(), st.round_began)
                {
                    log.round_done(key, began.elapsed(), || st.name());
                }
                if let Some(c) = self.ckpt.get() {
                    if st.rounds != before && st.rounds % c.every == 0 {
                        self.record(key, st);
                    }
                }
            }
            Op::Pull if head.shm => answer(st.pull_shm(&head, rank)),
            Op::Pull => answer(Ok(Some(st.snapshot()))),
            Op::RowPull => answer(row_pull(st, &vals).map(Some)),
            Op::Check => answer(crate::wire::Check::decode(&vals).and_then(|c| {
                let seg = st.check(&head, &c, rank)?;
                if head.sync {
                    // After this server's restart: rounds the worker saw
                    // complete (`entry/cut_short.rs`).
                    st.learn_round(c.seen);
                }
                Ok(Some(seg.unwrap_or_default()))
            })),
            Op::Init | Op::Replicate => unreachable!("handled in key_request"),
        }
    }

    /// Whether a key part of `nbytes` may have its rounds summed by its
    /// workers (`gate/mod.rs`): the server has nothing to add to them (no
    /// optimizer, no checkpoints, which record rounds as the server sees
    /// them, no copies for a backup, no fault set for a test), and the part
    /// is small enough.
    fn gate_ok(&self, key: u64, nbytes: usize, no_rule: bool) -> bool {
        no_rule
            && nbytes <= self.worker_sum_bytes.load(Ordering::Acquire)
            && self.workers <= crate::gate::MAX_WORKERS
            && self.ckpt.get().is_none()
            && !self.copies(key)
            && self.cut_round.load(Ordering::Acquire) == 0
            && self.fault.lock().is_none()
    }

    /// Tests (`Server::die_after_answering_rank_0`): the answer of the
    /// first push of a rank other than 0 taken into the round the fault
    /// names is held back until this server died, 300 ms after it was due
    /// (rank 0's, due first, has left by then).
    fn maybe_cut(&self, st: &EntryState, rank: usize, answer: Answer) -> Answer {
        let round = self.cut_round.load(Ordering::Acquire);
        if round == 0 || rank == 0 || st.rounds + 1 != round {
            return answer;
        }
        let Some(die) = self.cut.lock().take() else {
            return answer;
        };
        self.cut_round.store(0, Ordering::Release);
        Box::new(move |_| {
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(300));
                die();
                drop(answer);
            });
        })
    }

    pub(super) fn init(&self, key: u64, head: Head, vals: Bytes, answer: Answer) {
        let (id, part) = decode_ps_key(key, self.range_begin.load(Ordering::Acquire));
        if head.compression != 0 || vals.len() % head.dtype.size() != 0 {
            return answer(Err(Fault::Malformed(format!(
                "key id {id} part {part}: an init needs whole uncompressed {} elements, got {} bytes",
                head.dtype,
                vals.len()
            ))));
        }
        let copy = {
            let mut entries = self.entries.write();
            if entries.contains_key(&key) {
                return answer(Err(Fault::Mismatch(format!(
                    "key id {id} part {part} is already initialized on this server"
                ))));
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
}

/// The rows a row pull asks for.
pub(super) fn row_pull(st: &EntryState, vals: &[u8]) -> std::result::Result<Bytes, Fault> {
    let (h, rest) = split_rows(vals)?;
    if !rest.is_empty() {
        return Err(Fault::Mismatch(format!(
            "a row pull of {} has {} stray bytes",
            st.name(),
            rest.len()
        )));
    }
    if st.elems % h.row_len != 0 {
        return Err(Fault::Mismatch(format!(
            "{}: rows of {} elements do not divide its {} elements",
            st.name(),
            h.row_len,
            st.elems
        )));
    }
    let nrows = st.elems / h.row_len;
    let rb = h.row_len * st.dtype.size();
    let mut out = Vec::with_capacity(h.rows.len() * rb);
    let v = st.value_bytes();
    for &r in &h.rows {
        if r < 0 || r as usize >= nrows {
            return Err(Fault::Mismatch(format!(
                "{}: row {r} is outside its {nrows} rows",
                st.name()
            )));
        }
        let r = r as usize;
        out.extend_from_slice(&v[r * rb..(r + 1) * rb]);
    }
    Ok(Bytes::from(out))
}
