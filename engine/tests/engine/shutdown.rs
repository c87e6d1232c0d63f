//! Dropping the engine: pending ops finish, stuck ones are failed, threads end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pskv_engine::{Engine, FailureCause, OpSpec, Var};

#[test]
fn drop_finishes_pending_ops() {
    let count = Arc::new(AtomicUsize::new(0));
    {
        let engine = crate::engine(pskv_engine::EngineKind::Threaded, 2);
        let v = Var::new();
        for _ in 0..1000 {
            let c = count.clone();
            engine
                .push_sync(OpSpec::new("slowish").write(&v), move |_| {
                    c.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
                .unwrap();
        }
    }
    assert_eq!(count.load(Ordering::SeqCst), 1000);
}

#[test]
fn drop_fails_ops_that_cannot_run_and_returns() {
    let v = Var::named("stuck");
    let (keep_tx, keep_rx) = crossbeam_channel::unbounded();
    let start = Instant::now();
    {
        let engine = Engine::builder()
            .cpu_threads(1)
            .shutdown_timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        // An async op whose completion is held elsewhere, and one behind it.
        engine
            .push_async(OpSpec::new("held").write(&v), move |_, done| {
                keep_tx.send(done).unwrap()
            })
            .unwrap();
        engine
            .push_sync(OpSpec::new("behind").write(&v), |_| Ok(()))
            .unwrap();
    }
    assert!(start.elapsed() < Duration::from_secs(10));
    // Completing the held op later releases "behind", which fails: stopped.
    keep_rx.recv().unwrap().complete();
    let f = v.failure().expect("the op behind was failed");
    assert_eq!(f.op(), "behind");
    assert!(matches!(f.cause(), FailureCause::EngineStopped));
}

#[test]
fn the_last_handle_dropped_inside_an_op_does_not_deadlock() {
    let engine = crate::engine(pskv_engine::EngineKind::Threaded, 1);
    let inner = engine.clone();
    let (tx, rx) = crossbeam_channel::bounded(1);
    engine
        .push_sync(OpSpec::new("owns_engine"), move |_| {
            let _keep = inner;
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            Ok(())
        })
        .unwrap();
    drop(engine);
    // The op still runs and the shutdown completes on its own thread.
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
}
