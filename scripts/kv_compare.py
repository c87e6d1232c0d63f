#!/usr/bin/env python3
"""pskv's kvstore side by side with MXNet 1.9.1's dist_sync kvstore and with
MPI_Allreduce, on this host, in one run.

Runs every configuration REPS times, interleaved (pskv, MXNet, MPI, then
again), and keeps per case the median over repetitions of each run's time
(a run's time: the mean over workers of their median round). A ratio of
two systems is the ratio of their medians, followed, where two reps or
more have both systems' runs, by the ratio rep by rep in brackets, "—"
for a rep that lacks one (the runs of one rep follow each other; a
system's next run comes a whole rep later, as the machine's speed may
have moved). Writes a markdown report and the raw results as JSON
(`by_rep`: the runs by rep number).

    python3 scripts/kv_compare.py [--reps 3] [--out target/kv_compare]
        [--shapes 2x1,4x2] [--pskv target/release/pskv] [--pskv-before OTHER]
        [--vans tcp,shm] [--no-compress] [--skip-peers] [--model inception-v3]
        [--bind cores] [--push-buffers]

With --model, the one case is a model's whole gradient set (`pskv bench
--model`; MXNet and MPI through scripts/model_peers.py, the same tensors in
the same order). Every run also measures the floor of a parameter-server
round over plain TCP sockets (scripts/raw_tcp_ps.py: the same bytes, each
message padded to 64, no summing) for the 4 MiB and 32 MiB cases or the
model, and, with the peers, the same floor whose servers also sum
(`--sum`, in the MXNet venv); and both again in Rust (`pskv-net floor`,
built by `cargo build --release -p pskv-net`: the same bytes and
alignment, each server's share of a tensor in parts of 1 MiB answered as
they complete, a reading and a writing thread per connection; its sums
one pass per part), skipped with a note when that binary is missing. The
floor's sockets get the send buffer pskv gives its loopback links
(`PSKV_TCP_SNDBUF`, default 262144): plain sockets gain from it too with
single large messages and are no slower with a model's (BENCHMARKS.md), so
the floor stays the faster of the two.

With --pskv-before, a second pskv build (an older commit's `pskv`) runs
interleaved with the first, each run right before its twin, and the report
adds its columns and the ratio after / before per van: a change measured
before and after in one run.

With --bind cores, pskv's workers run on cores of their own (`pskv bench
--bind cores`), as mpirun binds MPI's ranks on its own (with 2 ranks, one
core each); the builds must know the option.

With --push-buffers, the build under test (--pskv) pushes every key from
its push buffer (`pskv bench --push-buffers`); the --pskv-before build
does not, so with the same binary as both the report's after / before
ratio is what push buffers change.

Needs ../shared/peers/setup.sh to have run (MXNet and mpi4py venvs).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.normpath(os.path.join(ROOT, "..", "shared", "peers"))
CASES = ["4B", "4KiB", "256KiB", "4MiB", "32MiB", "100x40KiB"]
# How pskv's workers are placed (`pskv bench --bind`): --bind.
BIND = "none"
# The build under test pushes from push buffers: --push-buffers.
PUSH_BUFFERS = False


def run(cmd, env=None, timeout=900):
    e = dict(os.environ)
    if env:
        e.update(env)
    t = time.time()
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        print("FAILED (%d): %s\n%s" % (p.returncode, " ".join(cmd), p.stderr[-2000:]),
              file=sys.stderr)
        return None, time.time() - t
    return p, time.time() - t


def pskv_run(exe, w, s, van, compress, outdir, tag, model, push_buffers=False):
    path = os.path.join(outdir, "pskv-%s.json" % tag)
    # --out too: the run's charts go beside its JSON, not into the caller's
    # working directory.
    cmd = [exe, "bench", "-w", str(w), "-s", str(s), "--van", van, "--json", path,
           "--out", os.path.splitext(path)[0]]
    if compress:
        cmd.append("--compress")
    if model:
        cmd += ["--model", model]
    if BIND != "none":
        cmd += ["--bind", BIND]
    if push_buffers:
        cmd.append("--push-buffers")
    p, _ = run(cmd)
    if p is None:
        return None
    return per_case(json.load(open(path)))


def per_case(workers):
    """Per case: the mean over workers of their median round, and whether
    every worker's check held."""
    out = {}
    for i, c in enumerate(workers[0]["cases"]):
        meds = [wk["cases"][i]["median_us"] for wk in workers]
        out[c["case"]] = {"us": statistics.mean(meds), "bytes": c["bytes"],
                          "ok": all(wk["cases"][i]["check_ok"] for wk in workers)}
    return out


def results(stdout):
    return [json.loads(l[len("RESULT "):]) for l in stdout.splitlines() if l.startswith("RESULT ")]


def mxnet_run(w, s, compress, outdir, tag, tensors):
    d = os.path.join(outdir, "mxnet-%s" % tag)
    if tensors:
        cmd = [sys.executable, os.path.join(HERE, "model_peers.py"), "mxnet", tensors,
               str(w), str(s), d]
    else:
        cmd = ["bash", os.path.join(PEERS, "mxnet_kv_bench.sh"), str(w), str(s), d]
    if compress:
        cmd.append("--compress")
    p, _ = run(cmd)
    if p is None:
        return None
    if tensors:
        rs = results(p.stdout)
        return per_case(rs) if len(rs) == w else None
    return per_case([json.loads(l) for l in open(os.path.join(d, "results.jsonl")) if l.strip()])


def mpi_run(np_, mode, tensors):
    if tensors:
        cmd = [sys.executable, os.path.join(HERE, "model_peers.py"), "mpi", tensors, str(np_), mode]
    else:
        cmd = ["bash", os.path.join(PEERS, "mpi_allreduce_bench.sh"), str(np_), mode]
    p, _ = run(cmd)
    if p is None:
        return None
    for r in results(p.stdout):
        return {c["case"]: {"us": c["median_us"], "bytes": c["bytes"], "ok": c["check_ok"]}
                for c in r["cases"]}
    return None


def floor_run(w, s, tensors, summed=False, rust=None):
    """The plain-socket floor (scripts/raw_tcp_ps.py, or with `rust` that
    `pskv-net` binary's `floor`); `summed`: the floor whose servers also
    sum (`--sum`; the Python one with numpy, run with the MXNet venv's
    Python)."""
    py = sys.executable
    if summed and not rust:
        from model_peers import MXPY
        py = MXPY
    # pskv's default: TCP_SEND_BUFFER in transport/src/config/mod.rs.
    sndbuf = os.environ.get("PSKV_TCP_SNDBUF", "262144")
    cmd = [py, os.path.join(HERE, "raw_tcp_ps.py")]
    if rust:
        cmd = [rust, "floor"]
    cmd += ["--workers", str(w), "--servers", str(s), "--sndbuf", sndbuf]
    if summed:
        cmd.append("--sum")
    if tensors:
        cmd += ["--tensors", tensors, "--rounds", "12"]
    else:
        cmd += ["--sizes", "%d,%d" % (4 << 20, 32 << 20), "--rounds", "20"]
    p, _ = run(cmd)
    if p is None:
        return None
    names = {"%dB" % (4 << 20): "4MiB", "%dB" % (32 << 20): "32MiB"}
    for r in results(p.stdout):
        return {names.get(c["case"], c["case"]): {"us": c["median_us"], "bytes": c["bytes"],
                                                  "ok": True} for c in r["cases"]}
    return None


def fmt_time(us):
    if us is None:
        return "—"
    if us >= 1000:
        return "%.2f ms" % (us / 1000)
    return "%.1f µs" % us


SINGLE_KEY = {"4B": 4, "4KiB": 4 << 10, "256KiB": 256 << 10, "4MiB": 4 << 20, "32MiB": 32 << 20}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#17becf", "#7f7f7f", "#bcbd22", "#000000", "#aec7e8"]


def size_label(b):
    """A byte count: exact for powers of two ("4 KiB"), else 3 digits."""
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if b < 1024 or unit == "GiB":
            return "%s %s" % (("%.3g" % b), unit)
        b /= 1024.0


def time_label(us):
    """A time given in µs: "850 ns", "12 µs", "3.4 ms", "1.2 s"."""
    s = us * 1e-6
    for scale, unit in [(1, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")]:
        if s >= scale or unit == "ns":
            return "%s %s" % (("%.3g" % (s / scale)), unit)


def svg_chart(path, title, series):
    """Median round against message size, log-log, one line per system;
    sizes ticked at powers of two, times at 1, 2 and 5 of each decade."""
    pts = [p for _, ps in series for p in ps]
    if not pts:
        return False
    W, H, L, R, T, B = 900, 540, 90, 230, 50, 60
    x0, x1 = min(p[0] for p in pts) / 1.5, max(p[0] for p in pts) * 1.5
    y0, y1 = min(p[1] for p in pts) / 2, max(p[1] for p in pts) * 2

    def fx(x):
        return L + (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) * (W - L - R)

    def fy(y):
        return H - B - (math.log(y) - math.log(y0)) / (math.log(y1) - math.log(y0)) * (H - T - B)

    sizes = sorted({p[0] for p in pts})
    if len(sizes) <= 12 and all(math.log2(x) == int(math.log2(x)) for x in sizes):
        xt = sizes  # ticked where measured, as pskv bench's charts
    else:
        xt = [2.0 ** e for e in range(int(math.floor(math.log2(x0))), int(math.ceil(math.log2(x1))) + 1)]
        xt = [t for t in xt if x0 <= t <= x1]
        xt = xt[::max(1, -(-len(xt) // 12))]
    yt = [m * 10.0 ** e for e in range(int(math.floor(math.log10(y0))), int(math.ceil(math.log10(y1))) + 1)
          for m in (1, 2, 5)]
    yt = [t for t in yt if y0 <= t <= y1]
    if len(yt) > 12:
        yt = [t for t in yt if abs(math.log10(t) - round(math.log10(t))) < 1e-9]
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif">' % (W, H),
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="%d" y="28" font-size="18">%s</text>' % (L, title)]
    for t in xt:
        out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>' % (fx(t), T, fx(t), H - B))
        out.append('<text x="%.1f" y="%d" font-size="12" text-anchor="middle">%s</text>'
                   % (fx(t), H - B + 18, size_label(t)))
    for t in yt:
        out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>' % (L, fy(t), W - R, fy(t)))
        out.append('<text x="%d" y="%.1f" font-size="12" text-anchor="end">%s</text>'
                   % (L - 6, fy(t) + 4, time_label(t)))
    out.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="black"/>'
               % (L, T, W - L - R, H - T - B))
    out.append('<text x="%.1f" y="%d" font-size="13" text-anchor="middle">bytes per key (one key)</text>'
               % ((L + W - R) / 2, H - 14))
    out.append('<text x="16" y="%.1f" font-size="13" text-anchor="middle" transform="rotate(-90 16 %.1f)">'
               'median round (push, pull, wait)</text>' % ((T + H - B) / 2, (T + H - B) / 2))
    for i, (label, ps) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        coords = " ".join("%.1f,%.1f" % (fx(x), fy(y)) for x, y in ps)
        out.append('<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>' % (coords, color))
        for x, y in ps:
            out.append('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>' % (fx(x), fy(y), color))
        ly = T + 16 + 20 * i
        out.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"/>'
                   % (W - R + 12, ly - 4, W - R + 32, ly - 4, color))
        out.append('<text x="%d" y="%d" font-size="13">%s</text>' % (W - R + 38, ly, label))
    out.append("</svg>")
    open(path, "w").write("\n".join(out) + "\n")
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "kv_compare"))
    ap.add_argument("--shapes", default="2x1,4x2")
    ap.add_argument("--pskv", default=os.path.join(ROOT, "target", "release", "pskv"))
    ap.add_argument("--pskv-before", default=None)
    ap.add_argument("--pskv-net", default=os.path.join(ROOT, "target", "release", "pskv-net"),
                    help="the pskv-net binary whose `floor` is the Rust floor")
    ap.add_argument("--vans", default="tcp,shm")
    ap.add_argument("--no-compress", action="store_true",
                    help="skip the 2-bit compressed runs (pskv's and MXNet's)")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--bind", default="none", choices=["none", "cores"],
                    help="pskv's workers on cores of their own (pskv bench --bind)")
    ap.add_argument("--push-buffers", action="store_true",
                    help="the build under test pushes from push buffers (pskv bench --push-buffers)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    global CASES, BIND, PUSH_BUFFERS
    BIND = a.bind
    PUSH_BUFFERS = a.push_buffers
    tensors = None
    if a.model:
        CASES = [a.model]
        tensors = os.path.join(os.path.abspath(a.out), "%s.json" % a.model)
        p, _ = run([a.pskv, "bench", "--model", a.model, "--print-tensors"])
        if p is None:
            sys.exit("kv_compare: %s cannot list the model's tensors" % a.pskv)
        open(tensors, "w").write(p.stdout)
    rust_floor = a.pskv_net if os.access(a.pskv_net, os.X_OK) else None
    if not rust_floor:
        print("kv_compare: no %s (cargo build --release -p pskv-net): the Rust floor is skipped"
              % a.pskv_net, file=sys.stderr)
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    configs = []
    comps = [False] if a.no_compress else [False, True]
    for (w, s) in shapes:
        for van in a.vans.split(","):
            for comp in comps:
                if a.pskv_before:
                    configs.append(("before", w, s, van, comp))
                configs.append(("pskv", w, s, van, comp))
        if not a.skip_peers:
            for comp in comps:
                configs.append(("mxnet", w, s, "zmq", comp))
            configs.append(("mpi", w, 0, "shm", False))
            configs.append(("mpi", w, 0, "tcp", False))
        configs.append(("floor", w, s, "tcp", False))
        if not a.skip_peers:
            configs.append(("floorsum", w, s, "tcp", False))
        if rust_floor:
            configs.append(("rfloor", w, s, "tcp", False))
            configs.append(("rfloorsum", w, s, "tcp", False))
    # Each system's runs by rep: a ratio of two systems is also given rep
    # by rep (the programs of one rep run close together, a system's next
    # run a whole rep later: the machine's speed may move in between).
    by_rep = {c: {} for c in configs}
    for rep in range(a.reps):
        for c in configs:
            sysname, w, s, van, comp = c
            tag = "w%ds%d-%s%s-r%d" % (w, s, van, "-2bit" if comp else "", rep)
            t0 = time.time()
            if sysname in ("pskv", "before"):
                exe = a.pskv if sysname == "pskv" else a.pskv_before
                r = pskv_run(exe, w, s, van, comp, a.out, sysname + "-" + tag, a.model,
                             PUSH_BUFFERS and sysname == "pskv")
            elif sysname == "mxnet":
                r = mxnet_run(w, s, comp, a.out, tag, tensors)
            elif sysname in ("floor", "floorsum", "rfloor", "rfloorsum"):
                r = floor_run(w, s, tensors, summed=sysname.endswith("sum"),
                              rust=rust_floor if sysname.startswith("r") else None)
            else:
                r = mpi_run(w, van, tensors)
            print("rep %d %-8s %s: %s (%.0f s)" % (rep, sysname, tag,
                  "ok" if r else "FAILED", time.time() - t0), file=sys.stderr, flush=True)
            if r:
                by_rep[c][rep] = r
    # The runs that succeeded, in rep order.
    runs = {c: [rs[i] for i in sorted(rs)] for c, rs in by_rep.items()}
    med = {}
    for c, rs in runs.items():
        med[c] = {}
        for case in CASES:
            xs = [r[case]["us"] for r in rs if case in r]
            oks = [r[case]["ok"] for r in rs if case in r]
            med[c][case] = (statistics.median(xs) if xs else None, all(oks) if oks else None)
    def label(c):
        return "|".join(map(str, c))

    json.dump({"reps": a.reps, "bind": BIND, "push_buffers": PUSH_BUFFERS,
               "runs": {label(c): rs for c, rs in runs.items()},
               "by_rep": {label(c): rs for c, rs in by_rep.items()}},
              open(os.path.join(a.out, "results.json"), "w"), indent=1)

    def paired(num, den, case):
        """`num`'s time over `den`'s in each rep, None where either lacks it."""
        out = []
        for i in range(a.reps):
            x, y = by_rep[num].get(i, {}).get(case), by_rep[den].get(i, {}).get(case)
            out.append(x["us"] / y["us"] if x and y and x["us"] and y["us"] else None)
        return out

    lines = []
    bound = ", pskv's workers bound to cores (--bind cores)" if BIND == "cores" else ""
    if PUSH_BUFFERS:
        bound += ", pskv pushing from push buffers (--push-buffers)"
    for (w, s) in shapes:
        lines.append("\n### %d workers, %d servers (MPI: %d ranks%s)\n" % (w, s, w, bound))
        cols = [(who, w, s, van, comp) for comp in [False, True] for van in ["tcp", "shm"]
                for who in ["before", "pskv"]]
        cols += [("mxnet", w, s, "zmq", False), ("mxnet", w, s, "zmq", True),
                 ("mpi", w, 0, "shm", False), ("mpi", w, 0, "tcp", False),
                 ("floor", w, s, "tcp", False), ("floorsum", w, s, "tcp", False),
                 ("rfloor", w, s, "tcp", False), ("rfloorsum", w, s, "tcp", False)]
        cols = [c for c in cols if c in med]
        names = {("pskv", "tcp", False): "pskv tcp", ("pskv", "shm", False): "pskv shm",
                 ("pskv", "tcp", True): "pskv tcp 2-bit", ("pskv", "shm", True): "pskv shm 2-bit",
                 ("mxnet", "zmq", False): "MXNet", ("mxnet", "zmq", True): "MXNet 2-bit",
                 ("mpi", "shm", False): "MPI shm", ("mpi", "tcp", False): "MPI tcp",
                 ("floor", "tcp", False): "TCP floor", ("floorsum", "tcp", False): "TCP floor with sums",
                 ("rfloor", "tcp", False): "Rust TCP floor",
                 ("rfloorsum", "tcp", False): "Rust floor with sums"}
        for (van, comp) in [("tcp", False), ("shm", False), ("tcp", True), ("shm", True)]:
            names[("before", van, comp)] = "before " + names[("pskv", van, comp)]
        hdr = [names[(c[0], c[3], c[4])] for c in cols]
        ratio_cols = []
        for van in ["tcp", "shm"]:
            for comp in [False, True]:
                if ("before", w, s, van, comp) in med:
                    ratio_cols.append(("after / before %s%s" % (van, " 2-bit" if comp else ""),
                                       ("pskv", w, s, van, comp), ("before", w, s, van, comp)))
        if ("mxnet", w, s, "zmq", False) in med and ("pskv", w, s, "tcp", False) in med:
            ratio_cols.append(("MXNet / pskv tcp", ("mxnet", w, s, "zmq", False), ("pskv", w, s, "tcp", False)))
        if ("mpi", w, 0, "shm", False) in med and ("pskv", w, s, "shm", False) in med:
            ratio_cols.append(("pskv shm / MPI shm", ("pskv", w, s, "shm", False), ("mpi", w, 0, "shm", False)))
        if ("floor", w, s, "tcp", False) in med and ("pskv", w, s, "tcp", False) in med:
            ratio_cols.append(("pskv tcp / TCP floor", ("pskv", w, s, "tcp", False), ("floor", w, s, "tcp", False)))
        if ("floorsum", w, s, "tcp", False) in med and ("pskv", w, s, "tcp", False) in med:
            ratio_cols.append(("pskv tcp / floor with sums", ("pskv", w, s, "tcp", False), ("floorsum", w, s, "tcp", False)))
        for sysname, what in [("rfloor", "Rust floor"), ("rfloorsum", "Rust floor with sums")]:
            if (sysname, w, s, "tcp", False) in med and ("pskv", w, s, "tcp", False) in med:
                ratio_cols.append(("pskv tcp / " + what, ("pskv", w, s, "tcp", False),
                                   (sysname, w, s, "tcp", False)))
        lines.append("| case | " + " | ".join(hdr + [r[0] for r in ratio_cols]) + " |")
        lines.append("|---|" + "---:|" * (len(hdr) + len(ratio_cols)))
        for case in CASES:
            row = []
            for c in cols:
                us, ok = med[c][case]
                row.append(fmt_time(us) + ("" if ok in (True, None) else " (WRONG)"))
            for _, num, den in ratio_cols:
                a_, b_ = med[num][case][0], med[den][case][0]
                cell = "%.2f" % (a_ / b_) if a_ and b_ else "—"
                per_rep = paired(num, den, case)
                if sum(x is not None for x in per_rep) > 1:
                    cell += " [%s]" % " ".join("—" if x is None else "%.2f" % x
                                               for x in per_rep)
                row.append(cell)
            lines.append("| %s | %s |" % (case, " | ".join(row)))
        series = [(names[(c[0], c[3], c[4])],
                   [(SINGLE_KEY[k], med[c][k][0]) for k in SINGLE_KEY if med[c].get(k, (None,))[0]])
                  for c in cols]
        chart = os.path.join(a.out, "chart-%dx%d.svg" % (w, s))
        if svg_chart(chart, "push-pull rounds, %d workers, %d servers (MPI: %d ranks)" % (w, s, w),
                     [x for x in series if x[1]]):
            lines.append("\nChart: %s\n" % chart)
    report = "\n".join(lines) + "\n"
    open(os.path.join(a.out, "report.md"), "w").write(report)
    print(report)


if __name__ == "__main__":
    main()
