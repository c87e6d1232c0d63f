//! `pskv demo`: trains the MLP of `mlp.rs` on the spirals of `data.rs` with
//! W worker processes and S server processes on this host (dist_sync, or
//! dist_sync_device with the tensors on GPUs with `--device gpu`; the
//! optimizer on the servers), shows a progress bar per epoch, and checks
//! that the final weights equal, bit for bit, those of a single-process
//! store fed the same gradients.
//!
//! The workers (`pskv demo-worker`, started through `launch::Job`) talk to
//! the launcher on stdout, one line per event: `STEP epoch step loss acc`
//! and `EPOCH epoch loss acc test_acc` from rank 0, `DONE samples secs` from
//! every worker. Rank 0 writes the final weights (f32, little-endian, key
//! order) to the file the launcher names.

pub mod data;
pub mod mlp;

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use pskv::engine::{Context, Engine};
use pskv::kvstore::{Compression, Key, KvStore, Optimizer, Tensor};

use super::error::{CliError, CliResult};
use super::launch::{stop_flag, Job, JobSpec, Launcher};
use data::{spirals, Rng};

/// Training samples, held-out samples.
const TRAIN: usize = 8192;
const TEST: usize = 2048;
const TRAIN_SEED: u64 = 1;
const TEST_SEED: u64 = 2;
const INIT_SEED: u64 = 3;

/// The demo's settings (`pskv demo` options, passed on to the workers).
#[derive(Clone, Debug)]
pub struct DemoSettings {
    /// Worker processes.
    pub workers: u32,
    /// Server processes.
    pub servers: u32,
    /// Passes over the training set.
    pub epochs: u32,
    /// Samples per worker per step.
    pub batch: usize,
    /// Learning rate.
    pub lr: f64,
    /// 2-bit gradient compression with this threshold.
    pub compress: Option<f32>,
    /// tcp, shm or auto.
    pub van: String,
    /// Weights and gradients on GPUs (worker r on GPU r, modulo the GPUs
    /// there are); the reference then reduces on the devices too.
    pub gpu: bool,
    /// As given: cpu or gpu (checked by `validate`).
    pub device: String,
}

impl DemoSettings {
    fn optimizer(&self) -> Optimizer {
        Optimizer::sgd(self.lr)
            .momentum(0.9)
            .wd(1e-4)
            .rescale_grad(1.0 / (self.batch as f64 * self.workers as f64))
    }

    fn steps_per_epoch(&self) -> usize {
        TRAIN / (self.batch * self.workers as usize)
    }

    /// The arguments that give a worker these settings.
    fn worker_args(&self) -> Vec<String> {
        let mut a = vec![
            "--workers".into(),
            self.workers.to_string(),
            "--servers".into(),
            self.servers.to_string(),
            "--epochs".into(),
            self.epochs.to_string(),
            "--batch".into(),
            self.batch.to_string(),
            "--lr".into(),
            self.lr.to_string(),
            "--van".into(),
            self.van.clone(),
            "--device".into(),
            self.device.clone(),
        ];
        if let Some(t) = self.compress {
            a.push("--compress".into());
            a.push(t.to_string());
        }
        a
    }

    /// Checks the settings.
    pub fn validate(&self) -> CliResult {
        if self.workers == 0 || self.servers == 0 {
            return Err(CliError::Usage(
                "the demo needs at least one worker and one server".into(),
            ));
        }
        if self.batch == 0 || self.steps_per_epoch() == 0 {
            return Err(CliError::Usage(format!(
                "--batch {} with {} workers leaves no step in an epoch of {TRAIN} samples",
                self.batch, self.workers
            )));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(CliError::Usage(format!(
                "--lr {}: expected a positive number",
                self.lr
            )));
        }
        if !matches!(self.van.as_str(), "tcp" | "shm" | "auto") {
            return Err(CliError::Usage(format!(
                "--van {}: expected tcp, shm or auto",
                self.van
            )));
        }
        if !matches!(self.device.as_str(), "cpu" | "gpu") || self.gpu != (self.device == "gpu") {
            return Err(CliError::Usage(format!(
                "--device {}: expected cpu or gpu",
                self.device
            )));
        }
        Ok(())
    }

    /// Where worker `rank`'s tensors live.
    fn ctx(&self, rank: usize) -> CliResult<Context> {
        if !self.gpu {
            return Ok(Context::Cpu);
        }
        super::gpus::of_rank(rank)
    }
}

/// The samples worker `rank` trains on at `step` of `epoch`.
fn shard(order: &[usize], s: &DemoSettings, step: usize, rank: usize) -> Vec<usize> {
    let start = (step * s.workers as usize + rank) * s.batch;
    order[start..start + s.batch].to_vec()
}

fn epoch_order(epoch: u32) -> Vec<usize> {
    Rng::new(1000 + epoch as u64).permutation(TRAIN)
}

fn tensors(e: &Engine, params: &[Vec<f32>], ctx: Context) -> CliResult<Vec<Tensor>> {
    mlp::shapes()
        .iter()
        .zip(params)
        .map(|(shape, v)| Ok(Tensor::from_slice(e, shape, v, ctx)?))
        .collect()
}

fn read_all(ts: &[Tensor]) -> CliResult<Vec<Vec<f32>>> {
    ts.iter().map(|t| Ok(t.to_vec::<f32>()?)).collect()
}

/// One worker of the demo (`pskv demo-worker`, DMLC_* from the launcher).
pub fn worker(s: &DemoSettings, weights_out: Option<&Path>) -> CliResult {
    let engine = Engine::new()?;
    // On GPUs, as MXNet's GPU training: the device kind (one value per key
    // here, so no reduction on the worker; sends go through pinned memory).
    let kind = if s.gpu {
        "dist_sync_device"
    } else {
        "dist_sync"
    };
    let kv = KvStore::create(kind, &engine)?;
    let rank = kv.rank() as usize;
    let ctx = s.ctx(rank)?;
    if kv.num_workers() != s.workers {
        return Err(CliError::Failed(format!(
            "the cluster has {} workers, the settings say {}",
            kv.num_workers(),
            s.workers
        )));
    }
    if let Some(t) = s.compress {
        kv.set_gradient_compression(Compression::two_bit(t))?;
    }
    let train = spirals(TRAIN, TRAIN_SEED);
    let test = spirals(TEST, TEST_SEED);
    let weights = tensors(&engine, &mlp::init(INIT_SEED), ctx)?;
    for (k, w) in weights.iter().enumerate() {
        kv.init(k as i64, w)?;
    }
    kv.set_optimizer(s.optimizer())?;
    // Every worker starts from the servers' values.
    for (k, w) in weights.iter().enumerate() {
        kv.pull(k as i64, std::slice::from_ref(w), 0)?;
    }
    let grads: Vec<Tensor> = weights
        .iter()
        .map(|w| w.zeros_like(ctx))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let mut samples = 0usize;
    for epoch in 0..s.epochs {
        let order = epoch_order(epoch);
        let (mut loss_sum, mut right, mut seen) = (0.0f64, 0usize, 0usize);
        for step in 0..s.steps_per_epoch() {
            let params = read_all(&weights)?;
            let idx = shard(&order, s, step, rank);
            let (g, loss, ok) = mlp::gradients(&params, &train, &idx);
            let mut items: Vec<(Key, Vec<Tensor>, Vec<Tensor>)> = Vec::new();
            for (k, gk) in g.iter().enumerate() {
                grads[k].copy_from_slice(gk)?;
                items.push((
                    Key::from(k as u32),
                    vec![grads[k].clone()],
                    vec![weights[k].clone()],
                ));
            }
            kv.pushpull_many(&items, 0)?;
            samples += idx.len();
            loss_sum += loss as f64;
            right += ok;
            seen += idx.len();
            if rank == 0 {
                println!(
                    "STEP {epoch} {step} {:.5} {:.5}",
                    loss_sum / seen as f64,
                    right as f64 / seen as f64
                );
            }
        }
        if rank == 0 {
            let (_, test_acc) = mlp::evaluate(&read_all(&weights)?, &test);
            println!(
                "EPOCH {epoch} {:.5} {:.5} {test_acc:.5}",
                loss_sum / seen as f64,
                right as f64 / seen as f64
            );
        }
    }
    let params = read_all(&weights)?;
    let secs = started.elapsed().as_secs_f64();
    if let (0, Some(path)) = (rank, weights_out) {
        let bytes: Vec<u8> = params
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(path, bytes).map_err(CliError::io(format!("writing {}", path.display())))?;
    }
    println!("DONE {samples} {secs:.6}");
    kv.close()?;
    Ok(())
}

/// The same training in one process: a local store (a device store when
/// compressing, or on GPUs), each step pushing the W workers' gradients as
/// W values of one key (summed in rank order, as the servers do; on GPUs,
/// value r on worker r's GPU, summed on the device), compressed the same
/// way when asked.
pub fn reference(s: &DemoSettings) -> CliResult<Vec<Vec<f32>>> {
    let engine = Engine::new()?;
    // A local store does not compress (as in MXNet); a device store with
    // host contexts standing in for devices does, per value.
    let kind = if s.compress.is_some() || s.gpu {
        "device"
    } else {
        "local"
    };
    let kv = KvStore::create(kind, &engine)?;
    if let Some(t) = s.compress {
        kv.set_gradient_compression(Compression::two_bit(t))?;
    }
    let train = spirals(TRAIN, TRAIN_SEED);
    let weights = tensors(&engine, &mlp::init(INIT_SEED), s.ctx(0)?)?;
    for (k, w) in weights.iter().enumerate() {
        kv.init(k as i64, w)?;
    }
    kv.set_optimizer(s.optimizer())?;
    let w = s.workers as usize;
    let grads: Vec<Vec<Tensor>> = weights
        .iter()
        .map(|t| {
            (0..w)
                .map(|r| Ok(t.zeros_like(s.ctx(r)?)?))
                .collect::<CliResult<Vec<_>>>()
        })
        .collect::<CliResult<_>>()?;
    for epoch in 0..s.epochs {
        let order = epoch_order(epoch);
        for step in 0..s.steps_per_epoch() {
            let params = read_all(&weights)?;
            let per_worker: Vec<Vec<Vec<f32>>> = (0..w)
                .map(|r| mlp::gradients(&params, &train, &shard(&order, s, step, r)).0)
                .collect();
            for (k, slots) in grads.iter().enumerate() {
                for (slot, g) in slots.iter().zip(&per_worker) {
                    slot.copy_from_slice(&g[k])?;
                }
            }
            for (k, wk) in weights.iter().enumerate() {
                kv.push(k as i64, &grads[k], 0)?;
                kv.pull(k as i64, std::slice::from_ref(wk), 0)?;
            }
        }
    }
    read_all(&weights)
}

/// What the launcher learned from rank 0.
#[derive(Default)]
struct Report {
    epochs: Vec<(f64, f64, f64)>,
    done: Vec<(usize, f64)>,
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos:>3}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Reads rank 0's lines, drawing a bar per epoch.
fn follow(out: impl std::io::Read, s: &DemoSettings) -> Report {
    let tty = std::io::stderr().is_terminal();
    let steps = s.steps_per_epoch() as u64;
    let mut rep = Report::default();
    let mut bar: Option<ProgressBar> = None;
    for line in std::io::BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["STEP", e, st, loss, acc] => {
                let (e, st): (u32, u64) = (e.parse().unwrap_or(0), st.parse().unwrap_or(0));
                let b = bar.get_or_insert_with(|| {
                    let b = if tty {
                        ProgressBar::new(steps)
                    } else {
                        ProgressBar::hidden()
                    };
                    b.set_style(bar_style());
                    b.set_prefix(format!("epoch {}/{}", e + 1, s.epochs));
                    b
                });
                b.set_position(st + 1);
                b.set_message(format!("loss {loss} acc {acc}"));
            }
            ["EPOCH", e, loss, acc, test] => {
                let p = |x: &str| x.parse::<f64>().unwrap_or(f64::NAN);
                let (loss, acc, test) = (p(loss), p(acc), p(test));
                let msg = format!(
                    "loss {loss:.4}  train acc {:5.1}%  test acc {:5.1}%",
                    acc * 100.0,
                    test * 100.0
                );
                match bar.take() {
                    Some(b) if tty => b.finish_with_message(msg),
                    _ => eprintln!(
                        "{:>12} {msg}",
                        format!("epoch {}/{}", e.parse::<u32>().unwrap_or(0) + 1, s.epochs)
                    ),
                }
                rep.epochs.push((loss, acc, test));
            }
            ["DONE", n, secs] => {
                rep.done
                    .push((n.parse().unwrap_or(0), secs.parse().unwrap_or(f64::NAN)));
            }
            _ => {}
        }
    }
    rep
}

/// The launcher side: runs the job, then the single-process reference,
/// prints the summary. Fails when the job fails or the weights differ.
pub fn run(s: &DemoSettings, timeout: Duration) -> CliResult {
    s.validate()?;
    if s.gpu {
        super::gpus::count().map_err(|e| CliError::Usage(format!("--device gpu: {e}")))?;
    }
    let params: usize = mlp::init(INIT_SEED).iter().map(Vec::len).sum();
    let layers: Vec<String> = mlp::LAYERS.iter().map(|n| n.to_string()).collect();
    eprintln!(
        "pskv demo: an MLP ({}, {params} parameters) learning {} classes of spiral arms \
         from {TRAIN} samples;\n           {} workers, {} servers on this host, {} over {}, \
         SGD with momentum on the servers{}",
        layers.join("-"),
        data::CLASSES,
        s.workers,
        s.servers,
        if s.gpu {
            format!("dist_sync_device with tensors on {}", super::gpus::name())
        } else {
            "dist_sync".into()
        },
        s.van,
        match s.compress {
            Some(t) => format!(", 2-bit gradient compression (threshold {t})"),
            None => String::new(),
        }
    );
    let dir = std::env::temp_dir().join(format!("pskv-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(CliError::io(format!("creating {}", dir.display())))?;
    let weights_file = dir.join("weights.f32");
    let result = run_in(s, timeout, &weights_file);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(s: &DemoSettings, timeout: Duration, weights_file: &PathBuf) -> CliResult {
    let exe = std::env::current_exe().map_err(CliError::io("locating pskv"))?;
    let mut cmd: Vec<std::ffi::OsString> = vec![exe.into(), "demo-worker".into()];
    cmd.extend(s.worker_args().into_iter().map(Into::into));
    cmd.push("--weights-out".into());
    cmd.push(weights_file.clone().into());
    let mut spec = JobSpec::local(s.workers, s.servers, cmd);
    spec.capture_stdout = true;
    spec.env.push(("PSKV_VAN".into(), s.van.clone()));
    let started = Instant::now();
    let mut job = Job::start(&spec, Launcher::Local)?;
    // Ranks come from the scheduler, not from the launch order: every
    // worker's lines are followed, and rank 0 is the one that reports steps.
    let followers: Vec<_> = (0..s.workers)
        .map(|i| {
            let o = job.take_stdout(i);
            let s = s.clone();
            std::thread::spawn(move || o.map(|o| follow(o, &s)).unwrap_or_default())
        })
        .collect();
    let stop = stop_flag()?;
    let outcome = job.supervise(&stop, Some(timeout));
    drop(job);
    let job_secs = started.elapsed().as_secs_f64();
    let mut report = Report::default();
    for t in followers {
        let r = t.join().unwrap_or_default();
        report.epochs.extend(r.epochs);
        report.done.extend(r.done);
    }
    let done = report.done;
    outcome.map_err(|f| CliError::Failed(f.message))?;
    if done.len() != s.workers as usize {
        return Err(CliError::Failed(format!(
            "{} of {} workers reported their training",
            done.len(),
            s.workers
        )));
    }
    let samples: usize = done.iter().map(|d| d.0).sum();
    let train_secs = done.iter().map(|d| d.1).fold(0.0, f64::max);
    let Some(&(_, train_acc, test_acc)) = report.epochs.last() else {
        return Err(CliError::Failed("rank 0 reported no epoch".into()));
    };

    eprintln!("computing the same training in one process for the check ...");
    let want = reference(s)?;
    let bytes = std::fs::read(weights_file).map_err(CliError::io(format!(
        "reading rank 0's weights {}",
        weights_file.display()
    )))?;
    let got: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let want: Vec<f32> = want.into_iter().flatten().collect();
    println!(
        "final accuracy: {:.1}% on {TEST} held-out samples ({:.1}% on the training set)",
        test_acc * 100.0,
        train_acc * 100.0
    );
    println!(
        "throughput: {:.0} samples/s over {} workers ({samples} samples in {train_secs:.2} s of \
         training; whole job {job_secs:.2} s)",
        samples as f64 / train_secs,
        s.workers
    );
    if got.len() != want.len() {
        return Err(CliError::Failed(format!(
            "check failed: rank 0 wrote {} weights, the model has {}",
            got.len(),
            want.len()
        )));
    }
    let differ = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    if differ > 0 {
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        return Err(CliError::Failed(format!(
            "check failed: {differ} of {} weights differ from the single-process run \
             (largest difference {worst:e})",
            want.len()
        )));
    }
    println!(
        "check: the {} weights equal the single-process run's, bit for bit",
        want.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::data::Dataset;
    use super::*;

    fn shards_cover_the_epoch(s: &DemoSettings, d: &Dataset) -> bool {
        let order = epoch_order(0);
        let mut seen = vec![false; d.len()];
        for step in 0..s.steps_per_epoch() {
            for r in 0..s.workers as usize {
                for i in shard(&order, s, step, r) {
                    if seen[i] {
                        return false;
                    }
                    seen[i] = true;
                }
            }
        }
        true
    }

    #[test]
    fn shards_are_disjoint() {
        let s = DemoSettings {
            workers: 4,
            servers: 2,
            epochs: 1,
            batch: 32,
            lr: 0.1,
            compress: None,
            van: "tcp".into(),
            gpu: false,
            device: "cpu".into(),
        };
        assert!(shards_cover_the_epoch(&s, &spirals(TRAIN, TRAIN_SEED)));
        assert!(s.validate().is_ok());
        let bad = DemoSettings {
            batch: 0,
            ..s.clone()
        };
        assert!(bad.validate().is_err());
        let bad = DemoSettings {
            van: "udp".into(),
            ..s.clone()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("udp"));
        let bad = DemoSettings {
            device: "tpu".into(),
            ..s
        };
        assert!(bad.validate().unwrap_err().to_string().contains("tpu"));
    }
}
