//! The Chrome trace and the DOT graph.

use pskv_engine::{Dependency, Engine, EngineKind, OpSpec, Var};

#[test]
fn profile_path_writes_a_chrome_trace_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.json");
    {
        let engine = Engine::builder()
            .cpu_threads(2)
            .profile_path(&path)
            .build()
            .unwrap();
        let v = Var::new();
        for i in 0..10 {
            engine
                .push_sync(
                    OpSpec::new(format!("step{i}")).write(&v).priority(i),
                    |_| Ok(()),
                )
                .unwrap();
        }
        engine
            .push_sync(OpSpec::new("fails").write(&v), |_| Err("x".into()))
            .unwrap();
        let _ = engine.wait_for_all();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let events = json["traceEvents"].as_array().unwrap();
    let ops: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert_eq!(ops.len(), 11);
    for i in 0..10 {
        let e = ops
            .iter()
            .find(|e| e["name"] == format!("step{i}"))
            .unwrap();
        assert!(e["ts"].as_f64().unwrap() > 0.0);
        assert!(e["dur"].as_f64().unwrap() >= 0.0);
        assert_eq!(e["args"]["priority"], i);
        assert_eq!(e["args"]["failed"], false);
    }
    let failed = ops.iter().find(|e| e["name"] == "fails").unwrap();
    assert_eq!(failed["args"]["failed"], true);
    // Worker threads are named in the metadata, and events point at them.
    let names: Vec<&str> = events
        .iter()
        .filter(|e| e["ph"] == "M")
        .filter_map(|e| e["args"]["name"].as_str())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("pskv-cpu-")),
        "{names:?}"
    );
}

#[test]
fn profiling_can_be_switched_on_and_taken() {
    let engine = crate::engine(EngineKind::Naive, 1);
    engine.push_sync(OpSpec::new("before"), |_| Ok(())).unwrap();
    engine.start_profiling();
    engine.push_sync(OpSpec::new("during"), |_| Ok(())).unwrap();
    engine.stop_profiling();
    engine.push_sync(OpSpec::new("after"), |_| Ok(())).unwrap();
    let events = engine.take_profile();
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["during"]);
}

#[test]
fn the_graph_has_the_dependency_edges() {
    let engine = crate::engine(EngineKind::Threaded, 2);
    let (a, b) = (Var::named("a"), Var::named("b"));
    engine
        .push_sync(OpSpec::new("untracked").write(&a), |_| Ok(()))
        .unwrap();
    engine.start_graph();
    engine
        .push_sync(OpSpec::new("w1").write(&a), |_| Ok(()))
        .unwrap();
    engine
        .push_sync(OpSpec::new("r1").read(&a).write(&b), |_| Ok(()))
        .unwrap();
    engine
        .push_sync(OpSpec::new("r2").read(&a), |_| Ok(()))
        .unwrap();
    engine
        .push_sync(OpSpec::new("w2").write(&a).read(&b), |_| Ok(()))
        .unwrap();
    engine
        .push_sync(OpSpec::new("w3").write(&b), |_| Ok(()))
        .unwrap();
    let g = engine.take_graph();
    engine.wait_for_all().unwrap();
    let graph = g.graph();
    let name = |i: petgraph::graph::NodeIndex| graph[i].name.clone();
    let mut edges: Vec<(String, String, Dependency)> = graph
        .edge_indices()
        .map(|e| {
            let (s, t) = graph.edge_endpoints(e).unwrap();
            (name(s), name(t), graph[e])
        })
        .collect();
    edges.sort_by(|x, y| (&x.0, &x.1).cmp(&(&y.0, &y.1)));
    use Dependency::*;
    // r1 -> w2 is both read-after-write (b) and write-after-read (a): one
    // edge, of the kind recorded last.
    let want: Vec<(String, String, Dependency)> = [
        ("r1", "w2", WriteAfterRead),
        ("r2", "w2", WriteAfterRead),
        ("w1", "r1", ReadAfterWrite),
        ("w1", "r2", ReadAfterWrite),
        ("w2", "w3", WriteAfterRead),
    ]
    .into_iter()
    .map(|(s, t, d)| (s.to_string(), t.to_string(), d))
    .collect();
    assert_eq!(graph.node_count(), 5);
    assert_eq!(edges, want);
    let dot = g.to_dot();
    assert!(dot.starts_with("digraph"), "{dot}");
    for n in ["w1", "r1", "r2", "w2", "w3", "RAW", "WAR"] {
        assert!(dot.contains(n), "{dot}");
    }
}

/// An op's own parts are slices inside its slice, on its thread; nothing is
/// recorded when the engine is not profiling.
#[test]
fn an_op_records_its_parts_inside_its_slice() {
    let engine = Engine::builder().cpu_threads(1).build().unwrap();
    let v = Var::new();
    let run = |engine: &Engine, on: bool| {
        engine
            .push_sync(OpSpec::new("whole").write(&v), move |rc| {
                let t0 = std::time::Instant::now();
                std::thread::sleep(std::time::Duration::from_millis(2));
                let t1 = std::time::Instant::now();
                assert_eq!(rc.profiling(), on);
                rc.record("part", "key 3", t0, t1);
                Ok(())
            })
            .unwrap();
        engine.wait_for_all().unwrap();
    };
    run(&engine, false);
    assert!(engine.take_profile().is_empty());
    engine.start_profiling();
    run(&engine, true);
    let events = engine.take_profile();
    let whole = events.iter().find(|e| e.name == "whole").unwrap();
    let part = events.iter().find(|e| e.name == "part").unwrap();
    assert_eq!((part.tid, part.ctx.as_str()), (whole.tid, "key 3"));
    assert!(part.dur_ns >= 2_000_000, "{part:?}");
    assert!(part.start_ns >= whole.start_ns, "{part:?} {whole:?}");
    assert!(
        part.start_ns + part.dur_ns <= whole.start_ns + whole.dur_ns,
        "{part:?} {whole:?}"
    );
}
