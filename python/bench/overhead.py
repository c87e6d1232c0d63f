"""What a call costs from Python: one push-pull of a 4 B and a 4 MiB key on
a `local` store, waited for (`kv.pushpull(k, v, out=o).wait()`), the same
work as benches/api_overhead.rs measures from Rust and C. Prints the
median and the spread over rounds of many calls, in microseconds.

Run: python python/bench/overhead.py [--rounds 30]
"""

import argparse
import statistics
import time

import numpy as np

import pskv


def per_call(kv, v, o, calls):
    t = time.perf_counter()
    for _ in range(calls):
        kv.pushpull(0, v, out=o).wait()
    return (time.perf_counter() - t) / calls * 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=30)
    opt = p.parse_args()
    for name, n, calls in [("4B", 1, 2000), ("4MiB", 1 << 20, 20)]:
        kv = pskv.create("local")
        kv.init(0, np.zeros(n, np.float32))
        v, o = np.ones(n, np.float32), np.zeros(n, np.float32)
        per_call(kv, v, o, calls)  # warm up
        us = sorted(per_call(kv, v, o, calls) for _ in range(opt.rounds))
        print(f"python/{name}: median {statistics.median(us):.2f} us per call "
              f"(min {us[0]:.2f}, max {us[-1]:.2f}; {opt.rounds} rounds of {calls})")
        kv.close()


if __name__ == "__main__":
    main()
