//! Sync `Async` ops run at their push when every var they name is free
//! (`run_now::try_run_now`): on the pushing thread, before the push returns,
//! and exactly as an op that ran and finished there would, for every other
//! op: push order on each var, grants, failures, waits.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pskv_engine::{Access, Engine, OpSpec, Property, Var};

fn engine() -> Engine {
    crate::engine(pskv_engine::EngineKind::Threaded, 2)
}

fn now_op(name: &'static str) -> OpSpec {
    OpSpec::new(name).property(Property::Async)
}

/// Free vars: the op has run, on this thread, with its grants, when the
/// push returns; its write counts as one.
#[test]
fn an_op_on_free_vars_runs_before_its_push_returns() {
    let e = engine();
    let (r, w) = (Var::new(), Var::new());
    let me = std::thread::current().id();
    let seen = Arc::new(Mutex::new(None));
    let s = seen.clone();
    let (r2, w2) = (r.clone(), w.clone());
    e.push_sync(now_op("now").read(&r).write(&w), move |rc| {
        let here = std::thread::current().id();
        *s.lock().unwrap() = Some((
            here,
            rc.access(&r2),
            rc.access(&w2),
            rc.op_name().to_string(),
        ));
        Ok(())
    })
    .unwrap();
    let got = seen
        .lock()
        .unwrap()
        .take()
        .expect("ran before the push returned");
    assert_eq!(
        got,
        (
            me,
            Some(Access::Read),
            Some(Access::Write),
            "now".to_string()
        )
    );
    assert_eq!((r.version(), w.version()), (0, 1));
    assert_eq!(e.pending(), 0);
    e.wait_for_all().unwrap();
}

/// A var held by a running op: the op waits behind it (push order), and
/// the grants it took on its free vars meanwhile go back: an op pushed on
/// such a var after it still runs after it.
#[test]
fn an_op_behind_a_busy_var_waits_and_gives_back_what_it_took() {
    let e = engine();
    let (free, busy) = (Var::named("free"), Var::named("busy"));
    let order = Arc::new(Mutex::new(Vec::new()));
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let o = order.clone();
    // Holds `busy` on a pool worker until told.
    e.push_sync(OpSpec::new("holder").write(&busy), move |_| {
        go_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        o.lock().unwrap().push("holder");
        Ok(())
    })
    .unwrap();
    let o = order.clone();
    // `free` comes first in the spec: taken, then given back when `busy`
    // refuses.
    e.push_sync(now_op("x").write(&free).write(&busy), move |_| {
        o.lock().unwrap().push("x");
        Ok(())
    })
    .unwrap();
    assert!(
        order.lock().unwrap().is_empty(),
        "x ran while busy was held"
    );
    let o = order.clone();
    e.push_sync(now_op("y").write(&free), move |_| {
        o.lock().unwrap().push("y");
        Ok(())
    })
    .unwrap();
    assert!(order.lock().unwrap().is_empty(), "y ran before x");
    go_tx.send(()).unwrap();
    e.wait_for_all().unwrap();
    assert_eq!(*order.lock().unwrap(), ["holder", "x", "y"]);
    assert_eq!((free.version(), busy.version()), (2, 2));
}

/// While an op runs at its push, its vars are held: another thread's op
/// on them waits until it ends.
#[test]
fn an_op_running_at_its_push_holds_its_vars() {
    let e = engine();
    let v = Var::new();
    let order = Arc::new(Mutex::new(Vec::new()));
    let (inside_tx, inside_rx) = mpsc::channel::<()>();
    let (e2, v2, o2) = (e.clone(), v.clone(), order.clone());
    let other = std::thread::spawn(move || {
        inside_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        e2.push_sync(OpSpec::new("other").write(&v2), move |_| {
            o2.lock().unwrap().push("other");
            Ok(())
        })
        .unwrap();
        e2.wait_for_var(&v2).unwrap();
    });
    let o = order.clone();
    e.push_sync(now_op("now").write(&v), move |_| {
        inside_tx.send(()).unwrap();
        // Time for the other thread's push to land while this runs.
        std::thread::sleep(Duration::from_millis(100));
        o.lock().unwrap().push("now");
        Ok(())
    })
    .unwrap();
    other.join().unwrap();
    assert_eq!(*order.lock().unwrap(), ["now", "other"]);
    assert_eq!(v.version(), 2);
}

/// An error or a panic of an op run at its push is stored on its write
/// vars, as any op's: the wait reports it, a later reader is skipped, and
/// a settle op still runs and takes it.
#[test]
fn failures_of_ops_run_at_their_push_are_stored_as_any_ops() {
    let e = engine();
    let (a, b) = (Var::new(), Var::new());
    e.push_sync(now_op("bad").write(&a), |_| Err("no disk".into()))
        .unwrap();
    let err = e.wait_for_var(&a).unwrap_err().to_string();
    assert!(err.contains("op 'bad' failed: no disk"), "{err}");
    e.push_sync(now_op("boom").write(&b), |_| panic!("kaboom"))
        .unwrap();
    let ran = Arc::new(Mutex::new(false));
    let r = ran.clone();
    e.push_sync(now_op("reader").read(&b), move |_| {
        *r.lock().unwrap() = true;
        Ok(())
    })
    .unwrap();
    assert!(!*ran.lock().unwrap(), "a reader of a failed var ran");
    let (tx, rx) = mpsc::channel();
    let b2 = b.clone();
    e.push_settle(now_op("settle").write(&b), move |_| {
        tx.send(b2.take_failure().map(|f| f.to_string())).unwrap();
        Ok(())
    })
    .unwrap();
    let taken = rx.try_recv().expect("the settle ran at its push").unwrap();
    assert!(taken.contains("kaboom"), "{taken}");
    e.wait_for_var(&b).unwrap();
    e.wait_for_all().unwrap();
}

/// Not at its push while profiling: the op is in the profile.
#[test]
fn ops_are_profiled_while_profiling() {
    let e = engine();
    let v = Var::new();
    e.start_profiling();
    e.push_sync(now_op("seen").write(&v), |_| Ok(())).unwrap();
    e.wait_for_all().unwrap();
    e.stop_profiling();
    let names: Vec<String> = e.take_profile().into_iter().map(|t| t.name).collect();
    assert!(names.iter().any(|n| n == "seen"), "{names:?}");
}

/// An op that an op run at its push pushes, and that runs inline, runs
/// after that op's closure has returned, not nested inside it (as after an
/// inline op with a record): the closure's locks and grants are not held
/// around it.
#[test]
fn ops_pushed_by_an_op_run_at_its_push_run_after_it() {
    let e = engine();
    let (a, b) = (Var::new(), Var::new());
    let order = Arc::new(Mutex::new(Vec::new()));
    let (e2, o, b2) = (e.clone(), order.clone(), b.clone());
    e.push_sync(now_op("outer").write(&a), move |_| {
        let o2 = o.clone();
        e2.push_sync(now_op("inner").write(&b2), move |_| {
            o2.lock().unwrap().push("inner");
            Ok(())
        })
        .unwrap();
        o.lock().unwrap().push("outer ends");
        Ok(())
    })
    .unwrap();
    assert_eq!(*order.lock().unwrap(), ["outer ends", "inner"]);
    assert_eq!((a.version(), b.version()), (1, 1));
    e.wait_for_all().unwrap();
}

/// A kept spec run again and again by `try_run_now`: runs at once on free
/// vars; a failed input or a busy var gives the closure back untouched,
/// holding nothing.
#[test]
fn a_kept_op_runs_now_and_is_given_back_behind_a_failure_or_a_busy_var() {
    let e = engine();
    let (a, b) = (Var::new(), Var::new());
    let spec = now_op("kept_copy").read(&a).write(&b);
    let mut runs = 0;
    for _ in 0..3 {
        let ran = e.try_run_now(&spec, |_| {
            runs += 1;
            Ok(())
        });
        assert!(ran.is_ok());
    }
    assert_eq!(runs, 3);
    assert_eq!(b.version(), 3, "each run counts as a write");
    // A failure on the input: given back (a pushed op passes it on).
    e.push_sync(now_op("bad").write(&a), |_| Err("no disk".into()))
        .unwrap();
    assert!(e.try_run_now(&spec, |_| panic!("ran")).is_err());
    assert_eq!(b.version(), 3, "nothing ran or was counted");
    assert!(a.take_failure().is_some());
    assert!(e.try_run_now(&spec, |_| Ok(())).is_ok());
    // A busy var: the closure comes back, nothing is held.
    let (a, b) = (Var::new(), Var::new());
    let spec = now_op("kept_copy").read(&a).write(&b);
    let (go, gate) = mpsc::channel::<()>();
    e.push_sync(OpSpec::new("slow").write(&a), move |_| {
        gate.recv_timeout(Duration::from_secs(10)).ok();
        Ok(())
    })
    .unwrap();
    let back = e.try_run_now(&spec, |_| Ok(()));
    assert!(back.is_err(), "ran behind a busy var");
    go.send(()).unwrap();
    e.wait_for_var(&a).unwrap();
    assert!(e.try_run_now(&spec, |_| Ok(())).is_ok());
    e.wait_for_all().unwrap();
}
