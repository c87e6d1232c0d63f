//! Sending an op's parts: one request per part, to the part's server or
//! (replicas) its backup, a part sent again to the backup when its server
//! died, and the answers handed to the op's [`Round`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::Mutex;
use pskv_engine::Completion;
use pskv_transport::{KvResponse, Landing, Region, RequestOptions, SlotSpan, TransportError};

use super::inflight::{Inflight, OutPtr};
use super::{staging, DistKey, DistStore};
use crate::compression::Compression;
use crate::dtype::DType;
use crate::error::{Fault, KvError};
use crate::tensor::Tensor;
use crate::wire::{Head, Op, Part};

/// Whether a request could not even start because its node cannot be
/// reached (no link, and making one failed).
pub(super) fn unreachable(e: &TransportError) -> bool {
    matches!(
        e,
        TransportError::Auth { .. }
            | TransportError::Io { .. }
            | TransportError::NotRunning(_)
            | TransportError::Request(_)
    )
}

/// A key's parts whose shared slots are in doubt (`DistKey::unsure`): a
/// push through the slot failed, so the server may still hold it and read
/// the slot when its round completes (a push sent again would write the
/// slot under it, and a pull through the value slot could read it while
/// that round writes it). A push's success by message, which the server
/// answers only once its round is over, ends the doubt.
///
/// Subtle: that needs the failed push never to reach the server after the
/// later one. The transport takes a timed-out request out of its link's
/// send queue (ordered by priority) before its failure is reported; one a
/// writer had taken, or a direct sender had claimed, leaves before
/// anything sent after it.
///
/// `any` is false while no part is in doubt (the usual case: a push then
/// takes no lock); it is set after the part's flag and cleared with the
/// last one, under the lock. The answer that changes them runs before its
/// op completes, so the key's next op (after it, by the key's var) sees
/// the change.
///
/// The key's push buffer, if one lives (`KvStore::push_buffer`), is this
/// worker's slots: while it lives no other push of the key writes them
/// (they go by message instead: `mask_lent`). A push from it through a
/// slot it holds that fails detaches it (`SlotSpan::detach`: private pages
/// of the same contents, so neither its holder's writes nor anyone's reach
/// the slots any more), before the op completes, while the op still holds
/// the tensor. No buffer is made while a part is in doubt; the doubt is
/// set, and a buffer made, under the parts' lock, so a buffer made while a
/// push fails learns of it either way (it is refused, or it sees the
/// failure).
#[derive(Default)]
pub(super) struct Unsure {
    any: AtomicBool,
    /// Set once a push buffer was made (so that keys without one take no
    /// lock in [`Unsure::lent`]).
    lent_ever: AtomicBool,
    parts: Mutex<Parts>,
}

/// Why no push buffer was made (`Unsure::lend`).
pub(super) enum Refused {
    /// A part's slot is in doubt.
    InDoubt,
    /// The key has one.
    Lent,
}

#[derive(Default)]
struct Parts {
    doubt: Vec<bool>,
    lent: Weak<SlotSpan>,
}

impl Unsure {
    /// Leaves out of `segs` the parts in doubt.
    pub(super) fn mask(&self, segs: &mut [Option<Arc<Region>>]) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let u = self.parts.lock();
        for (s, _) in segs.iter_mut().zip(u.doubt.iter()).filter(|(_, u)| **u) {
            *s = None;
        }
    }

    /// The answer to a push of part `i` (`tag`: the segment's it went
    /// through, or 0: by message; `seg`: that segment, if looked up).
    pub(super) fn note(&self, i: usize, (tag, seg): (u16, Option<&Arc<Region>>), ok: bool) {
        match (tag != 0, ok) {
            (true, false) => {
                let mut u = self.parts.lock();
                if u.doubt.len() <= i {
                    u.doubt.resize(i + 1, false);
                }
                u.doubt[i] = true;
                self.any.store(true, Ordering::Release);
                // The buffer must leave the slot if it holds the part's
                // slot in the segment the push used: the push came from it
                // (another tensor's push of a held part goes by message:
                // `mask_lent`), or was sent before the buffer was made (its
                // segment was not looked up then: told by the segment's
                // tag), so the op that zeroes the buffer, after this one,
                // must not write the slot either.
                let used = |r: &Arc<Region>| match seg {
                    Some(s) => Arc::ptr_eq(r, s),
                    None => r.tag() == tag,
                };
                let from_lent = u
                    .lent
                    .upgrade()
                    .filter(|span| span.placed(i).is_some_and(|(r, _)| used(r)));
                drop(u);
                if let Some(span) = from_lent {
                    // Subtle: before the op completes, so while it holds
                    // the buffer's tensor (or, through the C ABI or Python,
                    // its request holds the buffer): no one writes it now
                    // but the op's own answers, when it is also the op's
                    // output (an in-place push-pull, which fails: its
                    // output is then not to be relied on).
                    if let Err(e) = span.detach() {
                        tracing::error!(
                            "a push buffer could not be detached from its slots after a failed push \
                             (writes through its address may reach a slot its server still reads): {e}"
                        );
                    }
                }
            }
            (false, true) if self.any.load(Ordering::Acquire) => {
                let mut u = self.parts.lock();
                if let Some(x) = u.doubt.get_mut(i) {
                    *x = false;
                }
                self.any
                    .store(u.doubt.iter().any(|x| *x), Ordering::Release);
            }
            _ => {}
        }
    }

    /// Makes the key's push buffer with `make`, unless a part is in doubt
    /// (its slot may still be read) or one lives already: then the error
    /// says which.
    pub(super) fn lend(
        &self,
        make: impl FnOnce() -> Arc<SlotSpan>,
    ) -> Result<Arc<SlotSpan>, Refused> {
        let mut u = self.parts.lock();
        if u.doubt.iter().any(|x| *x) {
            return Err(Refused::InDoubt);
        }
        if u.lent.strong_count() > 0 {
            return Err(Refused::Lent);
        }
        let span = make();
        u.lent = Arc::downgrade(&span);
        self.lent_ever.store(true, Ordering::Release);
        Ok(span)
    }

    /// The key's push buffer, if one lives (no lock if none was ever
    /// made).
    pub(super) fn lent(&self) -> Option<Arc<SlotSpan>> {
        if !self.lent_ever.load(Ordering::Acquire) {
            return None;
        }
        self.parts.lock().lent.upgrade()
    }
}

/// One part's request, as sent (and as sent again to a backup).
#[derive(Clone)]
pub(super) struct PartSend {
    pub(super) i: usize,
    pub(super) part: Part,
    pub(super) head: Head,
    pub(super) priority: i32,
    /// A sync push's round, as this worker counts the key's rounds
    /// (`DistKey::seen`, plus one); else 0.
    pub(super) tag: u64,
    pub(super) payload: Bytes,
    /// A push's: the key's parts whose slots are in doubt
    /// (`DistKey::unsure`), kept by its answer.
    pub(super) unsure: Option<Arc<Unsure>>,
    /// The segment a push through a slot went through, when the key has
    /// had a push buffer (which a failure of this push may concern).
    pub(super) seg: Option<Arc<Region>>,
}

/// What answers of a part request are handed to: part index, answer, and
/// whether its values landed in the output already (then the answer
/// carries none: see [`LandIn`]).
pub(super) type OnAnswer =
    Arc<dyn Fn(usize, &KvResponse, bool) -> std::result::Result<(), Fault> + Send + Sync>;

/// Where the values of a round's answers may be received in place (a
/// [`Landing`] per part request; the TCP van reads them straight from the
/// socket): the output's buffer, in which part `p` holds `p.len *
/// unit_bytes` bytes from `p.start * unit_bytes`. The tensor that owns the
/// buffer is the round's `keep`, kept until every landing in it is closed
/// (the op may fail while a reader still writes one; see
/// `Inflight::finish`).
#[derive(Clone)]
pub(super) struct LandIn {
    pub(super) out: OutPtr,
    pub(super) unit_bytes: usize,
}

/// What the part requests of one op share.
#[derive(Clone)]
pub(super) struct Round {
    pub(super) head: Head,
    pub(super) priority: i32,
    /// A sync push's round (`PartSend::tag`), or 0.
    pub(super) tag: u64,
    /// The op, for errors (`push`, `pull`, ...).
    pub(super) name: &'static str,
    pub(super) on_answer: OnAnswer,
    /// Answers may land in the output (pulls and push-pulls of dense
    /// values).
    pub(super) land: Option<LandIn>,
    /// The tensor the answers write into (the op's output), which owns the
    /// memory that `on_answer` and `land` reach by pointer: handed to the
    /// op's `Inflight` when its parts are sent, and let go of there just
    /// before the op completes, so that the store holds no handle of a
    /// host output once the op's caller may see it done (a push buffer
    /// that is the output is then dropped with the caller's last handle).
    pub(super) keep: Option<Tensor>,
}

impl Round {
    /// Answers that carry nothing to keep.
    pub(super) fn ignore_answers(head: Head, priority: i32, name: &'static str) -> Round {
        // One closure for every such round (no allocation per op).
        static IGNORE: std::sync::LazyLock<OnAnswer> =
            std::sync::LazyLock::new(|| Arc::new(|_, _, _| Ok(())));
        Round {
            head,
            priority,
            tag: 0,
            name,
            on_answer: IGNORE.clone(),
            land: None,
            keep: None,
        }
    }
}

impl DistStore {
    pub(super) fn head(&self, op: Op, dtype: DType, compression: Compression) -> Head {
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

    pub(super) fn request_opts(&self, head: Head, priority: i32) -> RequestOptions {
        RequestOptions {
            cmd: head.encode(),
            priority,
            ..RequestOptions::default()
        }
    }

    /// Starts the bookkeeping of an op of `n` part requests, which holds
    /// the round's `keep` until the op completes: None (and the op
    /// completed) when there are none.
    pub(super) fn inflight(
        &self,
        dk: &DistKey,
        n: usize,
        completion: Completion,
        round: &mut Round,
        settle: staging::Lanes,
    ) -> Option<Arc<Inflight>> {
        let (name, keep) = (round.name, round.keep.take());
        if n == 0 {
            staging::settle(settle, move |r| match r {
                Ok(()) => completion.complete(),
                Err(e) => completion.fail(KvError::from(e)),
            });
            return None;
        }
        // A push's answers end its round (`pskv status`), which a sync push
        // counts in its key's rounds seen.
        let push = matches!(name, "push" | "pushpull")
            .then(|| (&self.rounds, self.sync.then(|| dk.seen.clone())));
        Some(Inflight::new(
            completion,
            n,
            name,
            &dk.local.key,
            (settle, keep),
            push,
            &self.missed,
        ))
    }

    /// Sends one request per part of `parts` (indices into the key's
    /// parts). `prepare(i)` gives part `i`'s values and, if they travel
    /// through its shared slot, the segment's tag (0: they do not); it runs
    /// just before the part is sent, so a part's copy overlaps the transfer
    /// of the ones before. `prepare` is dropped before the last part is
    /// sent (with what it owns: the op may complete once that part is
    /// answered).
    pub(super) fn send_parts(
        &self,
        dk: &DistKey,
        parts: impl ExactSizeIterator<Item = usize>,
        mut round: Round,
        completion: Completion,
        settle: staging::Lanes,
        prepare: impl FnMut(usize) -> std::result::Result<(Bytes, u16), Fault>,
    ) {
        let Some(inf) = self.inflight(dk, parts.len(), completion, &mut round, settle) else {
            return;
        };
        let round = &round;
        let mut parts = parts.peekable();
        let mut prepare = Some(prepare);
        while let (Some(i), Some(p)) = (parts.next(), prepare.as_mut()) {
            let prepared = p(i);
            if parts.peek().is_none() {
                prepare = None;
            }
            self.send_prepared(dk, &inf, round, i, prepared);
        }
    }

    /// Sends part `i` of an op with the values `prepared` gave (or counts
    /// the part failed).
    pub(super) fn send_prepared(
        &self,
        dk: &DistKey,
        inf: &Arc<Inflight>,
        round: &Round,
        i: usize,
        prepared: std::result::Result<(Bytes, u16), Fault>,
    ) {
        let (payload, shm_tag) = match prepared {
            Ok(x) => x,
            Err(e) => {
                return inf.part_done(Err(TransportError::Invalid(e.to_string())), |_| Ok(()))
            }
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
            unsure: matches!(head.op, Op::Push | Op::PushPull).then(|| dk.unsure.clone()),
            // Looked up only for keys that have had a push buffer (a
            // segment replaced since the part was prepared has another tag:
            // none then).
            seg: (shm_tag != 0 && dk.unsure.lent_ever.load(Ordering::Acquire))
                .then(|| dk.segs.read().get(i).cloned().flatten())
                .flatten()
                .filter(|r| r.tag() == shm_tag),
        };
        // A push through its slot may be summed at the part's gate, a
        // pull read from the value slot (`worker_sum/`).
        let Some(send) = self.at_gate(dk, inf, round, send) else {
            return;
        };
        // An init is not sent again elsewhere: the backup holds a key only
        // once its primary copied it there.
        let failover = self.replicas > 1 && head.op != Op::Init;
        self.send_part(
            send,
            failover,
            false,
            inf.clone(),
            round.on_answer.clone(),
            round.land.clone(),
        );
    }

    /// The node that serves a part of server rank `server`: the server, or
    /// (replicas) its backup once it is known dead or `to_backup`.
    pub(super) fn route(&self, server: u32, to_backup: bool) -> pskv_transport::NodeId {
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
    pub(super) fn send_part(
        &self,
        p: PartSend,
        failover: bool,
        to_backup: bool,
        inf: Arc<Inflight>,
        cb: OnAnswer,
        land: Option<LandIn>,
    ) {
        let target = self.route(p.part.server, to_backup);
        let opts = RequestOptions {
            cmd: p.head.encode(),
            priority: p.priority,
            target: (self.replicas > 1).then_some(target),
            tag: p.tag,
            // The transport fails the part on time (no watchdog here).
            timeout: Some(self.opts.timeout),
        };
        // A part through its shared slot is answered with no values (they
        // are in the value slot): nothing to land.
        let landing = land.as_ref().filter(|_| !p.head.shm).and_then(|into| {
            let (at, n) = (p.part.start * into.unit_bytes, p.part.len * into.unit_bytes);
            if n == 0 || at + n > into.out.1 {
                return None;
            }
            // SAFETY: the range is inside the output, which the op writes
            // until it completes; it completes only once this landing is
            // closed (`Inflight::finish`; the op's `Inflight` keeps the
            // buffer's owner, the round's `keep`, until then), and no other
            // request of the op lands in the range meanwhile (parts are
            // disjoint).
            let l = Arc::new(unsafe { Landing::new(into.out.0.add(at), n) });
            inf.hold(l.clone());
            Some(l)
        });
        let me = self.handle();
        let again = failover.then(|| p.clone());
        let retry = failover.then(|| p.clone());
        let (inf2, cb2, landing2) = (inf.clone(), cb.clone(), landing.clone());
        let i = p.i;
        let unsure = p.unsure.clone().map(|u| (u, p.head.shm_tag, p.seg.clone()));
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
                // No landing: failover comes with replicas, which land
                // nothing (`DistStore::landing`).
                return me.send_part(p, false, true, inf2, cb2, None);
            }
            if let Some((u, shm_tag, seg)) = &unsure {
                // Before the op can complete: its next push must see it.
                u.note(i, (*shm_tag, seg.as_ref()), r.is_ok());
            }

            let landed = landing2.as_ref().is_some_and(|l| l.is_filled());
            inf2.part_done(r, |resp| cb2(i, resp, landed))
        };
        let keys = [p.part.ps_key];
        let lens = [p.payload.len() as u32];
        let sent = match p.head.op {
            Op::Pull => self.kv.pull_with(&keys, opts, landing, done),
            Op::Push | Op::RowPush | Op::Init => {
                self.kv.push_with(&keys, &lens, p.payload, opts, done)
            }
            _ => self
                .kv
                .push_pull_with(&keys, &lens, p.payload, opts, landing, done),
        };
        match (sent, retry) {
            // The server died between the routing and the send, or cannot
            // be reached (its link is gone and a new one fails).
            (Err(e), Some(p)) if died(&e) || unreachable(&e) => {
                self.send_part(p, false, true, inf, cb, None)
            }
            (Err(e), _) => inf.part_done(Err(e), |_| Ok(())),
            (Ok(()), _) => {}
        }
    }
}
