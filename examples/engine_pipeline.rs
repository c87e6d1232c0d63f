//! A data-parallel training loop scheduled on pskv's dependency engine.
//!
//! Four shards compute gradients of a linear model in parallel; a reduce op
//! sums them; an update op applies SGD. Every op names the vars it reads and
//! writes, so the engine runs each step's shards together and orders the
//! steps by itself: the loop below never waits until it prints.
//!
//! Run: `cargo run --release --example engine_pipeline`
//! It writes a Chrome trace (open it in https://ui.perfetto.dev) and the op
//! graph of one step as Graphviz DOT under `target/`.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use pskv::engine::{Engine, OpSpec, Var};

const DIM: usize = 64;
const SHARDS: usize = 4;
const ROWS_PER_SHARD: usize = 2048;
const STEPS: usize = 60;
const LR: f32 = 0.5;

/// A buffer guarded by an engine var. The engine orders every access; the
/// mutex only satisfies the borrow checker and is never contended.
#[derive(Clone)]
struct Buf {
    var: Var,
    data: Arc<Mutex<Vec<f32>>>,
}

impl Buf {
    fn new(name: &str, data: Vec<f32>) -> Buf {
        Buf {
            var: Var::named(name),
            data: Arc::new(Mutex::new(data)),
        }
    }
}

/// A deterministic pseudo-random stream (64-bit LCG).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target)?;
    let trace = target.join("engine_pipeline_trace.json");
    let engine = Engine::builder().profile_path(&trace).build()?;

    // Data: y = x . w_true + noise, split into shards.
    let mut rng = Lcg(42);
    let w_true: Vec<f32> = (0..DIM).map(|_| rng.next()).collect();
    // Per shard: the rows (x) and the targets (y).
    type Shard = (Arc<Vec<f32>>, Arc<Vec<f32>>);
    let shards: Vec<Shard> = (0..SHARDS)
        .map(|_| {
            let x: Vec<f32> = (0..ROWS_PER_SHARD * DIM).map(|_| rng.next()).collect();
            let y: Vec<f32> = x
                .chunks(DIM)
                .map(|row| {
                    row.iter().zip(&w_true).map(|(a, b)| a * b).sum::<f32>() + 0.01 * rng.next()
                })
                .collect();
            (Arc::new(x), Arc::new(y))
        })
        .collect();

    let weight = Buf::new("weight", vec![0.0; DIM]);
    let grads: Vec<Buf> = (0..SHARDS)
        .map(|i| Buf::new(&format!("grad{i}"), vec![0.0; DIM]))
        .collect();
    let sum = Buf::new("grad_sum", vec![0.0; DIM]);
    let losses = Arc::new(Mutex::new(vec![0.0f32; STEPS]));

    let start = Instant::now();
    for step in 0..STEPS {
        if step == 1 {
            engine.start_graph();
        }
        // 1. Gradients per shard: read the weight, write the shard's gradient.
        for (i, (x, y)) in shards.iter().enumerate() {
            let (w, g, x, y, losses) = (
                weight.clone(),
                grads[i].clone(),
                x.clone(),
                y.clone(),
                losses.clone(),
            );
            engine.push_sync(
                OpSpec::new(format!("grad{i}")).read(&w.var).write(&g.var),
                move |_| {
                    let w = w.data.lock();
                    let mut g = g.data.lock();
                    g.iter_mut().for_each(|v| *v = 0.0);
                    let mut loss = 0.0;
                    for (row, &target) in x.chunks(DIM).zip(y.iter()) {
                        let err =
                            row.iter().zip(w.iter()).map(|(a, b)| a * b).sum::<f32>() - target;
                        loss += err * err;
                        for (gj, &xj) in g.iter_mut().zip(row) {
                            *gj += err * xj;
                        }
                    }
                    losses.lock()[step] += loss / (SHARDS * ROWS_PER_SHARD) as f32;
                    Ok(())
                },
            )?;
        }
        // 2. Reduce: read every gradient, write the sum. Higher priority than
        //    next step's gradient ops, which compete for the same workers.
        let (gs, s) = (grads.clone(), sum.clone());
        engine.push_sync(
            OpSpec::new("reduce")
                .reads(grads.iter().map(|g| &g.var))
                .write(&sum.var)
                .priority(1),
            move |_| {
                let mut s = s.data.lock();
                s.iter_mut().for_each(|v| *v = 0.0);
                for g in &gs {
                    for (a, b) in s.iter_mut().zip(g.data.lock().iter()) {
                        *a += b;
                    }
                }
                Ok(())
            },
        )?;
        // 3. Update: read the sum, write the weight.
        let (w, s) = (weight.clone(), sum.clone());
        engine.push_sync(
            OpSpec::new("sgd_update")
                .read(&sum.var)
                .write(&weight.var)
                .priority(2),
            move |_| {
                let scale = LR / (SHARDS * ROWS_PER_SHARD) as f32 * 2.0;
                for (wj, gj) in w.data.lock().iter_mut().zip(s.data.lock().iter()) {
                    *wj -= scale * gj;
                }
                Ok(())
            },
        )?;
        if step == 1 {
            let dot = target.join("engine_pipeline_graph.dot");
            std::fs::write(&dot, engine.take_graph().to_dot())?;
            println!("op graph of one step: {}", dot.display());
        }
    }
    engine.wait_for_var(&weight.var)?;
    let elapsed = start.elapsed();

    let losses = losses.lock();
    for step in (0..STEPS).step_by(10).chain([STEPS - 1]) {
        println!("step {step:3}: loss {:.6}", losses[step]);
    }
    let err: f32 = weight
        .data
        .lock()
        .iter()
        .zip(&w_true)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let ops = STEPS * (SHARDS + 2);
    println!(
        "{ops} ops in {:.1} ms ({:.0} ops/s); max |w - w_true| = {err:.4}",
        elapsed.as_secs_f64() * 1e3,
        ops as f64 / elapsed.as_secs_f64()
    );
    let converged = losses[STEPS - 1] < losses[0] / 100.0; // false for NaN too
    if !converged {
        return Err(format!(
            "training did not converge: loss {} -> {}",
            losses[0],
            losses[STEPS - 1]
        )
        .into());
    }
    drop(engine); // writes the trace
    println!(
        "Chrome trace (open in ui.perfetto.dev): {}",
        trace.display()
    );
    Ok(())
}
