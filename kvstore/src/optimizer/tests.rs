use super::*;
use half::f16;
use schedule::LrScheduler;

/// An MXNet optimizer's attribute dictionary passes as it is: the
/// attributes pskv has the meaning of take effect, the others are
/// ignored, a lazy_update pskv cannot do and a typo are errors.
#[test]
fn mxnet_attributes_are_taken_ignored_or_refused() {
    let method = |o: &Optimizer| serde_json::to_value(&o.method).unwrap();
    let a = Optimizer::create("adagrad", &[("float_stable_eps", 1e-5)]).unwrap();
    let b = Optimizer::create("adagrad", &[("epsilon", 1e-5)]).unwrap();
    assert_eq!(method(&a), method(&b));
    let plain = Optimizer::create("sgd", &[("momentum", 0.9)]).unwrap();
    let mx = Optimizer::create(
        "sgd",
        &[
            ("momentum", 0.9),
            ("lazy_update", 1.0),
            ("aggregate_num", 4.0),
            ("use_fused_step", 1.0),
            ("float_stable_eps", 1e-8),
        ],
    )
    .unwrap();
    assert_eq!(method(&plain), method(&mx));
    assert_eq!(plain.learning_rate, mx.learning_rate);
    let e = Optimizer::create("adam", &[("lazy_update", 0.0)]).unwrap_err();
    assert!(e.to_string().contains("lazy update"), "{e}");
    let e = Optimizer::create("sgd", &[("momentun", 0.9)]).unwrap_err();
    assert!(e.to_string().contains("momentun"), "{e}");
}

#[test]
fn a_method_serializes_as_before_the_rule_types() {
    // The shape workers send and checkpoints keep: {"Sgd":{"momentum":..}}.
    let o = Optimizer::sgd(0.1).momentum(0.5);
    let j = serde_json::to_value(&o.method).unwrap();
    assert_eq!(j, serde_json::json!({"Sgd": {"momentum": 0.5}}));
    let a = serde_json::to_value(&Optimizer::adam(0.1).method).unwrap();
    assert_eq!(
        a,
        serde_json::json!({"Adam": {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}})
    );
}

#[test]
fn sgd_follows_the_formula() {
    let opt = Optimizer::sgd(0.5);
    let mut w = vec![1.0f32, 2.0];
    let mut st = None;
    opt.update(
        0,
        WeightMut::F32(&mut w),
        GradRef::F32(&[1.0, -2.0]),
        &mut st,
    )
    .unwrap();
    assert_eq!(w, vec![0.5, 3.0]);
    assert_eq!(st.unwrap().count, 1);
}

/// A clone, or a new scheduler, starts counting afresh; a changed rate
/// is not served from the old rate's memo.
#[test]
fn schedules_restart_with_a_clone_or_a_new_scheduler() {
    let step = |o: &Optimizer, st: &mut Option<OptState>| {
        let mut w = vec![0.0f32];
        o.update(1, WeightMut::F32(&mut w), GradRef::F32(&[1.0]), st)
            .unwrap();
        -w[0]
    };
    let o = Optimizer::sgd(1.0).lr_scheduler(LrScheduler::factor(1, 0.5));
    let mut st = None;
    let rates: Vec<f32> = (0..3).map(|_| step(&o, &mut st)).collect();
    assert_eq!(rates, vec![1.0, 0.5, 0.25]);
    assert_eq!(o.num_update(), 3);
    let c = o.clone();
    assert_eq!(c.num_update(), 0);
    assert_eq!(step(&c, &mut None), 1.0);
    let o2 = o.lr_scheduler(LrScheduler::factor(1, 0.9));
    let mut st2 = None;
    let r2: Vec<f32> = (0..3).map(|_| step(&o2, &mut st2)).collect();
    assert_eq!(r2, vec![1.0, 0.9, 0.81]);
    let mut o3 = o2.clone();
    for _ in 0..3 {
        step(&o3, &mut None);
    }
    o3.learning_rate = 2.0;
    // Counts 1, then 4 (the restored count says so): 2 * 0.9^3.
    o3.note_count(3);
    let mut st3 = Some(OptState {
        count: 3,
        bufs: Vec::new(),
        master: None,
    });
    assert_eq!(step(&o3, &mut st3), (2.0f64 * 0.9 * 0.9 * 0.9) as f32);
}

#[test]
fn momentum_state_carries_over() {
    let opt = Optimizer::sgd(1.0).momentum(0.5);
    let mut w = vec![0.0f64];
    let mut st = None;
    for _ in 0..2 {
        opt.update(7, WeightMut::F64(&mut w), GradRef::F64(&[1.0]), &mut st)
            .unwrap();
    }
    // m1 = -1, w = -1; m2 = -0.5 - 1 = -1.5, w = -2.5.
    assert_eq!(w, vec![-2.5]);
}

#[test]
fn lazy_rows_leave_other_rows_alone() {
    let opt = Optimizer::adam(0.1);
    let mut w = vec![1.0f32; 6];
    let mut st = None;
    opt.update_rows(
        0,
        WeightMut::F32(&mut w),
        &[1],
        2,
        GradRef::F32(&[1.0, 1.0]),
        &mut st,
    )
    .unwrap();
    assert_eq!(&w[0..2], &[1.0, 1.0]);
    assert!(w[2] < 1.0 && w[3] < 1.0);
    assert_eq!(&w[4..6], &[1.0, 1.0]);
    assert!(opt
        .update_rows(
            0,
            WeightMut::F32(&mut w),
            &[3],
            2,
            GradRef::F32(&[1.0, 1.0]),
            &mut st
        )
        .is_err());
}

#[test]
fn bad_arguments_are_errors() {
    let opt = Optimizer::sgd(0.1);
    let mut w = vec![0.0f32; 2];
    let mut st = None;
    assert!(opt
        .update(0, WeightMut::F32(&mut w), GradRef::F32(&[1.0]), &mut st)
        .is_err());
    assert!(opt
        .update(
            0,
            WeightMut::F32(&mut w),
            GradRef::F64(&[1.0, 1.0]),
            &mut st
        )
        .is_err());
    assert!(Optimizer::create("rmsprop", &[]).is_err());
    assert!(Optimizer::create("sgd", &[("beta1", 0.5)]).is_err());
    assert!(Optimizer::create("adam", &[("beta1", 1.5)]).is_err());
    assert!(Optimizer::sgd(f64::NAN).validate().is_err());
}

#[test]
fn f16_multi_precision_keeps_a_master_copy() {
    let opt = Optimizer::sgd(1e-4).multi_precision(true);
    let mut w = vec![f16::from_f32(1.0)];
    let mut st = None;
    for _ in 0..10 {
        opt.update(
            0,
            WeightMut::F16(&mut w),
            GradRef::F16(&[f16::from_f32(1.0)]),
            &mut st,
        )
        .unwrap();
    }
    // Each step alone is below half an f16 ulp at 1.0; the master copy
    // accumulates them.
    let master = st.unwrap().master.unwrap()[0];
    assert!((master - 0.999).abs() < 1e-6, "{master}");
    assert_eq!(w[0], f16::from_f32(master));
}
