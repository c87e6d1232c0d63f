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

/// A worker that holds a read of r takes an op that does not read r: it
/// releases r first, which grants an inline write of r (an `Async`
/// property op, run there), whose finish makes three readers of r ready on
/// this worker. The op it took waits for those three: they must run on the
/// other worker meanwhile (kept for the worker that runs the waiting op,
/// they would wait for it, 10 s here, before the op was given back).
#[test]
fn ops_made_ready_before_an_op_runs_go_to_every_worker() {
    let e = crate::engine(EngineKind::Threaded, 2);
    for _ in 0..10 {
        let (r, u) = (Var::new(), Var::new());
        let (tx, rx) = crossbeam_channel::unbounded::<()>();
        // Read r and write u, long enough for the rest to queue behind it.
        e.push_sync(OpSpec::new("a").read(&r).write(&u), |_| {
            std::thread::sleep(Duration::from_millis(5));
            Ok(())
        })
        .unwrap();
        e.push_sync(
            OpSpec::new("inline write")
                .write(&r)
                .property(Property::Async),
            |_| Ok(()),
        )
        .unwrap();
        for _ in 0..3 {
            let tx = tx.clone();
            e.push_sync(OpSpec::new("reader").read(&r), move |_| {
                tx.send(()).unwrap();
                Ok(())
            })
            .unwrap();
        }
        // Made ready by a's finish (on its worker, which then takes it).
        let timed_out = Arc::new(AtomicUsize::new(0));
        let t = timed_out.clone();
        e.push_sync(OpSpec::new("waits for the readers").write(&u), move |_| {
            for _ in 0..3 {
                if rx.recv_timeout(Duration::from_secs(10)).is_err() {
                    t.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok(())
        })
        .unwrap();
        e.wait_for_all_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(timed_out.load(Ordering::SeqCst), 0);
    }
}

/// A write made ready by the release of a held read runs before a lower
/// priority op that was ready already, as when the read was released at
/// its op's finish: the worker gives back the op it took and takes again.
#[test]
fn a_write_granted_by_held_reads_keeps_its_priority() {
    let e = crate::engine(EngineKind::Threaded, 1);
    for _ in 0..10 {
        let (g, v, c) = (Var::new(), Var::new(), Var::new());
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        // Holds the one worker while the rest is pushed.
        e.push_sync(OpSpec::new("gate").write(&g), |_| {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        })
        .unwrap();
        for (name, spec) in [
            ("read", OpSpec::new("read").read(&v)),
            ("write", OpSpec::new("write").write(&v).priority(10)),
            ("low", OpSpec::new("low").write(&c).priority(-10)),
        ] {
            let order = order.clone();
            e.push_sync(spec, move |_| {
                order.lock().unwrap().push(name);
                Ok(())
            })
            .unwrap();
        }
        e.wait_for_all_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(*order.lock().unwrap(), ["read", "write", "low"]);
    }
}
