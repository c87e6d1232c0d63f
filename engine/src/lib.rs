//! pskv-engine: a variable-tracking asynchronous dependency engine, the model
//! of MXNet's ThreadedEngine re-designed in Rust.
//!
//! Ops are closures that name the [`Var`]s they read and write. The engine runs
//! each op once every earlier op it conflicts with on those vars has finished:
//! reads between two writes run together, a write runs alone, and the ops on a
//! var take effect in push order. Ready ops start on the worker pool of their
//! [`Context`] and [`Property`], highest priority first.
//!
//! ```
//! use pskv_engine::{Engine, OpSpec, Var};
//! use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
//!
//! let engine = Engine::builder().cpu_threads(2).build()?;
//! let (grad, weight) = (Var::named("grad"), Var::named("weight"));
//! let w = Arc::new(AtomicU64::new(0));
//! engine.push_sync(OpSpec::new("compute_grad").write(&grad), |_| Ok(()))?;
//! let w2 = w.clone();
//! engine.push_sync(OpSpec::new("update").read(&grad).write(&weight), move |_| {
//!     w2.fetch_add(1, Ordering::SeqCst);
//!     Ok(())
//! })?;
//! engine.wait_for_var(&weight)?;
//! assert_eq!(w.load(Ordering::SeqCst), 1);
//! # Ok::<(), pskv_engine::EngineError>(())
//! ```
//!
//! The crate knows nothing of CUDA, sockets or tensors: it schedules closures.
//! See `config` for the environment variables, and ARCHITECTURE.md for the
//! invariants.

#![warn(missing_docs)]
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod body;
mod config;
mod core;
#[allow(unsafe_code)]
mod core_ref;
mod engine;
mod error;
mod executor;
mod graph;
mod held_reads;
mod inline;
mod op;
#[allow(unsafe_code)]
mod op_block;
mod pool;
#[allow(unsafe_code)]
mod prefetch;
mod profiler;
pub mod progress;
mod run_now;
mod spec;
mod sync;
#[allow(unsafe_code)]
mod var;
mod wait;

pub use crate::config::{spin_budget, EngineBuilder, EngineConfig, EngineKind};
pub use crate::engine::Engine;
pub use crate::error::{EngineError, FailureCause, OpError, OpFailure};
pub use crate::executor::MAX_GPUS;
pub use crate::graph::{Dependency, OpGraph, OpNode};
pub use crate::op::{Access, Completion, RunContext};
pub use crate::profiler::{chrome_trace_json, write_chrome_trace, TraceEvent};
pub use crate::spec::{Context, OpSpec, Property};
pub use crate::var::Var;
pub use crate::wait::{spin_until, Latch, VarReady};
