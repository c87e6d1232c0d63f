//! pskv-transport: cluster membership and key/value messaging, the role
//! ps-lite plays under MXNet.
#![warn(missing_docs)]

pub mod protocol;
pub mod wire;
