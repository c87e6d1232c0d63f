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

/// A completion handle may finish its op on a thread of its own while the
/// engine's last handle is being dropped: the core stays alive until that
/// thread is done with it (`core_ref.rs`, C1). The paths run here; a
/// missing count would open a window of nanoseconds that neither this
/// test nor Miri's scheduler reliably hits.
#[test]
fn a_completion_finishes_its_op_while_the_engine_is_dropped() {
    let v = Var::named("io");
    let (tx, rx) = crossbeam_channel::bounded(1);
    let engine = crate::engine(pskv_engine::EngineKind::Threaded, 1);
    engine
        .push_async(OpSpec::new("io").write(&v), move |_, done| {
            tx.send(done).unwrap()
        })
        .unwrap();
    let done = rx.recv().unwrap();
    let io = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        done.complete();
    });
    let start = Instant::now();
    drop(engine);
    assert!(
        start.elapsed() >= Duration::from_millis(15),
        "the drop waited for the op"
    );
    io.join().unwrap();
    assert!(v.failure().is_none());
}

/// An op of engine B queued behind an op of engine A on a shared var is
/// run and finished by A's completing thread, while B's last handle is
/// dropped on another: that thread holds B's core for the span (C1).
#[test]
fn an_op_granted_by_another_engines_op_finishes_while_its_engine_is_dropped() {
    let shared = Var::named("shared");
    let ran = Arc::new(AtomicUsize::new(0));
    let a = crate::engine(pskv_engine::EngineKind::Threaded, 1);
    let b = crate::engine(pskv_engine::EngineKind::Threaded, 1);
    let (tx, rx) = crossbeam_channel::bounded(1);
    a.push_async(OpSpec::new("a_io").write(&shared), move |_, done| {
        tx.send(done).unwrap()
    })
    .unwrap();
    let a_done = rx.recv().unwrap();
    // A var's deletion runs inline on the thread that makes it ready, and
    // finishes there (no completion handle holds B's core).
    let r = ran.clone();
    b.delete_var_with(&shared, move |_| {
        r.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    let dropper = std::thread::spawn(move || drop(b));
    std::thread::sleep(Duration::from_millis(20));
    a_done.complete();
    dropper.join().unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert!(shared.failure().is_none());
    assert!(shared.is_deleted());
    drop(a);
}
