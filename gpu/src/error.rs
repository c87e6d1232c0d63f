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

    /// A device that does not exist was asked for.
    #[error("device {ordinal} asked for, but there are {have} {what}")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: u32,
        /// How many there are.
        have: usize,
        /// Of which kind.
        what: &'static str,
    },

    /// A buffer of another device was given.
    #[error("{what} is on device {on}, not on device {device}")]
    WrongDevice {
        /// Which buffer.
        what: &'static str,
        /// Its device.
        on: u32,
        /// The device of the call.
        device: u32,
    },

    /// A byte range outside a buffer.
    #[error("{what}: bytes {at}..{at}+{len} are outside the buffer's {have} bytes")]
    Range {
        /// Which copy or buffer.
        what: &'static str,
        /// First byte.
        at: usize,
        /// Bytes.
        len: usize,
        /// The buffer's bytes.
        have: usize,
    },

    /// A setting or an argument that cannot be used.
    #[error("{0}")]
    Config(String),

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
