//! Replicas (`PSKV_REPLICAS=2`): every server's keys are also held by its
//! *backup*, the next server by rank, so that a server's death loses no
//! round (the chain replication of the Parameter Server paper, OSDI'14,
//! with a chain of two).
//!
//! # The protocol
//!
//! - A server (the *primary* of the keys of its range) copies a key's
//!   state (value, optimizer state, f32 master weights, round count) to
//!   its backup after the key's init and after every completed round, and
//!   answers the round's pushes (and lets the key's next request, a pull
//!   say, run) only once the backup acknowledged the copy. So whatever a
//!   worker has seen of a key, the backup holds too.
//! - Every sync push says its round (one more than the key's rounds its
//!   worker saw complete; `entry/cut_short.rs`). When the primary dies, a
//!   worker sends what it had in flight to the backup, and from then on
//!   every request of those keys.
//!   The backup applies a pushed round it does not have; it answers one it
//!   already holds (the primary completed it, copied it, then died before
//!   answering everyone) without applying it again. So each round is
//!   applied exactly once, and the result equals, to the bit, that of a
//!   run without the failure (sums in rank order, the same optimizer on
//!   the same state).
//! - The backup serves its copies only once the scheduler declared the
//!   primary dead (*promotion*); requests for them that come earlier wait
//!   until then. Copies that arrive after the promotion are ignored, and a
//!   copy never takes a key back to an older round.
//!
//! What is not done: a promoted backup does not copy the keys it took over
//! to a further server, so a second death among the same two servers loses
//! them (the job then fails, naming the dead servers); a replicated job's
//! dead server is not started again (its keys live on in its backup); the
//! shared-memory fast path is off (a push must be re-sendable).
//!
//! # States of the replication of one server
//!
//! ```text
//!   backup alive ──backup declared dead──► alone (rounds answered at once)
//!   copies passive ──primary declared dead──► promoted (copies served, held requests run)
//! ```
//!
//! A round whose copy failed (the link to the backup broke) while the
//! backup is not yet declared dead is *parked*: answered once it is,
//! never if this server stops first. A backup that answers a copy with an
//! error is alive: that round is answered and the key goes unreplicated
//! (logged).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use pskv_transport::{
    KvResponse, KvWorker, NodeId, RequestOptions, Role, TrackError, TransportError,
};
use serde::{Deserialize, Serialize};

use super::entry::{Answer, EntryState};
use super::{Entry, Inner};
use crate::dtype::DType;
use crate::error::Fault;
use crate::optimizer::OptState;
use crate::wire::{Head, Op};

/// What a copy of a key carries besides its value.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Copy {
    pub key_id: u64,
    pub part: u64,
    pub dtype: u8,
    pub rounds: u64,
    pub generation: u64,
    pub opt: Option<OptState>,
    pub master: Option<Vec<f32>>,
}

impl Copy {
    /// The request body: `n: u32`, `n` bytes of header, the value.
    pub(crate) fn encode(&self, value: &[u8]) -> Result<Bytes, Fault> {
        let head = postcard::to_stdvec(self)
            .map_err(|e| Fault::Failed(format!("encoding a copy: {e}")))?;
        let mut b = Vec::with_capacity(4 + head.len() + value.len());
        b.extend_from_slice(&(head.len() as u32).to_le_bytes());
        b.extend_from_slice(&head);
        b.extend_from_slice(value);
        Ok(Bytes::from(b))
    }

    /// A copy and its value from a request body.
    pub(crate) fn decode(b: &Bytes) -> Result<(Copy, Bytes), Fault> {
        let bad = || Fault::Malformed(format!("a copy of {} bytes is malformed", b.len()));
        if b.len() < 4 {
            return Err(bad());
        }
        let n = u32::from_le_bytes(b[..4].try_into().map_err(|_| bad())?) as usize;
        if b.len() < 4 + n {
            return Err(bad());
        }
        let c: Copy = postcard::from_bytes(&b[4..4 + n])
            .map_err(|e| Fault::Malformed(format!("{}: {e}", bad())))?;
        if DType::from_code(c.dtype).is_none() {
            return Err(bad());
        }
        Ok((c, b.slice(4 + n..)))
    }
}

/// Something to run once (a copy's end, a test's fault).
pub(crate) type Once = Box<dyn FnOnce() + Send>;

/// An answer and what it answers with, kept for later.
pub(crate) type Kept = (Answer, Result<Option<Bytes>, Fault>);

/// The work on one ps key that a request asks for (and, for a copy, what
/// waits until the promotion).
pub(crate) struct KeyWork {
    pub key: u64,
    pub head: Head,
    /// The key's values in the request.
    pub vals: Bytes,
    /// The sender's rank (a worker's; a copy's primary's).
    pub rank: usize,
    /// A sync push's round (`entry/cut_short.rs`), or 0.
    pub tag: u64,
    pub answer: Answer,
}

/// The replication of one server.
pub(crate) struct Replication {
    /// This server's rank and the cluster's servers.
    pub rank: u32,
    pub servers: u32,
    /// On (`PSKV_REPLICAS=2`, two servers or more).
    pub on: bool,
    /// The copies' primary died: this server serves them.
    promoted: AtomicBool,
    /// The backup died: rounds are answered without a copy.
    alone: AtomicBool,
    /// Requests for copies that came before the promotion.
    held: Mutex<Vec<KeyWork>>,
    /// Sends the copies (taken at shutdown, which breaks the cycle server →
    /// worker handle → postoffice → request handler → server).
    client: Mutex<Option<KvWorker>>,
    /// Rounds whose copy failed while the backup was not (yet) known dead:
    /// answered once it is (`backup_died`), never if this server stops
    /// first (its workers then send those pushes to its backup).
    parked: Mutex<Vec<Once>>,
}

impl Replication {
    pub(crate) fn new(rank: u32, servers: u32, replicas: u32) -> Replication {
        Replication {
            rank,
            servers,
            on: replicas > 1 && servers > 1,
            promoted: AtomicBool::new(false),
            alone: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
            client: Mutex::new(None),
            parked: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn set_client(&self, kv: Option<KvWorker>) {
        *self.client.lock() = kv;
    }

    /// The backup's id.
    pub(crate) fn backup(&self) -> NodeId {
        Role::Server.id_of((self.rank + 1) % self.servers)
    }

    /// The rank of the server whose keys this one copies.
    pub(crate) fn primary_of_copies(&self) -> u32 {
        (self.rank + self.servers - 1) % self.servers
    }

    /// Whether completed rounds of this server's own keys are copied.
    pub(crate) fn copies_rounds(&self) -> bool {
        self.on && !self.alone.load(Ordering::Acquire)
    }

    pub(crate) fn is_promoted(&self) -> bool {
        self.promoted.load(Ordering::Acquire)
    }

    /// A request for a copy: held until the promotion (`None`), or served
    /// now (`Some`: given back).
    pub(crate) fn hold(&self, r: KeyWork) -> Option<KeyWork> {
        let mut held = self.held.lock();
        // Subtle: checked under the lock `promote` drains under, so no
        // request is held after the drain.
        if self.is_promoted() {
            return Some(r);
        }
        held.push(r);
        None
    }

    /// Runs `f` (taking a copy) unless the copies were promoted; false if
    /// they were.
    ///
    /// Subtle: under the lock the promotion takes, so a copy is either
    /// taken before any request held for the promotion runs, or ignored. A
    /// copy taken after the held pushes began a round would move the key's
    /// round under them: they would wait for ever for a push that the
    /// round's copy then answers as a duplicate.
    pub(crate) fn unless_promoted(&self, f: impl FnOnce()) -> bool {
        let _held = self.held.lock();
        if self.is_promoted() {
            return false;
        }
        f();
        true
    }

    /// The primary of the copies died: serve them. Returns the requests
    /// that waited, to run in arrival order.
    pub(crate) fn promote(&self) -> Vec<KeyWork> {
        let mut held = self.held.lock();
        self.promoted.store(true, Ordering::Release);
        std::mem::take(&mut *held)
    }

    /// The backup died: answer rounds without copying them, and the rounds
    /// whose copy failed meanwhile.
    pub(crate) fn backup_died(&self) {
        let parked = {
            let mut p = self.parked.lock();
            self.alone.store(true, Ordering::Release);
            std::mem::take(&mut *p)
        };
        for done in parked {
            done();
        }
    }

    /// This server stops: rounds waiting for a verdict on their copy are
    /// never answered.
    pub(crate) fn stop(&self) {
        self.parked.lock().clear();
    }

    /// A copy failed: the round is answered once the backup is known dead
    /// (at once if it is), never if this server stops first.
    ///
    /// Subtle: answering a round whose copy the backup does not hold would
    /// let a worker see a round that the backup, taking over, does not
    /// have: the workers that had not been answered would push it again
    /// there as a new round, which the answered ones never join.
    fn copy_failed(&self, done: Once) {
        let mut p = self.parked.lock();
        if self.alone.load(Ordering::Acquire) {
            drop(p);
            return done();
        }
        p.push(done);
    }

    /// Copies `key`'s state to the backup; `done` runs once the backup
    /// acknowledged it, or once it is known that it cannot (the backup died:
    /// logged, and the server goes on alone); never if this server stops
    /// before either.
    pub(crate) fn send(
        self: &Arc<Self>,
        key: u64,
        dtype: DType,
        copy: Copy,
        value: &[u8],
        done: impl FnOnce() + Send + 'static,
    ) {
        let client = self.client.lock().clone();
        let (Some(kv), true) = (client, self.copies_rounds()) else {
            return done();
        };
        let body = match copy.encode(value) {
            Ok(b) => b,
            Err(e) => {
                // Nothing the backup could change: the key goes unreplicated.
                tracing::error!("key id {} part {}: {e}", copy.key_id, copy.part);
                return done();
            }
        };
        let head = Head {
            op: Op::Replicate,
            dtype,
            compression: 0,
            sync: true,
            multi_precision: false,
            shm: false,
            shm_tag: 0,
        };
        let opts = RequestOptions {
            cmd: head.encode(),
            priority: i32::MAX,
            target: Some(self.backup()),
            tag: 0,
            // Until the backup answers or is declared dead (a round whose
            // copy is lost then parks: see the module docs).
            timeout: None,
        };
        let backup = self.backup();
        let key_id = copy.key_id;
        // Subtle: `done` must be settled whichever way the copy ends: in the
        // answer's callback, or here if the request could not even start.
        let done: Arc<Mutex<Option<Once>>> = Arc::new(Mutex::new(Some(Box::new(done))));
        let (done2, me) = (done.clone(), self.clone());
        let sent = kv.push_with(
            &[key],
            &[body.len() as u32],
            body,
            opts,
            move |r: Result<KvResponse, TransportError>| {
                let Some(d) = done2.lock().take() else { return };
                match r {
                    Ok(_) => d(),
                    // The backup is alive and refused the copy: waiting for
                    // its death would wedge the key; it goes unreplicated.
                    Err(e @ TransportError::Request(TrackError::Remote { .. })) => {
                        tracing::error!(
                            "key id {key_id}: the backup {} refused a copy ({e}); the key is not replicated",
                            pskv_transport::protocol::describe(backup)
                        );
                        d()
                    }
                    Err(e) => {
                        tracing::warn!(
                            "key id {key_id}: the backup {} did not take a copy ({e})",
                            pskv_transport::protocol::describe(backup)
                        );
                        me.copy_failed(d)
                    }
                }
            },
        );
        if let Err(e) = sent {
            tracing::warn!("key id {key_id}: no copy sent to the backup ({e})");
            if let Some(d) = done.lock().take() {
                self.copy_failed(d)
            }
        }
    }
}

/// Answers given during a round that must wait for its copy: while a slot
/// is open, the answers of the key's requests are kept in it instead of
/// sent; the op that opened it sends them once the backup has the round.
#[derive(Clone, Default)]
pub(crate) struct Deferred(Arc<Mutex<Option<Vec<Kept>>>>);

impl Deferred {
    /// An answer that goes into the slot while one is open.
    pub(crate) fn wrap(&self, answer: Answer) -> Answer {
        let slot = self.clone();
        Box::new(move |r| {
            let mut s = slot.0.lock();
            match s.as_mut() {
                Some(v) => v.push((answer, r)),
                None => {
                    drop(s);
                    answer(r)
                }
            }
        })
    }

    /// Opens the slot (inside the key's op, under its state lock).
    pub(crate) fn open(&self) {
        *self.0.lock() = Some(Vec::new());
    }

    /// Closes the slot; what it kept.
    pub(crate) fn close(&self) -> Vec<Kept> {
        self.0.lock().take().unwrap_or_default()
    }
}

/// Sends kept answers.
pub(crate) fn answer_all(kept: Vec<Kept>) {
    for (a, r) in kept {
        a(r);
    }
}

impl EntryState {
    /// This key's state as a copy (and its value).
    pub(crate) fn copy(&self) -> (Copy, Bytes) {
        (
            Copy {
                key_id: self.key_id,
                part: self.part,
                dtype: self.dtype.code(),
                rounds: self.rounds,
                generation: self.opt.generation,
                opt: self.opt.state.clone(),
                master: self.master.clone(),
            },
            self.snapshot(),
        )
    }

    /// Takes a copy's state, unless it is older than this one's.
    pub(crate) fn take_copy(&mut self, c: Copy, value: &[u8]) -> Result<(), Fault> {
        if DType::from_code(c.dtype) != Some(self.dtype) || value.len() != self.nbytes() {
            return Err(Fault::Mismatch(format!(
                "{}: a copy of {} bytes does not fit the key's {} bytes",
                self.name(),
                value.len(),
                self.nbytes()
            )));
        }
        if c.rounds < self.rounds {
            return Ok(());
        }
        self.set_value(value);
        self.rounds = c.rounds;
        self.opt.generation = c.generation;
        self.opt.state = c.opt;
        self.master = c.master;
        Ok(())
    }
}

impl Inner {
    /// A copy from the primary: taken before the promotion, ignored after
    /// (the copies are this server's to change then).
    pub(super) fn take_copy(&self, key: u64, vals: Bytes, answer: Answer) {
        if !self.is_copy(key) {
            return answer(Err(Fault::Unavailable(format!(
                "{}: a copy of a key this server does not back up",
                self.describe(key)
            ))));
        }
        let Some(repl) = self.repl.get() else {
            return answer(Err(Fault::Unavailable(
                "a copy, but this server keeps no replicas".into(),
            )));
        };
        let (c, value) = match Copy::decode(&vals) {
            Ok(x) => x,
            Err(e) => return answer(Err(e)),
        };
        let Some(dtype) = DType::from_code(c.dtype) else {
            return answer(Err(Fault::Malformed("a copy of an unknown type".into())));
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
    pub(super) fn promote(self: &Arc<Self>) {
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
}
