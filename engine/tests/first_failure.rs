//! The first failure of a process. An op's run looks at its vars' failures
//! only once some var of the process held one (a process-wide flag, set for
//! good by the first failure stored), so this test has a binary of its own:
//! no other test may fail first.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pskv_engine::{Engine, OpSpec, Property, Var};

/// Ops granted after the first failure on their var are skipped, through
/// the pool and at their push (`try_run_now`'s path for an `Async` op
/// whose vars are free).
#[test]
fn the_first_failure_of_the_process_skips_the_ops_granted_after_it() {
    let e = Engine::builder()
        .cpu_threads(2)
        .build()
        .expect("engine starts");
    let v = Var::named("v");
    let ran = Arc::new(AtomicUsize::new(0));
    let count = |spec: OpSpec| {
        let ran = ran.clone();
        e.push_sync(spec, move |_| {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    };
    count(OpSpec::new("before").write(&v));
    e.push_sync(OpSpec::new("fails").write(&v), |_| Err("on purpose".into()))
        .unwrap();
    // Queued behind the failing op: granted after it, through the pool.
    count(OpSpec::new("queued reader").read(&v));
    count(OpSpec::new("queued writer").write(&v));
    // Once the var is free (nothing pending; no wait, which would take the
    // failure off it), an `Async` op may run at its push: it must not.
    let start = Instant::now();
    while e.pending() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "ops still pending after 10 s"
        );
        std::thread::yield_now();
    }
    count(
        OpSpec::new("reader at push")
            .read(&v)
            .property(Property::Async),
    );
    let err = e.wait_for_all().expect_err("the failure is reported");
    assert!(err.to_string().contains("on purpose"), "{err}");
    assert_eq!(
        ran.load(Ordering::SeqCst),
        1,
        "only the op before the failure ran"
    );
}
