//! Ops waiting for their parts' answers ([`Inflight`]), and the pointer
//! their answers write through ([`OutPtr`]).
//!
//! # Invariants
//!
//! An op with `n` parts completes exactly once: when the last of its parts
//! is done. Every part is done exactly once: answered, failed, or timed
//! out, since each part's request carries the store's timeout and the
//! transport fails it on time (a part sent again to a backup is done when
//! its second request is). Answers copy into the op's output under the
//! read lock of `done`; the finisher takes the completion under its write
//! lock. So once an op has finished, no late answer writes into a tensor
//! that the next op may already own.
//!
//! The output's memory is reached by pointer (`OutPtr`, landings); its
//! owner, the op's output tensor on the host, is held here (`keep`) from
//! the send of the parts, and let go of just before the op completes, once
//! nothing writes it. So once its parts are sent the store holds no handle
//! of a host output when the op's caller sees it done (a GPU output is
//! also held by its op's body and device copies; an op that fails before
//! its parts are sent lets go of it as it returns).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use pskv_engine::Completion;
use pskv_transport::status::RoundLog;
use pskv_transport::{KvResponse, Landing, MissedBarrier, TrackError, TransportError};

use super::staging;
use crate::error::{Fault, KvError};
use crate::key::Key;
use crate::tensor::Tensor;

/// A mutable pointer to a buffer that several answers fill (disjoint
/// ranges), moved into the answers' callbacks.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut u8, pub(super) usize);
// SAFETY: the pointer targets a buffer the op owns for writing until it
// completes; callbacks write disjoint ranges, under `Inflight::done`'s
// read lock, and never after the op finished (see the module docs).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Copies `src` to `at` (bounds checked against the buffer).
    pub(super) fn write(&self, at: usize, src: &[u8]) -> std::result::Result<(), Fault> {
        if at + src.len() > self.1 {
            return Err(Fault::Mismatch(format!(
                "an answer of {} bytes at {at} overruns the {}-byte output",
                src.len(),
                self.1
            )));
        }
        // SAFETY: in bounds (checked); see the type's docs for exclusivity.
        unsafe { pskv_transport::copy::copy_to(self.0.add(at), src) };
        Ok(())
    }
}

/// An op waiting for its parts' answers.
pub(super) struct Inflight {
    done: RwLock<Option<Completion>>,
    remaining: AtomicUsize,
    error: Mutex<Option<String>>,
    /// Parts that timed out, and the timeout.
    timed_out: Mutex<Option<(usize, Duration)>>,
    op: &'static str,
    /// Named in errors (an integer key is copied, not formatted, per op).
    key: Key,
    /// Device lanes that carry the op's staging copies (`staging`): the op
    /// completes only once they are drained, so no copy of its outlives it.
    settle: staging::Lanes,
    /// A push: where its round is reported (`pskv status`), the key's id,
    /// and when the op began.
    round: Option<(Arc<RoundLog>, u64)>,
    /// A sync push: the key's count of rounds seen (`DistKey::seen`), one
    /// more once every part answered.
    seen: Option<Arc<AtomicU64>>,
    /// When the op began, and the collective rounds this worker missed: a
    /// timeout names one that failed meanwhile (the others made a
    /// collective call this worker had not reached).
    began: Instant,
    missed: MissedBarrier,
    /// Where its parts' answers may land (`parts::LandIn`): closed before
    /// the op completes.
    landings: Mutex<Vec<Arc<Landing>>>,
    /// The tensor its answers write into (`parts::Round::keep`): owns the
    /// memory they reach by pointer, landings included; let go of once
    /// they are all closed and the staging lanes drained, just before the
    /// op completes.
    keep: Mutex<Option<Tensor>>,
}

impl Inflight {
    pub(super) fn new(
        c: Completion,
        parts: usize,
        op: &'static str,
        key: &Key,
        (settle, keep): (staging::Lanes, Option<Tensor>),
        push: Option<(&Arc<RoundLog>, Option<Arc<AtomicU64>>)>,
        missed: &MissedBarrier,
    ) -> Arc<Inflight> {
        let (rounds, seen) = push.map_or((None, None), |(r, s)| (Some(r), s));
        let began = Instant::now();
        Arc::new(Inflight {
            done: RwLock::new(Some(c)),
            remaining: AtomicUsize::new(parts),
            error: Mutex::new(None),
            timed_out: Mutex::new(None),
            op,
            key: key.clone(),
            settle,
            round: rounds.map(|r| (r.clone(), key.id())),
            seen,
            began,
            missed: missed.clone(),
            landings: Mutex::new(Vec::new()),
            keep: Mutex::new(keep),
        })
    }

    /// Keeps a landing of one of the op's requests, to close at the end.
    pub(super) fn hold(&self, landing: Arc<Landing>) {
        self.landings.lock().push(landing);
    }

    /// One part answered: `on_ok` stores its values (under the read lock).
    pub(super) fn part_done(
        &self,
        r: std::result::Result<KvResponse, TransportError>,
        on_ok: impl FnOnce(&KvResponse) -> std::result::Result<(), Fault>,
    ) {
        {
            let g = self.done.read();
            if g.is_none() {
                return;
            }
            if let Err(TransportError::Request(TrackError::TimedOut { after, .. })) = &r {
                let mut t = self.timed_out.lock();
                *t = Some((t.map_or(0, |(n, _)| n) + 1, *after));
            }
            // The store keeps the message; `finish` names the op and key.
            let res = r
                .map_err(|e| e.to_string())
                .and_then(|resp| on_ok(&resp).map_err(|f| f.to_string()));
            if let Err(e) = res {
                self.error.lock().get_or_insert(e);
            }
        }
        // AcqRel: the last answer sees every earlier answer's writes.
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish();
        }
    }

    /// Completes the op.
    fn finish(&self) {
        let Some(c) = self.done.write().take() else {
            return;
        };
        let err = match *self.timed_out.lock() {
            Some((n, after)) => Some(KvError::Timeout {
                what: format!(
                    "the servers to answer a {} of key {} ({n} of its parts unanswered){}",
                    self.op,
                    self.key,
                    self.missed
                        .since(self.began)
                        .map_or_else(String::new, |e| format!(
                        "; meanwhile a collective call that this worker had not reached failed: {e}"
                    )),
                ),
                after,
            }),
            None => self.error.lock().take().map(|message| KvError::Server {
                op: self.op,
                key: self.key.to_string(),
                message,
            }),
        };
        if let (None, Some((log, id))) = (&err, &self.round) {
            log.round_done(*id, self.began.elapsed(), || self.key.to_string());
        }
        if let (None, Some(seen)) = (&err, &self.seen) {
            // Every part's round completed (the op may still fail in its
            // staging copies: the round is done all the same). Release:
            // before the op completes, so the key's next push sees it.
            seen.fetch_add(1, Ordering::Release);
        }
        // Subtle: every staging copy of the op was queued under the read
        // lock of `done` (answers) or before its part was sent, so all are
        // queued by now (the lock was just taken for writing, or every part
        // answered): draining the lanes covers them.
        let settle = self.settle.clone();
        let keep = self.keep.lock().take();
        let go = move || {
            staging::settle(settle, move |drained| {
                // Nothing writes the output now (answers, landings, staging
                // copies): the store lets go of it before its caller can see
                // the op done.
                drop(keep);
                match (err, drained) {
                    (None, Ok(())) => c.complete(),
                    (Some(e), _) => c.fail(e),
                    (None, Err(e)) => c.fail(KvError::from(e)),
                }
            })
        };
        // Subtle: the output is the next op's once the op completes, so
        // every landing in it is closed first. A landing that a reader is
        // still writing (its request failed or timed out meanwhile) closes
        // when the reader is done, and the op completes then, on the
        // reader's thread: that read ends when its answer is in or its link
        // closes, so such an op may complete later than the store's
        // timeout. The owner of the landing's memory (`keep`) is kept until
        // then.
        let landings = std::mem::take(&mut *self.landings.lock());
        if landings.is_empty() {
            return go();
        }
        close_all(landings, Box::new(go));
    }
}

/// Closes each landing, one after the other (as `staging::settle` drains
/// lanes); then runs `then`.
fn close_all(mut landings: Vec<Arc<Landing>>, then: Box<dyn FnOnce() + Send>) {
    let Some(l) = landings.pop() else {
        return then();
    };
    l.close(move || close_all(landings, then));
}
