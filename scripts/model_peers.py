#!/usr/bin/env python3
"""A model's whole gradient set through the peers, as `pskv bench --model`
moves it: every round pushes and pulls each tensor (last layer first,
tensor i at priority -i where the API takes one), then waits for all.

    model_peers.py mxnet TENSORS.json W S OUTDIR [--compress] [--iters 20] [--warm 3]
        MXNet 1.9.1's dist_sync kvstore: starts a scheduler, S servers and
        W workers on 127.0.0.1 (what ../shared/peers/mxnet_kv_bench.sh does
        for its cases) and prints each worker's RESULT line.
    model_peers.py mpi TENSORS.json NP shm|tcp [--iters 20] [--warm 3]
        MPI_Allreduce of each tensor under mpirun (Open MPI from
        ../shared/peers/setup.sh), over shared memory or TCP only.

TENSORS.json: `pskv bench --model NAME --print-tensors`. A worker (role
`mxnet-worker` or `mpi-rank`, started by the above) prints
`RESULT {json}` with the fields of pskv bench's results.
"""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

PEERS_VENVS = os.path.expanduser(os.environ.get("PSKV_PEERS_DIR", "~/.cache/pskv-peers"))
MXPY = os.path.join(PEERS_VENVS, "mxenv", "bin", "python")
MPIPY = os.path.join(PEERS_VENVS, "mpienv", "bin", "python")


def opt(args, name, default):
    if name in args:
        return type(default)(args[args.index(name) + 1])
    return default


def load(path):
    return [(t["name"], math.prod(t["shape"])) for t in json.load(open(path))]


def result(name, tensors, ts, ok, extra):
    import numpy as np
    med = float(np.median(ts))
    total = 4 * sum(n for _, n in tensors)
    r = {"case": name, "bytes": total, "nkeys": len(tensors), "iters": len(ts),
         "check_ok": ok, "median_us": med * 1e6, "mean_us": float(np.mean(ts)) * 1e6,
         "min_us": float(np.min(ts)) * 1e6, "p90_us": float(np.percentile(ts, 90)) * 1e6,
         "algbw_gbps_median": total / med / 1e9}
    r.update(extra)
    return r


def timed(one_round, warm, iters, barrier):
    """`warm` rounds, a barrier, each of `iters` rounds timed, a barrier."""
    for _ in range(warm):
        one_round()
    barrier()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        one_round()
        ts.append(time.perf_counter() - t0)
    barrier()
    return ts


def mxnet_worker(args):
    import numpy as np
    import mxnet as mx  # a server or the scheduler serves here and exits
    path = args[0]
    tensors = load(path)
    iters, warm = opt(args, "--iters", 20), opt(args, "--warm", 3)
    kv = mx.kv.create("dist_sync")
    if "--compress" in args:
        kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    rank, nw = kv.rank, kv.num_workers
    keys = list(range(len(tensors)))
    kv.init(keys, [mx.nd.zeros((n,)) for _, n in tensors])
    outs = [mx.nd.zeros((n,)) for _, n in tensors]
    order = list(reversed(keys))

    def round_(grads):
        for i in order:
            kv.push(i, grads[i], priority=-i)
            kv.pull(i, out=outs[i], priority=-i)
        mx.nd.waitall()

    round_([mx.nd.full((n,), float(rank + 1)) for _, n in tensors])
    expect = 0.5 * nw if "--compress" in args else nw * (nw + 1) / 2.0
    ok = all(abs(float(o[0].asscalar()) - expect) < 1e-3 and
             abs(float(o[-1].asscalar()) - expect) < 1e-3 for o in outs)
    rng = np.random.RandomState(1234 + rank)
    grads = [mx.nd.array(rng.uniform(-1, 1, n).astype(np.float32)) for _, n in tensors]
    ts = timed(lambda: round_(grads), warm, iters, kv._barrier)
    name = os.path.splitext(os.path.basename(path))[0]
    print("RESULT " + json.dumps({"rank": rank, "num_workers": nw, "cases": [
        result(name, tensors, ts, ok, {})]}), flush=True)


def mpi_rank(args):
    import numpy as np
    from mpi4py import MPI
    path = args[0]
    tensors = load(path)
    iters, warm = opt(args, "--iters", 20), opt(args, "--warm", 3)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    dst = [np.empty(n, dtype=np.float32) for _, n in tensors]
    order = list(reversed(range(len(tensors))))

    def round_(src):
        for i in order:
            comm.Allreduce(src[i], dst[i], op=MPI.SUM)

    round_([np.full(n, rank + 1, dtype=np.float32) for _, n in tensors])
    ok = all(d[0] == size * (size + 1) / 2 and d[-1] == size * (size + 1) / 2 for d in dst)
    rng = np.random.default_rng(rank)
    src = [rng.uniform(-1, 1, n).astype(np.float32) for _, n in tensors]
    ts = timed(lambda: round_(src), warm, iters, comm.Barrier)
    meds = comm.gather(float(np.median(ts)), root=0)
    oks = comm.gather(ok, root=0)
    if rank == 0:
        name = os.path.splitext(os.path.basename(path))[0]
        r = result(name, tensors, ts, all(oks), {"rank_median_us": [m * 1e6 for m in meds]})
        r["median_us"] = float(np.mean(meds)) * 1e6  # the mean over ranks, as the cases
        print("RESULT " + json.dumps({"np": size, "cases": [r]}), flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def mxnet_job(args, timeout=900):
    path, w, s, outdir = args[0], int(args[1]), int(args[2]), args[3]
    rest = args[4:]
    os.makedirs(outdir, exist_ok=True)
    env = dict(os.environ, DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(free_port()),
               DMLC_NUM_SERVER=str(s), DMLC_NUM_WORKER=str(w), DMLC_NODE_HOST="127.0.0.1",
               DMLC_INTERFACE="lo", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PS_VERBOSE="0")
    procs = []

    def start(role, i, extra):
        log = os.path.join(outdir, "%s%d" % (role, i))
        p = subprocess.Popen([MXPY, os.path.abspath(__file__), "mxnet-worker", path] + extra,
                             env=dict(env, DMLC_ROLE=role), stdout=open(log + ".out", "w"),
                             stderr=open(log + ".err", "w"), start_new_session=True)
        procs.append(p)
        return p

    start("scheduler", 0, rest)
    for i in range(s):
        start("server", i, rest)
    workers = [start("worker", i, rest) for i in range(w)]
    deadline = time.time() + timeout
    rc = 0
    try:
        for p in workers:
            rc |= p.wait(timeout=max(1, deadline - time.time()))
        for p in procs:  # servers and the scheduler leave once the workers finalize
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for i in range(w):
        for line in open(os.path.join(outdir, "worker%d.out" % i)):
            if line.startswith("RESULT "):
                print(line, end="")
    return rc


def mpi_job(args):
    path, np_, mode = args[0], args[1], args[2]
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "oob_tcp_if_include", "lo"]
    if mode == "tcp":
        cmd += ["--mca", "pml", "ob1", "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo"]
    cmd += ["-np", np_, MPIPY, os.path.abspath(__file__), "mpi-rank", path] + args[3:]
    return subprocess.run(cmd, timeout=900).returncode


def main():
    role, args = sys.argv[1], sys.argv[2:]
    if role == "mxnet":
        sys.exit(mxnet_job(args))
    if role == "mpi":
        sys.exit(mpi_job(args))
    if role == "mxnet-worker":
        mxnet_worker(args)
    elif role == "mpi-rank":
        mpi_rank(args)
    else:
        sys.exit("model_peers.py: unknown role %r (mxnet, mpi)" % role)


if __name__ == "__main__":
    main()
