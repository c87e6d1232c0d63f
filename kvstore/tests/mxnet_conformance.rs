//! pskv's optimizers against MXNet 1.9.1's, bit for bit.
//!
//! `fixtures/mxnet_optimizers.json` was written by MXNet itself
//! (`scripts/mxnet_fixtures.py`, run with the MXNet of ../shared/peers):
//! starting weights, the gradients of each step, and the weights after each
//! step, as bit patterns, for SGD (with and without momentum, clipping,
//! rescaling, weight decay), NAG, Adam and AdaGrad on f32, f64 and f16 with
//! multi-precision, and per-key multipliers. It also records how MXNet's
//! C++ parses 369 Python floats as operator parameters and as NDArray
//! scalars.

use half::f16;
use pskv_kvstore::optimizer::mxparse::{param_f32, python_repr, scalar_f32};
use pskv_kvstore::{GradRef, Key, LrScheduler, Optimizer, WeightMut};
use serde_json::Value;

fn fixture() -> Value {
    let text = include_str!("fixtures/mxnet_optimizers.json");
    serde_json::from_str(text).expect("the fixture is JSON")
}

fn hex(v: &Value) -> u64 {
    u64::from_str_radix(v.as_str().expect("hex string"), 16).expect("hex")
}

fn arr(v: &Value) -> Vec<u64> {
    v.as_array().expect("array").iter().map(hex).collect()
}

#[test]
fn hyperparameters_parse_as_mxnet_parses_them() {
    let doc = fixture();
    let rows = doc["parse"].as_array().unwrap();
    assert!(rows.len() > 300);
    let mut bad = Vec::new();
    for r in rows {
        let text = r[0].as_str().unwrap();
        let x: f64 = text.parse().unwrap();
        let (param, scalar) = (hex(&r[1]) as u32, hex(&r[2]) as u32);
        if python_repr(x) != text {
            bad.push(format!(
                "repr of {x:e}: pskv {} python {text}",
                python_repr(x)
            ));
        }
        if param_f32(x).to_bits() != param {
            bad.push(format!(
                "param {text}: pskv {:e} mxnet {:e}",
                param_f32(x),
                f32::from_bits(param)
            ));
        }
        if scalar_f32(x).to_bits() != scalar {
            bad.push(format!(
                "scalar {text}: pskv {:e} mxnet {:e}",
                scalar_f32(x),
                f32::from_bits(scalar)
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

fn optimizer_of(c: &Value) -> Optimizer {
    let name = c["optimizer"].as_str().unwrap();
    let params: Vec<(String, f64)> = c["params"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let x = match v {
                Value::Bool(b) => *b as u8 as f64,
                v => v.as_f64().unwrap(),
            };
            (k.clone(), x)
        })
        .collect();
    let refs: Vec<(&str, f64)> = params.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let mut opt = Optimizer::create(name, &refs).unwrap();
    let key = Key::Int(c["key"].as_u64().unwrap() as u32);
    if let Some(m) = c["lr_mult"].as_f64() {
        opt = opt.lr_mult(key.clone(), m);
    }
    if let Some(m) = c["wd_mult"].as_f64() {
        opt = opt.wd_mult(key, m);
    }
    opt
}

#[test]
fn every_update_matches_mxnet_to_the_bit() {
    let doc = fixture();
    let configs = doc["configs"].as_array().unwrap();
    assert!(configs.len() >= 20);
    let mut report = Vec::new();
    for c in configs {
        let opt = optimizer_of(c);
        let key = c["key"].as_u64().unwrap();
        let dtype = c["dtype"].as_str().unwrap();
        let w0 = arr(&c["weight0"]);
        let mut st = None;
        let mut w32: Vec<f32> = w0.iter().map(|&b| f32::from_bits(b as u32)).collect();
        let mut w64: Vec<f64> = w0.iter().map(|&b| f64::from_bits(b)).collect();
        let mut w16: Vec<f16> = w0.iter().map(|&b| f16::from_bits(b as u16)).collect();
        let steps = c["grads"].as_array().unwrap();
        for (t, (g, want)) in steps
            .iter()
            .zip(c["weights"].as_array().unwrap())
            .enumerate()
        {
            let (g, want) = (arr(g), arr(want));
            let got: Vec<u64> = match dtype {
                "float32" => {
                    let g: Vec<f32> = g.iter().map(|&b| f32::from_bits(b as u32)).collect();
                    opt.update(key, WeightMut::F32(&mut w32), GradRef::F32(&g), &mut st)
                        .unwrap();
                    w32.iter().map(|x| x.to_bits() as u64).collect()
                }
                "float64" => {
                    let g: Vec<f64> = g.iter().map(|&b| f64::from_bits(b)).collect();
                    opt.update(key, WeightMut::F64(&mut w64), GradRef::F64(&g), &mut st)
                        .unwrap();
                    w64.iter().map(|x| x.to_bits()).collect()
                }
                "float16" => {
                    let g: Vec<f16> = g.iter().map(|&b| f16::from_bits(b as u16)).collect();
                    opt.update(key, WeightMut::F16(&mut w16), GradRef::F16(&g), &mut st)
                        .unwrap();
                    w16.iter().map(|x| x.to_bits() as u64).collect()
                }
                other => panic!("unknown dtype {other}"),
            };
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            if diff > 0 {
                report.push(format!(
                    "{} {} {:?}: step {}: {diff} of {} elements differ",
                    opt.name(),
                    dtype,
                    c["params"],
                    t + 1,
                    want.len()
                ));
                break;
            }
        }
    }
    assert!(report.is_empty(), "\n{}", report.join("\n"));
}

/// An MXNet scheduler from the fixture, through the spec parser (so the
/// C ABI's way in is checked too).
fn scheduler_of(c: &Value) -> LrScheduler {
    let kind = match c["scheduler"].as_str().unwrap() {
        "FactorScheduler" => "factor",
        "MultiFactorScheduler" => "multifactor",
        "PolyScheduler" => "poly",
        "CosineScheduler" => "cosine",
        other => panic!("unknown scheduler {other}"),
    };
    let args: Vec<String> = c["scheduler_params"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::Array(a) => a
                    .iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            format!("{k}={v}")
        })
        .collect();
    LrScheduler::parse(&format!("{kind}({})", args.join(";"))).unwrap()
}

#[test]
fn scheduled_updates_match_mxnet_to_the_bit() {
    let doc = fixture();
    let runs = doc["schedules"].as_array().unwrap();
    assert!(runs.len() >= 11);
    let mut report = Vec::new();
    for c in runs {
        // As mx.optimizer.create(name, lr_scheduler=s, **params).
        let params: Vec<(String, f64)> = c["params"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
            .collect();
        let refs: Vec<(&str, f64)> = params.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let opt =
            Optimizer::create_scheduled(c["optimizer"].as_str().unwrap(), &refs, scheduler_of(c))
                .unwrap();
        let mut weights: std::collections::HashMap<
            u64,
            (Vec<f32>, Option<pskv_kvstore::OptState>),
        > = c["weight0"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, w)| {
                let w: Vec<f32> = arr(w).iter().map(|&b| f32::from_bits(b as u32)).collect();
                (k.parse().unwrap(), (w, None))
            })
            .collect();
        for (i, s) in c["steps"].as_array().unwrap().iter().enumerate() {
            let key = s["key"].as_u64().unwrap();
            let g: Vec<f32> = arr(&s["grad"])
                .iter()
                .map(|&b| f32::from_bits(b as u32))
                .collect();
            let (w, st) = weights.get_mut(&key).unwrap();
            opt.update(key, WeightMut::F32(w), GradRef::F32(&g), st)
                .unwrap();
            let want = arr(&s["weight"]);
            let diff = w
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() as u64 != **b)
                .count();
            if diff > 0 {
                report.push(format!(
                    "{} {} {:?}: step {} (key {key}, num_update {}): {diff} of {} elements differ",
                    opt.name(),
                    c["scheduler"],
                    c["scheduler_params"],
                    i + 1,
                    opt.num_update(),
                    want.len()
                ));
                break;
            }
        }
    }
    assert!(report.is_empty(), "\n{}", report.join("\n"));
}
