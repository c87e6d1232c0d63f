//! A worker's reads held over to its next op (`engine/src/held_reads.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pskv_engine::{EngineKind, OpSpec, Property, Var};

/// A worker with nothing left to run releases the reads it holds. Here that
/// release grants a write that runs inline there (an `Async` property op),
/// and that write's finish makes a pool op ready, which the worker keeps
/// for itself. It must run: kept while the worker looked for work, it was
/// lost until the worker's next op (a hang here) before the look queued it.
#[test]
fn ops_made_ready_by_a_workers_held_reads_all_run() {
    let e = crate::engine(EngineKind::Threaded, 1);
    for _ in 0..20 {
        let v = Var::new();
        let ran = Arc::new(AtomicUsize::new(0));
        // The read runs long enough for the two writes to queue behind it.
        e.push_sync(OpSpec::new("read").read(&v), |_| {
            std::thread::sleep(Duration::from_millis(5));
            Ok(())
        })
        .unwrap();
        for (name, prop) in [
            ("inline write", Property::Async),
            ("pool write", Property::Normal),
        ] {
            let ran = ran.clone();
            e.push_sync(OpSpec::new(name).write(&v).property(prop), move |_| {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        }
        e.wait_for_all_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        assert_eq!(v.version(), 2);
    }
}

/// Reads of one var held over from op to op, on both workers, with writes
/// between them: each write sees every read before it done and none after
/// it started (the fan-out of the dispatch bench, checked).
#[test]
fn writes_wait_for_reads_held_over() {
    let e = crate::engine(EngineKind::Threaded, 2);
    let v = Var::new();
    // Readers inside now (positive), or -1 while a write runs.
    let inside = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let bad = Arc::new(AtomicUsize::new(0));
    for round in 0..50 {
        for _ in 0..40 {
            let (inside, bad) = (inside.clone(), bad.clone());
            e.push_sync(OpSpec::new("read").read(&v), move |_| {
                if inside.fetch_add(1, Ordering::SeqCst) < 0 {
                    bad.fetch_add(1, Ordering::SeqCst);
                }
                std::hint::spin_loop();
                inside.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        }
        let (inside, bad) = (inside.clone(), bad.clone());
        e.push_sync(OpSpec::new("write").write(&v), move |_| {
            if inside.swap(-1, Ordering::SeqCst) != 0 {
                bad.fetch_add(1, Ordering::SeqCst);
            }
            inside.store(0, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        if round % 10 == 9 {
            e.wait_for_all_timeout(Duration::from_secs(20)).unwrap();
        }
    }
    e.wait_for_all_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(bad.load(Ordering::SeqCst), 0);
    assert_eq!(v.version(), 50);
}
