#!/usr/bin/env python3
"""Small rounds through the kvstore against the van's own round trip, in
one run: for each van (tcp, shm) and shape (1 worker and 2 workers, 1
server), REPS interleaved repetitions of
  - the van alone: `pskv-net node --mode pushpull` workers against a
    `pskv-net` server that echoes (a push-pull of 4 B and 4 KiB; the mean
    over workers of each worker's median round trip), and
  - the kvstore: `pskv bench -w W -s 1 --cases 4B,4KiB` (a sync round of
    every worker: push-pull of one key, waited for),
and prints, per case, the median over repetitions of each and their ratio.

    python3 scripts/small_rounds.py [--reps 5] [--pskv target/release/pskv]
        [--net target/release/pskv-net]

Build first: cargo build --release -p pskv -p pskv-net
"""
import argparse
import json
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile


def start_scheduler(cmd, env):
    """Starts a pskv scheduler on any free port (DMLC_PS_ROOT_PORT=0) and
    reads the port it bound from the pipe PSKV_PORT_FD names, as `pskv
    launch` does (a port found free and released first could be taken by
    another process before the scheduler binds it). The process and the
    port; exits naming the scheduler's own error if it reports none."""
    r, w = os.pipe()
    err = tempfile.TemporaryFile()
    try:
        p = subprocess.Popen(cmd, env=dict(env, DMLC_ROLE="scheduler", DMLC_PS_ROOT_PORT="0",
                                           PSKV_PORT_FD=str(w)),
                             pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=err)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    with os.fdopen(r) as f:
        ready, _, _ = select.select([f], [], [], 60)
        line = f.readline().strip() if ready else ""
    if not line.isdigit():
        why = ("did not report its port within 60 s" if not ready else
               "closed its port pipe without a port" if not line else
               f"wrote {line!r} instead of a port")
        p.kill()
        p.wait()
        err.seek(0)
        sys.exit(f"the scheduler ({cmd[0]}) {why}: {err.read().decode(errors='replace').strip()}")
    return p, line


def van_round(net, van, workers):
    """Per size, the mean over workers of their median round trip (us)."""
    env = dict(os.environ, DMLC_PS_ROOT_URI="127.0.0.1",
               DMLC_NUM_SERVER="1", DMLC_NUM_WORKER=str(workers), PSKV_VAN=van,
               PSKV_SHM_BYTES=str(64 << 20))

    def start(role, *args):
        return subprocess.Popen([net, "node", *args], env=dict(env, DMLC_ROLE=role),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    sched, env["DMLC_PS_ROOT_PORT"] = start_scheduler([net, "node"], env)
    infra, ws = [sched], []
    got = {4: [], 4096: []}
    try:
        infra.append(start("server"))
        ws = [start("worker", "--mode", "pushpull", "--sizes", "4,4K") for _ in range(workers)]
        for w in ws:
            out, _ = w.communicate(timeout=120)
            if w.returncode != 0:
                sys.exit(f"a pskv-net {van} worker failed")
            for line in out.splitlines():
                if line.startswith("{"):
                    r = json.loads(line)
                    got[r["bytes"]].append(r["median_us"])
        for p in infra:
            p.wait(timeout=60)
    finally:
        for p in infra + ws:
            if p.poll() is None:
                p.kill()
    return {"4B": statistics.mean(got[4]), "4KiB": statistics.mean(got[4096])}


def kv_round(pskv, van, workers):
    out = subprocess.run([pskv, "bench", "-w", str(workers), "-s", "1", "--van", van,
                          "--cases", "4B,4KiB"], capture_output=True, text=True, timeout=300,
                         cwd=os.environ.get("TMPDIR", "/tmp"))
    if out.returncode != 0:
        sys.exit(f"pskv bench failed:\n{out.stderr}")
    got = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[3] in ("4B", "4KiB"):
            m = re.match(r"([\d.]+) (us|ms)", cells[4])
            if m is None:
                sys.exit(f"pskv bench: cannot read the round time in {line!r}")
            got[cells[3]] = float(m.group(1)) * (1000 if m.group(2) == "ms" else 1)
    if set(got) != {"4B", "4KiB"}:
        sys.exit(f"pskv bench printed no 4B and 4KiB rows:\n{out.stdout}")
    return got


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--reps", type=int, default=5)
    a.add_argument("--pskv", default="target/release/pskv")
    a.add_argument("--net", default="target/release/pskv-net")
    o = a.parse_args()
    pskv, net = os.path.abspath(o.pskv), os.path.abspath(o.net)
    runs = {}
    for _ in range(o.reps):
        for van in ("shm", "tcp"):
            for w in (1, 2):
                for what, f in (("van", van_round), ("kv", kv_round)):
                    for case, us in f(net if what == "van" else pskv, van, w).items():
                        runs.setdefault((van, w, case, what), []).append(us)
    print("| van | shape | case | van round trip | kvstore round | kvstore / van |")
    print("|---|---|---|---:|---:|---:|")
    for van in ("shm", "tcp"):
        for w in (1, 2):
            for case in ("4B", "4KiB"):
                v = statistics.median(runs[(van, w, case, "van")])
                k = statistics.median(runs[(van, w, case, "kv")])
                print(f"| {van} | {w}x1 | {case} | {v:.1f} µs | {k:.1f} µs | {k / v:.2f} |")


if __name__ == "__main__":
    main()
