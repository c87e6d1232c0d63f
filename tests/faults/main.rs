//! Faults across processes, injected with the harness of
//! `tests/common/cluster.rs` (kill, stop and continue chosen nodes, starve
//! their disks): one test binary, one module per kind of fault. The
//! workers are this binary started again with a flag set; the scheduler
//! and the servers are `pskv` processes.

#[path = "../common/mod.rs"]
mod common;

mod death;
mod disk;
mod recovery;
mod replicas;
mod segments;
mod stalls;
