//! [`Options`]: a store's settings, from the environment (`PSKV_*`, and
//! MXNet's `MXNET_KVSTORE_*` names where MXNet has one) or given.

use std::time::Duration;

use crate::comm::tree::Topology;
use crate::error::{KvError, Result};

/// Settings of a store, from the environment by default.
#[derive(Clone, Debug)]
pub struct Options {
    /// Arrays of at least this many elements are split over all servers
    /// (`PSKV_KVSTORE_BIGARRAY_BOUND`, or MXNet's
    /// `MXNET_KVSTORE_BIGARRAY_BOUND`; default 1,000,000).
    pub bigarray_bound: usize,
    /// Each part of a key travels and is summed on its own, at most this
    /// many bytes (`PSKV_PARTITION_BYTES`). 0, the default: by the van
    /// setting ([`Options::partition_for`]): 1 MiB with `PSKV_VAN=tcp`,
    /// else 4 MiB.
    pub partition_bytes: usize,
    /// How long a push or pull waits for the servers before it fails
    /// (`PSKV_KVSTORE_TIMEOUT`, seconds; default 600).
    pub timeout: Duration,
    /// `device` kinds sum along a topology-aware tree
    /// (`PSKV_KVSTORE_USETREE=1`).
    pub use_tree: bool,
    /// The device link topology for the tree (`PSKV_KVSTORE_TOPOLOGY`;
    /// default: every pair alike).
    pub topology: Option<Topology>,
    /// Threads of the CPU kernels (sums, compression) of this store
    /// (`PSKV_KVSTORE_REDUCE_THREADS`; default: the cores).
    pub reduce_threads: usize,
    /// The transport settings of a distributed store (default: from the
    /// `DMLC_*` / `PSKV_*` environment when the store is created).
    pub transport: Option<pskv_transport::Config>,
    /// Workers and servers on one host exchange values through shared
    /// segments, the transport carrying only small messages (sync mode;
    /// `PSKV_KVSTORE_SHM=0` turns it off; on with the shm van).
    pub shm_direct: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            bigarray_bound: 1_000_000,
            partition_bytes: 0,
            timeout: Duration::from_secs(600),
            use_tree: false,
            topology: None,
            reduce_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            transport: None,
            shm_direct: true,
        }
    }
}

/// The parts of a key with `PSKV_VAN=tcp`: at most 1 MiB (BENCHMARKS.md,
/// "Parts of 1 MiB over TCP").
pub(crate) const TCP_PARTITION_BYTES: usize = 1 << 20;
/// The parts of a key with the other van settings: at most 4 MiB (as
/// BytePS).
pub(crate) const DEFAULT_PARTITION_BYTES: usize = 4 << 20;

impl Options {
    /// The part size for a store whose van setting is `van`:
    /// `partition_bytes` if set, else 1 MiB for `tcp` and 4 MiB for the
    /// others. Over TCP a round's sum of one part overlaps the transfer
    /// of the next; shared memory moves a part at memory speed, where
    /// smaller parts cost more per byte than they overlap (`auto` links may
    /// be shared memory). Every worker of a job must take the same size:
    /// `init` checks that they do (the part size is part of what the
    /// workers agree on), so workers configured apart get an error there.
    pub fn partition_for(&self, van: pskv_transport::VanKind) -> usize {
        match (self.partition_bytes, van) {
            (0, pskv_transport::VanKind::Tcp) => TCP_PARTITION_BYTES,
            (0, _) => DEFAULT_PARTITION_BYTES,
            (n, _) => n,
        }
    }

    /// The settings of the environment.
    pub fn from_env() -> Result<Options> {
        Options::from_lookup(&|k| std::env::var(k).ok())
    }

    /// The settings of an environment given as a lookup function.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Options> {
        let mut o = Options::default();
        let num = |name: &str, v: String| -> Result<u64> {
            v.trim()
                .parse::<u64>()
                .map_err(|_| KvError::invalid(format!("{name}={v} is not a non-negative integer")))
        };
        let bound = get("PSKV_KVSTORE_BIGARRAY_BOUND")
            .map(|v| ("PSKV_KVSTORE_BIGARRAY_BOUND", v))
            .or_else(|| {
                get("MXNET_KVSTORE_BIGARRAY_BOUND").map(|v| ("MXNET_KVSTORE_BIGARRAY_BOUND", v))
            });
        if let Some((name, v)) = bound {
            o.bigarray_bound = num(name, v)?.max(1) as usize;
        }
        if let Some(v) = get("PSKV_PARTITION_BYTES") {
            let b = num("PSKV_PARTITION_BYTES", v)?;
            if b < 1024 {
                return Err(KvError::invalid(format!(
                    "PSKV_PARTITION_BYTES={b} is too small: use at least 1024"
                )));
            }
            o.partition_bytes = b as usize;
        }
        if let Some(v) = get("PSKV_KVSTORE_TIMEOUT") {
            o.timeout = Duration::from_secs(num("PSKV_KVSTORE_TIMEOUT", v)?.max(1));
        }
        if let Some(v) = get("PSKV_KVSTORE_USETREE").or_else(|| get("MXNET_KVSTORE_USETREE")) {
            o.use_tree = matches!(v.trim(), "1" | "true" | "yes");
        }
        if let Some(v) = get("PSKV_KVSTORE_TOPOLOGY") {
            o.topology = Some(
                Topology::parse(&v)
                    .map_err(|e| KvError::invalid(format!("PSKV_KVSTORE_TOPOLOGY={v}: {e}")))?,
            );
        }
        if let Some(v) = get("PSKV_KVSTORE_SHM") {
            o.shm_direct = !matches!(v.trim(), "0" | "false" | "no" | "off");
        }
        if let Some(v) = get("PSKV_KVSTORE_REDUCE_THREADS") {
            o.reduce_threads = num("PSKV_KVSTORE_REDUCE_THREADS", v)?.max(1) as usize;
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use pskv_transport::VanKind;

    use super::*;

    /// The options of an environment where only `PSKV_PARTITION_BYTES` may
    /// be set.
    fn with_partition(v: Option<&str>) -> Result<Options> {
        Options::from_lookup(&|k| v.filter(|_| k == "PSKV_PARTITION_BYTES").map(String::from))
    }

    /// Unset, the part size follows the van: 1 MiB over TCP, 4 MiB over
    /// the others; set, it holds for every van.
    #[test]
    fn the_part_size_follows_the_van_unless_set() {
        let o = with_partition(None).unwrap();
        assert_eq!(o.partition_bytes, 0);
        assert_eq!(o.partition_for(VanKind::Tcp), 1 << 20);
        for van in [
            VanKind::Shm,
            VanKind::Auto,
            VanKind::Rdma,
            VanKind::RdmaEmulated,
        ] {
            assert_eq!(o.partition_for(van), 4 << 20, "{van:?}");
        }
        let o = with_partition(Some("2097152")).unwrap();
        for van in [VanKind::Tcp, VanKind::Shm, VanKind::Auto] {
            assert_eq!(o.partition_for(van), 2 << 20, "{van:?}");
        }
        assert!(with_partition(Some("100")).is_err());
    }
}
