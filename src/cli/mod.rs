//! The subcommands of the `pskv` program.

pub mod bench;
pub mod demo;
pub mod gpus;
pub mod launch;
pub mod roles;
