//! A worker of a distributed job, in Rust: fits `w` so that `w * x = 3 x`
//! by least squares, each worker on its own samples, the servers summing
//! the gradients and running SGD. Run it as every worker of a job:
//!
//! ```sh
//! cargo build --release --example dist_train
//! target/release/pskv launch -n 4 -s 2 -- target/release/examples/dist_train
//! ```

use pskv::engine::{Context, Engine};
use pskv::kvstore::{DType, KvStore, Optimizer, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::new()?;
    let kv = KvStore::create("dist_sync", &engine)?; // joins the job named by DMLC_*
    let (rank, workers) = (kv.rank(), kv.num_workers());
    let n = 1000;
    let w = Tensor::zeros(&engine, &[n], DType::F32, Context::Cpu)?;
    kv.init("w", &w)?;
    kv.set_optimizer(Optimizer::sgd(0.2).rescale_grad(1.0 / workers as f64))?;
    let grad = Tensor::zeros(&engine, &[n], DType::F32, Context::Cpu)?;
    for step in 0..50 {
        // This worker's sample: x = rank + 1 for every element; the loss is
        // (w x - 3 x)^2 / (2 x^2), whose gradient is w - 3.
        let x = (rank + 1) as f32;
        let wv = w.to_vec::<f32>()?;
        let g: Vec<f32> = wv
            .iter()
            .map(|wi| (wi * x - 3.0 * x) * x / (x * x))
            .collect();
        grad.copy_from_slice(&g)?;
        kv.pushpull(
            "w",
            std::slice::from_ref(&grad),
            std::slice::from_ref(&w),
            0,
        )?;
        if rank == 0 && step % 10 == 0 {
            println!("step {step}: w[0] = {:.4}", w.to_vec::<f32>()?[0]);
        }
    }
    let last = w.to_vec::<f32>()?[0];
    println!("worker {rank} of {workers}: w[0] = {last:.4} (target 3)");
    kv.close()?;
    if (last - 3.0).abs() > 1e-3 {
        return Err(format!("did not converge: {last}").into());
    }
    Ok(())
}
