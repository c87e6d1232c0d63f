//! The simulated network and fake clock that drive the protocol state
//! machines in the tests: loss, duplication, reordering (random delays),
//! node death and stopped processes. Deterministic: every run of a seed is
//! the same run.
#![allow(dead_code)]

pub mod handshake;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pskv_transport::protocol::member::{Member, MemberConfig, MemberEvent, MemberState};
use pskv_transport::protocol::resender::{Received, Resender};
use pskv_transport::protocol::scheduler::{Scheduler, SchedulerConfig, SchedulerEvent};
use pskv_transport::protocol::{Group, Role, SCHEDULER_ID};
use pskv_transport::wire::{Control, Decoder, Frame, Limits, Vote};

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone, Copy)]
pub struct Faults {
    pub loss: f64,
    pub dup: f64,
    pub max_delay_ms: u64,
}

pub const CLEAN: Faults = Faults {
    loss: 0.0,
    dup: 0.0,
    max_delay_ms: 1,
};
pub const NASTY: Faults = Faults {
    loss: 0.2,
    dup: 0.1,
    max_delay_ms: 40,
};

pub const TICK: Duration = Duration::from_millis(10);
pub const HB_INTERVAL: Duration = Duration::from_secs(1);
pub const HB_TIMEOUT: Duration = Duration::from_secs(5);
pub const SCHED_TIMEOUT: Duration = Duration::from_secs(15);

pub type Packet = Reverse<(Instant, u64, usize, usize, Vec<u8>)>;

/// Endpoint 0 is the scheduler; 1.. are members (their connection to the
/// scheduler has the endpoint's index as its id).
pub struct Sim {
    pub now: Instant,
    pub rng: Rng,
    pub faults: Faults,
    pub resend: bool,
    pub sched: Option<Scheduler>,
    pub sched_events: Vec<SchedulerEvent>,
    pub members: Vec<Option<Member>>,
    pub events: Vec<Vec<MemberEvent>>,
    pub resenders: Vec<Resender>,
    pub net: BinaryHeap<Packet>,
    pub seq: u64,
    /// Per endpoint (0: the scheduler), stopped until then (SIGSTOP): it
    /// neither runs its timers nor reads; its messages wait.
    pub stalled: Vec<Option<Instant>>,
    /// Per endpoint, when its timeout call last ran: as the driver, each
    /// machine's `handle_timeout` runs when its `next_timeout` is due, or
    /// after `IDLE_WAKE` with nothing due, never on a fixed tick.
    pub last_timer: Vec<Instant>,
    /// Heartbeat interval and timeout of every endpoint.
    pub hb: (Duration, Duration),
}

/// The driver's longest sleep with nothing due (postoffice/control.rs).
pub const IDLE_WAKE: Duration = Duration::from_secs(1);

/// Whether a machine whose next timeout is `next` and whose last timeout
/// call was at `last` gets one at `now`.
fn due(next: Option<Instant>, last: Instant, now: Instant) -> bool {
    next.is_some_and(|t| t <= now) || now >= last + IDLE_WAKE
}

impl Sim {
    pub fn new(seed: u64, faults: Faults, resend: bool, servers: u32, workers: u32) -> Sim {
        Sim::with_heartbeat(
            seed,
            faults,
            resend,
            servers,
            workers,
            (HB_INTERVAL, HB_TIMEOUT),
        )
    }

    /// A sim whose endpoints heartbeat every `hb.0` and time out after
    /// `hb.1`.
    pub fn with_heartbeat(
        seed: u64,
        faults: Faults,
        resend: bool,
        servers: u32,
        workers: u32,
        hb: (Duration, Duration),
    ) -> Sim {
        let now = Instant::now();
        let mut sim = Sim {
            now,
            rng: Rng(seed.max(1)),
            faults,
            resend,
            sched: Some(Scheduler::new(SchedulerConfig {
                num_servers: servers,
                num_workers: workers,
                heartbeat_timeout: Some(hb.1),
            })),
            sched_events: Vec::new(),
            members: vec![None],
            events: vec![Vec::new()],
            resenders: vec![Resender::new(SCHEDULER_ID, Duration::from_millis(100), 50)],
            net: BinaryHeap::new(),
            seq: 0,
            stalled: vec![None],
            last_timer: vec![now],
            hb,
        };
        for _ in 0..servers {
            sim.add_member(Role::Server);
        }
        for _ in 0..workers {
            sim.add_member(Role::Worker);
        }
        sim
    }

    pub fn add_member(&mut self, role: Role) -> usize {
        self.add_member_ranked(role, None)
    }

    /// A member that asks for `rank`.
    pub fn add_member_ranked(&mut self, role: Role, rank: Option<u32>) -> usize {
        let i = self.members.len();
        let cfg = MemberConfig {
            role,
            host: format!("host{i}"),
            port: 9000 + i as u16,
            host_id: i as u64,
            heartbeat_interval: Some(self.hb.0),
            heartbeat_timeout: Some(self.hb.1),
            scheduler_timeout: Some(SCHED_TIMEOUT),
            rank,
            register_timeout: Duration::from_secs(30),
        };
        self.members.push(Some(Member::new(cfg, self.now)));
        self.events.push(Vec::new());
        self.stalled.push(None);
        self.last_timer.push(self.now);
        self.resenders
            .push(Resender::new(0, Duration::from_millis(100), 50));
        self.flush();
        i
    }

    pub fn send_frame(&mut self, from: usize, to: usize, mut frame: Frame, stamp: bool) {
        if self.resend && stamp {
            self.resenders[from].stamp(to as u64, &mut frame, self.now);
        }
        self.transmit(from, to, frame.encode().to_vec());
    }

    pub fn transmit(&mut self, from: usize, to: usize, bytes: Vec<u8>) {
        let copies = if self.rng.chance(self.faults.loss) {
            0
        } else if self.rng.chance(self.faults.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = Duration::from_millis(self.rng.below(self.faults.max_delay_ms));
            self.seq += 1;
            self.net.push(Reverse((
                self.now + delay,
                self.seq,
                from,
                to,
                bytes.clone(),
            )));
        }
    }

    pub fn flush(&mut self) {
        loop {
            let mut any = false;
            if let (Some(s), None) = (self.sched.as_mut(), self.stalled[0]) {
                let mut out = Vec::new();
                while let Some((conn, msg)) = s.poll_transmit() {
                    out.push((conn as usize, msg));
                }
                while let Some(e) = s.poll_event() {
                    self.sched_events.push(e);
                }
                for (to, msg) in out {
                    any = true;
                    self.send_frame(0, to, msg.to_frame(SCHEDULER_ID, 0), true);
                }
            }
            for i in 1..self.members.len() {
                let mut out = Vec::new();
                if let (Some(m), None) = (self.members[i].as_mut(), self.stalled[i]) {
                    while let Some(msg) = m.poll_transmit() {
                        out.push(msg);
                    }
                    while let Some(e) = m.poll_event() {
                        self.events[i].push(e);
                    }
                }
                for msg in out {
                    any = true;
                    self.send_frame(i, 0, msg.to_frame(0, SCHEDULER_ID), true);
                }
            }
            if !any {
                break;
            }
        }
    }

    pub fn deliver(&mut self, from: usize, to: usize, bytes: Vec<u8>) {
        let alive = if to == 0 {
            self.sched.is_some()
        } else {
            self.members[to].is_some()
        };
        if !alive {
            return;
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let frame = Decoder::new(Limits::default())
            .decode(&mut buf)
            .expect("valid frame")
            .expect("whole frame");
        if self.resend {
            match self.resenders[to].on_receive(from as u64, &frame) {
                Received::Consumed => return,
                Received::Duplicate { ack } => {
                    self.send_frame(to, from, ack, false);
                    return;
                }
                Received::Deliver { ack } => {
                    if let Some(ack) = ack {
                        self.send_frame(to, from, ack, false);
                    }
                }
            }
        }
        let msg = Control::from_frame(&frame).expect("control body");
        if to == 0 {
            self.sched
                .as_mut()
                .unwrap()
                .handle(from as u64, msg, self.now);
        } else {
            self.members[to].as_mut().unwrap().handle(msg, self.now);
        }
    }

    /// Advances the clock by `d`, in ticks.
    pub fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += TICK;
            let mut resumed = Vec::new();
            for (i, st) in self.stalled.iter_mut().enumerate() {
                if st.is_some_and(|until| until <= self.now) {
                    *st = None;
                    resumed.push(i);
                }
            }
            // A process that runs again may run its timer before it reads
            // what waited for it (the harder order for stall detection).
            for i in resumed {
                self.timers(&[i]);
            }
            let mut later = Vec::new();
            while let Some(Reverse((at, _, _, _, _))) = self.net.peek() {
                if *at > self.now {
                    break;
                }
                let Reverse((at, seq, from, to, bytes)) = self.net.pop().unwrap();
                match self.stalled[to] {
                    // A stopped process reads nothing; it is all there
                    // when it runs again.
                    Some(until) => later.push(Reverse((until.max(at), seq, from, to, bytes))),
                    None => self.deliver(from, to, bytes),
                }
            }
            self.net.extend(later);
            let all: Vec<usize> = (0..self.members.len()).collect();
            self.timers(&all);
            let now = self.now;
            if self.resend {
                for i in 0..self.resenders.len() {
                    let alive = if i == 0 {
                        self.sched.is_some()
                    } else {
                        self.members[i].is_some()
                    };
                    if !alive {
                        continue;
                    }
                    let (again, _lost) = self.resenders[i].handle_timeout(now);
                    for (dest, frame) in again {
                        self.transmit(i, dest as usize, frame.encode().to_vec());
                    }
                }
            }
            self.flush();
        }
    }

    /// Runs the timeout calls that are due for endpoints `which` (0: the
    /// scheduler) that are not stopped.
    fn timers(&mut self, which: &[usize]) {
        let now = self.now;
        for &i in which {
            if self.stalled[i].is_some() {
                continue;
            }
            let ran = if i == 0 {
                match self.sched.as_mut() {
                    Some(s) if due(s.next_timeout(), self.last_timer[0], now) => {
                        s.handle_timeout(now);
                        true
                    }
                    _ => false,
                }
            } else {
                match self.members[i].as_mut() {
                    Some(m) if due(m.next_timeout(), self.last_timer[i], now) => {
                        m.handle_timeout(now);
                        true
                    }
                    _ => false,
                }
            };
            if ran {
                self.last_timer[i] = now;
            }
        }
    }

    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> Duration {
        let start = self.now;
        while !done(self) {
            assert!(
                self.now - start < limit,
                "condition not reached within {limit:?}"
            );
            self.run(TICK);
        }
        self.now - start
    }

    pub fn joined(&self, i: usize) -> bool {
        self.members[i]
            .as_ref()
            .is_some_and(|m| *m.state() == MemberState::Running)
    }

    pub fn barrier_done(&self, i: usize, g: Group) -> Vec<Option<String>> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                MemberEvent::BarrierDone { group, error } if *group == g => Some(error.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether the scheduler has declared any node dead.
    pub fn anyone_declared_dead(&self) -> bool {
        self.sched_events
            .iter()
            .any(|e| matches!(e, SchedulerEvent::NodeDead { .. }))
    }

    /// Members `who` arrive at a barrier of `g`, and so does the scheduler
    /// when `g` includes it.
    pub fn barrier_of(&mut self, who: &[usize], g: Group) {
        let now = self.now;
        for &i in who {
            self.member(i)
                .barrier(g, Vote::Ready, now)
                .expect("barrier");
        }
        if g.has(Role::Scheduler) {
            self.sched.as_mut().expect("a live scheduler").barrier(g);
        }
        self.flush();
    }

    /// Member `i`.
    pub fn member(&mut self, i: usize) -> &mut Member {
        self.members[i].as_mut().expect("a live member")
    }

    /// Member `i` arrives at a barrier of `g` with `vote`.
    pub fn barrier(&mut self, i: usize, g: Group, vote: Vote) {
        let now = self.now;
        self.member(i).barrier(g, vote, now).expect("barrier");
        self.flush();
    }

    /// Stops endpoint `i` (0: the scheduler) for `d`, as SIGSTOP would.
    pub fn stall(&mut self, i: usize, d: Duration) {
        self.stalled[i] = Some(self.now + d);
    }
}

pub fn seeds() -> impl Iterator<Item = u64> {
    [1u64, 7, 42, 1234, 99991, 31337, 2718281, 577215].into_iter()
}
