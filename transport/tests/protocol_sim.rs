//! The protocol state machines, driven through a simulated network with a
//! fake clock (`sim/`): loss, duplication, reordering (random delays), node
//! death. Deterministic: every run of a seed is the same run.

mod sim;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use pskv_transport::protocol::member::{MemberEvent, MemberState};
use pskv_transport::protocol::resender::{Received, Resender};
use pskv_transport::protocol::scheduler::SchedulerEvent;
use pskv_transport::protocol::tracker::{TrackError, Tracker};
use pskv_transport::protocol::{Group, Role, SCHEDULER_ID};
use pskv_transport::wire::{Flags, Frame, Kind, Vote};
use sim::*;

#[test]
fn registration_and_barriers_survive_loss_duplication_and_reordering() {
    for seed in seeds() {
        let (s, w) = (2, 4);
        let mut sim = Sim::new(seed, NASTY, true, s, w);
        let n = (s + w) as usize;
        sim.run_until(Duration::from_secs(60), |sim| {
            (1..=n).all(|i| sim.joined(i))
        });
        // Ids and ranks: distinct, complete, and the same table everywhere.
        let mut ids = HashSet::new();
        let table = sim.members[1].as_ref().unwrap().nodes().clone();
        for i in 1..=n {
            let m = sim.members[i].as_ref().unwrap();
            let id = m.id().unwrap();
            assert!(ids.insert(id), "seed {seed}: id {id} given twice");
            assert_eq!(m.nodes(), &table, "seed {seed}");
            assert_eq!(m.key_ranges().len(), s as usize);
            assert!(!m.is_recovery());
        }
        let mut want: Vec<u32> = (0..s)
            .map(|r| Role::Server.id_of(r))
            .chain((0..w).map(|r| Role::Worker.id_of(r)))
            .collect();
        let mut got: Vec<u32> = ids.into_iter().collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "seed {seed}");
        assert!(sim.sched_events.contains(&SchedulerEvent::Started));

        // Three barriers over everyone, the scheduler included, then one of
        // the workers only.
        for round in 1..=3usize {
            sim.barrier_of(&(1..=n).collect::<Vec<_>>(), Group::ALL);
            sim.run_until(Duration::from_secs(60), |sim| {
                (1..=n).all(|i| sim.barrier_done(i, Group::ALL).len() == round)
            });
            let sched_done = sim
                .sched_events
                .iter()
                .filter(|e| matches!(e, SchedulerEvent::BarrierDone { error: None, .. }))
                .count();
            assert_eq!(sched_done, round, "seed {seed}");
        }
        sim.barrier_of(&((s as usize + 1)..=n).collect::<Vec<_>>(), Group::WORKERS);
        sim.run_until(Duration::from_secs(60), |sim| {
            ((s as usize + 1)..=n).all(|i| sim.barrier_done(i, Group::WORKERS) == vec![None])
        });
        // Nobody was declared dead along the way: heartbeats got through.
        assert!(
            !sim.anyone_declared_dead(),
            "seed {seed}: {:?}",
            sim.sched_events
        );
    }
}

#[test]
fn a_silent_node_is_declared_dead_within_the_heartbeat_timeout() {
    for seed in seeds() {
        let mut sim = Sim::new(seed, CLEAN, false, 1, 3);
        sim.run_until(Duration::from_secs(10), |sim| {
            (1..=4).all(|i| sim.joined(i))
        });
        sim.run(Duration::from_secs(3));
        // Worker at endpoint 3 waits on a barrier of the workers; endpoint 4
        // dies silently (no FIN: a hung or partitioned process).
        sim.barrier_of(&[3], Group::WORKERS);
        let dead_id = sim.members[4].as_ref().unwrap().id().unwrap();
        sim.members[4] = None;
        let took = sim.run_until(Duration::from_secs(20), |sim| {
            sim.sched_events
                .iter()
                .any(|e| matches!(e, SchedulerEvent::NodeDead { id, .. } if *id == dead_id))
        });
        assert!(
            took <= HB_TIMEOUT + HB_INTERVAL + 3 * TICK,
            "seed {seed}: detection took {took:?}"
        );
        sim.run(Duration::from_millis(100));
        for i in 1..=3 {
            assert!(
                sim.events[i].contains(&MemberEvent::NodeDead(dead_id)),
                "seed {seed}: endpoint {i} not told"
            );
        }
        // The waiting barrier failed, naming the dead worker.
        let errs = sim.barrier_done(3, Group::WORKERS);
        assert_eq!(errs.len(), 1);
        let e = errs[0].clone().expect("an error");
        assert!(
            e.contains(&format!("id {dead_id}")) && e.contains("dead"),
            "{e}"
        );
        // dead_nodes answers like ps-lite's GetDeadNodes.
        let s = sim.sched.as_ref().unwrap();
        assert_eq!(
            s.dead_nodes(sim.now, Duration::from_secs(100)),
            vec![dead_id]
        );
        let m = sim.members[1].as_ref().unwrap();
        assert_eq!(
            m.dead_nodes(sim.now, Duration::from_secs(100)),
            vec![dead_id]
        );
    }
}

#[test]
fn a_closed_connection_is_death_at_once_and_a_restart_recovers_the_rank() {
    let mut sim = Sim::new(5, CLEAN, false, 2, 2);
    sim.run_until(Duration::from_secs(10), |sim| {
        (1..=4).all(|i| sim.joined(i))
    });
    let old = sim.members[2].as_ref().unwrap();
    let (dead_id, old_port) = (old.id().unwrap(), old.nodes()[&old.id().unwrap()].port);
    // Server at endpoint 2 crashes: the kernel closes its socket.
    sim.members[2] = None;
    sim.sched.as_mut().unwrap().disconnected(2);
    sim.flush();
    sim.run(Duration::from_millis(50));
    assert!(sim.events[3].contains(&MemberEvent::NodeDead(dead_id)));
    // A new process registers as a server: it takes the dead one's id.
    let new = sim.add_member(Role::Server);
    sim.run_until(Duration::from_secs(10), |sim| sim.joined(new));
    let m = sim.members[new].as_ref().unwrap();
    assert_eq!(m.id(), Some(dead_id));
    assert!(m.is_recovery());
    let new_port = m.nodes()[&dead_id].port;
    assert_ne!(new_port, old_port);
    // The others learn the new address.
    for i in [1, 3, 4] {
        assert!(
            sim.events[i]
                .iter()
                .any(|e| matches!(e, MemberEvent::NodeUpdated(n) if n.id == dead_id && n.port == new_port)),
            "endpoint {i}"
        );
    }
    assert!(sim
        .sched_events
        .contains(&SchedulerEvent::NodeRecovered { id: dead_id }));
    // A barrier of everyone works again with the recovered server.
    sim.barrier_of(&[1, 3, 4, new], Group::ALL);
    sim.run_until(Duration::from_secs(10), |sim| {
        [1, 3, 4, new]
            .iter()
            .all(|&i| sim.barrier_done(i, Group::ALL) == vec![None])
    });
}

/// A restarted server that registers before its old self is known dead
/// (it died silently: no closed connection) is held, and takes over the
/// old id when the heartbeat timeout declares it dead.
#[test]
fn a_restart_that_outruns_the_death_is_held_until_the_death() {
    let mut sim = Sim::new(11, CLEAN, false, 2, 1);
    sim.run_until(Duration::from_secs(10), |sim| {
        (1..=3).all(|i| sim.joined(i))
    });
    let dead_id = sim.members[2].as_ref().unwrap().id().unwrap();
    sim.members[2] = None;
    let new = sim.add_member(Role::Server);
    sim.run(Duration::from_millis(500));
    assert_eq!(
        sim.members[new].as_ref().unwrap().state(),
        &MemberState::Registering,
        "registered before the old server was known dead"
    );
    let took = sim.run_until(HB_TIMEOUT * 2, |sim| sim.joined(new));
    assert!(took <= HB_TIMEOUT + HB_INTERVAL + 3 * TICK, "{took:?}");
    let m = sim.members[new].as_ref().unwrap();
    assert_eq!(m.id(), Some(dead_id));
    assert!(m.is_recovery());
    assert!(sim
        .sched_events
        .contains(&SchedulerEvent::NodeRecovered { id: dead_id }));
}

#[test]
fn extra_nodes_are_rejected() {
    let mut sim = Sim::new(3, CLEAN, false, 1, 1);
    sim.run_until(Duration::from_secs(10), |sim| {
        sim.joined(1) && sim.joined(2)
    });
    let extra = sim.add_member(Role::Worker);
    // Held first (a worker might be about to die), then refused.
    sim.run(Duration::from_millis(100));
    assert_eq!(
        sim.members[extra].as_ref().unwrap().state(),
        &MemberState::Registering
    );
    sim.run(HB_TIMEOUT + HB_TIMEOUT / 4 + Duration::from_millis(200));
    match sim.members[extra].as_ref().unwrap().state() {
        MemberState::Rejected(reason) => {
            assert!(
                reason.contains("no worker is dead") && reason.contains("nothing to recover"),
                "{reason}"
            )
        }
        s => panic!("extra worker state {s:?}"),
    }
    // Before the start, a surplus registration is refused too.
    let mut sim = Sim::new(3, CLEAN, false, 1, 0);
    sim.add_member(Role::Worker);
    let extra = sim.add_member(Role::Worker);
    sim.run(Duration::from_millis(100));
    let states: Vec<MemberState> = (1..=extra)
        .map(|i| sim.members[i].as_ref().unwrap().state().clone())
        .collect();
    assert_eq!(
        states
            .iter()
            .filter(|s| matches!(s, MemberState::Rejected(_)))
            .count(),
        2,
        "a cluster of 1 server, 0 workers refuses both workers: {states:?}"
    );
}

#[test]
fn losing_the_scheduler_fails_waits_and_is_reported() {
    let mut sim = Sim::new(9, CLEAN, false, 1, 2);
    sim.run_until(Duration::from_secs(10), |sim| {
        (1..=3).all(|i| sim.joined(i))
    });
    sim.barrier(2, Group::ALL, Vote::Ready);
    sim.sched = None; // silent death
    let took = sim.run_until(Duration::from_secs(20), |sim| {
        sim.events[2]
            .iter()
            .any(|e| matches!(e, MemberEvent::SchedulerLost(_)))
    });
    assert!(took <= SCHED_TIMEOUT + 2 * TICK, "{took:?}");
    // A stalled scheduler is waited for: not given up before its timeout.
    assert!(took >= SCHED_TIMEOUT - HB_INTERVAL, "{took:?}");
    let errs = sim.barrier_done(2, Group::ALL);
    assert!(
        errs.len() == 1 && errs[0].as_ref().unwrap().contains("abandoned"),
        "{errs:?}"
    );
    let now = sim.now;
    let m = sim.members[1].as_mut().unwrap();
    assert!(m
        .dead_nodes(now, Duration::from_secs(1))
        .contains(&SCHEDULER_ID));
    assert!(m.barrier(Group::ALL, Vote::Ready, now).is_err());
}

#[test]
fn ordered_shutdown_ends_with_all_left() {
    let mut sim = Sim::new(11, NASTY, true, 2, 3);
    sim.run_until(Duration::from_secs(60), |sim| {
        (1..=5).all(|i| sim.joined(i))
    });
    for i in 1..=5 {
        let now = sim.now;
        sim.members[i].as_mut().unwrap().leave(now);
    }
    sim.flush();
    sim.run_until(Duration::from_secs(60), |sim| {
        sim.sched_events
            .contains(&SchedulerEvent::AllLeft { dead: vec![] })
    });
    // Nobody is called dead for leaving.
    sim.run(Duration::from_secs(10));
    assert!(!sim.anyone_declared_dead());
}

/// A member closes its connection only once the scheduler has answered
/// its Leave. Then even a close that the scheduler sees before what is
/// still in flight on the connection (the worst order two I/O tasks can
/// produce: a failed write ends the link before the reader got the Leave)
/// is not taken for a death.
#[test]
fn a_member_that_closes_once_its_leave_is_answered_is_never_called_dead() {
    for seed in seeds() {
        let (s, w) = (2, 3);
        let mut sim = Sim::new(seed, NASTY, true, s, w);
        let n = (s + w) as usize;
        sim.run_until(Duration::from_secs(60), |sim| {
            (1..=n).all(|i| sim.joined(i))
        });
        for i in 1..=n {
            let now = sim.now;
            let m = sim.members[i].as_mut().unwrap();
            assert!(!m.awaits_leave_ack(), "seed {seed}: not left yet");
            m.leave(now);
            assert!(
                m.awaits_leave_ack(),
                "seed {seed}: the Leave is not answered yet"
            );
        }
        sim.flush();
        let start = sim.now;
        let mut open: Vec<usize> = (1..=n).collect();
        while !open.is_empty() {
            assert!(
                sim.now < start + Duration::from_secs(60),
                "seed {seed}: endpoints {open:?} still wait for the answer to their Leave"
            );
            sim.run(Duration::from_millis(10));
            open.retain(|&i| {
                if sim.members[i].as_ref().unwrap().awaits_leave_ack() {
                    return true;
                }
                // The process exits: the scheduler sees the close at once.
                sim.members[i] = None;
                sim.sched.as_mut().unwrap().disconnected(i as u64);
                false
            });
            sim.flush();
        }
        sim.run_until(Duration::from_secs(60), |sim| {
            sim.sched_events
                .contains(&SchedulerEvent::AllLeft { dead: vec![] })
        });
        assert!(
            !sim.anyone_declared_dead(),
            "seed {seed}: {:?}",
            sim.sched_events
        );
    }
}

/// A member whose scheduler connection is gone, or that never left the
/// running state, has no answer to wait for.
#[test]
fn no_answer_to_wait_for_without_a_scheduler_or_a_leave() {
    let mut sim = Sim::new(3, CLEAN, false, 1, 1);
    sim.run_until(Duration::from_secs(10), |sim| {
        (1..=2).all(|i| sim.joined(i))
    });
    let now = sim.now;
    let m = sim.members[1].as_mut().unwrap();
    m.leave(now);
    assert!(m.awaits_leave_ack());
    m.scheduler_disconnected();
    assert!(
        !m.awaits_leave_ack(),
        "the scheduler is gone: nothing will answer"
    );
    // Fenced before leaving: no Leave is sent, nothing to wait for.
    let m = sim.members[2].as_mut().unwrap();
    m.handle(
        pskv_transport::wire::Control::Fenced {
            reason: "test".into(),
        },
        now,
    );
    m.leave(now);
    assert!(!m.awaits_leave_ack());
}

type InFlight = Vec<(Instant, u32, u32, Frame)>;

fn lossy_send(net: &mut InFlight, rng: &mut Rng, now: Instant, from: u32, to: u32, f: Frame) {
    if rng.chance(0.2) {
        return;
    }
    let copies = if rng.chance(0.1) { 2 } else { 1 };
    for _ in 0..copies {
        net.push((
            now + Duration::from_millis(rng.below(30)),
            from,
            to,
            f.clone(),
        ));
    }
}

/// Requests fanned out to two servers over a lossy, duplicating,
/// reordering network with resend: each completes exactly once with both
/// answers; then a server dies and what waits on it fails naming it.
#[test]
fn requests_complete_exactly_once_and_fail_on_death() {
    for seed in seeds() {
        let mut rng = Rng(seed);
        let mut now = Instant::now();
        let (worker, servers) = (9u32, [8u32, 10u32]);
        let mut wr = Resender::new(worker, Duration::from_millis(50), 100);
        let mut sr: BTreeMap<u32, Resender> = servers
            .iter()
            .map(|&s| (s, Resender::new(s, Duration::from_millis(50), 100)))
            .collect();
        let mut tracker: Tracker<u64> = Tracker::default();
        let mut net: InFlight = Vec::new();
        let mut done: BTreeMap<u64, Result<Vec<(u32, u64)>, TrackError>> = BTreeMap::new();
        let mut dead: Option<u32> = None;
        let total = 200;
        for step in 0..20_000 {
            now += Duration::from_millis(1);
            if step < total {
                let id = tracker.start(servers.to_vec());
                if let Some(d) = dead {
                    // What the KV layer does: a request to a node known dead
                    // fails at once.
                    for c in tracker.on_node_lost(d, || TrackError::NodeDead { node: d }) {
                        assert!(done.insert(c.request_id, c.result).is_none());
                    }
                } else {
                    for &s in &servers {
                        let mut f = Frame::new(Kind::Request);
                        f.sender = worker;
                        f.request_id = id;
                        f.flags = Flags::PULL;
                        wr.stamp(s as u64, &mut f, now);
                        lossy_send(&mut net, &mut rng, now, worker, s, f);
                    }
                }
            }
            if step == 100 {
                // Server 10 dies; the worker hears of it (NodeDead).
                dead = Some(10);
                for c in tracker.on_node_lost(10, || TrackError::NodeDead { node: 10 }) {
                    assert!(done.insert(c.request_id, c.result).is_none());
                }
                wr.forget(10);
            }
            // Deliver what is due, in arrival order (delays reorder).
            net.sort_by_key(|(at, ..)| *at);
            let ndue = net.iter().take_while(|(at, ..)| *at <= now).count();
            let due: Vec<_> = net.drain(..ndue).collect();
            for (_, from, to, f) in due {
                if Some(to) == dead || Some(from) == dead {
                    continue;
                }
                if to == worker {
                    match wr.on_receive(from as u64, &f) {
                        Received::Consumed => {}
                        Received::Duplicate { ack } => {
                            lossy_send(&mut net, &mut rng, now, worker, from, ack)
                        }
                        Received::Deliver { ack } => {
                            if let Some(ack) = ack {
                                lossy_send(&mut net, &mut rng, now, worker, from, ack);
                            }
                            let part = f.request_id * 1000 + from as u64;
                            if let Some(c) = tracker.on_response(from, f.request_id, part) {
                                assert!(
                                    done.insert(c.request_id, c.result).is_none(),
                                    "completed twice"
                                );
                            }
                        }
                    }
                } else {
                    let r = sr.get_mut(&to).unwrap();
                    match r.on_receive(from as u64, &f) {
                        Received::Consumed => {}
                        Received::Duplicate { ack } => {
                            lossy_send(&mut net, &mut rng, now, to, from, ack)
                        }
                        Received::Deliver { ack } => {
                            if let Some(ack) = ack {
                                lossy_send(&mut net, &mut rng, now, to, from, ack);
                            }
                            let mut resp = Frame::new(Kind::Response);
                            resp.sender = to;
                            resp.request_id = f.request_id;
                            r.stamp(from as u64, &mut resp, now);
                            lossy_send(&mut net, &mut rng, now, to, from, resp);
                        }
                    }
                }
            }
            let (again, lost) = wr.handle_timeout(now);
            assert!(lost.is_empty(), "seed {seed}: gave up on {lost:?}");
            for (d, f) in again {
                lossy_send(&mut net, &mut rng, now, worker, d as u32, f);
            }
            for (&s, r) in sr.iter_mut() {
                if Some(s) == dead {
                    continue;
                }
                let (again, _) = r.handle_timeout(now);
                for (d, f) in again {
                    lossy_send(&mut net, &mut rng, now, s, d as u32, f);
                }
            }
            if step > total && tracker.is_empty() {
                break;
            }
        }
        assert_eq!(done.len(), total, "seed {seed}: every request completes");
        for (id, r) in &done {
            match r {
                Ok(parts) => assert_eq!(parts, &vec![(8, id * 1000 + 8), (10, id * 1000 + 10)]),
                Err(e) => assert_eq!(e.to_string(), "server 1 (id 10) died before answering"),
            }
        }
        assert!(
            done.values().any(|r| r.is_ok()) && done.values().any(|r| r.is_err()),
            "seed {seed}"
        );
    }
}

// ---- the login handshake ------------------------------------------------

use pskv_transport::protocol::handshake::HandshakeError;
use pskv_transport::wire::VanId;
use sim::handshake::{run_handshake, End, HsFaults, HsSetup, HS_TIMEOUT};

const HS_NASTY: HsFaults = HsFaults {
    loss: 0.1,
    dup: 0.1,
    slow: 0.05,
    max_delay: Duration::from_millis(40),
};

/// Many handshakes per seed under loss, duplication and delay: each ends on
/// both sides within its deadlines (H3); a side is done only if the other
/// is, with the same van, the same answer and the proved ids (H1, H2); one
/// that no fault touched is done on both sides; every failure says why.
#[test]
fn handshakes_end_in_time_and_agree_under_loss_duplication_and_delay() {
    for seed in seeds() {
        let mut rng = Rng(seed);
        let (mut clean, mut failed) = (0, 0);
        for i in 0..300u32 {
            let mut setup = HsSetup::plain(9 + 2 * (i % 7), 8);
            if rng.chance(0.2) {
                setup.answer = Err("no shared memory here".into());
            }
            let start = Instant::now();
            let run = run_handshake(&mut rng, HS_NASTY, &setup, start);
            // Three waits at most, each bounded by the deadline.
            assert!(
                run.ended <= start + 3 * HS_TIMEOUT + Duration::from_secs(1),
                "seed {seed} #{i}: ended after {:?}",
                run.ended - start
            );
            match (&run.connector, &run.acceptor) {
                (End::Done(c), End::Done(a)) => {
                    assert_eq!(c.peer, setup.acceptor_id, "seed {seed} #{i}");
                    assert_eq!(a.peer, setup.connector_id, "seed {seed} #{i}");
                    assert_eq!((c.van, &c.answer), (a.van, &a.answer), "seed {seed} #{i}");
                    assert_eq!((c.van, &c.answer), (VanId::Shm, &setup.answer));
                    clean += 1;
                }
                (End::Done(c), other) => {
                    panic!(
                        "seed {seed} #{i}: the connector is done ({c:?}), the acceptor {other:?}"
                    )
                }
                (other, End::Done(_)) | (other, End::Failed(_)) => {
                    if let End::Failed(e) = other {
                        assert!(!e.to_string().is_empty(), "seed {seed} #{i}");
                    }
                    assert!(run.faulted, "seed {seed} #{i}: no fault, yet {other:?}");
                    failed += 1;
                }
            }
        }
        // The faults make some fail and leave most whole.
        assert!(
            clean >= 30 && failed >= 30,
            "seed {seed}: {clean} done, {failed} failed"
        );
    }
}

/// A connector that dials again after each failure (as `join` does) gets
/// through, with fresh nonces each time.
#[test]
fn a_retried_handshake_gets_through_the_faults() {
    for seed in seeds() {
        let mut rng = Rng(seed ^ 0x5eed);
        let setup = HsSetup::plain(11, 8);
        let mut now = Instant::now();
        let tries = (1..=50)
            .find(|_| {
                let run = run_handshake(&mut rng, HS_NASTY, &setup, now);
                now = run.ended + Duration::from_millis(100);
                matches!(run.connector, End::Done(_))
            })
            .unwrap_or_else(|| panic!("seed {seed}: 50 tries failed"));
        assert!(tries <= 10, "seed {seed}: {tries} tries");
    }
}

/// Wrong tokens and fenced ids fail on both sides, with the reason on the
/// connector's side too, whatever the network does.
#[test]
fn refusals_reach_the_connector_and_never_end_done() {
    for seed in seeds() {
        let mut rng = Rng(seed);
        let mut wrong = HsSetup::plain(9, 8);
        wrong.token_a = Some(b"another token".to_vec());
        let mut fenced = HsSetup::plain(9, 8);
        fenced.admit = Err("node 9 was declared dead".into());
        for (setup, reason) in [(wrong, "wrong cluster token"), (fenced, "declared dead")] {
            for _ in 0..50 {
                let run = run_handshake(&mut rng, HS_NASTY, &setup, Instant::now());
                let auth = |e: &End| matches!(e, End::Failed(HandshakeError::Auth(_)));
                assert!(auth(&run.acceptor), "seed {seed}: {:?}", run.acceptor);
                assert!(auth(&run.connector), "seed {seed}: {:?}", run.connector);
                if !run.faulted {
                    let End::Failed(e) = &run.connector else {
                        unreachable!()
                    };
                    assert!(e.to_string().contains(reason), "seed {seed}: {e}");
                }
            }
        }
    }
}
