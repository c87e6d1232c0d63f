//! Barriers: rounds of a group that complete when every live member has
//! arrived, fail at once when one votes `Fail` or a member is dead (the
//! members that had not come are owed the failure and told at once, by a
//! notice that names them), and compare `Agree` digests.

use std::collections::BTreeMap;

use super::{describe, Group, NodeId, Role, Scheduler, SchedulerEvent, State};
use crate::protocol::vote_failure;
use crate::wire::{Control, Vote};

impl Scheduler {
    /// The scheduler itself arrives at a barrier of `group` (which must
    /// include the scheduler).
    pub fn barrier(&mut self, group: Group) {
        self.rounds.entry(group.0).or_default().me = true;
        self.check_round(group);
    }

    pub(super) fn on_barrier(&mut self, id: NodeId, group: Group, seq: u64, vote: Vote) {
        if !group.is_valid() {
            return;
        }
        // A member owed the failure of a round it had not reached: this
        // arrival is its part of that round.
        if let Some(error) = self.owed.get_mut(&group.0).and_then(|o| o.remove(&id)) {
            self.release(id, group, seq, Some(error));
            return;
        }
        let round = self.rounds.entry(group.0).or_default();
        let vote = match (round.arrived.get(&id), vote) {
            // A node that gave up waiting: its vote replaces its arrival
            // (a vote for a round that has completed is stale), and says
            // what it had come with (the collective call, by name).
            (Some((s, _)), _) if *s != seq => return,
            (Some((_, Vote::Agree { summary, .. })), Vote::Fail { reason }) => Vote::Fail {
                reason: format!("{reason} at {summary}"),
            },
            (_, vote) => vote,
        };
        round.arrived.insert(id, (seq, vote));
        self.check_round(group);
    }

    /// Tells node `id` that its barrier `seq` of `group` is over.
    fn release(&mut self, id: NodeId, group: Group, seq: u64, error: Option<String>) {
        if let Some(conn) = self.nodes.get(&id).and_then(|e| e.conn) {
            self.out.push_back((
                conn,
                Control::BarrierDone {
                    group: group.0,
                    seq,
                    error,
                },
            ));
        }
    }

    pub(super) fn recheck_barriers(&mut self) {
        let groups: Vec<u8> = self.rounds.keys().copied().collect();
        for g in groups {
            self.check_round(Group(g));
        }
    }

    fn check_round(&mut self, group: Group) {
        let Some(round) = self.rounds.get(&group.0) else {
            return;
        };
        let members: Vec<(NodeId, State)> = self
            .nodes
            .iter()
            .filter(|(_, e)| {
                Role::from_code(e.info.role).is_some_and(|r| group.has(r)) && e.state != State::Left
            })
            .map(|(id, e)| (*id, e.state))
            .collect();
        let dead: Vec<NodeId> = members
            .iter()
            .filter(|(_, s)| *s == State::Dead)
            .map(|(id, _)| *id)
            .collect();
        let failed = round.arrived.iter().find_map(|(id, (_, v))| match v {
            Vote::Fail { reason } => Some(vote_failure(group, *id, reason)),
            _ => None,
        });
        let error = if let Some(e) = failed {
            Some(e)
        } else if !dead.is_empty() {
            let names: Vec<String> = dead.iter().map(|d| describe(*d)).collect();
            Some(format!(
                "barrier of group {} cannot complete: {} dead",
                group.0,
                names.join(", ")
            ))
        } else {
            let all_nodes = members.iter().all(|(id, _)| round.arrived.contains_key(id));
            let me_ok = !group.has(Role::Scheduler) || round.me;
            if !(all_nodes && me_ok) {
                return;
            }
            disagreement(group, &round.arrived)
        };
        let round = self.rounds.remove(&group.0).expect("checked above");
        if let Some(e) = &error {
            // Live members that had not arrived get the same failure when
            // they do (every member, the one whose vote failed it included,
            // reports the same cause), and are told now, with who had not
            // come: a call only some members made.
            let missing: Vec<NodeId> = members
                .iter()
                .filter(|(id, state)| *state == State::Alive && !round.arrived.contains_key(id))
                .map(|(id, _)| *id)
                .collect();
            let names: Vec<String> = missing.iter().map(|id| describe(*id)).collect();
            let notice = format!("{e}; {} had not reached it", names.join(", "));
            let owed = self.owed.entry(group.0).or_default();
            for id in &missing {
                owed.insert(*id, e.clone());
                if let Some(conn) = self.nodes.get(id).and_then(|n| n.conn) {
                    let error = notice.clone();
                    self.out.push_back((
                        conn,
                        Control::BarrierMissed {
                            group: group.0,
                            error,
                        },
                    ));
                }
            }
        }
        for (id, (seq, vote)) in round.arrived {
            if matches!(vote, Vote::Fail { .. }) {
                continue; // it is not waiting
            }
            self.release(id, group, seq, error.clone());
        }
        if round.me {
            self.events
                .push_back(SchedulerEvent::BarrierDone { group, error });
        }
    }
}

/// The error of a completed round whose `Agree` votes differ, if they do.
fn disagreement(group: Group, arrived: &BTreeMap<NodeId, (u64, Vote)>) -> Option<String> {
    let mut by_digest: BTreeMap<u64, (String, Vec<NodeId>)> = BTreeMap::new();
    for (id, (_, v)) in arrived {
        if let Vote::Agree { digest, summary } = v {
            by_digest
                .entry(*digest)
                .or_insert_with(|| (summary.clone(), Vec::new()))
                .1
                .push(*id);
        }
    }
    if by_digest.len() < 2 {
        return None;
    }
    let sides: Vec<String> = by_digest
        .values()
        .map(|(summary, ids)| {
            let who: Vec<String> = ids.iter().map(|i| describe(*i)).collect();
            format!("{} has {summary}", who.join(", "))
        })
        .collect();
    Some(format!(
        "barrier of group {}: the nodes disagree: {}",
        group.0,
        sides.join("; ")
    ))
}
