//! Unit tests of `Tensor`: copies in push order, shared buffers, row-sparse
//! values, tensors of another engine.

use super::*;
use bytes::Bytes;
use parking_lot::Mutex;

fn engine() -> Engine {
    Engine::builder().cpu_threads(2).build().unwrap()
}

#[test]
fn copies_and_reads_follow_push_order() {
    let e = engine();
    let a = Tensor::from_vec(&e, &[4], vec![1.0f32, 2.0, 3.0, 4.0], Context::Cpu).unwrap();
    let b = Tensor::zeros(&e, &[4], DType::F32, Context::Gpu(1)).unwrap();
    a.copy_to(&b).unwrap();
    a.copy_from_slice(&[9.0f32; 4]).unwrap();
    assert_eq!(b.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(a.to_vec::<f32>().unwrap(), vec![9.0; 4]);
    b.map_mut::<f32>(|v| v.iter_mut().for_each(|x| *x *= 2.0))
        .unwrap();
    assert_eq!(b.to_vec::<f32>().unwrap(), vec![2.0, 4.0, 6.0, 8.0]);
    assert!(a.to_vec::<f64>().is_err());
    assert!(a.copy_from_slice(&[1.0f32; 3]).is_err());
}

#[test]
fn shared_buffers_are_copied_before_a_write() {
    let e = engine();
    let a = Tensor::from_vec(&e, &[2], vec![1i32, 2], Context::Cpu).unwrap();
    let held = Arc::new(Mutex::new(Bytes::new()));
    let (h2, a2) = (held.clone(), a.clone());
    e.push_sync(OpSpec::new("share").read(a.var()), move |rc| {
        *h2.lock() = a2.read(&rc)?.share(0..8);
        Ok(())
    })
    .unwrap();
    a.map_mut::<i32>(|v| v[0] = 7).unwrap();
    assert_eq!(a.to_vec::<i32>().unwrap(), vec![7, 2]);
    assert_eq!(&held.lock()[..], bytemuck::cast_slice::<i32, u8>(&[1, 2]));
}

#[test]
fn row_sparse_round_trips_and_densifies() {
    let e = engine();
    let rs = Tensor::row_sparse(
        &e,
        &[4, 2],
        vec![1, 3],
        &[1.0f32, 2.0, 3.0, 4.0],
        Context::Cpu,
    )
    .unwrap();
    assert_eq!(
        rs.to_vec::<f32>().unwrap(),
        vec![0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 3.0, 4.0]
    );
    let dense = Tensor::zeros(&e, &[4, 2], DType::F32, Context::Cpu).unwrap();
    rs.copy_to(&dense).unwrap();
    let back = Tensor::zeros_row_sparse(&e, &[4, 2], DType::F32, Context::Cpu).unwrap();
    dense.copy_to(&back).unwrap();
    assert_eq!(
        back.to_row_sparse::<f32>().unwrap(),
        (vec![1, 3], vec![1.0, 2.0, 3.0, 4.0])
    );
    assert!(Tensor::row_sparse(&e, &[4, 2], vec![3, 1], &[0.0f32; 4], Context::Cpu).is_err());
    assert!(Tensor::row_sparse(&e, &[4, 2], vec![4], &[0.0f32; 2], Context::Cpu).is_err());
    assert!(Tensor::row_sparse(&e, &[4, 2], vec![0], &[0.0f32; 3], Context::Cpu).is_err());
}

#[test]
fn tensors_of_another_engine_are_refused() {
    let (e1, e2) = (engine(), engine());
    let a = Tensor::zeros(&e1, &[1], DType::F32, Context::Cpu).unwrap();
    let b = Tensor::zeros(&e2, &[1], DType::F32, Context::Cpu).unwrap();
    assert!(a.copy_to(&b).is_err());
}
