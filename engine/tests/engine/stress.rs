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
/// returns (no lost wake-up), and when it does, the burst its caller pushed
/// before it has run (the pending count is read as finished-then-pushed).
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
                        .expect("wait_for_all returned");
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
