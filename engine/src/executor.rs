//! Where ready ops go: the threaded engine's worker pools (CPU, CPU
//! priority, and per GPU a compute and a copy pool, started on first use),
//! or nothing at all for the naive engine, which runs every op at its push.

use std::sync::OnceLock;

use parking_lot::Mutex;

use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::pool::Pool;
use crate::spec::{Context, Property};

/// The highest number of GPU ids an engine serves.
pub const MAX_GPUS: u32 = 64;

/// Where ready ops go.
pub(crate) enum Executor {
    /// Worker pools per device (the threaded engine).
    Threaded(Pools),
    /// Every op runs inline at push (the naive engine).
    Naive,
}

/// The worker pools of the threaded engine. GPU pools start on first use.
pub(crate) struct Pools {
    engine_id: u64,
    pub(crate) cpu: Pool,
    pub(crate) cpu_priority: Pool,
    gpus: Vec<OnceLock<GpuPools>>,
    gpu_start: Mutex<()>,
    gpu_threads: usize,
    gpu_copy_threads: usize,
}

pub(crate) struct GpuPools {
    pub(crate) compute: Pool,
    pub(crate) copy: Pool,
}

impl Pools {
    pub(crate) fn start(engine_id: u64, cfg: &EngineConfig) -> Result<Pools, EngineError> {
        Ok(Pools {
            engine_id,
            cpu: Pool::start(engine_id, "cpu", cfg.cpu_threads)?,
            cpu_priority: Pool::start(engine_id, "cpu-prio", cfg.cpu_priority_threads)?,
            gpus: (0..MAX_GPUS).map(|_| OnceLock::new()).collect(),
            gpu_start: Mutex::new(()),
            gpu_threads: cfg.gpu_threads,
            gpu_copy_threads: cfg.gpu_copy_threads,
        })
    }

    fn gpu(&self, n: u32) -> Result<&GpuPools, EngineError> {
        let slot = &self.gpus[n as usize];
        if let Some(p) = slot.get() {
            return Ok(p);
        }
        let _guard = self.gpu_start.lock();
        if let Some(p) = slot.get() {
            return Ok(p);
        }
        let pools = GpuPools {
            compute: Pool::start(self.engine_id, &format!("gpu{n}"), self.gpu_threads)?,
            copy: Pool::start(
                self.engine_id,
                &format!("gpu{n}-copy"),
                self.gpu_copy_threads,
            )?,
        };
        Ok(slot.get_or_init(|| pools))
    }

    /// The pool an op runs on (None: run inline). Starts GPU pools on first use.
    #[inline]
    pub(crate) fn pool_for(
        &self,
        ctx: Context,
        prop: Property,
    ) -> Result<Option<&Pool>, EngineError> {
        Ok(match (prop, ctx) {
            (Property::Async | Property::DeleteVar, _) => None,
            (Property::CpuPrioritized, Context::Cpu | Context::CpuPinned(_)) => {
                Some(&self.cpu_priority)
            }
            (_, Context::Cpu | Context::CpuPinned(_)) => Some(&self.cpu),
            (Property::CopyToDevice | Property::CopyFromDevice, Context::Gpu(n)) => {
                Some(&self.gpu(n)?.copy)
            }
            (_, Context::Gpu(n)) => Some(&self.gpu(n)?.compute),
        })
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &Pool> {
        [&self.cpu, &self.cpu_priority].into_iter().chain(
            self.gpus
                .iter()
                .filter_map(|g| g.get())
                .flat_map(|g| [&g.compute, &g.copy]),
        )
    }
}
