//! One million ops: no deadlock, every op runs once, every var ends right.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pskv_engine::{EngineKind, OpSpec, Property, Var};

#[test]
fn one_million_ops_without_deadlock() {
    let engine = crate::engine(EngineKind::Threaded, 2);
    let nvars = 1000;
    let vars: Vec<Var> = (0..nvars).map(|_| Var::new()).collect();
    let ran = Arc::new(AtomicU64::new(0));
    let mut writes = vec![0u64; nvars];
    let n = 1_000_000u64;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..n {
        // xorshift: a cheap deterministic mix of reads, writes and props.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let a = (x % nvars as u64) as usize;
        let b = ((x >> 20) % nvars as u64) as usize;
        let mut spec = OpSpec::new("stress").priority((x >> 40) as i32 % 4);
        spec = match x % 4 {
            0 => spec.read(&vars[a]),
            1 => spec.read(&vars[a]).write(&vars[b]),
            _ => spec.write(&vars[a]),
        };
        match x % 4 {
            0 => {}
            1 => writes[b] += 1,
            _ => writes[a] += 1,
        }
        let r = ran.clone();
        if i % 16 == 0 {
            engine
                .push_async(spec.property(Property::Async), move |_, done| {
                    r.fetch_add(1, Ordering::Relaxed);
                    done.complete();
                })
                .unwrap();
        } else {
            engine
                .push_sync(spec, move |_| {
                    r.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                })
                .unwrap();
        }
    }
    engine
        .wait_for_all_timeout(Duration::from_secs(240))
        .unwrap();
    assert_eq!(ran.load(Ordering::Relaxed), n);
    for (v, w) in vars.iter().zip(writes) {
        assert_eq!(v.version(), w);
    }
}

/// `wait_for_all` under pushes from other threads: each of three threads
/// pushes bursts of ops and waits for all after each burst; every wait
/// returns (no lost wake-up; the others pause in their own waits, so the
/// engine does go idle), and when it does, the burst its caller pushed
/// before it has run.
#[test]
fn wait_for_all_returns_after_each_callers_burst_while_others_push() {
    let engine = Arc::new(crate::engine(EngineKind::Threaded, 2));
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let v = Var::new();
                let ran = Arc::new(AtomicU64::new(0));
                for burst in 1..=200u64 {
                    for _ in 0..(1 + (burst * 7 + t) % 50) {
                        let r = ran.clone();
                        engine
                            .push_sync(OpSpec::new("burst").write(&v), move |_| {
                                r.fetch_add(1, Ordering::Relaxed);
                                Ok(())
                            })
                            .unwrap();
                    }
                    let pushed: u64 = (1..=burst).map(|b| 1 + (b * 7 + t) % 50).sum();
                    engine
                        .wait_for_all_timeout(Duration::from_secs(60))
                        .expect("every op finished within 60 s");
                    assert_eq!(
                        ran.load(Ordering::Relaxed),
                        pushed,
                        "thread {t} burst {burst}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// The pending count never reads zero while an op is pending, however fast
/// other ops are pushed and finished meanwhile (it is read finished-then-
/// pushed; the other order could see a push and its finish between its two
/// reads and hide the pending op).
#[test]
fn pending_never_reads_zero_while_an_op_waits() {
    let engine = crate::engine(EngineKind::Threaded, 2);
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let blocked = Var::new();
    let r = release.clone();
    engine
        .push_async(
            OpSpec::new("held")
                .write(&blocked)
                .property(Property::Async),
            move |_, done| {
                std::thread::spawn(move || {
                    while !r.load(Ordering::Acquire) {
                        std::thread::yield_now();
                    }
                    done.complete();
                });
            },
        )
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (engine, stop) = (engine.clone(), stop.clone());
        std::thread::spawn(move || {
            let v = Var::new();
            while !stop.load(Ordering::Relaxed) {
                engine
                    .push_async(
                        OpSpec::new("quick").write(&v).property(Property::Async),
                        |_, done| done.complete(),
                    )
                    .unwrap();
            }
        })
    };
    let start = std::time::Instant::now();
    let mut reads = 0u64;
    while start.elapsed() < Duration::from_millis(300) {
        assert!(engine.pending() >= 1, "pending read 0 after {reads} reads");
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    release.store(true, Ordering::Release);
    engine
        .wait_for_all_timeout(Duration::from_secs(20))
        .expect("the held op finished");
    assert_eq!(engine.pending(), 0);
}
