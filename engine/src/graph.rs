//! Recording the dependency DAG of the ops pushed while recording is on, and
//! writing it as DOT (Graphviz) through petgraph.
//!
//! An edge A → B means B had to wait for A on some var: B reads what A wrote
//! (read-after-write), B writes what A wrote (write-after-write), or B writes
//! what A read (write-after-read). Recording costs one lock per push, only
//! while it is on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::op::Op;

/// The kind of a dependency edge.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Dependency {
    /// The later op reads a var the earlier op wrote.
    ReadAfterWrite,
    /// The later op writes a var the earlier op wrote.
    WriteAfterWrite,
    /// The later op writes a var the earlier op read.
    WriteAfterRead,
}

/// A node of the op graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpNode {
    /// The op's name.
    pub name: String,
    /// The op's position in push order among the recorded ops.
    pub seq: u64,
    /// Its priority.
    pub priority: i32,
}

/// The dependency DAG of the ops pushed while recording.
///
/// ```
/// use pskv_engine::{Engine, OpSpec, Var};
/// let engine = Engine::builder().cpu_threads(1).build()?;
/// let v = Var::named("x");
/// engine.start_graph();
/// engine.push_sync(OpSpec::new("produce").write(&v), |_| Ok(()))?;
/// engine.push_sync(OpSpec::new("consume").read(&v), |_| Ok(()))?;
/// let graph = engine.take_graph();
/// assert_eq!(graph.graph().edge_count(), 1);
/// assert!(graph.to_dot().contains("produce"));
/// # Ok::<(), pskv_engine::EngineError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct OpGraph {
    graph: DiGraph<OpNode, Dependency>,
}

impl OpGraph {
    /// The petgraph graph.
    pub fn graph(&self) -> &DiGraph<OpNode, Dependency> {
        &self.graph
    }

    /// The graph in Graphviz DOT.
    pub fn to_dot(&self) -> String {
        use petgraph::dot::Dot;
        let labelled = self.graph.map(
            |_, n| format!("{} (#{}, p{})", n.name, n.seq, n.priority),
            |_, e| match e {
                Dependency::ReadAfterWrite => "RAW",
                Dependency::WriteAfterWrite => "WAW",
                Dependency::WriteAfterRead => "WAR",
            },
        );
        format!("{}", Dot::new(&labelled))
    }
}

#[derive(Default)]
struct Recording {
    graph: DiGraph<OpNode, Dependency>,
    last_writer: HashMap<u64, NodeIndex>,
    readers_since_write: HashMap<u64, Vec<NodeIndex>>,
}

#[derive(Default)]
pub(crate) struct GraphRecorder {
    on: AtomicBool,
    rec: Mutex<Recording>,
}

impl GraphRecorder {
    #[inline]
    pub(crate) fn is_recording(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub(crate) fn start(&self) {
        *self.rec.lock() = Recording::default();
        self.on.store(true, Ordering::Relaxed);
    }

    pub(crate) fn take(&self) -> OpGraph {
        self.on.store(false, Ordering::Relaxed);
        let rec = std::mem::take(&mut *self.rec.lock());
        OpGraph { graph: rec.graph }
    }

    pub(crate) fn record(&self, op: &Op) {
        let mut rec = self.rec.lock();
        let rec = &mut *rec;
        let node = rec.graph.add_node(OpNode {
            name: op.name.to_string(),
            seq: rec.graph.node_count() as u64,
            priority: op.priority,
        });
        for v in op.reads() {
            if let Some(&w) = rec.last_writer.get(&v.id()) {
                rec.graph.update_edge(w, node, Dependency::ReadAfterWrite);
            }
            rec.readers_since_write
                .entry(v.id())
                .or_default()
                .push(node);
        }
        for v in op.writes() {
            let readers = rec.readers_since_write.remove(&v.id()).unwrap_or_default();
            if readers.is_empty() {
                if let Some(&w) = rec.last_writer.get(&v.id()) {
                    rec.graph.update_edge(w, node, Dependency::WriteAfterWrite);
                }
            }
            for r in readers {
                rec.graph.update_edge(r, node, Dependency::WriteAfterRead);
            }
            rec.last_writer.insert(v.id(), node);
        }
    }
}
