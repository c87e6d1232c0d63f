//! The ordering rules, checked against a sequential model on random programs.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use pskv_engine::{Completion, Engine, EngineKind, OpSpec, Property, Var};

/// What each op observes: per var, the ops that wrote it so far.
struct Cell {
    log: Mutex<Vec<usize>>,
    /// -1: a writer is inside; n > 0: n readers are inside.
    occupancy: AtomicI64,
}

#[derive(Clone, Debug)]
struct RandOp {
    reads: Vec<usize>,
    writes: Vec<usize>,
    priority: i32,
    /// 0: push_sync; 1: push_async completed from a helper thread;
    /// 2: Property::Async completed from a helper thread; 3: push_sync
    /// with Property::Async (run at its push when its vars are free).
    mode: u8,
}

fn rand_op(nvars: usize) -> impl Strategy<Value = RandOp> {
    (
        proptest::collection::vec(0..nvars, 0..4),
        proptest::collection::vec(0..nvars, 0..3),
        -3i32..3,
        0u8..4,
    )
        .prop_map(|(reads, writes, priority, mode)| RandOp {
            reads,
            writes,
            priority,
            mode,
        })
}

type Job = Box<dyn FnOnce() + Send>;

/// Runs a random program on `engine` and checks that every op saw exactly the
/// writes pushed before it on each var it touches, that writes were alone and
/// that every op ran once.
fn check_program(engine: &Engine, nvars: usize, ops: &[RandOp]) -> Result<(), String> {
    let vars: Vec<Var> = (0..nvars).map(|i| Var::named(format!("v{i}"))).collect();
    let cells: Arc<Vec<Cell>> = Arc::new(
        (0..nvars)
            .map(|_| Cell {
                log: Mutex::new(Vec::new()),
                occupancy: AtomicI64::new(0),
            })
            .collect(),
    );
    let problems = Arc::new(Mutex::new(Vec::<String>::new()));
    let runs = Arc::new(AtomicUsize::new(0));
    // The helper thread completes async ops after doing their work there.
    let (tx, rx) = crossbeam_channel::unbounded::<(Job, Completion)>();
    let helper = std::thread::spawn(move || {
        for (job, done) in rx {
            job();
            done.complete();
        }
    });
    // The model: the writes pushed so far, per var.
    let mut model: Vec<Vec<usize>> = vec![Vec::new(); nvars];
    for (i, op) in ops.iter().enumerate() {
        let mut writes = op.writes.clone();
        writes.sort();
        writes.dedup();
        let mut reads: Vec<usize> = op
            .reads
            .iter()
            .copied()
            .filter(|r| !writes.contains(r))
            .collect();
        reads.sort();
        reads.dedup();
        let expect: Vec<(usize, bool, Vec<usize>)> = reads
            .iter()
            .map(|&v| (v, false, model[v].clone()))
            .chain(writes.iter().map(|&v| (v, true, model[v].clone())))
            .collect();
        for &w in &writes {
            model[w].push(i);
        }
        let cells = cells.clone();
        let problems = problems.clone();
        let runs = runs.clone();
        let work = move || {
            runs.fetch_add(1, Ordering::SeqCst);
            for (v, write, _) in &expect {
                let c = &cells[*v];
                if *write {
                    if c.occupancy.swap(-1, Ordering::SeqCst) != 0 {
                        problems
                            .lock()
                            .unwrap()
                            .push(format!("op {i} wrote v{v} beside another op"));
                    }
                } else if c.occupancy.fetch_add(1, Ordering::SeqCst) < 0 {
                    problems
                        .lock()
                        .unwrap()
                        .push(format!("op {i} read v{v} during a write"));
                }
            }
            std::thread::yield_now();
            for (v, write, seen) in &expect {
                let c = &cells[*v];
                let mut log = c.log.lock().unwrap();
                if &*log != seen {
                    problems
                        .lock()
                        .unwrap()
                        .push(format!("op {i} saw v{v} = {:?}, expected {:?}", *log, seen));
                }
                if *write {
                    log.push(i);
                }
            }
            for (v, write, _) in &expect {
                let c = &cells[*v];
                if *write {
                    c.occupancy.store(0, Ordering::SeqCst);
                } else {
                    c.occupancy.fetch_sub(1, Ordering::SeqCst);
                }
            }
        };
        let spec = OpSpec::new(format!("op{i}"))
            .reads(op.reads.iter().map(|&v| &vars[v]))
            .writes(op.writes.iter().map(|&v| &vars[v]))
            .priority(op.priority);
        let pushed = match op.mode {
            0 => engine.push_sync(spec, move |_| {
                work();
                Ok(())
            }),
            3 => engine.push_sync(spec.property(Property::Async), move |_| {
                work();
                Ok(())
            }),
            m => {
                let spec = if m == 2 {
                    spec.property(Property::Async)
                } else {
                    spec
                };
                let tx = tx.clone();
                engine.push_async(spec, move |_, done| {
                    tx.send((Box::new(work), done)).expect("helper alive");
                })
            }
        };
        pushed.map_err(|e| e.to_string())?;
    }
    engine
        .wait_for_all_timeout(Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    drop(tx);
    helper.join().unwrap();
    let problems = problems.lock().unwrap();
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    if runs.load(Ordering::SeqCst) != ops.len() {
        return Err(format!(
            "{} of {} ops ran",
            runs.load(Ordering::SeqCst),
            ops.len()
        ));
    }
    for (v, cell) in cells.iter().enumerate() {
        if *cell.log.lock().unwrap() != model[v] {
            return Err(format!(
                "v{v} ended as {:?}, expected {:?}",
                cell.log.lock().unwrap(),
                model[v]
            ));
        }
        if vars[v].version() != model[v].len() as u64 {
            return Err(format!(
                "v{v} has version {}, expected {}",
                vars[v].version(),
                model[v].len()
            ));
        }
    }
    Ok(())
}

fn program() -> impl Strategy<Value = (usize, Vec<RandOp>)> {
    (1usize..6).prop_flat_map(|n| (Just(n), proptest::collection::vec(rand_op(n), 1..60)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn threaded_engine_orders_like_the_model((nvars, ops) in program()) {
        let engine = crate::engine(EngineKind::Threaded, 2);
        prop_assert_eq!(check_program(&engine, nvars, &ops), Ok(()));
    }

    #[test]
    fn naive_engine_orders_like_the_model((nvars, ops) in program()) {
        let engine = crate::engine(EngineKind::Naive, 1);
        prop_assert_eq!(check_program(&engine, nvars, &ops), Ok(()));
    }
}

/// Reads between two writes overlap in time (they are not serialised).
#[test]
fn reads_between_writes_run_together() {
    let engine = crate::engine(EngineKind::Threaded, 2);
    let v = Var::new();
    let barrier = Arc::new(std::sync::Barrier::new(2));
    for i in 0..2 {
        let b = barrier.clone();
        engine
            .push_sync(OpSpec::new(format!("read{i}")).read(&v), move |_| {
                // Both reads must be inside at once to pass this barrier.
                b.wait();
                Ok(())
            })
            .unwrap();
    }
    engine
        .wait_for_all_timeout(Duration::from_secs(20))
        .unwrap();
}

/// A var named twice, or both read and written, is one write: no
/// self-deadlock, and a concurrent reader never overlaps it.
#[test]
fn duplicate_vars_are_one_write() {
    for engine in crate::engines() {
        let v = Var::new();
        let inside = Arc::new(AtomicI64::new(0));
        for i in 0..50 {
            let inside = inside.clone();
            let spec = match i % 3 {
                0 => OpSpec::new("dup").write(&v).write(&v).read(&v).read(&v),
                1 => OpSpec::new("both").read(&v).write(&v),
                _ => OpSpec::new("reader").read(&v),
            };
            let writes = i % 3 != 2;
            engine
                .push_sync(spec, move |_| {
                    let before = if writes {
                        inside.swap(-1000, Ordering::SeqCst)
                    } else {
                        inside.fetch_add(1, Ordering::SeqCst)
                    };
                    std::thread::yield_now();
                    if writes {
                        inside.store(0, Ordering::SeqCst);
                    } else {
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                    if (writes && before != 0) || before < 0 {
                        return Err("overlap".into());
                    }
                    Ok(())
                })
                .unwrap();
        }
        engine
            .wait_for_all_timeout(Duration::from_secs(20))
            .unwrap();
        assert_eq!(v.version(), 34, "{:?}", engine.kind());
    }
}
