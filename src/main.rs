//! The `pskv` program.

mod cli;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

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
    /// Time push/pull rounds (4 B to 32 MiB, 100 keys of 40 KiB) on a local cluster.
    Bench(BenchArgs),
    /// Start a scheduler, servers and workers (local, ssh, mpi, slurm).
    Launch,
    /// Run the scheduler of a cluster.
    Scheduler,
    /// Run one parameter server.
    Server,
    /// Show the dependency engine's configuration as read from the environment.
    EngineConfig,
    /// A worker of `pskv bench` (started by it).
    #[command(hide = true)]
    BenchWorker(BenchArgs),
}

#[derive(Args, Clone)]
struct BenchArgs {
    /// Workers.
    #[arg(short = 'w', long, default_value_t = 2)]
    workers: u32,
    /// Servers.
    #[arg(short = 's', long, default_value_t = 1)]
    servers: u32,
    /// Transport: tcp, shm or auto.
    #[arg(long, default_value = "tcp")]
    van: String,
    /// 2-bit gradient compression (threshold 0.5).
    #[arg(long)]
    compress: bool,
    /// A round: `pushpull` (one round trip) or `push-pull` (a push, then a pull).
    #[arg(long, default_value = "pushpull")]
    mode: String,
    /// Cases, comma-separated: 4B, 4KiB, 256KiB, 4MiB, 32MiB, 100x40KiB (default: all).
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Multiplies the number of timed rounds.
    #[arg(long, default_value_t = 1.0)]
    iters_scale: f64,
    /// Also write the workers' results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

impl BenchArgs {
    fn settings(&self) -> Result<cli::bench::BenchSettings, String> {
        if !matches!(self.mode.as_str(), "pushpull" | "push-pull") {
            return Err(format!(
                "--mode {}: expected pushpull or push-pull",
                self.mode
            ));
        }
        if self.workers == 0 || self.servers == 0 {
            return Err("a cluster needs at least one worker and one server".into());
        }
        Ok(cli::bench::BenchSettings {
            workers: self.workers,
            servers: self.servers,
            van: self.van.clone(),
            compress: self.compress,
            mode: self.mode.clone(),
            cases: self.cases.clone(),
            iters_scale: self.iters_scale,
        })
    }
}

fn fail(what: &str, e: String) -> ExitCode {
    eprintln!("pskv {what}: {e}");
    ExitCode::from(1)
}

fn bench(a: &BenchArgs) -> Result<(), String> {
    let s = a.settings()?;
    eprintln!(
        "pskv bench: {} workers, {} servers, van {}, {}{}",
        s.workers,
        s.servers,
        s.van,
        s.mode,
        if s.compress {
            ", 2-bit compression"
        } else {
            ""
        }
    );
    let results = cli::bench::run(&s)?;
    println!("| case | median round | algorithmic bandwidth | check |");
    println!("|---|---:|---:|---|");
    for (case, _bytes, us, gbps, ok) in cli::bench::summary(&results) {
        println!(
            "| {case} | {us:.1} us | {gbps:.3} GB/s | {} |",
            if ok { "ok" } else { "WRONG" }
        );
    }
    if let Some(p) = &a.json {
        let text = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("writing {}: {e}", p.display()))?;
    }
    Ok(())
}

fn not_built(what: &str, issue: u32) -> ExitCode {
    eprintln!(
        "pskv {what}: not available yet (issue {issue}). \
         Try `cargo run --release --example engine_pipeline`, or `pskv bench`."
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo => not_built("demo", 6),
        Command::Bench(a) => match bench(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("bench", e),
        },
        Command::BenchWorker(a) => match a.settings().and_then(|s| cli::bench::worker(&s)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("bench worker", e),
        },
        Command::Launch => not_built("launch", 6),
        Command::Scheduler => match cli::roles::scheduler() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("scheduler", e),
        },
        Command::Server => match cli::roles::server() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("server", e),
        },
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
