//! Collective calls of a distributed store fail together, and what every
//! worker must agree on is checked: a key's size, type and shape at `init`
//! (on every van and fast path, against the key's record on its server),
//! the optimizer, a barrier that one worker gave up on, a collective that
//! failed on one worker.

use std::time::{Duration, Instant};

use pskv_engine::Context;
use pskv_kvstore::{DType, Key, KvStore, Optimizer, Options, Tensor};
use pskv_transport::VanKind;

mod common;
use common::*;

fn opts(timeout: Duration) -> Options {
    Options {
        timeout,
        ..Options::default()
    }
}

/// Whether key 7 (the same on every worker) can be made and pushed and
/// pulled.
fn still_works(kv: &KvStore, e: &pskv_engine::Engine) -> bool {
    let w = Tensor::full(e, &[4], 1.0f32, Context::Cpu).unwrap();
    kv.init(7, &w).is_ok()
        && kv
            .pushpull(7, std::slice::from_ref(&w), std::slice::from_ref(&w), 0)
            .is_ok()
        && w.to_vec::<f32>().is_ok()
}

/// What `init` of key 3 gives on each worker, when worker thread `i` inits
/// it with `shape(i)` and `dtype(i)`; then whether key 7 (the same
/// everywhere) still works.
fn init_mismatch(
    van: VanKind,
    shape: fn(usize) -> Vec<usize>,
    dtype: fn(usize) -> DType,
) -> Vec<(String, bool)> {
    let c = cluster_van(1, 2, van);
    c.run_each(
        "dist_sync",
        opts(Duration::from_secs(20)),
        move |i, kv, e| {
            let t = Tensor::zeros(e, &shape(i), dtype(i), Context::Cpu).unwrap();
            let r = kv.init(3, &t);
            let ok = still_works(kv, e);
            (r.err().map(|e| e.to_string()).unwrap_or_default(), ok)
        },
    )
    .into_iter()
    .map(|(r, _, _)| r)
    .collect()
}

/// Two workers that init one key with different sizes both get an error
/// naming the key and both sizes, over TCP and over shared memory (where
/// one rank used to read zeros for the missing elements, silently), and
/// the store goes on working for the other keys.
#[test]
fn workers_that_init_a_key_with_different_sizes_all_get_an_error_naming_it() {
    for van in [VanKind::Tcp, VanKind::Shm] {
        for (a, b) in [(100usize, 200usize), (100, 50)] {
            let sizes = if a == 100 && b == 200 {
                (|i: usize| vec![if i == 0 { 100 } else { 200 }]) as fn(usize) -> Vec<usize>
            } else {
                |i: usize| vec![if i == 0 { 100 } else { 50 }]
            };
            let got = init_mismatch(van, sizes, |_| DType::F32);
            eprintln!("{van:?}: {}", got[0].0);
            for (e, ok) in &got {
                assert!(
                    e.contains("key 3") && e.contains(&a.to_string()) && e.contains(&b.to_string()),
                    "{van:?}: {e:?}"
                );
                assert!(
                    ok,
                    "{van:?}: the store stopped working after the failed init"
                );
            }
            assert_eq!(got[0].0, got[1].0, "{van:?}: the same error on both");
        }
    }
}

/// Workers whose settings cut a key into other parts (one with the default
/// part size of a TCP store, 1 MiB, one with `PSKV_PARTITION_BYTES` at
/// 4 MiB; or workers with other `PSKV_VAN`s, whose defaults differ) would
/// push parts of other lengths: both get an error at `init` naming both
/// part sizes, and keys they cut alike (one part each, here) still work.
#[test]
fn workers_that_cut_a_key_into_other_parts_all_get_an_error_at_init() {
    let c = cluster(1, 2);
    let out = c.run_each_opts(
        "dist_sync",
        |i| Options {
            partition_bytes: if i == 0 { 0 } else { 4 << 20 },
            ..opts(Duration::from_secs(20))
        },
        |_, kv, e| {
            let t = Tensor::zeros(e, &[1 << 20], DType::F32, Context::Cpu).unwrap();
            let err = kv.init(3, &t).err().map(|e| e.to_string());
            let ok = still_works(kv, e);
            (err, ok)
        },
    );
    for ((err, ok), _, _) in &out {
        let e = err.as_deref().expect("the init fails");
        eprintln!("{e}");
        for part in [
            "key 3 f32 [1048576] in 4 parts",
            "key 3 f32 [1048576] in 1 part",
            "parts of at most 1048576 bytes: PSKV_PARTITION_BYTES",
            "parts of at most 4194304 bytes",
        ] {
            assert!(e.contains(part), "{part:?} in {e}");
        }
        assert!(ok, "the store stopped working after the failed init");
    }
    assert_eq!(out[0].0 .0, out[1].0 .0, "the same error on both");
}

/// An `init` whose later key cannot be cut (more parts than a key may
/// have) fails as a whole: the keys before it are not left registered
/// without an init (a second `init` of them used to fail, "already
/// initialized", and a push of one failed on a panic, indexing parts its
/// init never checked), so they can be initialized again and used.
#[test]
fn an_init_that_fails_on_one_key_registers_none_of_them() {
    let c = cluster(1, 1);
    let tiny_parts = Options {
        partition_bytes: 4,
        ..opts(Duration::from_secs(20))
    };
    let out = c.run_each("dist_sync", tiny_parts, |_, kv, e| {
        let good = Tensor::full(e, &[4], 1.0f32, Context::Cpu).unwrap();
        // 65,537 parts of one element: one more than a key may have.
        let bad = Tensor::zeros(e, &[65_537], DType::F32, Context::Cpu).unwrap();
        let err = kv
            .init_many(&[(Key::Int(1), good.clone()), (Key::Int(2), bad)])
            .err()
            .map(|e| e.to_string());
        let again = kv.init(1, &good).map_err(|e| e.to_string());
        let pushed = kv
            .pushpull(
                1,
                std::slice::from_ref(&good),
                std::slice::from_ref(&good),
                0,
            )
            .is_ok()
            && good.to_vec::<f32>().is_ok_and(|v| v == [1.0; 4]);
        (err, again, pushed)
    });
    let ((err, again, pushed), _, _) = &out[0];
    let err = err.as_deref().expect("the init with the bad key fails");
    assert!(err.contains("key id 2") && err.contains("parts"), "{err}");
    again
        .as_ref()
        .expect("key 1 can be initialized after the failed call");
    assert!(pushed, "key 1 works after its init");
}

/// The same for the element type, and for shapes of one size.
#[test]
fn workers_that_init_a_key_with_different_types_or_shapes_all_get_an_error() {
    let got = init_mismatch(
        VanKind::Shm,
        |_| vec![10],
        |i| if i == 0 { DType::F32 } else { DType::F64 },
    );
    for (e, _) in &got {
        assert!(
            e.contains("key 3") && e.contains("f32") && e.contains("f64"),
            "{e}"
        );
    }
    let got = init_mismatch(
        VanKind::Tcp,
        |i| if i == 0 { vec![10, 10] } else { vec![100] },
        |_| DType::F32,
    );
    for (e, _) in &got {
        assert!(
            e.contains("key 3") && e.contains("[10, 10]") && e.contains("[100]"),
            "{e}"
        );
    }
}

/// An optimizer that fails on one worker (out of range here) fails
/// `set_optimizer` on every worker at once, with its cause, instead of
/// leaving the others at the barrier until the store's timeout.
#[test]
fn set_optimizer_that_fails_on_one_worker_fails_on_all_at_once() {
    let timeout = Duration::from_secs(20);
    let out = failing_call(3, timeout, |i, kv| {
        let m = if i == 1 { 5.0 } else { 0.9 };
        kv.set_optimizer(Optimizer::sgd(0.1).momentum(m))
    });
    for (e, took, _) in &out {
        assert!(e.contains("momentum"), "{e}");
        assert!(*took < timeout / 4, "took {took:?}");
    }
}

/// Different optimizers set by different workers are an error on all of
/// them (rank 0's used to win silently).
#[test]
fn different_optimizers_on_different_workers_are_an_error() {
    let out = failing_call(2, Duration::from_secs(20), |i, kv| {
        kv.set_optimizer(if i == 0 {
            Optimizer::sgd(0.1)
        } else {
            Optimizer::adam(0.1)
        })
    });
    for (e, _, _) in &out {
        assert!(
            e.contains("sgd") && e.contains("adam") && e.contains("disagree"),
            "{e}"
        );
    }
    assert_eq!(out[0].0, out[1].0);
}

/// Workers that make different collective calls at once (worker 0
/// `set_optimizer`, as MXNet's rank 0 alone sends it; worker 1 `barrier`)
/// all fail at once, naming both calls, instead of pairing the calls'
/// barriers; the next barrier works.
#[test]
fn different_collective_calls_at_once_fail_on_all_workers() {
    let out = failing_call(2, Duration::from_secs(30), |i, kv| {
        if i == 0 {
            kv.set_optimizer(Optimizer::sgd(0.1))
        } else {
            kv.barrier()
        }
    });
    for (e, took, next) in &out {
        assert!(
            e.contains("set_optimizer") && e.contains("barrier") && e.contains("disagree"),
            "{e}"
        );
        assert!(*took < Duration::from_secs(10), "took {took:?}: {e}");
        assert!(next.is_ok(), "the next barrier: {next:?}");
    }
}

/// `workers` workers init key 0, then make `call`, which must fail on
/// every one of them: per worker, its error (printed), how long the call
/// took, and how the next barrier went.
fn failing_call(
    workers: u32,
    timeout: Duration,
    call: impl Fn(usize, &KvStore) -> pskv_kvstore::Result<()> + Send + Sync + 'static,
) -> Vec<(String, Duration, pskv_kvstore::Result<()>)> {
    let c = cluster(1, workers);
    let out = c.run_each("dist_sync", opts(timeout), move |i, kv, e| {
        let w = Tensor::zeros(e, &[8], DType::F32, Context::Cpu).unwrap();
        kv.init(0, &w).unwrap();
        let t = Instant::now();
        let r = call(i, kv);
        (r, t.elapsed(), kv.barrier())
    });
    out.into_iter()
        .map(|((r, took, next), _, _)| {
            let e = r.expect_err("an error on every worker").to_string();
            eprintln!("{e}");
            (e, took, next)
        })
        .collect()
}

/// A barrier that one worker gave up on (its timeout) fails on the others
/// with that cause, and the next barrier works on every worker (a timed-out
/// barrier used to poison every later one on that node).
#[test]
fn a_timed_out_barrier_fails_everywhere_and_the_next_one_works() {
    let c = cluster(1, 2);
    let out = c.run_each("dist_sync", opts(Duration::from_secs(2)), |i, kv, _| {
        let first = if i == 0 {
            kv.barrier()
        } else {
            std::thread::sleep(Duration::from_secs(3));
            kv.barrier()
        };
        let second = kv.barrier();
        (first.err().map(|e| e.to_string()), second)
    });
    let (e0, e1) = (&out[0].0 .0, &out[1].0 .0);
    assert!(
        e0.as_deref().is_some_and(|e| e.contains("timed out")),
        "{e0:?}"
    );
    assert!(
        e1.as_deref().is_some_and(|e| e.contains("gave up")),
        "the late worker: {e1:?}"
    );
    for ((_, second), _, _) in &out {
        assert!(second.is_ok(), "{second:?}");
    }
}

/// Settings that make no sense are refused where the optimizer is made.
#[test]
fn nonsense_optimizer_settings_are_refused() {
    for (o, what) in [
        (Optimizer::sgd(-1.0), "learning_rate"),
        (Optimizer::sgd(0.1).momentum(5.0), "momentum"),
        (Optimizer::sgd(0.1).rescale_grad(0.0), "rescale_grad"),
        (Optimizer::adam(0.1).epsilon(0.0), "epsilon"),
        (Optimizer::adagrad(0.1).epsilon(0.0), "epsilon"),
    ] {
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
    assert!(Optimizer::sgd(0.0).momentum(0.0).validate().is_ok());
    // KvStore is used here only to keep the import honest for local stores.
    let engine = pskv_engine::Engine::new().unwrap();
    assert!(KvStore::create("local", &engine)
        .unwrap()
        .set_optimizer(Optimizer::sgd(-1.0))
        .is_err());
}

/// A sync round that one worker never pushes to: the other's push fails
/// after the store's timeout, as a timeout naming the key (the transport
/// fails each part's request on time; no thread of the kvstore watches),
/// and the worker's next call on the key reports it once.
#[test]
fn a_round_that_never_completes_times_out_naming_the_key() {
    let c = cluster(1, 2);
    let timeout = Duration::from_millis(1500);
    let out = c.run_each("dist_sync", opts(timeout), move |i, kv, e| {
        let t = pskv_kvstore::Tensor::from_slice(e, &[4], &[1.0f32; 4], Context::Cpu).unwrap();
        kv.init(3, &t).unwrap();
        if i == 1 {
            // Never pushes; waits out the other's timeout.
            std::thread::sleep(timeout * 3);
            return None;
        }
        let t0 = std::time::Instant::now();
        kv.push(3, std::slice::from_ref(&t), 0).unwrap();
        let err = kv
            .pull(3, std::slice::from_ref(&t), 0)
            .and_then(|()| t.wait_to_read());
        Some((t0.elapsed(), err.map_err(|e| e.to_string())))
    });
    let (took, err) = out[0].0.clone().expect("worker 0 pushed");
    let err = err.expect_err("the push timed out");
    assert!(err.contains("key 3") && err.contains("unanswered"), "{err}");
    assert!(took >= timeout && took < timeout * 3, "{took:?}");
}

/// MXNet code may call `set_optimizer` on rank 0 only; in pskv it is a
/// collective call. The caller fails at the store's timeout saying the
/// other workers did not make the call; a worker that pushed meanwhile
/// fails at its own timeout naming that call (the scheduler tells it), and
/// its next collective call fails at once with the same cause.
#[test]
fn a_collective_call_only_one_worker_makes_fails_on_all_saying_so() {
    let c = cluster(1, 2);
    let timeout = Duration::from_millis(1500);
    let out = c.run_each("dist_sync", opts(timeout), move |_, kv, e| {
        let t = pskv_kvstore::Tensor::from_slice(e, &[4], &[1.0f32; 4], Context::Cpu).unwrap();
        kv.init(3, &t).unwrap();
        let t0 = std::time::Instant::now();
        if kv.rank() == 0 {
            let err = kv.set_optimizer(Optimizer::sgd(0.1)).unwrap_err();
            return (err.to_string(), t0.elapsed(), None);
        }
        // Starts pushing a little after the other worker began its call.
        std::thread::sleep(Duration::from_millis(300));
        kv.push(3, std::slice::from_ref(&t), 0).unwrap();
        let err = kv
            .pull(3, std::slice::from_ref(&t), 0)
            .and_then(|()| t.wait_to_read())
            .unwrap_err();
        let took = t0.elapsed();
        let t1 = std::time::Instant::now();
        let next = kv.barrier().unwrap_err().to_string();
        (err.to_string(), took, Some((next, t1.elapsed())))
    });
    // Rank 0 calls; the other pushes (ranks are given in registration
    // order, not thread order).
    let (calls, pushes): (Vec<_>, Vec<_>) = out.iter().map(|o| &o.0).partition(|o| o.2.is_none());
    let (caller, took, _) = calls[0];
    eprintln!("the caller: {caller}\nthe other: {}", pushes[0].0);
    assert!(
        caller.contains("timed out") && caller.contains("collective call set_optimizer"),
        "{caller}"
    );
    assert!(*took >= timeout && *took < timeout * 2, "{took:?}");
    let (pusher, took, next) = pushes[0];
    assert!(
        pusher.contains("key 3")
            && pusher.contains("had not reached")
            && pusher.contains("set_optimizer")
            && pusher.contains("worker 1 (id 11) had not reached it")
            && pusher.contains("failed on worker 0 (id 9)"),
        "{pusher}"
    );
    assert!(*took < timeout * 3, "{took:?}");
    let (next, took) = next.as_ref().unwrap();
    assert!(
        next.contains("set_optimizer") && next.contains("gave up"),
        "{next}"
    );
    assert!(*took < timeout / 2, "{took:?}");
}
