//! The `local` and `device` kvstores: sums, updates, ordering, row-sparse
//! keys, compression, trees, optimizer state, and every error.

#![allow(clippy::cloned_ref_to_slice_refs, clippy::needless_range_loop)]

use std::sync::Arc;

use pskv_engine::{Context, Engine};
use pskv_gpu::cpu::CpuKernels;
use pskv_gpu::Kernels;
use pskv_kvstore::{
    Compression, DType, Key, KvError, KvStore, Optimizer, Options, Tensor, Topology, Values,
    ValuesMut,
};

fn engine() -> Engine {
    Engine::builder().cpu_threads(2).build().unwrap()
}

fn f32s(e: &Engine, v: &[f32], ctx: Context) -> Tensor {
    Tensor::from_slice(e, &[v.len()], v, ctx).unwrap()
}

fn zeros(e: &Engine, n: usize) -> Tensor {
    Tensor::zeros(e, &[n], DType::F32, Context::Cpu).unwrap()
}

use pskv_test_support::values;

#[test]
fn push_sums_the_devices_and_pull_sees_it() {
    let e = engine();
    let kv = KvStore::create("local", &e).unwrap();
    kv.init(3, &zeros(&e, 4)).unwrap();
    let a = f32s(&e, &[1.0, 2.0, 3.0, 4.0], Context::Gpu(0));
    let b = f32s(&e, &[10.0, 20.0, 30.0, 40.0], Context::Gpu(1));
    kv.push(3, &[a.clone(), b], 0).unwrap();
    let outs = [
        zeros(&e, 4),
        Tensor::zeros(&e, &[4], DType::F32, Context::Gpu(1)).unwrap(),
    ];
    kv.pull(3, &outs, 0).unwrap();
    // The push is ordered after earlier writes of `a`, the pull after the push.
    a.copy_from_slice(&[0.0f32; 4]).unwrap();
    for o in &outs {
        assert_eq!(o.to_vec::<f32>().unwrap(), vec![11.0, 22.0, 33.0, 44.0]);
    }
    assert_eq!(kv.rank(), 0);
    assert_eq!(kv.num_workers(), 1);
    kv.barrier().unwrap();
}

#[test]
fn many_pushes_and_pulls_keep_their_order() {
    let e = engine();
    let kv = KvStore::create("local", &e).unwrap();
    kv.set_optimizer(Optimizer::sgd(1.0)).unwrap();
    kv.init("w", &zeros(&e, 1)).unwrap();
    let out = zeros(&e, 1);
    let mut seen = Vec::new();
    for i in 1..=50 {
        kv.push("w", &[f32s(&e, &[-(i as f32)], Context::Cpu)], 0)
            .unwrap();
        kv.pull("w", &[out.clone()], 0).unwrap();
        seen.push(out.to_vec::<f32>().unwrap()[0]);
    }
    let want: Vec<f32> = (1..=50).map(|i| (i * (i + 1) / 2) as f32).collect();
    assert_eq!(seen, want);
}

#[test]
fn many_keys_in_one_call_and_string_keys() {
    let e = engine();
    let kv = KvStore::create("local", &e).unwrap();
    let keys: Vec<Key> = (0..40)
        .map(|i| {
            if i % 2 == 0 {
                Key::Int(i)
            } else {
                Key::from(format!("layer{i}"))
            }
        })
        .collect();
    let inits: Vec<(Key, Tensor)> = keys.iter().map(|k| (k.clone(), zeros(&e, 8))).collect();
    kv.init_many(&inits).unwrap();
    let pushes: Vec<(Key, Vec<Tensor>)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            (
                k.clone(),
                vec![f32s(&e, &values(i as u64, 8), Context::Cpu)],
            )
        })
        .collect();
    kv.push_many(&pushes, 0).unwrap();
    let outs: Vec<(Key, Vec<Tensor>)> = keys
        .iter()
        .map(|k| (k.clone(), vec![zeros(&e, 8)]))
        .collect();
    kv.pull_many(&outs, 0).unwrap();
    for (i, (_, o)) in outs.iter().enumerate() {
        assert_eq!(o[0].to_vec::<f32>().unwrap(), values(i as u64, 8));
    }
    // A key given twice in one push: its values are summed.
    kv.push_many(
        &[
            (Key::Int(0), vec![f32s(&e, &[1.0; 8], Context::Cpu)]),
            (Key::Int(0), vec![f32s(&e, &[2.0; 8], Context::Cpu)]),
        ],
        0,
    )
    .unwrap();
    kv.pull(0, &[outs[0].1[0].clone()], 0).unwrap();
    assert_eq!(outs[0].1[0].to_vec::<f32>().unwrap(), vec![3.0; 8]);
}

/// An `init` of several keys, two of which share an id (two strings of
/// one 31-bit hash), fails naming both and adds none of its keys: they,
/// and the good key before them, can be initialized after.
#[test]
fn an_init_with_two_keys_of_one_id_adds_none_of_its_keys() {
    let e = engine();
    let kv = KvStore::create("local", &e).unwrap();
    let (a, b) = (Key::from("w10160"), Key::from("w69673"));
    assert_eq!(a.id(), b.id(), "the two names' hashes clash");
    let err = kv
        .init_many(&[
            (Key::from(5u32), zeros(&e, 4)),
            (a.clone(), zeros(&e, 4)),
            (b.clone(), zeros(&e, 4)),
        ])
        .unwrap_err();
    assert!(
        err.to_string().contains("'w10160'") && err.to_string().contains("'w69673'"),
        "{err}"
    );
    for k in [Key::from(5u32), a.clone(), b.clone()] {
        assert!(
            matches!(kv.key_info(k.clone()), Err(KvError::NotInitialized { .. })),
            "{k} was added"
        );
    }
    kv.init_many(&[(Key::from(5u32), zeros(&e, 4)), (a, zeros(&e, 4))])
        .unwrap();
}

#[test]
fn every_misuse_is_a_clear_error() {
    let e = engine();
    assert!(matches!(
        KvStore::create("dist_banana", &e),
        Err(KvError::UnknownKind(_))
    ));
    let kv = KvStore::create("local", &e).unwrap();
    let v = zeros(&e, 4);
    let err = kv.push(9, &[v.clone()], 0).unwrap_err();
    assert!(matches!(err, KvError::NotInitialized { .. }), "{err}");
    assert!(err.to_string().contains("key 9"), "{err}");
    assert!(kv.pull("nope", &[v.clone()], 0).is_err());
    kv.init(1, &v).unwrap();
    let err = kv.init(1, &v).unwrap_err();
    assert!(matches!(err, KvError::AlreadyInitialized { .. }), "{err}");
    let err = kv.push(1, &[zeros(&e, 5)], 0).unwrap_err();
    assert!(
        err.to_string().contains("5 elements") && err.to_string().contains("4 elements"),
        "{err}"
    );
    let f64s = Tensor::zeros(&e, &[4], DType::F64, Context::Cpu).unwrap();
    let err = kv.pull(1, &[f64s], 0).unwrap_err();
    assert!(
        err.to_string().contains("f64") && err.to_string().contains("f32"),
        "{err}"
    );
    assert!(kv.push(1, &[], 0).is_err());
    assert!(kv.push(-1, &[v.clone()], 0).is_err());
    let other = Engine::builder().cpu_threads(1).build().unwrap();
    assert!(kv.push(1, &[zeros(&other, 4)], 0).is_err());
    let err = kv
        .set_gradient_compression(Compression::two_bit(0.5))
        .unwrap_err();
    assert!(matches!(err, KvError::Unsupported { .. }), "{err}");
    assert!(kv.send_command_to_servers(0, "x").is_err());
    assert!(kv
        .set_optimizer(Optimizer::adam(-0.0).betas(2.0, 0.5))
        .is_err());
    // After all that, the key still works.
    kv.push(1, &[f32s(&e, &[1.0; 4], Context::Cpu)], 0).unwrap();
    kv.pull(1, &[v.clone()], 0).unwrap();
    assert_eq!(v.to_vec::<f32>().unwrap(), vec![1.0; 4]);
    // Compression takes f32 only.
    let dev = KvStore::create("device", &e).unwrap();
    dev.set_gradient_compression(Compression::two_bit(0.5))
        .unwrap();
    dev.init(
        2,
        &Tensor::zeros(&e, &[4], DType::F64, Context::Cpu).unwrap(),
    )
    .unwrap();
    let err = dev
        .push(
            2,
            &[Tensor::zeros(&e, &[4], DType::F64, Context::Gpu(0)).unwrap()],
            0,
        )
        .unwrap_err();
    assert!(err.to_string().contains("f32"), "{err}");
}

#[test]
fn an_updater_error_reaches_the_next_read() {
    let e = engine();
    let kv = KvStore::create("local", &e).unwrap();
    kv.set_updater(
        |_k: &Key, _g: &Values<'_>, _w: &mut ValuesMut<'_>| -> Result<(), String> {
            Err("the updater refuses".into())
        },
    )
    .unwrap();
    kv.init(0, &zeros(&e, 2)).unwrap();
    kv.push(0, &[zeros(&e, 2)], 0).unwrap();
    let out = zeros(&e, 2);
    kv.pull(0, &[out.clone()], 0).unwrap();
    let err = out.to_vec::<f32>().unwrap_err();
    assert!(err.to_string().contains("the updater refuses"), "{err}");
    // Reported once: the engine's wait clears it.
    let _ = e.wait_for_all();
}

#[test]
fn custom_updaters_see_the_merged_gradient() {
    let e = engine();
    let kv = KvStore::create("local", &e).unwrap();
    kv.set_updater(
        |_k: &Key, g: &Values<'_>, w: &mut ValuesMut<'_>| -> Result<(), String> {
            let g = g.as_slice::<f32>().ok_or("f32")?.to_vec();
            for (w, g) in w.as_mut_slice::<f32>().ok_or("f32")?.iter_mut().zip(g) {
                *w = *w * 2.0 + g;
            }
            Ok(())
        },
    )
    .unwrap();
    kv.init(0, &f32s(&e, &[1.0, 2.0], Context::Cpu)).unwrap();
    kv.push(
        0,
        &[
            f32s(&e, &[1.0, 1.0], Context::Gpu(0)),
            f32s(&e, &[2.0, 2.0], Context::Gpu(1)),
        ],
        0,
    )
    .unwrap();
    let out = zeros(&e, 2);
    kv.pull(0, &[out.clone()], 0).unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![5.0, 7.0]);
}

#[test]
fn device_tree_reduction_follows_the_topology() {
    let e = Engine::builder()
        .cpu_threads(2)
        .gpu_threads(1)
        .build()
        .unwrap();
    let opts = Options {
        use_tree: true,
        topology: Some(Topology::parse("0 3 1 1; 3 0 1 1; 1 1 0 3; 1 1 3 0").unwrap()),
        ..Options::default()
    };
    let kv = KvStore::create_with("device", &e, opts).unwrap();
    let n = 1000;
    for key in 0u32..4 {
        kv.init(key, &zeros(&e, n)).unwrap();
        let vals: Vec<Vec<f32>> = (0..4).map(|d| values(key as u64 * 10 + d, n)).collect();
        let ins: Vec<Tensor> = (0..4)
            .map(|d| f32s(&e, &vals[d], Context::Gpu(d as u32)))
            .collect();
        kv.push(key, &ins, 0).unwrap();
        let out = zeros(&e, n);
        kv.pull(key, &[out.clone()], 0).unwrap();
        // The reference: the same tree, summed own-value-first, deepest
        // children first.
        let topo = Topology::parse("0 3 1 1; 3 0 1 1; 1 1 0 3; 1 1 3 0").unwrap();
        let root = (key as usize) % 4;
        let tree = topo.tree(&[0, 1, 2, 3], root).unwrap();
        fn partial(t: &pskv_kvstore::ReduceTree, d: usize, vals: &[Vec<f32>]) -> Vec<f32> {
            let mut acc = vals[d].clone();
            for c in t.children(d) {
                let p = partial(t, c, vals);
                for (a, b) in acc.iter_mut().zip(&p) {
                    *a += *b;
                }
            }
            acc
        }
        let want = partial(&tree, root, &vals);
        assert_eq!(out.to_vec::<f32>().unwrap(), want, "key {key}");
    }
}

#[test]
fn device_compression_matches_a_cpu_reference() {
    let e = Engine::builder()
        .cpu_threads(2)
        .gpu_threads(1)
        .build()
        .unwrap();
    let kv = KvStore::create("device", &e).unwrap();
    kv.set_gradient_compression(Compression::two_bit(0.5))
        .unwrap();
    let n = 300;
    kv.init(7, &zeros(&e, n)).unwrap();
    let k = CpuKernels::single_threaded();
    let mut residuals = vec![vec![0.0f32; n]; 3];
    let out = zeros(&e, n);
    for step in 0..5u64 {
        let grads: Vec<Vec<f32>> = (0..3).map(|d| values(step * 7 + d, n)).collect();
        let ins: Vec<Tensor> = (0..3)
            .map(|d| f32s(&e, &grads[d], Context::Gpu(d as u32)))
            .collect();
        kv.push(7, &ins, 0).unwrap();
        kv.pull(7, &[out.clone()], 0).unwrap();
        let mut want = vec![0.0f32; n];
        for d in 0..3 {
            let mut codes = vec![0u32; pskv_gpu::layout::words_2bit(n)];
            k.quantize_2bit(&grads[d], &mut residuals[d], &mut codes, 0.5)
                .unwrap();
            let mut deq = vec![0.0f32; n];
            k.dequantize_2bit(&codes, &mut deq, 0.5).unwrap();
            if d == 0 {
                want = deq;
            } else {
                want.iter_mut().zip(&deq).for_each(|(a, b)| *a += *b);
            }
        }
        assert_eq!(out.to_vec::<f32>().unwrap(), want, "step {step}");
    }
}

#[test]
fn row_sparse_updates_only_the_rows_pushed() {
    let e = engine();
    let kv = KvStore::create("local", &e).unwrap();
    kv.set_optimizer(Optimizer::sgd(0.5).wd(0.1)).unwrap();
    let w0: Vec<f32> = (0..12).map(|i| i as f32).collect();
    kv.init(
        "emb",
        &Tensor::from_slice(&e, &[6, 2], &w0, Context::Cpu).unwrap(),
    )
    .unwrap();
    let g1 = Tensor::row_sparse(
        &e,
        &[6, 2],
        vec![1, 4],
        &[1.0f32, 1.0, 2.0, 2.0],
        Context::Gpu(0),
    )
    .unwrap();
    let g2 = Tensor::row_sparse(
        &e,
        &[6, 2],
        vec![4, 5],
        &[1.0f32, 1.0, 3.0, 3.0],
        Context::Gpu(1),
    )
    .unwrap();
    kv.push("emb", &[g1, g2], 0).unwrap();
    let out = Tensor::zeros_row_sparse(&e, &[6, 2], DType::F32, Context::Cpu).unwrap();
    let ids = Tensor::from_slice(&e, &[4], &[5i64, 0, 4, 5], Context::Cpu).unwrap();
    kv.pull_row_sparse("emb", &[out.clone()], &[ids], 0)
        .unwrap();
    let (rows, vals) = out.to_row_sparse::<f32>().unwrap();
    assert_eq!(rows, vec![0, 4, 5]);
    // sgd_update (lazy): w = (1 - lr*wd) * w - lr * g on rows 1, 4, 5 only.
    let upd = |w: f32, g: f32| (1.0f32 - 0.5 * 0.1) * w - (0.5f32 * 1.0) * g;
    assert_eq!(
        vals,
        vec![
            0.0,
            1.0,
            upd(8.0, 3.0),
            upd(9.0, 3.0),
            upd(10.0, 3.0),
            upd(11.0, 3.0)
        ]
    );
    let dense = Tensor::zeros(&e, &[6, 2], DType::F32, Context::Cpu).unwrap();
    kv.pull("emb", &[dense.clone()], 0).unwrap();
    let d = dense.to_vec::<f32>().unwrap();
    assert_eq!(&d[0..2], &[0.0, 1.0]);
    assert_eq!(d[2], upd(2.0, 1.0));
    assert_eq!(&d[4..8], &[4.0, 5.0, 6.0, 7.0]);
    // Bad row ids are an error on the read.
    let bad = Tensor::from_slice(&e, &[1], &[6i64], Context::Cpu).unwrap();
    kv.pull_row_sparse("emb", &[out.clone()], &[bad], 0)
        .unwrap();
    assert!(out
        .to_vec::<f32>()
        .unwrap_err()
        .to_string()
        .contains("row id 6"));
    let _ = e.wait_for_all();
    // Pulling into a row-sparse tensor needs row ids.
    assert!(kv.pull("emb", &[out], 0).is_err());
}

#[test]
fn optimizer_state_survives_save_and_load() {
    let e = engine();
    let dir = std::env::temp_dir().join(format!("pskv-states-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("adam.states");
    let n = 64;
    let run = |kv: &KvStore, steps: std::ops::Range<u64>| {
        for s in steps {
            kv.push(0, &[f32s(&e, &values(s, n), Context::Cpu)], 0)
                .unwrap();
        }
        let out = zeros(&e, n);
        kv.pull(0, &[out.clone()], 0).unwrap();
        out.to_vec::<f32>().unwrap()
    };
    let a = KvStore::create("local", &e).unwrap();
    a.set_optimizer(Optimizer::adam(0.01).wd(0.001)).unwrap();
    a.init(0, &f32s(&e, &values(99, n), Context::Cpu)).unwrap();
    let mid = run(&a, 0..3);
    a.save_optimizer_states(&path).unwrap();
    let end_a = run(&a, 3..5);

    let b = KvStore::create("local", &e).unwrap();
    b.set_optimizer(Optimizer::adam(0.01).wd(0.001)).unwrap();
    b.init(0, &f32s(&e, &mid, Context::Cpu)).unwrap();
    b.load_optimizer_states(&path).unwrap();
    let end_b = run(&b, 3..5);
    assert_eq!(end_a, end_b);

    // A store without the key, or a damaged file, is refused.
    let c = KvStore::create("local", &e).unwrap();
    c.set_optimizer(Optimizer::adam(0.01)).unwrap();
    assert!(c.load_optimizer_states(&path).is_err());
    std::fs::write(dir.join("junk"), b"not states").unwrap();
    assert!(b.load_optimizer_states(dir.join("junk")).is_err());
    assert!(b.load_optimizer_states(dir.join("missing")).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_store_waits_for_its_ops_when_dropped() {
    let e = engine();
    let out = zeros(&e, 1000);
    {
        let kv = KvStore::create("local", &e).unwrap();
        kv.init(0, &f32s(&e, &vec![2.0; 1000], Context::Cpu))
            .unwrap();
        kv.pull(0, &[out.clone()], 0).unwrap();
    }
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![2.0; 1000]);
    let _ = Arc::new(());
}

/// Planned calls (`KvStore::plan`, `issue`) give what the calls they plan
/// give, bit for bit, step after step: one value on the host (its copies
/// kept), two devices' values and outputs (planned through the general
/// path), a pull alone, with an optimizer set part way, and on a `device`
/// store with compression turned on part way.
#[test]
fn planned_calls_match_the_calls_they_plan() {
    use pskv_kvstore::Call;
    for kind in ["local", "device"] {
        let e = engine();
        let (calls, plans) = (
            KvStore::create(kind, &e).unwrap(),
            KvStore::create(kind, &e).unwrap(),
        );
        let n = 6;
        let host = |v: &[f32]| f32s(&e, v, Context::Cpu);
        let on = |v: &[f32], g: u32| f32s(&e, v, Context::Gpu(g));
        let start: Vec<f32> = values(1, n);
        for kv in [&calls, &plans] {
            kv.init(1, &host(&start)).unwrap();
            kv.init(2, &host(&start)).unwrap();
        }
        // Per store: key 1's value and output, key 2's two values and two
        // outputs, key 2's pulled copy.
        let side = || {
            let zero = vec![0.0f32; n];
            (
                host(&zero),
                host(&zero),
                [on(&zero, 0), on(&zero, 1)],
                [host(&zero), on(&zero, 1)],
                host(&zero),
            )
        };
        let (a, b) = (side(), side());
        let one = |t: &Tensor| vec![t.clone()];
        let p1 = plans
            .plan(Call::PushPull, 1, &one(&b.0), &one(&b.1), 0)
            .unwrap();
        let p2 = plans.plan(Call::Push, 2, &b.2, &[], -1).unwrap();
        let p3 = plans.plan(Call::Pull, 2, &[], &b.3, -1).unwrap();
        let p4 = plans.plan(Call::Pull, 2, &[], &one(&b.4), -2).unwrap();
        for step in 0..6u64 {
            if step == 2 {
                for kv in [&calls, &plans] {
                    kv.set_optimizer(Optimizer::sgd(0.25)).unwrap();
                }
            }
            if step == 4 && kind == "device" {
                for kv in [&calls, &plans] {
                    kv.set_gradient_compression(Compression::two_bit(0.5))
                        .unwrap();
                }
            }
            let g: Vec<f32> = values(10 + step, n);
            let h: Vec<f32> = values(20 + step, n);
            for s in [&a, &b] {
                s.0.copy_from_slice(&g).unwrap();
                s.2[0].copy_from_slice(&g).unwrap();
                s.2[1].copy_from_slice(&h).unwrap();
            }
            calls.pushpull(1, &one(&a.0), &one(&a.1), 0).unwrap();
            calls.push(2, &a.2, -1).unwrap();
            calls.pull(2, &a.3, -1).unwrap();
            calls.pull(2, &one(&a.4), -2).unwrap();
            for p in [&p1, &p2, &p3, &p4] {
                plans.issue(p).unwrap();
            }
            let outs = |s: &(Tensor, Tensor, [Tensor; 2], [Tensor; 2], Tensor)| {
                [&s.1, &s.3[0], &s.3[1], &s.4].map(|t| t.to_vec::<f32>().unwrap())
            };
            let (want, got) = (outs(&a), outs(&b));
            for (w, g) in want.iter().zip(&got) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(w), bits(g), "{kind} step {step}");
            }
        }
        // Misuse: a plan of another store, a key not initialized, a shape
        // that is not the key's, values given to a pull.
        let err = |r: pskv_kvstore::Result<()>| r.unwrap_err().to_string();
        assert!(err(calls.issue(&p1)).contains("another store"));
        let z = one(&host(&[0.0; 3]));
        assert!(plans.plan(Call::Push, 9, &z, &[], 0).is_err());
        assert!(plans.plan(Call::Push, 1, &z, &[], 0).is_err());
        let pulled = plans.plan(Call::Pull, 1, &one(&b.0), &one(&b.1), 0);
        assert!(pulled.unwrap_err().to_string().contains("takes no values"));
        e.wait_for_all().unwrap();
    }
}

/// A planned call's copies wait behind busy tensors (pushed, not run at
/// once) and keep their order with the ops before them.
#[test]
fn a_planned_call_waits_behind_a_busy_tensor() {
    use pskv_engine::OpSpec;
    use pskv_kvstore::Call;
    let e = engine();
    let kv = KvStore::create("local", &e).unwrap();
    kv.init(0, &zeros(&e, 4)).unwrap();
    let (v, o) = (zeros(&e, 4), zeros(&e, 4));
    let plan = kv
        .plan(Call::PushPull, 0, &[v.clone()], &[o.clone()], 0)
        .unwrap();
    let (go, gate) = std::sync::mpsc::channel::<()>();
    e.push_sync(OpSpec::new("hold").write(v.var()), move |_| {
        gate.recv_timeout(std::time::Duration::from_secs(20)).ok();
        Ok(())
    })
    .unwrap();
    v.copy_from_slice(&[7.0f32; 4]).unwrap();
    kv.issue(&plan).unwrap();
    v.copy_from_slice(&[9.0f32; 4]).unwrap();
    go.send(()).unwrap();
    assert_eq!(o.to_vec::<f32>().unwrap(), vec![7.0; 4]);
    kv.issue(&plan).unwrap();
    assert_eq!(o.to_vec::<f32>().unwrap(), vec![9.0; 4]);
}
