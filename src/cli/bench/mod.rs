//! `pskv bench`: push/pull rounds of the cases of ../shared/peers (one key
//! of 4 B to 32 MiB, and 100 keys of 40 KiB), or of a model's whole
//! gradient set (`--model`, [`model`]), on a local cluster of `pskv`
//! processes, so the figures read side by side with MXNet's dist_sync
//! kvstore and MPI_Allreduce on the same host.
//!
//! A round is a push of a float32 gradient and a pull of the sum, waited
//! for: as `pushpull` (one round trip, the default) or as a push then a
//! pull (`--mode push-pull`, what MXNet's benchmark does). A model's round
//! issues its gradients as a framework's backward pass does: the last
//! layer's first, gradient `i` with priority `-i`, each key on its own
//! call.

pub mod model;

use std::time::{Duration, Instant};

use pskv::engine::{Context, Engine};
use pskv::kvstore::{Compression, DType, Key, KvStore, Tensor};
use serde::{Deserialize, Serialize};

use super::chart::{self, Axis, Series};
use super::error::{CliError, CliResult};
use super::launch::{allowed_cpus, cpu_list, run_collecting, Bind, JobSpec};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// name, bytes per key, keys, warm-up rounds, timed rounds.
pub type Case = (&'static str, usize, usize, usize, usize);

/// What one case's round moves: its keys in the order they are issued,
/// each with its elements and priority.
#[derive(Clone, Debug)]
struct Workload {
    name: String,
    /// (elements, priority) per key, in issue order.
    keys: Vec<(usize, i32)>,
    warm: usize,
    iters: usize,
}

impl Workload {
    fn case((name, nbytes, nkeys, warm, iters): Case) -> Workload {
        Workload {
            name: name.to_string(),
            keys: vec![((nbytes / 4).max(1), 0); nkeys],
            warm,
            iters,
        }
    }

    /// A model's gradients, last layer first, gradient `i` at priority
    /// `-i`: 3 warm-up rounds, 20 timed.
    fn model(name: &str) -> CliResult<Workload> {
        let params = model::params(name)?;
        let keys = params
            .iter()
            .enumerate()
            .rev()
            .map(|(i, p)| (p.len(), -(i as i32)))
            .collect();
        Ok(Workload {
            name: name.to_string(),
            keys,
            warm: 3,
            iters: 20,
        })
    }

    /// One priority for every key: the round can go as one call.
    fn one_priority(&self) -> Option<i32> {
        let p = self.keys.first()?.1;
        self.keys.iter().all(|k| k.1 == p).then_some(p)
    }
}

/// The peers' cases.
pub const CASES: &[Case] = &[
    ("4B", 4, 1, 20, 500),
    ("4KiB", 4 * KIB, 1, 20, 500),
    ("256KiB", 256 * KIB, 1, 10, 200),
    ("4MiB", 4 * MIB, 1, 5, 50),
    ("32MiB", 32 * MIB, 1, 3, 20),
    ("100x40KiB", 40 * KIB, 100, 3, 50),
];

/// One case's result on one worker (the fields of the peers' JSON).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct CaseResult {
    /// Case name.
    pub case: String,
    /// Bytes of all keys.
    pub bytes: usize,
    /// Keys.
    pub nkeys: usize,
    /// Timed rounds.
    pub iters: usize,
    /// The correctness round gave the expected sum.
    pub check_ok: bool,
    /// Median round time.
    pub median_us: f64,
    /// Mean round time.
    pub mean_us: f64,
    /// Fastest round.
    pub min_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// bytes / median.
    pub algbw_gbps_median: f64,
    /// With `--push-buffers`: the keys whose push buffer lies (in part or
    /// whole) in shared memory at the end of the case.
    #[serde(default)]
    pub shared_keys: usize,
    /// Key parts pushed from push buffers in place (nothing copied) in the
    /// case, its check round and warm-up included.
    #[serde(default)]
    pub in_place_parts: u64,
    /// Key parts of the case's pushes (check round and warm-up included)
    /// that the workers summed in shared memory, their server's gate open
    /// (`KvStore::worker_summed_parts`).
    #[serde(default)]
    pub worker_summed_parts: u64,
}

/// One worker's results.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct WorkerResult {
    /// Its rank.
    pub rank: u32,
    /// Workers.
    pub num_workers: u32,
    /// Servers.
    pub num_servers: u32,
    /// 2-bit compression on.
    pub compress: bool,
    /// pushpull or push-pull.
    pub mode: String,
    /// The transport.
    pub van: String,
    /// Where the tensors were: cpu or gpu.
    #[serde(default = "cpu")]
    pub device: String,
    /// The CPUs the worker could run on (`0-3,6`; `--bind cores` gives
    /// each its own).
    #[serde(default)]
    pub cpus: String,
    /// Keys pushed from their push buffers (`KvStore::push_buffer`).
    #[serde(default)]
    pub push_buffers: bool,
    /// Per case.
    pub cases: Vec<CaseResult>,
}

/// Settings of a bench run.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// Workers.
    pub workers: u32,
    /// Servers.
    pub servers: u32,
    /// tcp, shm, auto.
    pub van: String,
    /// 2-bit compression (threshold 0.5).
    pub compress: bool,
    /// pushpull or push-pull.
    pub mode: String,
    /// Case names (empty: all, or none with a model).
    pub cases: Vec<String>,
    /// A model's gradient set, run after the cases.
    pub model: Option<String>,
    /// Multiplies the timed rounds.
    pub iters_scale: f64,
    /// Tensors on GPUs (worker r on GPU r) through dist_sync_device.
    pub gpu: bool,
    /// How the workers are placed on the host's cores.
    pub bind: Bind,
    /// Each key pushed from its push buffer (`KvStore::push_buffer`).
    pub push_buffers: bool,
}

fn cpu() -> String {
    "cpu".into()
}

/// The cases named (all of them when none is and there is no model), then
/// the model's.
fn selected(names: &[String], model: Option<&str>) -> CliResult<Vec<Workload>> {
    let mut out: Vec<Workload> = if names.is_empty() && model.is_none() {
        CASES.iter().copied().map(Workload::case).collect()
    } else {
        names
            .iter()
            .map(|n| {
                CASES.iter().find(|c| c.0 == n).copied().map(Workload::case).ok_or_else(|| {
                    CliError::Usage(format!(
                        "unknown case '{n}': expected one of 4B, 4KiB, 256KiB, 4MiB, 32MiB, 100x40KiB"
                    ))
                })
            })
            .collect::<CliResult<_>>()?
    };
    if let Some(m) = model {
        out.push(Workload::model(m)?);
    }
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// The worker side: runs every case and prints `RESULT {json}`.
pub fn worker(s: &BenchSettings) -> CliResult {
    let engine = Engine::new()?;
    let (kind, ctx) = if s.gpu {
        ("dist_sync_device", super::gpus::of_rank(0)?)
    } else {
        ("dist_sync", Context::Cpu)
    };
    let kv = KvStore::create(kind, &engine)?;
    // Worker r on GPU r.
    let ctx = match ctx {
        Context::Gpu(_) => super::gpus::of_rank(kv.rank() as usize)?,
        c => c,
    };
    if s.compress {
        kv.set_gradient_compression(Compression::two_bit(0.5))?;
    }
    let (rank, nw) = (kv.rank(), kv.num_workers());
    let mut out = WorkerResult {
        rank,
        num_workers: nw,
        num_servers: std::env::var("DMLC_NUM_SERVER")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        compress: s.compress,
        mode: s.mode.clone(),
        van: s.van.clone(),
        device: if s.gpu { "gpu" } else { "cpu" }.into(),
        // Best effort: a host whose CPU set the call cannot read still benches.
        cpus: allowed_cpus().map(|c| cpu_list(&c)).unwrap_or_default(),
        push_buffers: s.push_buffers,
        cases: Vec::new(),
    };
    let mut seed = 0x1234_5678u64 + rank as u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    for (ci, w) in selected(&s.cases, s.model.as_deref())?
        .into_iter()
        .enumerate()
    {
        let iters = ((w.iters as f64 * s.iters_scale).round() as usize).max(3);
        let nkeys = w.keys.len();
        let keys: Vec<Key> = (0..nkeys)
            .map(|k| Key::Int((100 + ci * 1000 + k) as u32))
            .collect();
        let zeros = |k: usize| Tensor::zeros(&engine, &[w.keys[k].0], DType::F32, ctx);
        let inits: Vec<(Key, Tensor)> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| zeros(i).map(|t| (k.clone(), t)))
            .collect::<Result<_, _>>()?;
        kv.init_many(&inits)?;
        let outs: Vec<Tensor> = (0..nkeys).map(zeros).collect::<Result<_, _>>()?;
        let in_place_before = kv.pushed_in_place();
        let summed_before = kv.worker_summed_parts();
        // What the keys are pushed from: their push buffers, or tensors
        // made here.
        let bufs: Option<Vec<Tensor>> = if s.push_buffers {
            Some(
                keys.iter()
                    .map(|k| kv.push_buffer(k.clone()))
                    .collect::<Result<_, _>>()?,
            )
        } else {
            None
        };
        // Correctness: every worker pushes rank+1; the sum is W(W+1)/2, or
        // 0.5 per worker with 2-bit compression at threshold 0.5.
        let chk: Vec<(Key, Vec<Tensor>)> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let n = w.keys[i].0;
                let t = match &bufs {
                    Some(b) => b[i]
                        .copy_from_slice(&vec![(rank + 1) as f32; n])
                        .map(|()| b[i].clone()),
                    None => Tensor::full(&engine, &[n], (rank + 1) as f32, ctx),
                };
                t.map(|t| (k.clone(), vec![t]))
            })
            .collect::<Result<_, _>>()?;
        kv.push_many(&chk, 0)?;
        let pulls: Vec<(Key, Vec<Tensor>)> = keys
            .iter()
            .cloned()
            .zip(outs.iter().map(|o| vec![o.clone()]))
            .collect();
        kv.pull_many(&pulls, 0)?;
        let expect = if s.compress {
            0.5 * nw as f32
        } else {
            (nw * (nw + 1)) as f32 / 2.0
        };
        // Every key's first and last element.
        let mut check_ok = true;
        for o in &outs {
            let v = o.to_vec::<f32>()?;
            check_ok &= (v[0] - expect).abs() < 1e-3 && (v[v.len() - 1] - expect).abs() < 1e-3;
        }

        let grads: Vec<Tensor> = w
            .keys
            .iter()
            .enumerate()
            .map(|(i, &(n, _))| {
                let v: Vec<f32> = (0..n).map(|_| rnd()).collect();
                match &bufs {
                    Some(b) => b[i].copy_from_slice(&v).map(|()| b[i].clone()),
                    None => Tensor::from_vec(&engine, &[n], v, ctx),
                }
            })
            .collect::<Result<_, _>>()?;
        let pushpulls: Vec<(Key, Vec<Tensor>, Vec<Tensor>)> = keys
            .iter()
            .zip(&grads)
            .zip(&outs)
            .map(|((k, g), o)| (k.clone(), vec![g.clone()], vec![o.clone()]))
            .collect();
        let pushes: Vec<(Key, Vec<Tensor>)> = keys
            .iter()
            .cloned()
            .zip(grads.iter().map(|g| vec![g.clone()]))
            .collect();
        let one_priority = w.one_priority();
        let one_round = || -> CliResult {
            match (s.mode == "push-pull", one_priority) {
                (true, Some(p)) => {
                    kv.push_many(&pushes, p)?;
                    kv.pull_many(&pulls, p)?;
                }
                (false, Some(p)) => kv.pushpull_many(&pushpulls, p)?,
                // Key by key, as a framework's backward pass hands them over.
                (true, None) => {
                    for (i, &(_, p)) in w.keys.iter().enumerate() {
                        kv.push_many(&pushes[i..=i], p)?;
                        kv.pull_many(&pulls[i..=i], p)?;
                    }
                }
                (false, None) => {
                    for (i, &(_, p)) in w.keys.iter().enumerate() {
                        kv.pushpull_many(&pushpulls[i..=i], p)?;
                    }
                }
            }
            for o in &outs {
                o.wait_to_read()?;
            }
            Ok(())
        };
        for _ in 0..w.warm {
            one_round()?;
        }
        kv.barrier()?;
        let mut ts = Vec::with_capacity(iters);
        let all = Instant::now();
        for _ in 0..iters {
            let t0 = Instant::now();
            one_round()?;
            ts.push(t0.elapsed().as_secs_f64());
        }
        let mean = all.elapsed().as_secs_f64() / iters as f64;
        kv.barrier()?;
        let mut shared_keys = 0;
        for b in bufs.iter().flatten() {
            shared_keys += usize::from(b.in_shared_memory()?);
        }
        ts.sort_by(|a, b| a.total_cmp(b));
        let med = percentile(&ts, 0.5);
        let total: usize = w.keys.iter().map(|k| k.0 * 4).sum();
        if rank == 0 {
            // Progress for the launcher's bar.
            println!("CASE {}", w.name);
        }
        out.cases.push(CaseResult {
            case: w.name.clone(),
            bytes: total,
            nkeys,
            iters,
            check_ok,
            shared_keys,
            in_place_parts: kv.pushed_in_place() - in_place_before,
            worker_summed_parts: kv.worker_summed_parts() - summed_before,
            median_us: med * 1e6,
            mean_us: mean * 1e6,
            min_us: ts[0] * 1e6,
            p90_us: percentile(&ts, 0.9) * 1e6,
            algbw_gbps_median: total as f64 / med / 1e9,
        });
    }
    println!(
        "RESULT {}",
        serde_json::to_string(&out).map_err(|x| CliError::Failed(format!("a result: {x}")))?
    );
    kv.close()?;
    Ok(())
}

/// The launcher side: starts the cluster, collects and prints the results.
pub fn run(
    s: &BenchSettings,
    on_case: std::sync::Arc<dyn Fn(&str) + Send + Sync>,
) -> CliResult<Vec<WorkerResult>> {
    selected(&s.cases, s.model.as_deref())?;
    let exe = std::env::current_exe().map_err(CliError::io("locating pskv"))?;
    let mut args: Vec<std::ffi::OsString> = vec![
        exe.into(),
        "bench-worker".into(),
        "-w".into(),
        s.workers.to_string().into(),
        "-s".into(),
        s.servers.to_string().into(),
        "--mode".into(),
        s.mode.clone().into(),
        "--van".into(),
        s.van.clone().into(),
    ];
    if s.compress {
        args.push("--compress".into());
    }
    if s.push_buffers {
        args.push("--push-buffers".into());
    }
    if s.gpu {
        args.push("--device".into());
        args.push("gpu".into());
    }
    if !s.cases.is_empty() {
        args.push("--cases".into());
        args.push(s.cases.join(",").into());
    }
    if let Some(m) = &s.model {
        args.push("--model".into());
        args.push(m.into());
    }
    args.push("--iters-scale".into());
    args.push(s.iters_scale.to_string().into());
    let mut spec = JobSpec::local(s.workers, s.servers, args);
    spec.bind = s.bind;
    spec.env.push(("PSKV_VAN".to_string(), s.van.clone()));
    let outs = run_collecting(&spec, Duration::from_secs(600), on_case)?;
    let mut results = Vec::new();
    for o in outs {
        for line in o.lines() {
            if let Some(j) = line.strip_prefix("RESULT ") {
                results.push(
                    serde_json::from_str::<WorkerResult>(j)
                        .map_err(|x| CliError::Failed(format!("a worker's result: {x}")))?,
                );
            }
        }
    }
    if results.len() != s.workers as usize {
        return Err(CliError::Failed(format!(
            "{} of {} workers reported results",
            results.len(),
            s.workers
        )));
    }
    results.sort_by_key(|r| r.rank);
    Ok(results)
}

/// Per case: the mean over workers of their medians, and its bandwidth.
pub fn summary(results: &[WorkerResult]) -> Vec<(String, usize, f64, f64, bool)> {
    let Some(first) = results.first() else {
        return Vec::new();
    };
    first
        .cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let meds: Vec<f64> = results.iter().map(|r| r.cases[i].median_us).collect();
            let m = meds.iter().sum::<f64>() / meds.len() as f64;
            let ok = results.iter().all(|r| r.cases[i].check_ok);
            (c.case.clone(), c.bytes, m, c.bytes as f64 / m / 1e3, ok)
        })
        .collect()
}

/// The number of cases a run of `names` (and `model`) times.
pub fn case_count(names: &[String], model: Option<&str>) -> CliResult<usize> {
    selected(names, model).map(|c| c.len())
}

/// Draws the sweep's single-key cases (100x40KiB and a model are other
/// shapes and are left out) against message size, one line per run, as two SVG files in
/// `dir`: `bandwidth.svg` (algorithmic bandwidth) and `latency.svg` (the
/// median round). Returns their paths; None when no run had a single-key
/// case.
pub fn charts(
    runs: &[Vec<WorkerResult>],
    dir: &std::path::Path,
) -> CliResult<Option<(std::path::PathBuf, std::path::PathBuf)>> {
    let series = |value: fn(f64, f64) -> f64| -> Vec<Series> {
        runs.iter()
            .filter_map(|r| {
                let first = r.first()?;
                let label = format!(
                    "{} workers, {} servers, {}{}",
                    first.num_workers,
                    first.num_servers,
                    first.van,
                    if first.compress { ", 2-bit" } else { "" }
                );
                let points: Vec<(f64, f64)> = summary(r)
                    .into_iter()
                    .zip(&first.cases)
                    .filter(|(_, c)| c.nkeys == 1)
                    .map(|(s, _)| s)
                    .map(|(_, bytes, us, gbps, _)| (bytes as f64, value(us, gbps)))
                    .collect();
                Some(Series { label, points })
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    if series(|us, _| us).is_empty() {
        return Ok(None);
    }
    let bw = dir.join("bandwidth.svg");
    chart::draw(
        &bw,
        "pskv push-pull: bandwidth against message size",
        Axis {
            desc: "algorithmic bandwidth (bytes / median round)",
            label: chart::rate_label,
        },
        &series(|_, gbps| gbps * 1e9),
    )?;
    let lat = dir.join("latency.svg");
    chart::draw(
        &lat,
        "pskv push-pull: round time against message size",
        Axis {
            desc: "median round (push, pull, wait)",
            label: chart::time_label,
        },
        &series(|us, _| us * 1e-6),
    )?;
    Ok(Some((bw, lat)))
}
