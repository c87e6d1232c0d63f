//! Which GPUs `pskv demo --device gpu` and `pskv bench --device gpu` put
//! their workers on: worker r on GPU r modulo the GPUs there are (the CUDA
//! devices when `PSKV_GPU` picks CUDA, else the emulated device's).

use pskv::engine::Context;
use pskv::gpu::device::{self, Backend};

use super::error::{CliError, CliResult};

/// What the GPUs are, for banners and tables.
pub fn name() -> &'static str {
    match cuda() {
        Ok(None) => "emulated GPUs (PSKV_GPU, or no CUDA device here)",
        _ => "CUDA GPUs",
    }
}

/// How many GPUs there are to spread workers over.
pub fn count() -> CliResult<usize> {
    Ok(cuda()?.unwrap_or(device::EMULATED_DEVICES as usize))
}

/// Where worker `rank`'s tensors live.
pub fn of_rank(rank: usize) -> CliResult<Context> {
    Ok(Context::Gpu((rank % count()?) as u32))
}

/// The CUDA devices `PSKV_GPU` picks (None: the emulated device).
fn cuda() -> CliResult<Option<usize>> {
    let cuda = match Backend::from_env()? {
        Backend::Emulated => false,
        Backend::Cuda => true,
        Backend::Auto => device::cuda_devices().is_ok_and(|n| n > 0),
    };
    if !cuda {
        return Ok(None);
    }
    match device::cuda_devices() {
        Ok(n) if n > 0 => Ok(Some(n)),
        Ok(_) => Err(CliError::Usage(
            "PSKV_GPU asks for CUDA, but there is no CUDA device".into(),
        )),
        Err(e) => Err(e.into()),
    }
}
