//! Rounds that end without completing: failed (a worker died, a push was
//! malformed), a push that gave way to its retry, and pushes of a round
//! the workers already saw complete.
//!
//! # The workers' count of rounds
//!
//! Each sync push says which round of its key it is (each of its parts
//! carries it): one more than the rounds its worker saw complete
//! (`DistKey::seen`), and a worker's check after a server's restart says
//! that count too. A server normally holds
//! the same count (`EntryState::rounds`). A restarted one holds its
//! checkpoint's, which may be behind; worse, a crash between two answers
//! of a round leaves one worker that saw the round complete and went on,
//! and one that did not and sends its push again. Were the restarted
//! server to take that push into a new round, the round would wait for a
//! push the first worker will not send until the second moves on (and,
//! with several servers, the first waits on another server for the
//! second): a wedge. So a server *learns* the workers' count: a push of
//! round `t`, or a check saying `t - 1`, means rounds up to `t - 1`
//! completed; the key's count moves up to it (the value stays what it
//! holds: those rounds are lost, whole); a push of a round the count holds
//! is answered with the value, not applied.
//!
//! Invariant: every push in a sync round in progress is of round
//! `rounds + 1` (one of a later round moves the count up first, and one of
//! an earlier round is answered at once), so when the count moves up past
//! it, the whole round in progress is of a completed round: answered, not
//! applied.

use bytes::Bytes;

use super::{answer_of, EntryState, Want};
use crate::error::Fault;
use crate::wire::Head;

impl EntryState {
    /// The workers saw rounds up to `seen` complete: a count behind it (a
    /// restart's) moves up, and the round in progress, all of a round now
    /// known complete, is answered without being applied.
    pub(crate) fn learn_round(&mut self, seen: u64) {
        if seen <= self.rounds {
            return;
        }
        tracing::warn!(
            "{}: the workers saw {seen} rounds complete, this server holds {} (a restart lost the rest): counting from {seen}",
            self.name(),
            self.rounds
        );
        self.rounds = seen;
        let mut answers = std::mem::take(&mut self.waiters);
        for p in &mut self.pending {
            if let Some(a) = p.take() {
                let want = Want::of(&a.head);
                answers.push((a.answer, want));
            }
        }
        self.reset_round();
        self.answer_value(answers);
    }

    /// Whether a sync push of round `tag` (0: untagged) is of a round this
    /// key holds complete, after learning from it that the rounds before
    /// it are: the push is then answered (`answer_done`), not taken.
    pub(crate) fn round_done(&mut self, tag: u64) -> bool {
        if tag == 0 {
            return false;
        }
        self.learn_round(tag - 1);
        tag <= self.rounds
    }

    /// The answer of a push of a round this key completed already:
    /// nothing (a push), the value (a push-pull), or word that the value
    /// is in its slot (a shared-memory push-pull with this process's
    /// segment).
    pub(crate) fn answer_done(&self, head: &Head) -> Result<Option<Bytes>, Fault> {
        let want = Want::of(head);
        if want == Want::Slot {
            self.check_shm(head)?;
        }
        let want = self.want(want);
        Ok(answer_of(
            want,
            &(want == Want::Value).then(|| self.snapshot()),
        ))
    }

    /// The answer of a push that a push of the same rank, sent again in
    /// its round, took the place of.
    pub(super) fn gave_way(&self, rank: usize) -> Result<Option<Bytes>, Fault> {
        Err(Fault::Unavailable(format!(
            "{}: worker {rank} sent this push again in the same round; the later one counts",
            self.name()
        )))
    }

    /// Fails the round in progress, if one is, naming this key: it cannot
    /// complete (`msg` says why).
    pub(crate) fn fail_active_round(&mut self, msg: &str) {
        if self.arrived > 0 || !self.waiters.is_empty() {
            let m = format!("{}: {msg}", self.name());
            self.fail_round(Fault::Unavailable(m));
        }
    }

    /// Answers every push of the round with `why` and starts over.
    pub(super) fn fail_round(&mut self, why: Fault) {
        for (answer, _) in std::mem::take(&mut self.waiters) {
            answer(Err(why.clone()));
        }
        for p in &mut self.pending {
            if let Some(a) = p.take() {
                (a.answer)(Err(why.clone()));
            }
        }
        self.reset_round();
    }
}
