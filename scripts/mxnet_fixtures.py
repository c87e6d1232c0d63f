#!/usr/bin/env python
"""Writes kvstore/tests/fixtures/mxnet_optimizers.json: what MXNet 1.9.1's own
optimizers do to given weights and gradients, for pskv's conformance test.

Run with the MXNet of ../shared/peers (setup.sh installs it):
    ~/.cache/pskv-peers/mxenv/bin/python scripts/mxnet_fixtures.py

Every update goes through mx.optimizer.get_updater, the object a kvstore
(local, or a dist server) calls, so the Python bookkeeping (update counts,
Adam's bias correction, aggregation into multi_sgd) is MXNet's own. Arrays
are written as hex bit patterns so that nothing is rounded on the way.
"""
import json
import os
import sys

import numpy as np
import mxnet as mx

N = 37

CONFIGS = [
    ("sgd", dict(learning_rate=0.1), "float32", 4),
    ("sgd", dict(learning_rate=0.1, wd=0.001), "float32", 4),
    ("sgd", dict(learning_rate=0.1, wd=0.01, momentum=0.9), "float32", 6),
    ("sgd", dict(learning_rate=0.05, wd=1e-4, momentum=0.9, rescale_grad=1 / 128.0,
                 clip_gradient=0.5), "float32", 6),
    ("sgd", dict(learning_rate=0.3, wd=0.02, clip_gradient=0.25, rescale_grad=0.7), "float32", 4),
    ("nag", dict(learning_rate=0.1, momentum=0.9, wd=0.01), "float32", 6),
    ("nag", dict(learning_rate=0.1, momentum=0.9, wd=0.01, clip_gradient=0.3,
                 rescale_grad=0.5), "float32", 6),
    ("nag", dict(learning_rate=0.2, wd=0.01), "float32", 4),
    ("adam", dict(learning_rate=0.001), "float32", 8),
    ("adam", dict(learning_rate=1e-4, wd=0.01, clip_gradient=1.0, rescale_grad=0.25), "float32", 12),
    ("adam", dict(learning_rate=0.01, beta1=0.8, beta2=0.99, epsilon=1e-6), "float32", 20),
    ("adagrad", dict(learning_rate=0.1), "float32", 6),
    ("adagrad", dict(learning_rate=0.05, wd=0.01, clip_gradient=0.5, rescale_grad=2.0,
                     eps=1e-6), "float32", 6),
    ("sgd", dict(learning_rate=0.1, wd=0.01, momentum=0.9), "float64", 5),
    ("nag", dict(learning_rate=0.1, momentum=0.9, wd=0.01), "float64", 5),
    ("adam", dict(learning_rate=1e-4, wd=0.01), "float64", 8),
    # (AdaGrad on float64 fails inside MXNet: its history is always float32.)
    ("sgd", dict(learning_rate=0.1, wd=0.01, momentum=0.9, multi_precision=True), "float16", 6),
    ("sgd", dict(learning_rate=0.01, multi_precision=True), "float16", 6),
    ("nag", dict(learning_rate=0.1, momentum=0.9, wd=0.01, multi_precision=True), "float16", 6),
    ("adam", dict(learning_rate=0.001, wd=0.01, multi_precision=True), "float16", 8),
    ("adagrad", dict(learning_rate=0.1, multi_precision=True), "float16", 6),
]

BITS = {"float32": (np.uint32, 8), "float64": (np.uint64, 16), "float16": (np.uint16, 4)}


def hexes(a, dtype):
    ut, w = BITS[dtype]
    return ["%0*x" % (w, int(v)) for v in np.ascontiguousarray(a, dtype=dtype).view(ut)]


def run(name, params, dtype, steps, seed, key, lr_mult=None):
    rng = np.random.RandomState(seed)
    opt = mx.optimizer.create(name, **params)
    if lr_mult:
        opt.set_lr_mult({key: lr_mult})
        opt.set_wd_mult({key: 0.5})
    upd = mx.optimizer.get_updater(opt)
    w0 = rng.uniform(-1, 1, N).astype(dtype)
    weight = mx.nd.array(w0, dtype=dtype)
    grads, weights = [], []
    for _ in range(steps):
        g = rng.normal(0, 1, N)
        g[rng.randint(0, N, 3)] *= 8.0  # some large values, to clip
        g = g.astype(dtype)
        upd(key, mx.nd.array(g, dtype=dtype), weight)
        grads.append(hexes(g, dtype))
        weights.append(hexes(weight.asnumpy(), dtype))
    return dict(optimizer=name, params=params, dtype=dtype, key=key,
                lr_mult=lr_mult, wd_mult=0.5 if lr_mult else None,
                weight0=hexes(w0, dtype), grads=grads, weights=weights)


SCHEDULES = [
    # (optimizer, params, scheduler class, scheduler kwargs, key order)
    ("sgd", dict(learning_rate=0.1, momentum=0.9, wd=0.001), "FactorScheduler",
     dict(step=3, factor=0.5, stop_factor_lr=0.02), [0] * 12),
    ("sgd", dict(learning_rate=0.2), "FactorScheduler",
     dict(step=2, factor=0.7, base_lr=0.05, warmup_steps=4, warmup_begin_lr=0.001), [0] * 10),
    ("nag", dict(learning_rate=0.1, momentum=0.9), "MultiFactorScheduler",
     dict(step=[2, 5, 6], factor=0.3, warmup_steps=2, warmup_mode="constant",
          warmup_begin_lr=0.003), [0] * 9),
    ("adam", dict(learning_rate=0.01, wd=0.01), "PolyScheduler",
     dict(max_update=7, base_lr=0.02, pwr=2, final_lr=0.001, warmup_steps=2), [0] * 10),
    ("adagrad", dict(learning_rate=0.1), "CosineScheduler",
     dict(max_update=6, base_lr=0.3, final_lr=0.01), [0] * 8),
    # num_update is the most updates of any key: key 1 follows key 0's count.
    ("sgd", dict(learning_rate=0.1, momentum=0.9), "FactorScheduler",
     dict(step=2, factor=0.5), [0, 0, 0, 1, 0, 1, 1, 1, 0, 1]),
    ("adam", dict(learning_rate=0.01), "CosineScheduler",
     dict(max_update=8, base_lr=0.05, final_lr=0.0, warmup_steps=3, warmup_begin_lr=0.01),
     [0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1]),
    # begin_num_update: counts (Adam's t too) start there.
    ("adam", dict(learning_rate=0.01, begin_num_update=5), "FactorScheduler",
     dict(step=4, factor=0.5), [0, 0, 1, 0, 1, 1]),
    # No learning_rate: SGD, NAG and AdaGrad keep the scheduler's base_lr;
    # Adam's default 0.001 overrides it.
    ("sgd", dict(momentum=0.9), "FactorScheduler",
     dict(step=2, factor=0.5, base_lr=0.3), [0] * 7),
    ("adagrad", dict(), "MultiFactorScheduler", dict(step=[2, 4], factor=0.5, base_lr=0.2),
     [0] * 6),
    ("adam", dict(), "FactorScheduler", dict(step=2, factor=0.5, base_lr=0.3), [0] * 6),
]


def run_schedule(name, params, sched, sparams, order, seed, dtype="float32"):
    """Updates keys in `order` (each with its own weight) through one
    updater, as a server does; records every step."""
    rng = np.random.RandomState(seed)
    lr_sched = getattr(mx.lr_scheduler, sched)(**sparams)
    opt = mx.optimizer.create(name, lr_scheduler=lr_sched, **params)
    upd = mx.optimizer.get_updater(opt)
    keys = sorted(set(order))
    w0 = {k: rng.uniform(-1, 1, N).astype(dtype) for k in keys}
    weights = {k: mx.nd.array(w0[k], dtype=dtype) for k in keys}
    steps = []
    for k in order:
        g = rng.normal(0, 1, N).astype(dtype)
        upd(k, mx.nd.array(g, dtype=dtype), weights[k])
        steps.append(dict(key=k, grad=hexes(g, dtype),
                          weight=hexes(weights[k].asnumpy(), dtype)))
    return dict(optimizer=name, params=params, scheduler=sched, scheduler_params=sparams,
                dtype=dtype, weight0={str(k): hexes(w0[k], dtype) for k in keys},
                steps=steps)


def parse_table():
    """How operator float parameters and NDArray scalars reach a kernel."""
    rng = np.random.RandomState(7)
    vals = list(10.0 ** rng.uniform(-9, 1.5, 300))
    # Adam's bias-corrected rates for small base rates.
    for t in range(1, 60):
        vals.append(1e-4 * (1 - 0.999 ** t) ** 0.5 / (1 - 0.9 ** t))
    vals += [0.1, 0.9, 0.999, 1e-8, 1e-7, 1 / 128.0, 3.0, 12.5, 1e-5, 2.5e-05]
    zero = mx.nd.zeros((1,))
    neg1 = mx.nd.array([-1.0])
    one = mx.nd.ones((1,))
    out = []
    for v in vals:
        v = float(v)
        param = mx.nd.sgd_update(zero, neg1, lr=v, wd=0.0).asnumpy()[0]
        scalar = (one * v).asnumpy()[0]
        out.append([repr(v), "%08x" % int(np.float32(param).view(np.uint32)),
                    "%08x" % int(np.float32(scalar).view(np.uint32))])
    return out


def main():
    configs = []
    for i, (name, params, dtype, steps) in enumerate(CONFIGS):
        configs.append(run(name, params, dtype, steps, seed=100 + i, key=i))
    # Multipliers by key.
    configs.append(run("sgd", dict(learning_rate=0.1, wd=0.01, momentum=0.9), "float32", 4,
                       seed=999, key=3, lr_mult=2.0))
    configs.append(run("adam", dict(learning_rate=0.001, wd=0.01), "float32", 4,
                       seed=998, key=5, lr_mult=0.5))
    schedules = [run_schedule(*c, seed=500 + i) for i, c in enumerate(SCHEDULES)]
    doc = dict(mxnet=mx.__version__, n=N, configs=configs, parse=parse_table(),
               schedules=schedules)
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "kvstore", "tests", "fixtures", "mxnet_optimizers.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=0, sort_keys=True)
        f.write("\n")
    print("wrote", os.path.normpath(path), file=sys.stderr)


if __name__ == "__main__":
    main()
