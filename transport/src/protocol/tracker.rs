//! Requests fanned out to several nodes, completed once, with no I/O.
//!
//! A request is PENDING until every target answered (COMPLETE, with the
//! answers in target order), one answered with an error (FAILED), a target
//! died (FAILED, naming the node), the connection its part to a target went
//! out on broke (FAILED, naming the node), or its deadline passed (FAILED,
//! naming the nodes that did not answer; the driver calls
//! [`Tracker::expire`] at [`Tracker::next_deadline`]). After that its id is
//! forgotten and late answers are dropped. So every request completes
//! exactly once, none waits on a dead node, and none with a deadline waits
//! past it.
//!
//! Each part records the link it was sent on ([`Tracker::sent_on`]): a
//! broken link fails only the parts that went out on it
//! ([`Tracker::on_link_lost`]), and a failed request names the links of
//! its parts still unanswered ([`Completed::unanswered_on`]): their frames
//! may still wait in those links' send queues, and the driver takes them
//! back before it reports the failure. Subtle: a node may have two links at once
//! (a restarted server: the old process's link closes late, after a
//! request already went to the new one). Failing the new link's requests
//! too would tell a caller that a push failed which the new server holds:
//! its retry would be a second push of the same worker in that round (the
//! kvstore copes: the later takes the first one's place), a failure the
//! caller need not have seen (this once wedged a job in CI, when a retry
//! was carried into the next round).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use super::{describe, NodeId};

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrackError {
    /// A target node died.
    #[error("{} died before answering", describe(*node))]
    NodeDead {
        /// The node.
        node: NodeId,
    },
    /// The connection to a target broke.
    #[error("the connection to {} broke before it answered: {reason}", describe(*node))]
    ConnectionLost {
        /// The node.
        node: NodeId,
        /// What broke.
        reason: String,
    },
    /// A target answered with an error.
    #[error("{} answered with an error: {message}", describe(*node))]
    Remote {
        /// The node.
        node: NodeId,
        /// Its message.
        message: String,
    },
    /// The transport is shutting down, or the scheduler is gone.
    #[error("request abandoned: {0}")]
    Abandoned(String),
    /// The request's deadline passed.
    #[error("no answer from {} within {after:?}", waiting.iter().map(|n| describe(*n)).collect::<Vec<_>>().join(", "))]
    TimedOut {
        /// The request's timeout.
        after: Duration,
        /// The targets that had not answered.
        waiting: Vec<NodeId>,
    },
}

/// A finished request.
#[derive(Debug)]
pub struct Completed<T> {
    /// Its id.
    pub request_id: u64,
    /// The answers, in target order, or why it failed.
    pub result: Result<Vec<(NodeId, T)>, TrackError>,
    /// A failed request's links that its unanswered parts went out on: a
    /// driver takes back those parts' frames still waiting in the links'
    /// send queues before it reports the failure, so that a request its
    /// caller was told failed never reaches a node afterwards (empty for a
    /// completed request).
    pub unanswered_on: Vec<u64>,
}

#[derive(Debug)]
struct Pending<T> {
    /// Its targets. The lists are inline for a request of one target
    /// (every request of the kvstore's parts) and, but for the answers,
    /// of two: no allocation per request.
    targets: SmallVec<[NodeId; 2]>,
    parts: SmallVec<[Option<T>; 1]>,
    /// The link each part went out on (None: not sent yet).
    via: SmallVec<[Option<u64>; 2]>,
    left: usize,
    /// When it fails unanswered, and its timeout (for the error).
    deadline: Option<(Instant, Duration)>,
}

impl<T> Pending<T> {
    /// The indexes of the targets that have not answered.
    fn unanswered(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.targets.len()).filter(|&i| self.parts[i].is_none())
    }
}

/// The request tracker.
#[derive(Debug)]
pub struct Tracker<T> {
    next_id: u64,
    pending: HashMap<u64, Pending<T>>,
    /// The deadlines of the pending requests that have one.
    deadlines: BTreeSet<(Instant, u64)>,
}

impl<T> Default for Tracker<T> {
    fn default() -> Self {
        Tracker {
            next_id: 1,
            pending: HashMap::new(),
            deadlines: BTreeSet::new(),
        }
    }
}

impl<T> Tracker<T> {
    /// Starts a request to `targets` (distinct, non-empty) with no deadline;
    /// returns its id.
    pub fn start(&mut self, targets: impl IntoIterator<Item = NodeId>) -> u64 {
        self.start_with(targets, None)
    }

    /// Starts a request that fails if unanswered `timeout` after `now`.
    pub fn start_until(
        &mut self,
        targets: impl IntoIterator<Item = NodeId>,
        now: Instant,
        timeout: Duration,
    ) -> u64 {
        self.start_with(targets, Some((now + timeout, timeout)))
    }

    fn start_with(
        &mut self,
        targets: impl IntoIterator<Item = NodeId>,
        deadline: Option<(Instant, Duration)>,
    ) -> u64 {
        let targets: SmallVec<[NodeId; 2]> = targets.into_iter().collect();
        let id = self.next_id;
        self.next_id += 1;
        let n = targets.len();
        if let Some((at, _)) = deadline {
            self.deadlines.insert((at, id));
        }
        self.pending.insert(
            id,
            Pending {
                parts: (0..n).map(|_| None).collect(),
                via: SmallVec::from_elem(None, n),
                targets,
                left: n,
                deadline,
            },
        );
        id
    }

    /// Forgets request `id`.
    fn take(&mut self, id: u64) -> Option<Pending<T>> {
        let p = self.pending.remove(&id)?;
        if let Some((at, _)) = p.deadline {
            self.deadlines.remove(&(at, id));
        }
        Some(p)
    }

    /// Forgets request `id`, failed with `error`.
    fn failed(&mut self, id: u64, error: TrackError) -> Option<Completed<T>> {
        let p = self.take(id)?;
        let unanswered_on = p.unanswered().filter_map(|i| p.via[i]).collect();
        Some(Completed {
            request_id: id,
            result: Err(error),
            unanswered_on,
        })
    }

    /// The earliest deadline of a pending request.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(at, _)| at)
    }

    /// Fails every request whose deadline is `now` or earlier.
    pub fn expire(&mut self, now: Instant) -> Vec<Completed<T>> {
        let mut done = Vec::new();
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            let Some(p) = self.pending.get(&id) else {
                self.deadlines.pop_first();
                continue;
            };
            let waiting = p.unanswered().map(|i| p.targets[i]).collect();
            let after = p.deadline.map_or(Duration::ZERO, |(_, d)| d);
            done.extend(self.failed(id, TrackError::TimedOut { after, waiting }));
        }
        done
    }

    /// Whether request `id` is still pending.
    pub fn is_pending(&self, id: u64) -> bool {
        self.pending.contains_key(&id)
    }

    /// Requests still pending.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// An answer from `from`. Returns the completion if it was the last.
    pub fn on_response(&mut self, from: NodeId, request_id: u64, part: T) -> Option<Completed<T>> {
        let p = self.pending.get_mut(&request_id)?;
        let i = p.targets.iter().position(|&t| t == from)?;
        if p.parts[i].is_some() {
            return None; // a duplicate answer
        }
        p.parts[i] = Some(part);
        p.left -= 1;
        if p.left > 0 {
            return None;
        }
        let p = self.take(request_id).expect("present above");
        let parts = p
            .targets
            .into_iter()
            .zip(p.parts)
            .map(|(t, part)| (t, part.expect("every part arrived")))
            .collect();
        Some(Completed {
            request_id,
            result: Ok(parts),
            unanswered_on: Vec::new(),
        })
    }

    /// An error answer from `from`: the request fails now.
    pub fn on_error(
        &mut self,
        from: NodeId,
        request_id: u64,
        message: String,
    ) -> Option<Completed<T>> {
        let p = self.pending.get(&request_id)?;
        if !p.targets.contains(&from) {
            return None;
        }
        let error = TrackError::Remote {
            node: from,
            message,
        };
        self.failed(request_id, error)
    }

    /// The part of request `request_id` to `node` goes out on link `link`.
    /// False if the request is no longer pending (failed or timed out
    /// meanwhile: the part must not be sent, or the node would act on a
    /// request whose caller was told it failed).
    pub fn sent_on(&mut self, request_id: u64, node: NodeId, link: u64) -> bool {
        let Some(p) = self.pending.get_mut(&request_id) else {
            return false;
        };
        match p.targets.iter().position(|&t| t == node) {
            Some(i) => {
                p.via[i] = Some(link);
                true
            }
            None => false,
        }
    }

    /// Link `link` to `node` broke: every request with a part to `node`
    /// that went out on it and is still unanswered fails. Parts sent on
    /// another link, or not sent yet, are not this link's.
    pub fn on_link_lost(
        &mut self,
        node: NodeId,
        link: u64,
        error: impl Fn() -> TrackError,
    ) -> Vec<Completed<T>> {
        self.fail_waiting(node, Some(link), error)
    }

    /// The part of request `request_id` to `node` could not be sent (no
    /// connection could be made): the request fails, if still pending.
    pub fn on_unsent(
        &mut self,
        request_id: u64,
        node: NodeId,
        error: impl Fn() -> TrackError,
    ) -> Option<Completed<T>> {
        let p = self.pending.get(&request_id)?;
        if !p.targets.contains(&node) {
            return None;
        }
        self.fail(vec![request_id], error).pop()
    }

    fn fail(&mut self, ids: Vec<u64>, error: impl Fn() -> TrackError) -> Vec<Completed<T>> {
        ids.into_iter()
            .filter_map(|request_id| self.failed(request_id, error()))
            .collect()
    }

    /// `node` is gone: every request still waiting on it fails.
    pub fn on_node_lost(
        &mut self,
        node: NodeId,
        error: impl Fn() -> TrackError,
    ) -> Vec<Completed<T>> {
        self.fail_waiting(node, None, error)
    }

    /// Fails every request with an unanswered part to `node` (sent on
    /// `link`, if given).
    fn fail_waiting(
        &mut self,
        node: NodeId,
        link: Option<u64>,
        error: impl Fn() -> TrackError,
    ) -> Vec<Completed<T>> {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                p.unanswered()
                    .any(|i| p.targets[i] == node && link.is_none_or(|l| p.via[i] == Some(l)))
            })
            .map(|(id, _)| *id)
            .collect();
        self.fail(ids, error)
    }

    /// Everything fails (shutdown, scheduler lost).
    pub fn fail_all(&mut self, reason: &str) -> Vec<Completed<T>> {
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        self.fail(ids, || TrackError::Abandoned(reason.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_once_in_target_order() {
        let mut t = Tracker::default();
        let id = t.start(vec![8, 10, 12]);
        assert!(t.on_response(10, id, "b").is_none());
        assert!(t.on_response(10, id, "dup").is_none());
        assert!(t.on_response(99, id, "stranger").is_none());
        assert!(t.on_response(12, id, "c").is_none());
        let done = t.on_response(8, id, "a").unwrap();
        assert_eq!(done.result.unwrap(), vec![(8, "a"), (10, "b"), (12, "c")]);
        assert!(t.on_response(8, id, "late").is_none());
        assert!(t.is_empty());
    }

    #[test]
    fn a_broken_link_fails_only_the_parts_sent_on_it() {
        let lost = || TrackError::ConnectionLost {
            node: 10,
            reason: "old process".into(),
        };
        let mut t = Tracker::default();
        // Sent on link 1 (the old process), on link 2 (the new one), not
        // sent yet (a connection is being made), and answered on link 1.
        let old = t.start(vec![10]);
        let new = t.start(vec![8, 10]);
        let queued = t.start(vec![10]);
        let answered = t.start(vec![10]);
        assert!(t.sent_on(old, 10, 1));
        assert!(t.sent_on(new, 8, 7) && t.sent_on(new, 10, 2));
        assert!(t.sent_on(answered, 10, 1));
        assert!(!t.sent_on(new, 12, 2), "not a target");
        t.on_response(10, answered, "done");
        let failed = t.on_link_lost(10, 1, lost);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].request_id, old);
        assert!(failed[0]
            .result
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("old process"));
        // Another node's link of the same number is not this one.
        assert!(t.on_link_lost(12, 2, lost).is_empty());
        // The new link's request completes; the queued one is still pending,
        // and fails only when its connection cannot be made.
        t.on_response(8, new, "a");
        assert!(t.on_response(10, new, "b").unwrap().result.is_ok());
        assert_eq!(t.len(), 1);
        assert!(t.on_unsent(queued, 8, lost).is_none(), "not a target");
        assert!(t.on_unsent(queued, 10, lost).unwrap().result.is_err());
        // A request that failed meanwhile is not sent.
        assert!(!t.sent_on(queued, 10, 2));
        assert!(t.on_unsent(queued, 10, lost).is_none());
    }

    #[test]
    fn a_dead_node_fails_only_what_waits_on_it() {
        let mut t = Tracker::default();
        let a = t.start(vec![8, 10]);
        let b = t.start(vec![8]);
        let c = t.start(vec![10]);
        t.on_response(10, a, ());
        let failed = t.on_node_lost(10, || TrackError::NodeDead { node: 10 });
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].request_id, c);
        assert_eq!(
            failed[0].result.as_ref().unwrap_err().to_string(),
            "server 1 (id 10) died before answering"
        );
        let failed = t.on_node_lost(8, || TrackError::NodeDead { node: 8 });
        let mut ids: Vec<u64> = failed.iter().map(|c| c.request_id).collect();
        ids.sort();
        assert_eq!(ids, vec![a, b]);
        assert!(t.is_empty());
    }

    #[test]
    fn a_deadline_fails_the_request_naming_who_did_not_answer() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let slow = t.start_until(vec![8, 10], t0, 2 * s);
        let quick = t.start_until(vec![8], t0, s);
        let forever = t.start(vec![12]);
        assert_eq!(t.next_deadline(), Some(t0 + s));
        assert!(t.on_response(8, quick, "q").is_some());
        assert_eq!(t.next_deadline(), Some(t0 + 2 * s));
        t.on_response(8, slow, "a");
        assert!(t.expire(t0 + s).is_empty());
        let done = t.expire(t0 + 2 * s);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].request_id, slow);
        assert_eq!(
            done[0].result.as_ref().unwrap_err(),
            &TrackError::TimedOut {
                after: 2 * s,
                waiting: vec![10]
            }
        );
        assert_eq!(
            done[0].result.as_ref().unwrap_err().to_string(),
            "no answer from server 1 (id 10) within 2s"
        );
        assert!(t.on_response(10, slow, "late").is_none());
        assert_eq!(t.next_deadline(), None);
        assert_eq!(t.len(), 1);
        assert!(t.expire(t0 + 100 * s).is_empty());
        assert!(t.on_response(12, forever, "f").is_some());
    }

    #[test]
    fn an_expired_request_names_the_links_of_its_unanswered_parts() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        // Parts to 8 (answered), 10 (sent on link 4) and 12 (not sent yet).
        let id = t.start_until(vec![8, 10, 12], t0, s);
        assert!(t.sent_on(id, 8, 3));
        assert!(t.sent_on(id, 10, 4));
        t.on_response(8, id, "a");
        let done = t.expire(t0 + s);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].unanswered_on, vec![4]);
        // Gone: a late part finds it failed.
        assert!(!t.sent_on(id, 12, 5));
    }

    /// Every way to fail names the links of the unanswered parts that went
    /// out (an error answer from one node, a link or node lost, a part that
    /// could not be sent), so that the driver takes them back; a completed
    /// request names none.
    #[test]
    fn every_failure_names_the_links_of_its_unanswered_parts() {
        let mut t = Tracker::default();
        let three = |t: &mut Tracker<&str>| {
            let id = t.start(vec![8, 10, 12]);
            assert!(t.sent_on(id, 8, 3) && t.sent_on(id, 10, 4));
            id
        };
        let id = three(&mut t);
        let c = t.on_error(8, id, "no".into()).unwrap();
        assert_eq!(c.unanswered_on, vec![3, 4]);
        let id = three(&mut t);
        t.on_response(8, id, "a");
        let c = t.on_error(10, id, "no".into()).unwrap();
        assert_eq!(c.unanswered_on, vec![4]);
        let id = three(&mut t);
        let c = t.on_link_lost(10, 4, || TrackError::Abandoned("x".into()));
        assert_eq!((c.len(), &c[0].unanswered_on), (1, &vec![3, 4]));
        let id2 = three(&mut t);
        assert_ne!(id, id2);
        let c = t.on_node_lost(8, || TrackError::NodeDead { node: 8 });
        assert_eq!(c[0].unanswered_on, vec![3, 4]);
        let id = three(&mut t);
        let c = t
            .on_unsent(id, 12, || TrackError::Abandoned("x".into()))
            .unwrap();
        assert_eq!(c.unanswered_on, vec![3, 4]);
        let id = three(&mut t);
        t.on_response(8, id, "a");
        t.on_response(10, id, "b");
        assert!(t.sent_on(id, 12, 5));
        let c = t.on_response(12, id, "c").unwrap();
        assert!(c.result.is_ok() && c.unanswered_on.is_empty());
    }

    #[test]
    fn an_error_answer_fails_at_once() {
        let mut t = Tracker::<()>::default();
        let id = t.start(vec![8, 10]);
        let done = t
            .on_error(8, id, "key 5 was never initialized".into())
            .unwrap();
        assert!(matches!(
            done.result,
            Err(TrackError::Remote { node: 8, .. })
        ));
        assert!(t.on_response(10, id, ()).is_none());
        assert_eq!(t.fail_all("bye").len(), 0);
    }
}
