//! The subcommands of the `pskv` program.

pub mod bench;
pub mod cluster;
pub mod roles;
