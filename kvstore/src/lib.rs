//! pskv-kvstore: tensors, and the local, device and distributed kvstores
//! with their servers, optimizers and gradient compression: MXNet's KVStore
//! re-designed on pskv's engine, transport and kernels.

#![warn(missing_docs)]

mod comm;
mod compression;
mod dtype;
mod error;
mod gate;
mod hash;
mod key;
mod kinds;
pub mod optimizer;
mod options;
mod plan;
mod registry;
mod server;
mod states;
mod store;
mod tensor;
mod ticket;
mod updater;
mod wire;

pub use comm::tree::{ReduceTree, Topology};
pub use compression::Compression;
pub use dtype::{DType, Elem};
pub use error::{KvError, Result};
pub use hash::{IdHash, IdHasher};
pub use key::{IntoKey, Key};
pub use kinds::Kind;
pub use optimizer::schedule::{Decay, LrScheduler, Warmup, WarmupMode};
pub use optimizer::{GradRef, Method, OptState, Optimizer, StateVals, WeightMut};
pub use options::Options;
pub use plan::{Call, CallPlan};
pub use server::{CheckpointError, CheckpointSettings, Controller, Server};
pub use store::KvStore;
pub use tensor::{Home, Storage, Tensor};
pub use ticket::{Ticket, TicketPlan};
pub use updater::{Updater, Values, ValuesMut};
