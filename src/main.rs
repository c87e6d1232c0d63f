//! The `pskv` program.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pskv",
    version,
    about = "A parameter-server stack for distributed training"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a small model with 4 workers and 2 servers on this host.
    Demo,
    /// Sweep push/pull bandwidth over message sizes, transports and cluster shapes.
    Bench,
    /// Start a scheduler, servers and workers (local, ssh, mpi, slurm).
    Launch,
    /// Run the scheduler of a cluster.
    Scheduler,
    /// Run one parameter server.
    Server,
    /// Show the dependency engine's configuration as read from the environment.
    EngineConfig,
}

fn not_built(what: &str, issue: u32) -> ExitCode {
    eprintln!(
        "pskv {what}: not available yet. It needs the kvstore and program issues \
         (issue {issue}); today pskv ships the dependency engine only. \
         Try `cargo run --release --example engine_pipeline`."
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo => not_built("demo", 6),
        Command::Bench => not_built("bench", 6),
        Command::Launch => not_built("launch", 6),
        Command::Scheduler => not_built("scheduler", 6),
        Command::Server => not_built("server", 6),
        Command::EngineConfig => match pskv::engine::EngineBuilder::from_env() {
            Ok(b) => {
                println!("{:#?}", b.config());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pskv engine-config: {e}");
                ExitCode::from(2)
            }
        },
    }
}
