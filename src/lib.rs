//! pskv: a parameter-server stack for distributed training, re-designed in
//! Rust from Apache MXNet's distributed KVStore.
//!
//! This crate is the facade: it re-exports the workspace's crates under short
//! names, and holds the `pskv` program (launcher, demo, bench) and the C ABI as
//! they are built.
//!
//! ```
//! use pskv::engine::{Engine, OpSpec, Var};
//! let engine = Engine::builder().cpu_threads(1).build()?;
//! let v = Var::new();
//! engine.push_sync(OpSpec::new("hello").write(&v), |_| Ok(()))?;
//! engine.wait_for_var(&v)?;
//! # Ok::<(), pskv::engine::EngineError>(())
//! ```

#![warn(missing_docs)]

pub mod capi;
pub mod logging;

pub use pskv_engine as engine;
pub use pskv_gpu as gpu;
pub use pskv_kvstore as kvstore;
pub use pskv_transport as transport;
