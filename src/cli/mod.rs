//! The subcommands of the `pskv` program.

pub mod bench;
pub mod chart;
pub mod demo;
pub mod error;
pub mod gpus;
pub mod launch;
pub mod roles;
pub mod status;
pub mod trace;

/// What `--van` takes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VanArg {
    /// TCP sockets.
    Tcp,
    /// Shared memory between processes of one host.
    Shm,
    /// Shared memory where the peers share a host, else TCP.
    Auto,
}

impl VanArg {
    /// As `PSKV_VAN` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            VanArg::Tcp => "tcp",
            VanArg::Shm => "shm",
            VanArg::Auto => "auto",
        }
    }
}

/// What `--device` takes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// Host memory.
    Cpu,
    /// GPU contexts (worker r on GPU r; the emulated device where there is
    /// none: `PSKV_GPU`).
    Gpu,
}

impl DeviceArg {
    /// Its name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceArg::Cpu => "cpu",
            DeviceArg::Gpu => "gpu",
        }
    }
}

/// What `pskv bench --mode` takes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// One round trip: a push-pull.
    Pushpull,
    /// A push, then a pull.
    PushPull,
}

impl ModeArg {
    /// Its name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ModeArg::Pushpull => "pushpull",
            ModeArg::PushPull => "push-pull",
        }
    }
}
