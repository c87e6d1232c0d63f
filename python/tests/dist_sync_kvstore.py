"""The checks of MXNet 1.9.1's distributed kvstore test
(tests/nightly/dist_sync_kvstore.py), run on pskv's Python API: run it
under `pskv launch -n N -s S -- python dist_sync_kvstore.py`.

What is checked, as MXNet checks it (written anew for pskv):
- init: many keys, float32 and float16, small and big (split over the
  servers), each pulled back equal to its init value;
- push and pull sums over the workers, through an update rule of MXNet's
  test optimizer (weight += rescale_grad * grad, rescale_grad = 2), small and
  big keys, float32 and float16;
- row-sparse keys: pushes of some rows, pulls of random rows (repeats
  included), of all rows, of no rows, small and big;
- 2-bit compression with threshold 0.5: a pull before any push, a zero
  push, the residual carried between pushes, pushes at the threshold, and
  random gradients against a simulation of the quantization with error
  feedback.

MXNet's optimizer `test` (weight += rescale_grad * grad) is not an
optimizer of pskv: the servers run the same arithmetic as SGD with
learning_rate 1 and rescale_grad -2 (weight - 1 * (-2 * grad)), exact for
these values.
"""

import argparse
import sys

import numpy as np

import pskv

SHAPE = (2, 3)
IRREGULAR = (1211, 1211)
BIG = (1200, 1200)  # more than the big-array bound: split over the servers
RATE = 2

KEYS = ["3", "5", "7"]
BIG_KEYS = ["99"]
F16_KEYS = ["4", "6", "8"]
F16_BIG_KEYS = ["100"]
RSP_KEYS = ["9", "11", "13"]
RSP_BIG_KEYS = ["97"]
F16_RSP_KEYS = ["10", "12", "14"]
F16_RSP_BIG_KEYS = ["98"]

INIT_KEYS = [str(i) for i in range(200, 300)]
INIT_KEYS_BIG = [str(i) for i in range(300, 310)]

COMPR = [("1000", SHAPE), ("1200", IRREGULAR), ("1300", BIG)]
COMPR_INIT = [("1001", SHAPE), ("1201", IRREGULAR), ("1301", BIG)]
COMPR_RANDOM = [("1002", SHAPE), ("1202", IRREGULAR), ("1302", BIG)]

kv = pskv.create("dist_sync")
rank = kv.rank
nworker = kv.num_workers


def fail(what, got, want):
    raise AssertionError(f"worker {rank}: {what}: got {got!r}, want {want!r}")


def equal(got, want, what):
    """Exactly equal (MXNet's check_diff: the sum of |a - b| is 0)."""
    want = np.broadcast_to(np.asarray(want, dtype=got.dtype), got.shape)
    if not np.array_equal(got, want):
        bad = np.argwhere(got != want)[:3]
        fail(what, [got[tuple(i)] for i in bad], [want[tuple(i)] for i in bad])


def pulled(key, shape, dtype="float32"):
    out = np.full(shape, -7, dtype=dtype)
    kv.pull(key, out=out).wait()
    return out


def check_init():
    for keys, shape in [(INIT_KEYS, SHAPE), (INIT_KEYS_BIG, BIG)]:
        for i, k in enumerate(keys):
            dtype = "float32" if i < len(keys) // 2 else "float16"
            kv.init(k, np.ones(shape, dtype) * i)
            equal(pulled(k, shape, dtype), i, f"init of key {k}")
    print(f"worker {rank} is initialized", flush=True)


def init_keys():
    kv.init(KEYS, [np.ones(SHAPE, np.float32)] * len(KEYS))
    kv.init(BIG_KEYS, [np.ones(BIG, np.float32)] * len(BIG_KEYS))
    kv.init(RSP_KEYS, [pskv.row_sparse(np.ones(SHAPE, np.float32))] * len(RSP_KEYS))
    kv.init(RSP_BIG_KEYS, [pskv.row_sparse(np.ones(BIG, np.float32))])
    kv.init(F16_KEYS, [np.ones(SHAPE, np.float16)] * len(F16_KEYS))
    kv.init(F16_BIG_KEYS, [np.ones(BIG, np.float16)])
    kv.init(F16_RSP_KEYS, [pskv.row_sparse(np.ones(SHAPE, np.float16))] * len(F16_RSP_KEYS))
    kv.init(F16_RSP_BIG_KEYS, [pskv.row_sparse(np.ones(BIG, np.float16))])


def check_dense(dtype, nrepeat):
    keys = [(k, SHAPE) for k in KEYS] + [(k, BIG) for k in BIG_KEYS]
    if dtype == "float16":
        keys = [(k, SHAPE) for k in F16_KEYS] + [(k, BIG) for k in F16_BIG_KEYS]
    for k, s in keys:
        for i in range(nrepeat):
            kv.push(k, np.ones(s, dtype) * (rank + 1))
            # 1 + rate * (1 + 2 + ... + nworker) per round.
            want = (nworker + 1) * nworker * RATE / 2 * (i + 1) + 1
            equal(pulled(k, s, dtype), want, f"{dtype} key {k} after {i + 1} pushes")


def expected_rows(shape, dtype, updates, rounds):
    """The key's value after `rounds` rounds of `updates[r]` (rows) from
    each rank r pushing rank + 1."""
    val = np.ones(shape, dtype)
    for r in range(nworker):
        for row in updates[r]:
            val[row] += (r + 1) * RATE * rounds
    return val


def pull_rows(k, shape, dtype, ids):
    out = np.full(shape, -7, dtype)
    kv.row_sparse_pull(k, out=out, row_ids=ids).wait()
    return out


def check_row_sparse(dtype, nrepeat):
    k = RSP_KEYS[0] if dtype == "float32" else F16_RSP_KEYS[0]
    v = np.zeros(SHAPE, dtype)
    v[rank % SHAPE[0]] = rank + 1
    updates = [[r % SHAPE[0]] for r in range(nworker)]
    for i in range(nrepeat):
        kv.push(k, pskv.row_sparse(v))
        ids = np.random.randint(SHAPE[0], size=SHAPE[0])
        # MXNet passes row ids as a float array of another shape.
        got = pull_rows(k, SHAPE, dtype, ids.reshape(SHAPE[0] // 2, 2).astype(dtype))
        full = expected_rows(SHAPE, dtype, updates, i + 1)
        want = np.zeros(SHAPE, dtype)
        want[ids] = full[ids]
        equal(got, want, f"row-sparse {dtype} key {k} round {i}")


def check_row_sparse_zeros(dtype, nrepeat):
    k1 = RSP_KEYS[1] if dtype == "float32" else F16_RSP_KEYS[1]
    k2 = RSP_BIG_KEYS[0] if dtype == "float32" else F16_RSP_BIG_KEYS[0]
    none = lambda s: pskv.RowSparse(np.zeros((0,) + s[1:], dtype), [], s)
    for i in range(nrepeat):
        kv.push(k1, none(SHAPE))
        kv.push(k2, none(BIG))
        equal(pull_rows(k1, SHAPE, dtype, np.arange(SHAPE[0])), 1, f"key {k1}, all rows")
        equal(pull_rows(k2, BIG, dtype, np.arange(BIG[0])), 1, f"key {k2}, all rows")
        equal(pull_rows(k1, SHAPE, dtype, []), 0, f"key {k1}, no rows")
        equal(pull_rows(k2, BIG, dtype, []), 0, f"key {k2}, no rows")


def check_big_row_sparse(dtype, nrepeat):
    k = RSP_BIG_KEYS[0] if dtype == "float32" else F16_RSP_BIG_KEYS[0]
    rng = np.random.RandomState(123)
    rows = np.flatnonzero(rng.rand(BIG[0]) < 0.3)
    # Worker r updates every (r + 1) * 2-th of those rows.
    updates = [rows[:: (r + 1) * 2] for r in range(nworker)]
    v = np.zeros(BIG, dtype)
    v[updates[rank]] = rank + 1
    # The key already took one all-rows-zero push per round of
    # check_row_sparse_zeros: zero changes nothing.
    for i in range(nrepeat):
        kv.push(k, pskv.row_sparse(v))
        ids = np.random.RandomState(rank).randint(BIG[0], size=BIG[0])
        got = pull_rows(k, BIG, dtype, ids.reshape(BIG[0] // 2, 2).astype(dtype))
        full = expected_rows(BIG, dtype, updates, i + 1)
        want = np.zeros(BIG, dtype)
        want[ids] = full[ids]
        equal(got, want, f"big row-sparse {dtype} key {k} round {i}")


def quantize_2bit(grad, residual, threshold):
    """MXNet's 2-bit quantization with error feedback, simulated: the
    gradient plus the residual becomes +threshold, -threshold or 0; what
    is left over is the next residual."""
    r = (residual + grad).astype(np.float32)
    q = np.where(r >= threshold, threshold, np.where(r <= -threshold, -threshold, 0)).astype(np.float32)
    return q, (r - q).astype(np.float32)


def check_compression(threshold, nrepeat):
    print(f"worker {rank} started with compression tests", flush=True)
    # A pull before any push; keys initialized under compression keep their
    # values (an init is not quantized).
    for k, s in COMPR:
        equal(pulled(k, s), 0, f"compressed key {k} before a push")
    for k, s in COMPR_INIT:
        equal(pulled(k, s), 1, f"key {k} initialized under compression")
    # Zeros.
    for k, s in COMPR:
        kv.push(k, np.zeros(s, np.float32))
        equal(pulled(k, s), 0, f"compressed key {k} after a zero push")
    # The residual: 0.4 stays below the threshold; 0.4 + (t - 0.4) reaches it.
    for k, s in COMPR:
        kv.push(k, np.ones(s, np.float32) * 0.4)
        equal(pulled(k, s), 0, f"key {k}: 0.4 is below the threshold")
        kv.push(k, np.ones(s, np.float32) * (threshold - 0.4))
        cur = threshold * RATE * nworker
        equal(pulled(k, s), cur, f"key {k}: the residual reaches the threshold")
        kv.push(k, np.ones(s, np.float32) * 0.2)
        equal(pulled(k, s), cur, f"key {k}: 0.2 is below")
        kv.push(k, np.ones(s, np.float32) * (threshold - 0.2))
        cur += threshold * RATE * nworker
        equal(pulled(k, s), cur, f"key {k}: again at the threshold")
    # A push of the threshold itself.
    for k, s in COMPR:
        before = pulled(k, s)[0, 0]
        kv.push(k, np.ones(s, np.float32) * threshold)
        equal(pulled(k, s), before + RATE * nworker * threshold, f"key {k}: a push at the threshold")
    # Random gradients (the same on every worker), fresh keys.
    rng = np.random.RandomState(123)
    for k, s in COMPR_RANDOM:
        kv.init(k, np.zeros(s, np.float32))
    for k, s in COMPR_RANDOM:
        residual = np.zeros(s, np.float32)
        for i in range(nrepeat):
            before = pulled(k, s)
            grad = rng.rand(*s).astype(np.float32)
            kv.push(k, grad)
            after = pulled(k, s)
            q, residual = quantize_2bit(grad, residual, threshold)
            want = q * nworker * RATE
            if not np.allclose(after - before, want, rtol=1e-5, atol=1e-5):
                fail(f"key {k} round {i}: random gradient", (after - before)[:1, :4], want[:1, :4])
    print(f"worker {rank} is done with compression tests", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nrepeat", type=int, default=7)
    opt = p.parse_args()
    check_init()
    init_keys()
    # MXNet's optimizer `test` with rescale_grad = RATE, on the servers.
    kv.set_optimizer("sgd", learning_rate=1.0, rescale_grad=-RATE)
    for dtype in ["float16", "float32"]:
        check_dense(dtype, opt.nrepeat)
        check_row_sparse(dtype, opt.nrepeat)
        check_row_sparse_zeros(dtype, opt.nrepeat)
        check_big_row_sparse(dtype, opt.nrepeat)
    print(f"worker {rank} is done with non compression tests", flush=True)
    threshold = 0.5
    kv.set_gradient_compression({"type": "2bit", "threshold": threshold})
    for k, s in COMPR:
        kv.init(k, np.zeros(s, np.float32))
    for k, s in COMPR_INIT:
        kv.init(k, np.ones(s, np.float32))
    check_compression(threshold, opt.nrepeat)
    pskv.waitall()
    kv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
