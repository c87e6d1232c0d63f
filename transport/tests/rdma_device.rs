//! RDMA on a real device (feature `rdma`): a small cluster over verbs. Where
//! there is no device (these CI machines have none, and no soft-RoCE), the
//! test says so and passes without running.
#![cfg(feature = "rdma")]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pskv_transport::{
    Config, KvRequest, KvWorker, Postoffice, RequestOptions, Responder, Role, VanKind,
};

#[test]
fn push_pull_over_a_verbs_device() {
    let dev = match pskv_transport::rdma_device() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    eprintln!("running on RDMA device {dev}");
    let cfg = |role, port| Config::new(role, "127.0.0.1", port, 1, 1).van(VanKind::Rdma);
    let sched = Postoffice::start(cfg(Role::Scheduler, 0), None).unwrap();
    let port = sched.local_addr().port();
    let echo = |req: KvRequest, r: Responder| r.respond(req.keys, req.lens, req.vals);
    let server = std::thread::spawn(move || {
        Postoffice::start(cfg(Role::Server, port), Some(Arc::new(echo))).unwrap()
    });
    let worker = Postoffice::start(cfg(Role::Worker, port), None).unwrap();
    let _server = server.join().unwrap();
    assert_eq!(worker.van_to(8), Some("rdma"));
    let kv = KvWorker::new(&worker);
    for n in [4usize, 4096, 1 << 20, 8 << 20] {
        let vals: Vec<u8> = (0..n).map(|i| i as u8).collect();
        let got = kv
            .push_pull(
                &[1],
                &[n as u32],
                Bytes::from(vals.clone()),
                RequestOptions::default(),
            )
            .unwrap()
            .wait(Duration::from_secs(30))
            .unwrap();
        assert_eq!(got.to_bytes(), Bytes::from(vals));
    }
}
