//! The `pskv` program.

mod cli;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use cli::error::{CliError, CliResult};

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
    Demo(DemoArgs),
    /// A worker of `pskv demo` (started by it).
    #[command(hide = true)]
    DemoWorker(DemoArgs),
    /// Time push/pull rounds (4 B to 32 MiB, 100 keys of 40 KiB) on a local cluster.
    Bench(BenchArgs),
    /// Start a scheduler, servers and workers (local, ssh, mpi, slurm).
    Launch(LaunchArgs),
    /// Run the scheduler of a cluster.
    Scheduler,
    /// Run one parameter server.
    Server,
    /// Show the dependency engine's configuration as read from the environment.
    EngineConfig,
    /// Work with profiles (`PSKV_PROFILE`).
    #[command(subcommand)]
    Trace(TraceCommand),
    /// A running job's nodes as its scheduler sees them: heartbeats,
    /// traffic, rounds and the slowest key (never disturbs the job).
    Status(StatusArgs),
    /// The helper of `pskv launch` that stops a job whose launcher died.
    #[command(hide = true)]
    LaunchWatchdog,
    /// A worker of `pskv bench` (started by it).
    #[command(hide = true)]
    BenchWorker(BenchArgs),
}

#[derive(Subcommand)]
enum TraceCommand {
    /// Put the profiles of a job's processes (`PSKV_PROFILE=DIR/` writes one
    /// per process) on one timeline, one track group per process.
    Merge {
        /// The directory of the profiles.
        dir: std::path::PathBuf,
        /// The merged trace (Chrome trace JSON; Perfetto opens it).
        #[arg(short = 'o', long, default_value = "job.json")]
        out: std::path::PathBuf,
    },
}

#[derive(Args)]
struct StatusArgs {
    /// The scheduler, HOST:PORT (the token from PSKV_TOKEN). Default: the
    /// DMLC_PS_ROOT_* variables inside a job, else the one job of
    /// `pskv launch` running for this user.
    #[arg(long, value_name = "HOST:PORT")]
    scheduler: Option<String>,
    /// The job of `pskv launch` whose launcher has this pid.
    #[arg(long, value_name = "PID")]
    job: Option<u32>,
    /// JSON, one object per report and line.
    #[arg(long)]
    json: bool,
    /// Report again every SECS seconds (default 1) until the job ends.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
    watch: Option<f64>,
    /// With --watch: stop after N reports.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Seconds one question to the scheduler may take.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
}

impl StatusArgs {
    fn run(&self) -> CliResult {
        let secs = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v < 1e9 {
                Ok(std::time::Duration::from_secs_f64(v))
            } else {
                Err(CliError::Usage(format!(
                    "--{name} {v}: expected a positive number of seconds"
                )))
            }
        };
        let report = cli::status::Report {
            json: self.json,
            every: self.watch.map(|w| secs("watch", w)).transpose()?,
            count: self.count,
            timeout: secs("timeout", self.timeout)?,
        };
        if self.count.is_some() && report.every.is_none() {
            return Err(CliError::Usage("--count needs --watch".into()));
        }
        let target = cli::status::Target {
            scheduler: self.scheduler.clone(),
            job: self.job,
        };
        cli::status::run(&target, &report)
    }
}

#[derive(Args, Clone)]
struct DemoArgs {
    /// Workers.
    #[arg(short = 'w', long, default_value_t = 4)]
    workers: u32,
    /// Servers.
    #[arg(short = 's', long, default_value_t = 2)]
    servers: u32,
    /// Passes over the 8,192 training samples.
    #[arg(long, default_value_t = 10)]
    epochs: u32,
    /// Samples per worker per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Learning rate (SGD with momentum 0.9 on the servers).
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// 2-bit gradient compression, with this threshold.
    #[arg(long, value_name = "THRESHOLD", num_args = 0..=1, default_missing_value = "2")]
    compress: Option<f32>,
    /// Transport.
    #[arg(long, value_enum, default_value_t = cli::VanArg::Tcp)]
    van: cli::VanArg,
    /// Where weights and gradients live: cpu, or gpu (worker r on GPU r;
    /// the emulated device where there is none: PSKV_GPU).
    #[arg(long, value_enum, default_value_t = cli::DeviceArg::Cpu)]
    device: cli::DeviceArg,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// (worker) where rank 0 writes the final weights.
    #[arg(long, hide = true)]
    weights_out: Option<std::path::PathBuf>,
}

impl DemoArgs {
    fn settings(&self) -> cli::demo::DemoSettings {
        cli::demo::DemoSettings {
            workers: self.workers,
            servers: self.servers,
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            compress: self.compress,
            van: self.van.as_str().into(),
            gpu: self.device == cli::DeviceArg::Gpu,
            device: self.device.as_str().into(),
        }
    }
}

#[derive(Args, Clone)]
struct LaunchArgs {
    /// Workers.
    #[arg(short = 'n', long = "num-workers")]
    workers: u32,
    /// Servers (default: as many as workers, as MXNet's launch.py).
    #[arg(short = 's', long = "num-servers")]
    servers: Option<u32>,
    /// local, ssh, mpi (run under mpirun) or slurm (run under srun).
    #[arg(long, value_enum, default_value_t = cli::launch::Launcher::Local)]
    launcher: cli::launch::Launcher,
    /// ssh: the hosts, one per line (`host`, `host slots=N` or `host:N`).
    #[arg(short = 'H', long)]
    hostfile: Option<std::path::PathBuf>,
    /// An environment variable for every process (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// The scheduler's address as the nodes reach it (ssh, mpi, slurm).
    #[arg(long)]
    root_uri: Option<String>,
    /// Stop the job if the workers have not finished after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Start a dead server again, from its checkpoint, up to N times in all
    /// (local, ssh). Checkpoints go to PSKV_CHECKPOINT_DIR, or for a local
    /// job to a directory of its own.
    #[arg(long, value_name = "N", default_value_t = 0)]
    restart_servers: u32,
    /// Copies of every server's keys: 2 keeps each on the next server too,
    /// so that a server's death loses no round and needs no restart (sets
    /// PSKV_REPLICAS for every process).
    #[arg(long, value_name = "N")]
    replicas: Option<u32>,
    /// Place the workers on this host's cores: `cores` gives each its own
    /// (blocks of the CPUs this launcher may use; one each, round-robin,
    /// when there are more workers than CPUs); servers stay free. Local
    /// launcher only.
    #[arg(long, value_enum, default_value_t = cli::launch::Bind::None)]
    bind: cli::launch::Bind,
    /// The worker command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<std::ffi::OsString>,
}

fn launch(a: &LaunchArgs) -> ExitCode {
    use cli::launch::{exec_rank, read_hostfile, stop_flag, Job, JobSpec, Launcher};
    let fail = |msg: String, code: u8| {
        eprintln!("pskv launch: {msg}");
        ExitCode::from(code)
    };
    let launcher = a.launcher;
    let mut env = Vec::new();
    for kv in &a.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_string(), v.to_string())),
            _ => return fail(format!("--env {kv}: expected KEY=VALUE"), 2),
        }
    }
    if let Some(r) = a.replicas {
        env.push(("PSKV_REPLICAS".into(), r.to_string()));
    }
    let mut spec = JobSpec::local(a.workers, a.servers.unwrap_or(a.workers), a.command.clone());
    spec.env = env;
    spec.root_uri = a.root_uri.clone();
    spec.server_restarts = a.restart_servers;
    spec.bind = a.bind;
    match launcher {
        Launcher::Mpi | Launcher::Slurm if spec.server_restarts > 0 => {
            return fail(
                "--restart-servers works with the local and ssh launchers; under mpirun or srun the job's manager owns the processes".into(),
                2,
            );
        }
        Launcher::Mpi | Launcher::Slurm if spec.bind != cli::launch::Bind::None => {
            return fail(cli::launch::BIND_HERE_ONLY.into(), 2);
        }
        Launcher::Mpi | Launcher::Slurm => {
            let f = exec_rank(&spec, launcher);
            return fail(f.message, f.code);
        }
        Launcher::Ssh => match &a.hostfile {
            Some(h) => match read_hostfile(h) {
                Ok(hosts) => spec.hosts = hosts,
                Err(e) => return fail(e.to_string(), 2),
            },
            None => return fail("the ssh launcher needs a hostfile (-H FILE)".into(), 2),
        },
        Launcher::Local => {}
    }
    let stop = match stop_flag() {
        Ok(s) => s,
        Err(e) => return fail(e.to_string(), 1),
    };
    let mut job = match Job::start(&spec, launcher) {
        Ok(j) => j,
        // 2 for a job asked for wrongly, 1 for one that failed to start.
        Err(e) => {
            let code = if matches!(e, CliError::Usage(_)) {
                2
            } else {
                1
            };
            return fail(e.to_string(), code);
        }
    };
    match job.supervise(&stop, a.timeout.map(std::time::Duration::from_secs)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => fail(f.message, f.code),
    }
}

#[derive(Args, Clone)]
struct BenchArgs {
    /// Workers per run, comma-separated; paired with --servers.
    #[arg(short = 'w', long, value_delimiter = ',', default_values_t = [2u32, 4])]
    workers: Vec<u32>,
    /// Servers per run, comma-separated; paired with --workers.
    #[arg(short = 's', long, value_delimiter = ',', default_values_t = [1u32, 2])]
    servers: Vec<u32>,
    /// Transports to sweep, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [cli::VanArg::Tcp, cli::VanArg::Shm])]
    van: Vec<cli::VanArg>,
    /// 2-bit gradient compression (threshold 0.5).
    #[arg(long)]
    compress: bool,
    /// Where the tensors live: cpu, or gpu (worker r on GPU r, through
    /// dist_sync_device; the emulated device where there is none: PSKV_GPU).
    #[arg(long, value_enum, default_value_t = cli::DeviceArg::Cpu)]
    device: cli::DeviceArg,
    /// A round: `pushpull` (one round trip) or `push-pull` (a push, then a pull).
    #[arg(long, value_enum, default_value_t = cli::ModeArg::Pushpull)]
    mode: cli::ModeArg,
    /// Cases, comma-separated: 4B, 4KiB, 256KiB, 4MiB, 32MiB, 100x40KiB (default: all,
    /// or none with --model).
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// A model's whole gradient set as one more case: inception-v3 (292 tensors,
    /// 108.6 MB), issued last layer first, gradient i at priority -i.
    #[arg(long)]
    model: Option<String>,
    /// Print the model's tensors (name and shape, in parameter order) as JSON
    /// and exit: what the peers' scripts push.
    #[arg(long, requires = "model")]
    print_tensors: bool,
    /// Place the workers on this host's cores, as `pskv launch --bind`:
    /// `cores` gives each its own (servers stay free).
    #[arg(long, value_enum, default_value_t = cli::launch::Bind::None)]
    bind: cli::launch::Bind,
    /// Push each key from its push buffer (`KvStore::push_buffer`: over shm,
    /// the worker's slots of the key's segments, so a push copies nothing)
    /// instead of an ordinary tensor.
    #[arg(long)]
    push_buffers: bool,
    /// Multiplies the number of timed rounds.
    #[arg(long, default_value_t = 1.0)]
    iters_scale: f64,
    /// Where the JSON results and the chart go.
    #[arg(long, default_value = "pskv-bench")]
    out: std::path::PathBuf,
    /// Write the JSON results here instead of OUT/bench.json.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

impl BenchArgs {
    /// One settings per (workers, servers) pair and transport.
    fn runs(&self) -> CliResult<Vec<cli::bench::BenchSettings>> {
        if self.workers.len() != self.servers.len() {
            return Err(CliError::Usage(format!(
                "--workers and --servers pair up: {} values against {}",
                self.workers.len(),
                self.servers.len()
            )));
        }
        if !(self.iters_scale > 0.0 && self.iters_scale.is_finite()) {
            return Err(CliError::Usage(format!(
                "--iters-scale {}: expected a positive number",
                self.iters_scale
            )));
        }
        cli::bench::case_count(&self.cases, self.model.as_deref())?;
        if self.push_buffers && self.device == cli::DeviceArg::Gpu {
            return Err(CliError::Usage(
                "--push-buffers: push buffers are host memory; not with --device gpu".into(),
            ));
        }
        let gpu = match self.device {
            cli::DeviceArg::Cpu => false,
            cli::DeviceArg::Gpu => {
                cli::gpus::count().map_err(|e| CliError::Usage(format!("--device gpu: {e}")))?;
                true
            }
        };
        let mut runs = Vec::new();
        for (&w, &s) in self.workers.iter().zip(&self.servers) {
            if w == 0 || s == 0 {
                return Err(CliError::Usage(
                    "a cluster needs at least one worker and one server".into(),
                ));
            }
            for van in &self.van {
                runs.push(cli::bench::BenchSettings {
                    workers: w,
                    servers: s,
                    van: van.as_str().into(),
                    compress: self.compress,
                    mode: self.mode.as_str().into(),
                    cases: self.cases.clone(),
                    model: self.model.clone(),
                    iters_scale: self.iters_scale,
                    gpu,
                    bind: self.bind,
                    push_buffers: self.push_buffers,
                });
            }
        }
        if runs.is_empty() {
            return Err(CliError::Usage(
                "nothing to run: give at least one --workers/--servers pair and --van".into(),
            ));
        }
        Ok(runs)
    }
}

fn fail(what: &str, e: CliError) -> ExitCode {
    eprintln!("pskv {what}: {e}");
    ExitCode::from(1)
}

fn bench(a: &BenchArgs) -> CliResult {
    use indicatif::{ProgressBar, ProgressStyle};
    use std::io::IsTerminal;
    if let (true, Some(m)) = (a.print_tensors, &a.model) {
        // One tensor a line.
        let lines = cli::bench::model::params(m)?
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CliError::Failed(format!("encoding the tensors: {e}")))?;
        println!("[\n{}\n]", lines.join(",\n"));
        return Ok(());
    }
    let runs = a.runs()?;
    let per_run = cli::bench::case_count(&a.cases, a.model.as_deref())?;
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new((runs.len() * per_run) as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} cases {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut all = Vec::new();
    for s in &runs {
        let what = format!(
            "{} workers, {} servers, {}, {}{}{}",
            s.workers,
            s.servers,
            s.van,
            s.mode,
            if s.compress { ", 2-bit" } else { "" },
            if s.gpu {
                format!(", tensors on {}", cli::gpus::name())
            } else {
                String::new()
            }
        );
        bar.set_message(what.clone());
        if bar.is_hidden() {
            eprintln!("pskv bench: {what}");
        }
        let b = bar.clone();
        let results = cli::bench::run(
            s,
            std::sync::Arc::new(move |line: &str| {
                if line.starts_with("CASE ") {
                    b.inc(1);
                }
            }),
        )?;
        all.push(results);
    }
    bar.finish_and_clear();
    println!("| workers | servers | van | case | median round | algorithmic bandwidth | check |");
    println!("|---:|---:|---|---|---:|---:|---|");
    for (s, results) in runs.iter().zip(&all) {
        for (case, _bytes, us, gbps, ok) in cli::bench::summary(results) {
            println!(
                "| {} | {} | {}{}{}{}{} | {case} | {us:.1} us | {gbps:.3} GB/s | {} |",
                s.workers,
                s.servers,
                s.van,
                if s.compress { " 2-bit" } else { "" },
                if s.gpu { " gpu" } else { "" },
                if s.bind == cli::launch::Bind::Cores {
                    " bound"
                } else {
                    ""
                },
                if s.push_buffers { " push-buffers" } else { "" },
                if ok { "ok" } else { "WRONG" }
            );
        }
    }
    std::fs::create_dir_all(&a.out)
        .map_err(CliError::io(format!("creating {}", a.out.display())))?;
    let json = a.json.clone().unwrap_or_else(|| a.out.join("bench.json"));
    let flat: Vec<&cli::bench::WorkerResult> = all.iter().flatten().collect();
    let text = serde_json::to_string_pretty(&flat)
        .map_err(|e| CliError::Failed(format!("encoding the results: {e}")))?;
    std::fs::write(&json, text).map_err(CliError::io(format!("writing {}", json.display())))?;
    match cli::bench::charts(&all, &a.out)? {
        Some((bw, lat)) => eprintln!(
            "pskv bench: results in {}, charts in {} and {}",
            json.display(),
            bw.display(),
            lat.display()
        ),
        None => eprintln!("pskv bench: results in {}", json.display()),
    }
    if all
        .iter()
        .flat_map(|r| cli::bench::summary(r))
        .any(|(.., ok)| !ok)
    {
        return Err(CliError::Failed(
            "a correctness check failed (a WRONG row above)".into(),
        ));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    pskv::logging::init();
    match cli.command {
        Command::Demo(a) => {
            match cli::demo::run(&a.settings(), std::time::Duration::from_secs(a.timeout)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail("demo", e),
            }
        }
        Command::DemoWorker(a) => {
            match cli::demo::worker(&a.settings(), a.weights_out.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail("demo worker", e),
            }
        }
        Command::Bench(a) => match bench(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("bench", e),
        },
        Command::BenchWorker(a) => match a
            .runs()
            .and_then(|r| {
                r.into_iter()
                    .next()
                    .ok_or_else(|| CliError::Usage("no run".into()))
            })
            .and_then(|s| cli::bench::worker(&s))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("bench worker", e),
        },
        Command::Launch(a) => launch(&a),
        Command::LaunchWatchdog => {
            cli::launch::watchdog_main();
            ExitCode::SUCCESS
        }
        Command::Scheduler => match cli::roles::scheduler() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("scheduler", e),
        },
        Command::Server => match cli::roles::server() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("server", e),
        },
        Command::Trace(TraceCommand::Merge { dir, out }) => {
            match cli::trace::merge_to(&dir, &out) {
                Ok(n) => {
                    eprintln!(
                        "pskv trace merge: {n} processes of {} in {}",
                        dir.display(),
                        out.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail("trace merge", e),
            }
        }
        Command::Status(a) => match a.run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("status", e),
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
