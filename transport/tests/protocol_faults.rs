//! Faults of the cluster conversation, in the simulated network (`sim/`):
//! barriers that time out or fail on one node, settings the nodes disagree
//! on, stopped processes (a node, the scheduler), ranks asked for, the end
//! of a job whose workers are gone, and the fencing of an old process.

mod sim;

use std::time::Duration;

use pskv_transport::protocol::member::{MemberEvent, MemberState};
use pskv_transport::protocol::scheduler::SchedulerEvent;
use pskv_transport::protocol::{describe, vote_failure, Group, Role};
use pskv_transport::wire::Vote;
use sim::*;

/// A cluster of `s` servers and `w` workers, all joined (members `1..=s`
/// are the servers, then the workers).
fn cluster(seed: u64, faults: Faults, s: u32, w: u32) -> Sim {
    let mut sim = Sim::new(seed, faults, faults.loss > 0.0, s, w);
    let n = (s + w) as usize;
    sim.run_until(Duration::from_secs(60), |sim| {
        (1..=n).all(|i| sim.joined(i))
    });
    sim
}

fn id_of(sim: &mut Sim, i: usize) -> u32 {
    sim.member(i).id().expect("joined")
}

/// One node gives up waiting (its timeout): every node of the round gets
/// the same error, those that come later too, and the next barrier works
/// for all (the old behaviour: the node that timed out could never take
/// part in a barrier of that group again).
#[test]
fn a_timed_out_barrier_fails_on_every_node_and_the_next_one_works() {
    for seed in seeds() {
        let mut sim = cluster(seed, NASTY, 1, 3);
        let (a, b, late) = (2, 3, 4);
        sim.barrier(a, Group::WORKERS, Vote::Ready);
        sim.barrier(b, Group::WORKERS, Vote::Ready);
        sim.run(Duration::from_millis(300));
        let now = sim.now;
        sim.member(a)
            .abandon_barrier(Group::WORKERS, "it waited 600s and gave up".into(), now);
        sim.flush();
        sim.run_until(Duration::from_secs(30), |sim| {
            !sim.barrier_done(b, Group::WORKERS).is_empty()
        });
        let e = sim.barrier_done(b, Group::WORKERS)[0]
            .clone()
            .expect("an error");
        let (a_id, late_id) = (id_of(&mut sim, a), id_of(&mut sim, late));
        assert!(
            e.contains("gave up") && e.contains(&describe(a_id)),
            "seed {seed}: {e}"
        );
        // The same cause as the node whose vote failed the round reports
        // (a collective fails on every rank alike): who had not come is in
        // the notice to them, not in the round's error.
        assert_eq!(
            e,
            vote_failure(Group::WORKERS, a_id, "it waited 600s and gave up"),
            "seed {seed}"
        );
        // The node that had not arrived is told at once (a collective call
        // it did not make)...
        sim.run_until(Duration::from_secs(30), |sim| {
            sim.events[late]
                .iter()
                .any(|e| matches!(e, MemberEvent::BarrierMissed { .. }))
        });
        let told: Vec<&MemberEvent> = sim.events[late]
            .iter()
            .filter(|e| matches!(e, MemberEvent::BarrierMissed { .. }))
            .collect();
        assert_eq!(
            told,
            [&MemberEvent::BarrierMissed {
                group: Group::WORKERS,
                error: format!("{e}; {} had not reached it", describe(late_id))
            }],
            "seed {seed}"
        );
        // ... and gets the same failure when it arrives.
        sim.barrier(late, Group::WORKERS, Vote::Ready);
        sim.run_until(Duration::from_secs(30), |sim| {
            !sim.barrier_done(late, Group::WORKERS).is_empty()
        });
        assert_eq!(
            sim.barrier_done(late, Group::WORKERS),
            vec![Some(e.clone())],
            "seed {seed}"
        );
        // The node that gave up got no late answer to the abandoned round.
        assert!(sim.barrier_done(a, Group::WORKERS).is_empty());
        // Everyone can go on: the next barrier completes everywhere.
        for i in [a, b, late] {
            sim.barrier(i, Group::WORKERS, Vote::Ready);
        }
        sim.run_until(Duration::from_secs(30), |sim| {
            [a, b, late]
                .iter()
                .all(|&i| sim.barrier_done(i, Group::WORKERS).last() == Some(&None))
        });
    }
}

/// A collective that fails locally on one node (a bad optimizer name, a
/// checkpoint that cannot be written) fails on all of them at once with
/// its cause, instead of leaving the others waiting for their timeout.
#[test]
fn a_collective_that_fails_on_one_node_fails_on_all() {
    for seed in seeds() {
        let mut sim = cluster(seed, NASTY, 1, 3);
        sim.barrier(2, Group::WORKERS, Vote::Ready);
        sim.barrier(
            3,
            Group::WORKERS,
            Vote::Fail {
                reason: "set_optimizer: unknown optimizer 'sgdd'".into(),
            },
        );
        sim.run_until(Duration::from_secs(30), |sim| {
            !sim.barrier_done(2, Group::WORKERS).is_empty()
        });
        sim.barrier(4, Group::WORKERS, Vote::Ready);
        sim.run_until(Duration::from_secs(30), |sim| {
            !sim.barrier_done(4, Group::WORKERS).is_empty()
        });
        let e2 = sim.barrier_done(2, Group::WORKERS);
        let e4 = sim.barrier_done(4, Group::WORKERS);
        assert_eq!(e2, e4, "seed {seed}: the same cause everywhere");
        let e = e2[0].clone().expect("an error");
        assert!(e.contains("unknown optimizer 'sgdd'"), "{e}");
        // The failing node does not wait, so it gets no answer.
        assert!(sim.barrier_done(3, Group::WORKERS).is_empty());
        for i in 2..=4 {
            sim.barrier(i, Group::WORKERS, Vote::Ready);
        }
        sim.run_until(Duration::from_secs(30), |sim| {
            (2..=4).all(|i| sim.barrier_done(i, Group::WORKERS).last() == Some(&None))
        });
    }
}

/// Settings that differ across workers (say, the optimizer) fail the
/// barrier on every worker, naming who has what.
#[test]
fn disagreeing_settings_fail_the_barrier_on_every_node() {
    let mut sim = cluster(3, CLEAN, 1, 3);
    let vote = |d: u64, s: &str| Vote::Agree {
        digest: d,
        summary: s.into(),
    };
    sim.barrier(2, Group::WORKERS, vote(1, "sgd(lr=0.1)"));
    sim.barrier(3, Group::WORKERS, vote(2, "adam(lr=0.1)"));
    sim.barrier(4, Group::WORKERS, vote(1, "sgd(lr=0.1)"));
    sim.run(Duration::from_millis(100));
    let errs: Vec<_> = (2..=4)
        .map(|i| sim.barrier_done(i, Group::WORKERS))
        .collect();
    assert!(errs.iter().all(|e| e == &errs[0]), "{errs:?}");
    let e = errs[0][0].clone().expect("an error");
    let odd = id_of(&mut sim, 3);
    assert!(
        e.contains("disagree") && e.contains("adam(lr=0.1)") && e.contains("sgd(lr=0.1)"),
        "{e}"
    );
    assert!(e.contains(&format!("{} has adam", describe(odd))), "{e}");
    // Agreement passes.
    for i in 2..=4 {
        sim.barrier(i, Group::WORKERS, vote(1, "sgd(lr=0.1)"));
    }
    sim.run(Duration::from_millis(100));
    assert!((2..=4).all(|i| sim.barrier_done(i, Group::WORKERS).last() == Some(&None)));
}

/// A node stopped (SIGSTOP) beyond the heartbeat timeout is declared dead;
/// when it runs again it is told so (fenced) and must stop, instead of
/// running on as a ghost that never rejoins.
#[test]
fn a_stopped_node_is_declared_dead_and_fenced_when_it_runs_again() {
    for seed in seeds() {
        let mut sim = cluster(seed, CLEAN, 1, 2);
        let (server, stopped) = (1, 3);
        let id = id_of(&mut sim, stopped);
        sim.stall(stopped, HB_TIMEOUT * 3);
        sim.run_until(HB_TIMEOUT * 2, |sim| {
            sim.sched_events
                .iter()
                .any(|e| matches!(e, SchedulerEvent::NodeDead { id: d, .. } if *d == id))
        });
        sim.run(Duration::from_millis(100));
        assert!(sim.events[server].contains(&MemberEvent::NodeDead(id)));
        // It runs again: its next heartbeat is answered with Fenced.
        sim.run_until(HB_TIMEOUT * 3, |sim| {
            sim.members[stopped]
                .as_ref()
                .is_some_and(|m| matches!(m.state(), MemberState::Fenced(_)))
        });
        let fenced = sim.events[stopped].iter().find_map(|e| match e {
            MemberEvent::Fenced(r) => Some(r.clone()),
            _ => None,
        });
        let r = fenced.expect("a Fenced event");
        assert!(r.contains("declared") && r.contains(&describe(id)), "{r}");
        // It did not mistake its own stop for the scheduler's silence.
        assert!(!sim.events[stopped]
            .iter()
            .any(|e| matches!(e, MemberEvent::SchedulerLost(_))));
        // Its peers refuse it as a dead node.
        assert!(sim.member(server).admits(id, 0).is_err());
    }
}

/// The scheduler stopped for longer than the heartbeat timeout (but less
/// than the scheduler timeout): when it runs again it does not declare
/// everyone dead, the members kept waiting for it, and barriers work.
#[test]
fn a_stopped_scheduler_is_survived() {
    for seed in seeds() {
        let mut sim = cluster(seed, CLEAN, 2, 2);
        sim.barrier(3, Group::WORKERS, Vote::Ready);
        sim.stall(0, HB_TIMEOUT * 2 + HB_TIMEOUT / 2);
        sim.barrier(4, Group::WORKERS, Vote::Ready);
        sim.run(HB_TIMEOUT * 3);
        assert!(
            !sim.anyone_declared_dead(),
            "seed {seed}: {:?}",
            sim.sched_events
        );
        for i in 1..=4 {
            assert!(sim.joined(i), "seed {seed}: member {i} gave up");
        }
        // The barrier that waited through the stop completed.
        assert_eq!(sim.barrier_done(3, Group::WORKERS), vec![None]);
        assert_eq!(sim.barrier_done(4, Group::WORKERS), vec![None]);
    }
}

/// The scheduler stopped right after the cluster came up, before the
/// driver ever ran its timeout call (it runs on the machines'
/// `next_timeout`, not on a tick): when it runs again it still tells its
/// own stall from the nodes' silence.
#[test]
fn a_scheduler_stopped_before_its_first_timeout_call_is_survived() {
    for seed in seeds() {
        let mut sim = cluster(seed, CLEAN, 1, 2);
        sim.stall(0, HB_TIMEOUT * 2 + HB_TIMEOUT / 2);
        sim.run(HB_TIMEOUT * 3);
        assert!(
            !sim.anyone_declared_dead(),
            "seed {seed}: {:?}",
            sim.sched_events
        );
    }
}

/// With a heartbeat timeout short against the heartbeat interval (1 s and
/// 2 s, as the process tests run), a member still sees a silent scheduler
/// as lost on time: it is called often enough that the gaps between its
/// calls never look like stalls of its own (which would forgive the
/// scheduler's silence, forever).
#[test]
fn a_silent_scheduler_is_lost_on_time_with_a_short_heartbeat_timeout() {
    for seed in seeds() {
        let hb = (Duration::from_secs(1), Duration::from_secs(2));
        let mut sim = Sim::with_heartbeat(seed, CLEAN, false, 1, 1, hb);
        sim.run_until(Duration::from_secs(60), |sim| {
            sim.joined(1) && sim.joined(2)
        });
        sim.sched = None; // silent death
        let took = sim.run_until(SCHED_TIMEOUT * 2, |sim| {
            sim.events[2]
                .iter()
                .any(|e| matches!(e, MemberEvent::SchedulerLost(_)))
        });
        assert!(
            took <= SCHED_TIMEOUT + Duration::from_millis(500),
            "seed {seed}: {took:?}"
        );
    }
}

/// Ranks asked for (DMLC_WORKER_ID, DMLC_SERVER_ID) are given; the others
/// fill the free ranks in registration order; a rank asked twice, or out of
/// range, is refused with a message naming it.
#[test]
fn asked_for_ranks_are_given_and_conflicts_refused() {
    let mut sim = Sim::new(5, CLEAN, false, 0, 0);
    // A fresh scheduler for 2 servers and 4 workers.
    sim.sched = Some(pskv_transport::protocol::scheduler::Scheduler::new(
        pskv_transport::protocol::scheduler::SchedulerConfig {
            num_servers: 2,
            num_workers: 4,
            heartbeat_timeout: Some(HB_TIMEOUT),
        },
    ));
    let s1 = sim.add_member_ranked(Role::Server, Some(1));
    let s0 = sim.add_member_ranked(Role::Server, None);
    let w2 = sim.add_member_ranked(Role::Worker, Some(2));
    let wa = sim.add_member_ranked(Role::Worker, None);
    let bad = sim.add_member_ranked(Role::Worker, Some(2));
    let big = sim.add_member_ranked(Role::Worker, Some(9));
    let w0 = sim.add_member_ranked(Role::Worker, Some(0));
    let wb = sim.add_member_ranked(Role::Worker, None);
    sim.run_until(Duration::from_secs(10), |sim| {
        [s1, s0, w2, wa, w0, wb].iter().all(|&i| sim.joined(i))
    });
    let rank = |sim: &mut Sim, i: usize| {
        let id = sim.member(i).id().unwrap();
        pskv_transport::protocol::role_rank(id).unwrap().1
    };
    assert_eq!(rank(&mut sim, s1), 1);
    assert_eq!(rank(&mut sim, s0), 0);
    assert_eq!(rank(&mut sim, w2), 2);
    assert_eq!(rank(&mut sim, w0), 0);
    assert_eq!(rank(&mut sim, wa), 1);
    assert_eq!(rank(&mut sim, wb), 3);
    for (i, what) in [(bad, "two workers asked for rank 2"), (big, "rank 9")] {
        match sim.members[i].as_ref().unwrap().state() {
            MemberState::Rejected(r) => assert!(r.contains(what), "{r}"),
            s => panic!("member {i}: {s:?}"),
        }
    }
}

/// When every worker is gone (one left, one died) the servers are told the
/// job ended, and failed; once they leave, the scheduler's end names the
/// dead worker (it used to report a clean end and exit 0).
#[test]
fn when_every_worker_is_gone_the_servers_are_told_and_the_end_names_the_dead() {
    let mut sim = cluster(8, CLEAN, 2, 2);
    let (w_left, w_dead) = (3, 4);
    let dead_id = id_of(&mut sim, w_dead);
    let now = sim.now;
    sim.member(w_left).leave(now);
    sim.flush();
    sim.run(Duration::from_millis(100));
    assert!(!sim.events[1]
        .iter()
        .any(|e| matches!(e, MemberEvent::JobEnded(..))));
    sim.members[w_dead] = None;
    sim.sched.as_mut().unwrap().disconnected(w_dead as u64);
    sim.flush();
    sim.run(Duration::from_millis(100));
    for s in [1, 2] {
        let ended = sim.events[s].iter().find_map(|e| match e {
            MemberEvent::JobEnded(r, failed) => Some((r.clone(), *failed)),
            _ => None,
        });
        let (r, failed) = ended.expect("the servers are told");
        assert!(failed && r.contains(&describe(dead_id)), "{r}");
        let now = sim.now;
        sim.member(s).leave(now);
    }
    sim.flush();
    sim.run(Duration::from_millis(100));
    assert!(sim.sched_events.contains(&SchedulerEvent::AllLeft {
        dead: vec![dead_id]
    }));
}

/// A restart takes the dead node's id at the next epoch: peers admit the
/// new process and refuse the old one (and refuse any dead id).
#[test]
fn a_restart_moves_the_epoch_and_peers_refuse_the_old_process() {
    let mut sim = cluster(2, CLEAN, 2, 1);
    let id = id_of(&mut sim, 2);
    assert_eq!(sim.member(2).epoch(), 0);
    assert!(sim.member(3).admits(id, 0).is_ok());
    sim.members[2] = None;
    sim.sched.as_mut().unwrap().disconnected(2);
    sim.flush();
    sim.run(Duration::from_millis(50));
    assert!(sim.member(3).admits(id, 0).is_err(), "a dead id");
    let new = sim.add_member(Role::Server);
    sim.run_until(Duration::from_secs(10), |sim| sim.joined(new));
    assert_eq!(sim.member(new).id(), Some(id));
    assert_eq!(sim.member(new).epoch(), 1);
    sim.run(Duration::from_millis(50));
    let e = sim.member(3).admits(id, 0).unwrap_err();
    assert!(e.contains("epoch 1"), "{e}");
    assert!(sim.member(3).admits(id, 1).is_ok());
    assert!(sim.member(1).admits(id, 1).is_ok());
}
