//! Unit tests of `Var`: its failure slot, and what keeps a var alive
//! (K1 to K4 in `mod.rs`).

use super::*;

#[test]
fn failure_first_wins_and_take_clears() {
    let v = Var::named("x");
    let a = OpFailure::new("a", crate::FailureCause::Panic("boom".into()));
    let b = OpFailure::new("b", crate::FailureCause::Panic("later".into()));
    v.set_failure(&a);
    v.set_failure(&b);
    assert_eq!(v.failure().unwrap().op(), "a");
    v.inner().clear_failure_if(&b);
    assert!(v.failure().is_some());
    assert_eq!(v.take_failure().unwrap().op(), "a");
    assert!(v.failure().is_none());
    assert_eq!(v.describe(), format!("var {} 'x'", v.id()));
}

/// Whether the var behind `weak` is still alive (its handles' count
/// or an orphaned queue's hold, K2).
fn alive(weak: &Weak<VarInner>) -> bool {
    weak.strong_count() > 0
}

/// Pushes an op that writes `v` and waits (up to 30 s) until the returned
/// sender opens it, then gives `then`'s result.
fn push_gate(
    e: &crate::Engine,
    v: &Var,
    then: impl FnOnce() -> Result<(), crate::OpError> + Send + 'static,
) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    e.push_sync(crate::OpSpec::new("gate").write(v), move |_| {
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .map_err(|_| "gate not opened")?;
        then()
    })
    .unwrap();
    tx
}

fn engine(threads: usize) -> crate::Engine {
    crate::Engine::builder()
        .cpu_threads(threads)
        .build()
        .expect("engine starts")
}

#[test]
fn handles_count_themselves_and_a_var_dropped_idle_is_freed() {
    let v = Var::new();
    let weak = v.downgrade();
    let w = v.clone();
    assert_eq!(v.inner().handles.load(Ordering::Relaxed), 2);
    assert_eq!(weak.strong_count(), 1, "all handles share one count");
    drop(w);
    assert!(alive(&weak));
    drop(v);
    assert!(!alive(&weak), "freed with its last handle");
}

/// Ops hold no count: after they ran, only the handles do; queued,
/// run at their push, skipped after a failure, or given back.
#[test]
fn ops_leave_no_count_behind() {
    let e = engine(2);
    let (v, u) = (Var::new(), Var::new());
    for i in 0..200 {
        let spec = match i % 3 {
            0 => crate::OpSpec::new("w").write(&v).read(&u),
            1 => crate::OpSpec::new("r").read(&v).read(&v),
            _ => crate::OpSpec::new("now")
                .write(&u)
                .property(crate::Property::Async),
        };
        e.push_sync(spec, move |_| {
            if i == 50 {
                Err("fails on purpose".into())
            } else {
                Ok(())
            }
        })
        .unwrap();
    }
    let _ = e.wait_for_all();
    for x in [&v, &u] {
        assert_eq!(x.inner().handles.load(Ordering::Relaxed), 1);
        assert_eq!(x.downgrade().strong_count(), 1);
        assert!(x.inner().queue.lock().is_idle());
    }
}

/// A var whose handles are all dropped while ops wait on it lives until
/// the last of them is released, and is freed then.
#[test]
fn a_var_without_handles_lives_until_its_ops_are_released() {
    let e = engine(1);
    let v = Var::new();
    let weak = v.downgrade();
    let open = push_gate(&e, &v, || Ok(()));
    let ran = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let ran = ran.clone();
        e.push_sync(crate::OpSpec::new("after").read(&v), move |ctx| {
            // The op's own handle is still good while it runs.
            assert!(ctx.op_name() == "after");
            ran.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    }
    drop(v);
    assert!(alive(&weak), "kept by its busy queue");
    open.send(()).unwrap();
    e.wait_for_all().unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 3);
    assert!(!alive(&weak), "freed by the last release");
}

/// Handles cloned and dropped on many threads while ops run: the var
/// is freed exactly when the last is gone and its ops are done.
#[test]
fn handles_dropped_on_many_threads_free_the_var_once() {
    let e = Arc::new(engine(2));
    for _ in 0..20 {
        let v = Var::new();
        let weak = v.downgrade();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (e, v) = (e.clone(), v.clone());
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let w = v.clone();
                        let spec = if (i + t) % 4 == 0 {
                            crate::OpSpec::new("w").write(&w)
                        } else {
                            crate::OpSpec::new("r").read(&w)
                        };
                        e.push_sync(spec, |_| Ok(())).unwrap();
                    }
                })
            })
            .collect();
        drop(v);
        for t in threads {
            t.join().unwrap();
        }
        e.wait_for_all().unwrap();
        assert!(!alive(&weak));
    }
}

/// An async op's grant ends with its completion: `access` then says
/// None (it reads no handle of the op's, which may be freed).
#[test]
fn an_async_op_no_longer_holds_its_vars_once_completed() {
    let e = engine(1);
    let v = Var::new();
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let (w, s2) = (v.clone(), seen.clone());
    let (ran_tx, ran) = std::sync::mpsc::channel();
    e.push_async(crate::OpSpec::new("io").read(&v), move |ctx, done| {
        s2.lock().push(ctx.access(&w));
        done.complete();
        s2.lock().push(ctx.access(&w));
        let _ = ran_tx.send(());
    })
    .unwrap();
    e.wait_for_all().unwrap();
    // Subtle: the wait may return once `complete` is called, before the
    // closure's second look: wait for the closure's end too.
    ran.recv_timeout(std::time::Duration::from_secs(30))
        .expect("the async op's closure ran to its end");
    assert_eq!(*seen.lock(), [Some(crate::Access::Read), None]);
}

/// A failing op on a var whose handles are gone: its failure is logged
/// with a `Weak` to the var, which is freed at the op's release; the log
/// then finds it gone (no handle is made from it, K4) and reports nothing
/// of it, as when a var was dropped after its ops.
#[test]
fn a_failure_on_a_var_freed_meanwhile_is_dropped_from_the_log() {
    let e = engine(1);
    let v = Var::new();
    let weak = v.downgrade();
    let open = push_gate(&e, &v, || Err("fails on purpose".into()));
    drop(v);
    open.send(()).unwrap();
    assert!(
        e.wait_for_all().is_ok(),
        "a freed var's failure is not told"
    );
    assert!(!alive(&weak));
    // The engine goes on: a new var's failure is told.
    let u = Var::new();
    e.push_sync(crate::OpSpec::new("fails too").write(&u), |_| {
        Err("again".into())
    })
    .unwrap();
    assert!(e.wait_for_all().is_err());
}
