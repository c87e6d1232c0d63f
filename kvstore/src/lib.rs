//! pskv-kvstore: tensors, and the local, device and distributed kvstores
//! with their servers, optimizers and gradient compression: MXNet's KVStore
//! re-designed on pskv's engine, transport and kernels.

#![warn(missing_docs)]

mod dtype;
mod error;
mod key;
pub mod optimizer;
mod tensor;

pub use dtype::{DType, Elem};
pub use error::{KvError, Result};
pub use key::Key;
pub use optimizer::{GradRef, Method, OptState, Optimizer, StateVals, WeightMut};
pub use tensor::{Storage, Tensor};
