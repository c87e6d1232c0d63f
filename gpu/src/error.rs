//! The errors of the kernels.

/// What a kernel call can report. Kernels never panic on bad arguments.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Two buffers that must agree in length do not.
    #[error("{kernel}: {what} has {got} elements, expected {expected}")]
    Length {
        /// The kernel.
        kernel: &'static str,
        /// Which buffer.
        what: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        got: usize,
    },

    /// A sum needs at least one input.
    #[error("{kernel}: no inputs to reduce")]
    NoInputs {
        /// The kernel.
        kernel: &'static str,
    },

    /// The compression threshold is not usable.
    #[error("{kernel}: threshold {threshold} is invalid: {reason}")]
    Threshold {
        /// The kernel.
        kernel: &'static str,
        /// The threshold given.
        threshold: f32,
        /// What is required.
        reason: &'static str,
    },

    /// CUDA cannot be used on this machine (no driver, no NVRTC, no device,
    /// or pskv was built without the `cuda` feature). Callers fall back to the
    /// CPU kernels.
    #[error("CUDA is unavailable: {0}")]
    CudaUnavailable(String),

    /// A CUDA call failed.
    #[error("CUDA error in {context}: {message}")]
    Cuda {
        /// What was being done.
        context: &'static str,
        /// The driver's or NVRTC's message.
        message: String,
    },

    /// The thread pool for the CPU kernels could not be built.
    #[error("could not start {threads} kernel threads: {message}")]
    Threads {
        /// Threads asked for.
        threads: usize,
        /// Why it failed.
        message: String,
    },
}

pub(crate) fn check_len(
    kernel: &'static str,
    what: &'static str,
    expected: usize,
    got: usize,
) -> Result<(), KernelError> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::Length {
            kernel,
            what,
            expected,
            got,
        })
    }
}
