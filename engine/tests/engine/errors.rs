//! Failures: stored on write vars, inherited by readers with the first
//! failing op's name, reported by the waits, and never a hang.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pskv_engine::{Context, Engine, EngineError, EngineKind, FailureCause, OpSpec, Var};

#[test]
fn a_failure_reaches_the_waits_and_skips_the_readers() {
    for engine in crate::engines() {
        let (a, b, c) = (Var::named("a"), Var::named("b"), Var::named("c"));
        let ran = Arc::new(AtomicUsize::new(0));
        engine
            .push_sync(
                OpSpec::new("load").write(&a),
                |_| Err("disk on fire".into()),
            )
            .unwrap();
        let r = ran.clone();
        engine
            .push_sync(OpSpec::new("use_a").read(&a).write(&b), move |_| {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        let r = ran.clone();
        engine
            .push_sync(OpSpec::new("use_b").read(&b).write(&c), move |_| {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        // c inherits the failure through two skipped ops, naming the first.
        let err = engine.wait_for_var(&c).unwrap_err();
        assert_eq!(
            err.to_string(),
            "op 'load' failed: disk on fire",
            "{:?}",
            engine.kind()
        );
        assert!(matches!(
            err.failure().unwrap().cause(),
            FailureCause::Error(_)
        ));
        assert_eq!(ran.load(Ordering::SeqCst), 0, "skipped ops must not run");
        // Reported once per var: c is clear now, a and b still hold it.
        engine.wait_for_var(&c).unwrap();
        assert_eq!(
            engine.wait_for_var(&b).unwrap_err().failure().unwrap().op(),
            "load"
        );
        // wait_for_all reports only what no wait told of: this failure
        // reached c's and b's waits; it still clears it from a.
        engine.wait_for_all().unwrap();
        engine.wait_for_var(&a).unwrap();
        // The vars work again.
        let r = ran.clone();
        engine
            .push_sync(OpSpec::new("again").read(&a).write(&b), move |_| {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        engine.wait_for_var(&b).unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}

#[test]
fn a_panic_is_caught_and_reported_with_its_message() {
    for engine in crate::engines() {
        let v = Var::new();
        engine
            .push_sync(OpSpec::new("explode").write(&v), |_| panic!("boom {}", 42))
            .unwrap();
        let err = engine.wait_for_var(&v).unwrap_err();
        assert_eq!(err.to_string(), "op 'explode' failed: panicked: boom 42");
        // An async closure that panics while holding its completion.
        engine
            .push_async(OpSpec::new("explode_async").write(&v), |_, _done| {
                panic!("async boom")
            })
            .unwrap();
        let err = engine.wait_for_var(&v).unwrap_err();
        assert_eq!(
            err.to_string(),
            "op 'explode_async' failed: panicked: async boom"
        );
        // The workers survived.
        engine
            .push_sync(OpSpec::new("fine").write(&v), |_| Ok(()))
            .unwrap();
        engine.wait_for_var(&v).unwrap();
    }
}

#[test]
fn a_dropped_completion_is_an_error_not_a_hang() {
    for engine in crate::engines() {
        let v = Var::new();
        engine
            .push_async(OpSpec::new("forgetful").write(&v), |_, done| drop(done))
            .unwrap();
        let err = engine.wait_for_var(&v).unwrap_err();
        assert!(matches!(
            err.failure().unwrap().cause(),
            FailureCause::CompletionDropped
        ));
        assert!(err.to_string().contains("'forgetful'"), "{err}");
        // Dropped on another thread, later.
        engine
            .push_async(OpSpec::new("lost_in_thread").write(&v), |_, done| {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(20));
                    drop(done);
                });
            })
            .unwrap();
        let err = engine.wait_for_var(&v).unwrap_err();
        assert_eq!(err.failure().unwrap().op(), "lost_in_thread");
    }
}

#[test]
fn failures_of_ops_that_write_nothing_reach_wait_for_all() {
    for engine in crate::engines() {
        let v = Var::new();
        engine
            .push_sync(OpSpec::new("send").read(&v), |_| Err("peer gone".into()))
            .unwrap();
        let err = engine.wait_for_all().unwrap_err();
        assert_eq!(err.to_string(), "op 'send' failed: peer gone");
        engine.wait_for_all().unwrap();
        // A read-only failure stores nothing on the var it read.
        engine.wait_for_var(&v).unwrap();
    }
}

/// A reader queued behind a failed write is skipped and, writing no var,
/// logs the failure it inherited; once a wait on the var reported it, that
/// log entry is not news: `wait_for_all` does not report it a second time
/// (a kvstore's close used to fail with a push error its caller had already
/// handled and retried, after more retries than it remembered).
#[test]
fn a_failure_a_wait_reported_is_not_reported_again_by_wait_for_all() {
    for engine in crate::engines() {
        let v = Var::new();
        engine
            .push_sync(OpSpec::new("push").write(&v), |_| Err("server died".into()))
            .unwrap();
        engine
            .push_sync(OpSpec::new("read").read(&v), |_| Ok(()))
            .unwrap();
        let err = engine.wait_for_var(&v).unwrap_err();
        assert_eq!(err.failure().unwrap().op(), "push");
        engine.wait_for_all().unwrap();
        // One nobody was told of is still reported.
        engine
            .push_sync(OpSpec::new("push2").write(&v), |_| Err("again".into()))
            .unwrap();
        engine
            .push_sync(OpSpec::new("read2").read(&v), |_| Ok(()))
            .unwrap();
        let err = engine.wait_for_all().unwrap_err();
        assert_eq!(err.failure().unwrap().op(), "push2");
        engine.wait_for_all().unwrap();
        engine.wait_for_var(&v).unwrap();
    }
}

#[test]
fn completing_twice_or_failing_after_complete_is_ignored() {
    let engine = crate::engine(EngineKind::Threaded, 1);
    let v = Var::new();
    engine
        .push_sync(OpSpec::new("ok_then_panic").write(&v), |_| Ok(()))
        .unwrap();
    engine.wait_for_var(&v).unwrap();
    // complete, then the closure panics: the op succeeded; the panic is logged.
    engine
        .push_async(OpSpec::new("late_panic").write(&v), |_, done| {
            done.complete();
            panic!("after completion");
        })
        .unwrap();
    engine.wait_for_var(&v).unwrap();
    assert_eq!(v.version(), 2);
}

#[test]
fn waits_time_out_naming_what_they_waited_for() {
    let engine = crate::engine(EngineKind::Threaded, 1);
    let v = Var::named("slow");
    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
    engine
        .push_sync(OpSpec::new("blocker").write(&v), move |_| {
            let _ = rx.recv_timeout(Duration::from_secs(20));
            Ok(())
        })
        .unwrap();
    engine
        .push_sync(OpSpec::new("next_op").write(&v), |_| Ok(()))
        .unwrap();
    let start = Instant::now();
    let err = engine
        .wait_for_var_timeout(&v, Duration::from_millis(100))
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    let msg = err.to_string();
    assert!(matches!(err, EngineError::Timeout { .. }));
    assert!(
        msg.contains("'slow'") && msg.contains("a running write") && msg.contains("'next_op'"),
        "{msg}"
    );
    let err = engine
        .wait_for_all_timeout(Duration::from_millis(50))
        .unwrap_err();
    assert!(err.to_string().contains("still pending"), "{err}");
    tx.send(()).unwrap();
    engine.wait_for_all().unwrap();
}

#[test]
fn the_naive_engine_bounds_its_wait_for_an_async_completion() {
    let engine = Engine::builder()
        .kind(EngineKind::Naive)
        .wait_timeout(Some(Duration::from_millis(100)))
        .build()
        .unwrap();
    let v = Var::new();
    let (keep_tx, keep_rx) = crossbeam_channel::unbounded();
    engine
        .push_async(OpSpec::new("never_completes").write(&v), move |_, done| {
            keep_tx.send(done).unwrap();
        })
        .unwrap();
    let err = engine.wait_for_var(&v).unwrap_err();
    assert!(
        matches!(
            err.failure().unwrap().cause(),
            FailureCause::CompletionTimedOut(_)
        ),
        "{err}"
    );
    // A completion arriving late is ignored.
    keep_rx.recv().unwrap().complete();
    engine.wait_for_var(&v).unwrap();
    assert_eq!(v.version(), 1);
}

#[test]
fn delete_var_runs_after_pending_ops_and_refuses_later_pushes() {
    for engine in crate::engines() {
        let v = Var::new();
        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        for i in 0..5 {
            let o = order.clone();
            engine
                .push_sync(OpSpec::new("w").write(&v), move |_| {
                    std::thread::sleep(Duration::from_millis(2));
                    o.lock().push(i);
                    Ok(())
                })
                .unwrap();
        }
        let o = order.clone();
        engine
            .delete_var_with(&v, move |_| o.lock().push(99))
            .unwrap();
        assert!(v.is_deleted());
        let err = engine
            .push_sync(OpSpec::new("late").read(&v), |_| Ok(()))
            .unwrap_err();
        assert!(matches!(err, EngineError::VarDeleted { .. }), "{err}");
        assert!(engine.delete_var(&v).is_err());
        engine.wait_for_all().unwrap();
        assert_eq!(*order.lock(), vec![0, 1, 2, 3, 4, 99]);
    }
}

#[test]
fn contexts_out_of_range_are_refused() {
    let engine = crate::engine(EngineKind::Threaded, 1);
    let err = engine
        .push_sync(
            OpSpec::new("far").context(Context::Gpu(pskv_engine::MAX_GPUS)),
            |_| Ok(()),
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::InvalidContext { .. }));
    assert!(err.to_string().contains("gpu(64)"), "{err}");
}

/// A naive push that times out while its op still waits for its var (behind
/// an op pushed from inside another op, whose push does not wait) must not
/// release a grant its op never held: the var's count of completed writes
/// stays right, the op fails with the timeout when its turn comes (its body
/// never runs), and the var serves later ops.
#[test]
fn a_naive_push_timing_out_while_queued_releases_nothing_it_did_not_hold() {
    let engine = Engine::builder()
        .kind(EngineKind::Naive)
        .wait_timeout(Some(Duration::from_millis(100)))
        .shutdown_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let (v, w) = (Var::new(), Var::new());
    let (tx, rx) = crossbeam_channel::unbounded();
    let (inner, v2) = (engine.clone(), v.clone());
    engine
        .push_sync(OpSpec::new("outer"), move |_| {
            inner
                .push_async(OpSpec::new("held").write(&v2), move |_, done| {
                    tx.send(done).unwrap();
                })
                .unwrap();
            Ok(())
        })
        .unwrap();
    let held = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the held op started");
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    engine
        .push_sync(OpSpec::new("queued").write(&v).write(&w), move |_| {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    // The push returned after its timeout; "held" still holds the var.
    // (It holds `w`, granted at once, and waits for `v`.)
    assert_eq!(v.version(), 0, "a write counted that has not completed");
    assert_eq!(w.version(), 0, "a grant released while still held");
    held.complete();
    let err = engine.wait_for_var(&v).unwrap_err();
    assert!(
        matches!(
            err.failure().expect("an op's failure").cause(),
            FailureCause::CompletionTimedOut(_)
        ),
        "{err}"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the timed-out op ran");
    assert_eq!(v.version(), 2);
    assert_eq!(w.version(), 1);
    let r = ran.clone();
    engine
        .push_sync(OpSpec::new("later").write(&v), move |_| {
            r.fetch_add(10, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    engine.wait_for_var(&v).unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 10);
    assert_eq!(v.version(), 3);
    // Every op counted finished once: nothing is left pending (the failure
    // it left on `w` is the one `wait_for_var` reported: not news).
    engine.wait_for_all().unwrap();
    assert_eq!(engine.pending(), 0);
}
