//! Pools, priorities, contexts and async completion.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pskv_engine::{Access, Context, Engine, EngineKind, OpSpec, Property, RunContext, Var};

fn thread_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

/// With one worker busy, ready ops start highest priority first, FIFO among
/// equal priorities.
#[test]
fn ready_ops_start_in_priority_order() {
    let engine = crate::engine(EngineKind::Threaded, 1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let (began_tx, began_rx) = crossbeam_channel::bounded::<()>(1);
    engine
        .push_sync(OpSpec::new("blocker"), move |_| {
            let _ = began_tx.send(());
            go_rx
                .recv_timeout(Duration::from_secs(20))
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .unwrap();
    // The worker holds the blocker before the others are pushed (else it
    // may take one of the first pushed, the best ready then: CI saw it).
    began_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the blocker started");
    let order = Arc::new(Mutex::new(Vec::new()));
    let priorities = [0, 5, -2, 5, 7, 0, -2, 3, 7, 1, 0, 9, -5, 3];
    for (i, &p) in priorities.iter().enumerate() {
        let order = order.clone();
        let v = Var::new();
        engine
            .push_sync(
                OpSpec::new(format!("op{i}")).write(&v).priority(p),
                move |_| {
                    order.lock().unwrap().push((p, i));
                    Ok(())
                },
            )
            .unwrap();
    }
    go_tx.send(()).unwrap();
    engine.wait_for_all().unwrap();
    let got = order.lock().unwrap().clone();
    let mut want: Vec<(i32, usize)> = priorities.iter().copied().zip(0..).collect();
    want.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    assert_eq!(got, want);
}

/// Each context and property runs on its own pool; async ops run inline.
#[test]
fn ops_run_on_the_pool_of_their_context() {
    let engine = Engine::builder()
        .cpu_threads(1)
        .cpu_priority_threads(1)
        .gpu_threads(1)
        .gpu_copy_threads(1)
        .build()
        .unwrap();
    let cases = [
        (Context::Cpu, Property::Normal, "pskv-cpu-0"),
        (Context::CpuPinned(0), Property::Normal, "pskv-cpu-0"),
        (Context::Cpu, Property::CpuPrioritized, "pskv-cpu-prio-0"),
        (Context::Gpu(1), Property::Normal, "pskv-gpu1-0"),
        (Context::Gpu(1), Property::CopyToDevice, "pskv-gpu1-copy-0"),
        (
            Context::Gpu(0),
            Property::CopyFromDevice,
            "pskv-gpu0-copy-0",
        ),
    ];
    for (ctx, prop, want) in cases {
        let seen = Arc::new(Mutex::new(String::new()));
        let s = seen.clone();
        let v = Var::new();
        engine
            .push_sync(
                OpSpec::new("where").write(&v).context(ctx).property(prop),
                move |rc| {
                    assert_eq!(rc.ctx, ctx);
                    *s.lock().unwrap() = thread_name();
                    Ok(())
                },
            )
            .unwrap();
        engine.wait_for_var(&v).unwrap();
        assert_eq!(*seen.lock().unwrap(), want, "{ctx:?} {prop:?}");
    }
    // An async op with no dependency runs on the pusher's thread.
    let seen = Arc::new(Mutex::new(String::new()));
    let s = seen.clone();
    engine
        .push_async(
            OpSpec::new("io").property(Property::Async),
            move |_, done| {
                *s.lock().unwrap() = thread_name();
                done.complete();
            },
        )
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), thread_name());
    engine.wait_for_all().unwrap();
}

/// Async ops completed from many foreign threads, with dependents waiting.
#[test]
fn async_completion_from_foreign_threads() {
    for engine in crate::engines() {
        let v = Var::new();
        let total = Arc::new(AtomicUsize::new(0));
        let n = 200;
        for i in 0..n {
            let t = total.clone();
            let spec = OpSpec::new("remote").write(&v);
            let spec = if i % 2 == 0 {
                spec.property(Property::Async)
            } else {
                spec
            };
            engine
                .push_async(spec, move |_, done| {
                    std::thread::spawn(move || {
                        // Writes are exclusive: a read-modify-write must not race.
                        let x = t.load(Ordering::SeqCst);
                        std::thread::yield_now();
                        t.store(x + 1, Ordering::SeqCst);
                        done.complete();
                    });
                })
                .unwrap();
        }
        engine.wait_for_var(&v).unwrap();
        assert_eq!(total.load(Ordering::SeqCst), n);
        assert_eq!(v.version(), n as u64);
    }
}

/// A chain of 100,000 async ops completing inline does not overflow the stack.
#[test]
fn long_inline_chains_do_not_recurse() {
    for engine in crate::engines() {
        let v = Var::new();
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        if engine.kind() == EngineKind::Naive {
            // The naive push waits for the gate: open it in advance.
            tx.send(()).unwrap();
        }
        // Hold the var so the whole chain queues behind it.
        engine
            .push_async(OpSpec::new("gate").write(&v), move |_, done| {
                std::thread::spawn(move || {
                    let _ = rx.recv_timeout(Duration::from_secs(20));
                    done.complete();
                });
            })
            .unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        for _ in 0..100_000 {
            let c = count.clone();
            engine
                .push_async(
                    OpSpec::new("link").write(&v).property(Property::Async),
                    move |_, done| {
                        c.fetch_add(1, Ordering::Relaxed);
                        done.complete();
                    },
                )
                .unwrap();
        }
        if engine.kind() == EngineKind::Threaded {
            tx.send(()).unwrap();
        }
        engine.wait_for_var(&v).unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 100_000);
    }
}

/// `var_ready` from tokio, with the completion coming from a plain thread.
#[test]
fn var_ready_works_under_tokio() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let engine = crate::engine(EngineKind::Threaded, 2);
    rt.block_on(async {
        let v = Var::new();
        engine
            .push_async(OpSpec::new("recv").write(&v), |_, done| {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(30));
                    done.complete();
                });
            })
            .unwrap();
        tokio::time::timeout(Duration::from_secs(20), engine.var_ready(&v))
            .await
            .expect("var_ready resolved")
            .unwrap();
        assert_eq!(v.version(), 1);
        engine
            .push_sync(OpSpec::new("bad").write(&v), |_| Err("nope".into()))
            .unwrap();
        let err = engine.var_ready(&v).await.unwrap_err();
        assert_eq!(err.to_string(), "op 'bad' failed: nope");
    });
}

/// An op's run context names the vars its spec named, and how: a var both
/// read and written is written; one it did not name is not granted.
#[test]
fn the_run_context_grants_exactly_the_ops_vars() {
    let engine = Engine::builder().cpu_threads(2).build().unwrap();
    let (r, w, both, other) = (Var::new(), Var::new(), Var::new(), Var::new());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let (r2, w2, b2, o2) = (r.clone(), w.clone(), both.clone(), other.clone());
    let spec = OpSpec::new("grants")
        .read(&r)
        .write(&w)
        .read(&both)
        .write(&both);
    for async_op in [false, true] {
        let (s, r2, w2, b2, o2) = (s.clone(), r2.clone(), w2.clone(), b2.clone(), o2.clone());
        let look = move |rc: &RunContext<'_>| {
            let got = [&r2, &w2, &b2, &o2].map(|v| rc.access(v));
            s.lock().unwrap().push(got);
        };
        if async_op {
            engine
                .push_async(spec.clone(), move |rc, done| {
                    look(&rc);
                    done.complete()
                })
                .unwrap();
        } else {
            engine
                .push_sync(spec.clone(), move |rc| {
                    look(&rc);
                    Ok(())
                })
                .unwrap();
        }
    }
    engine.wait_for_all().unwrap();
    let want = [
        Some(Access::Read),
        Some(Access::Write),
        Some(Access::Write),
        None,
    ];
    assert_eq!(*seen.lock().unwrap(), vec![want, want]);
}

/// Bursts of ops after idle gaps (the workers asleep) and right after the
/// last burst (a worker still searching): no wake-up is lost (every op runs,
/// in time; a searcher that never stopped searching fails this), and bursts
/// spread over both workers.
#[test]
fn bursts_after_idle_gaps_wake_the_pool_and_spread_over_it() {
    let e = Engine::builder().cpu_threads(2).build().unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let mut spread = 0;
    for round in 0..60 {
        // Long enough for both workers to stop searching and sleep.
        std::thread::sleep(Duration::from_millis(if round % 2 == 0 { 3 } else { 0 }));
        let names = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let vars: Vec<Var> = (0..6).map(|_| Var::new()).collect();
        for v in &vars {
            let (ran, names) = (ran.clone(), names.clone());
            e.push_sync(OpSpec::new("burst").write(v), move |_| {
                names.lock().unwrap().insert(thread_name());
                std::thread::sleep(Duration::from_micros(500));
                ran.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        }
        e.wait_for_all_timeout(Duration::from_secs(10))
            .expect("every op of the burst ran");
        if names.lock().unwrap().len() == 2 {
            spread += 1;
        }
    }
    assert_eq!(ran.load(Ordering::SeqCst), 60 * 6);
    assert!(
        spread >= 30,
        "bursts ran on both workers in only {spread} of 60 rounds"
    );
}

/// Two ops pushed back to back while the workers are between searching and
/// sleeping, the first waiting (spinning) for the second: the second must
/// reach the other worker while the first runs, whichever worker took the
/// first (a pusher skips its wake-up while a worker searches; that worker
/// must then wake a sleeper for what it leaves behind, in the inbox too).
/// A lost wake-up shows as a first op that waits its full second. Up to
/// 20,000 rounds or 15 s (a loaded machine runs fewer rounds, not longer).
#[test]
fn an_op_pushed_behind_one_a_searcher_takes_wakes_a_sleeper() {
    let e = Engine::builder().cpu_threads(2).build().unwrap();
    let (a, b) = (Var::new(), Var::new());
    let slow = Arc::new(AtomicUsize::new(0));
    let start = std::time::Instant::now();
    for round in 0..20_000u64 {
        if start.elapsed() > Duration::from_secs(15) {
            break;
        }
        // Gaps of 0 to 60 µs: rounds meet the workers searching, going to
        // sleep, and asleep.
        let gap = std::time::Instant::now();
        while gap.elapsed() < Duration::from_micros(round % 61) {
            std::hint::spin_loop();
        }
        let flag = Arc::new(AtomicBool::new(false));
        let (f, s) = (flag.clone(), slow.clone());
        e.push_sync(OpSpec::new("first").write(&a), move |_| {
            let t = std::time::Instant::now();
            while !f.load(Ordering::Acquire) {
                if t.elapsed() > Duration::from_secs(1) {
                    s.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                std::thread::yield_now();
            }
            Ok(())
        })
        .unwrap();
        e.push_sync(OpSpec::new("second").write(&b), move |_| {
            flag.store(true, Ordering::Release);
            Ok(())
        })
        .unwrap();
        e.wait_for_all_timeout(Duration::from_secs(10))
            .expect("both ops ran");
        assert_eq!(
            slow.load(Ordering::SeqCst),
            0,
            "round {round}: the second op waited a second for a worker"
        );
    }
}

/// An async op made ready by a CPU op's finish runs inline on that worker,
/// inside the finish; ops its closure pushes to the same pool must reach
/// the pool's other workers, not wait in this worker's own batch behind
/// the closure (which here waits for one of them).
#[test]
fn ops_pushed_by_an_inline_op_inside_a_finish_reach_the_other_workers() {
    let engine = crate::engine(EngineKind::Threaded, 2);
    let x = Var::named("x");
    // "first" runs on a worker and finishes only after "inline_waits" is
    // queued behind it, so that its finish is what makes it ready.
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    engine
        .push_sync(OpSpec::new("first").write(&x), move |_| {
            go_rx
                .recv_timeout(Duration::from_secs(60))
                .map_err(|_| "the test never let \"first\" finish".into())
        })
        .unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let inner = engine.clone();
    engine
        .push_async(
            OpSpec::new("inline_waits")
                .read(&x)
                .property(Property::Async),
            move |_, done| {
                inner
                    .push_sync(OpSpec::new("pushed_inside"), move |_| {
                        tx.send(()).unwrap();
                        Ok(())
                    })
                    .unwrap();
                match rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(()) => done.complete(),
                    Err(_) => done.fail("the op pushed inside never ran"),
                }
            },
        )
        .unwrap();
    go_tx.send(()).unwrap();
    engine.wait_for_var(&x).unwrap();
    engine.wait_for_all().unwrap();
}
