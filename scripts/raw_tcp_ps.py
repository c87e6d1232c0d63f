#!/usr/bin/env python3
"""The floor of a parameter-server round over TCP loopback on this host:
W client processes each send their tensors to S server processes and get
them back, over plain sockets, with no summing and no framing beyond a
64-byte header per message (see Alignment below). This is the traffic of
one dist_sync push-pull round with W workers and S servers; no parameter
server over TCP can beat it.

    python3 scripts/raw_tcp_ps.py [--workers 2] [--servers 1]
        [--sizes 4194304,33554432] [--tensors TENSORS.json] [--rounds 30]
        [--conns 1] [--sndbuf 0] [--sum]

--sizes: one tensor of each size, a round each. --tensors: a model's
tensors (`pskv bench --model NAME --print-tensors`), all of them in one
round, one message per tensor and server (each tensor split evenly over
the servers, as a parameter server shards it), the last tensor first.
Prints one line per workload: the median round time over the clients, and
`RESULT {json}` with the same fields as `pskv bench`'s cases.

--conns N: N connections between each client and server instead of one
(the "several connections per link" idea of issue 16): every message of
at least 1 MiB (a tensor whose share of each server is that large) is cut
into N slices on 64-byte bounds, slice c going over connection c; smaller
messages go whole over connection 0, as a parameter server would split
only large parts. Each connection has a thread of its own at both ends
and first sends one 64-byte header naming its number c. Not with --sum.

--sndbuf N: every socket's send buffer set to N bytes (SO_SNDBUF, which
the kernel doubles), as pskv sets its loopback links' (PSKV_TCP_SNDBUF);
0 (the default): the kernel's autotuning.

Alignment: every message is a 64-byte header (the length, then zeros)
and its payload padded to a multiple of 64 bytes, and every buffer sent
from or received into starts on a 64-byte boundary. The kernel copies a
socket's bytes with `rep movsb` between the sender's buffer, pages of its
own (filled in stream order) and the receiver's buffer; on some x86 hosts
that instruction runs at a fourth of its speed or less when the destination
is a few bytes past the source modulo 4 KiB (BENCHMARKS.md, "The floor's
receives ran at the slow distance"). With an 8-byte prefix and buffers 16
bytes into their pages every receive here did, so the floor was not one.

--sum: the servers also sum: each answers every worker with the sum of all
workers' pushes of the tensor (float32, in rank order, numpy's `add` at
memory speed, the tensors shared out among the server's threads, those
of 1 MiB or more by slices), so the floor does a parameter server's
aggregation too. Needs numpy (the MXNet venv of ../shared/peers has it).
"""
import argparse
import ctypes
import json
import math
import multiprocessing as mp
import os
import socket
import statistics
import struct
import threading
import time


ALIGN = 64


def padded(n):
    """A payload's length on the wire: `n` rounded up to `ALIGN`."""
    return -(-n // ALIGN) * ALIGN


def aligned(n):
    """A zeroed writable buffer of `padded(n)` bytes at an address that is a
    multiple of `ALIGN` (module docs)."""
    b = bytearray(padded(n) + ALIGN)
    k = -ctypes.addressof(ctypes.c_char.from_buffer(b)) % ALIGN
    return memoryview(b)[k:k + padded(n)]


def recv_exact(s, view):
    got = 0
    while got < len(view):
        n = s.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n


def send_msg(s, payload):
    """The header and the payload in one system call where it fits."""
    hdr = struct.pack("<Q", len(payload)).ljust(ALIGN, b"\0")
    sent = s.sendmsg([hdr, payload])
    if sent < len(hdr):
        s.sendall(hdr[sent:])
        sent = len(hdr)
    if sent - len(hdr) < len(payload):
        s.sendall(payload[sent - len(hdr):])


def tune(s, sndbuf):
    """TCP_NODELAY, and the send buffer when asked for."""
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sndbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)


def serve(listener, workers, lanes, rounds, add, sndbuf):
    """A thread per connection (a client sends to every server in turn, so
    a server that read its clients one after the other could wait on a
    client blocked on another server): each round, receive the push, wait
    until every connection's is in, answer. `lanes[c]`: the byte counts of
    the messages over a client's connection c (one lane unless --conns);
    each connection names its lane first. With `add` (one lane), the
    answer is the sum of the workers' pushes, summed between two barriers
    (`shares`)."""
    conns = [listener.accept()[0] for _ in range(workers * len(lanes))]
    everyone = threading.Barrier(len(conns))
    hello = memoryview(bytearray(ALIGN))
    lane_of = []
    for c in conns:
        recv_exact(c, hello)
        lane_of.append(struct.unpack_from("<Q", hello)[0])
    bufs = [[aligned(p) for p in lanes[lane]] for lane in lane_of]
    parts = lanes[0]
    sums = [aligned(p) for p in parts] if add else None
    mine_to_sum = shares(parts, workers) if add else None

    def one(rank, c):
        tune(c, sndbuf)
        mine = bufs[rank]
        hdr = memoryview(bytearray(ALIGN))
        for _ in range(rounds):
            for b in mine:
                recv_exact(c, hdr)
                recv_exact(c, b)
            everyone.wait(timeout=600)
            if add:
                for j, lo, hi in mine_to_sum[rank]:
                    add([bufs[w][j][lo:hi] for w in range(workers)], sums[j][lo:hi])
                everyone.wait(timeout=600)
            for b in (sums if add else mine):
                send_msg(c, b)
        c.close()

    ts = [threading.Thread(target=one, args=(r, c)) for r, c in enumerate(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def shares(parts, threads):
    """What each of a server's threads sums: `(j, lo, hi)`, bytes lo..hi of
    tensor j. A tensor of at least `SLICED` bytes is cut into one slice per
    thread (on 64-byte bounds), so that a single large tensor is summed by
    all of them at once (numpy lets go of the GIL while it adds); smaller
    ones go whole, tensor j to thread j % threads."""
    out = [[] for _ in range(threads)]
    for j, n in enumerate(parts):
        n = padded(n)
        if n >= SLICED:
            cut = [n * r // threads // ALIGN * ALIGN for r in range(threads)] + [n]
            for r in range(threads):
                out[r].append((j, cut[r], cut[r + 1]))
        else:
            out[j % threads].append((j, 0, n))
    return out


SLICED = 1 << 20


def pattern(n):
    """n bytes of a repeating non-zero pattern, every page written: float32
    values from 1 to 2 (normal numbers, so that `--sum` adds at full speed,
    as a gradient's would)."""
    block = struct.pack("<255f", *(1.0 + k / 256 for k in range(255)))
    return (block * (n // len(block) + 1))[:n]


def client(ports, lanes, rounds, q, sndbuf):
    """lanes[c][server]: the byte counts of its messages over connection c
    to that server, in round order (one lane unless --conns; a thread per
    lane, each round started and ended by all of them together)."""
    went = threading.Barrier(len(lanes))
    ts = []

    def lane(c, parts):
        socks = []
        for p in ports:
            s = socket.create_connection(("127.0.0.1", p))
            tune(s, sndbuf)
            s.sendall(struct.pack("<Q", c).ljust(ALIGN, b"\0"))
            socks.append(s)
        # Non-zero bytes: a zero-filled `bytes(n)` is calloc'd, so every page
        # of it is the kernel's one shared zero page, which the socket copies
        # read from cache (sends measured 20% cheaper than from real data).
        data = [[aligned(n) for n in ps] for ps in parts]
        for ds, ps in zip(data, parts):
            for d, n in zip(ds, ps):
                d[:n] = pattern(n)
        back = [[aligned(n) for n in ps] for ps in parts]
        hdr = memoryview(bytearray(ALIGN))
        for _ in range(rounds):
            if len(lanes) > 1:
                went.wait(timeout=600)
            t = time.perf_counter()
            # Message j of every server, then message j + 1: a tensor at a time.
            for j in range(len(parts[0])):
                for s, d in zip(socks, data):
                    send_msg(s, d[j])
            for s, b in zip(socks, back):
                for v in b:
                    recv_exact(s, hdr)
                    recv_exact(s, v)
            if len(lanes) > 1:
                went.wait(timeout=600)
            if c == 0:
                ts.append(time.perf_counter() - t)
        for s in socks:
            s.close()

    def guarded(c, parts):
        """A lane that fails lets the others go (they would wait at the
        barrier for its rounds), then fails the client."""
        try:
            lane(c, parts)
        except BaseException:
            went.abort()
            raise

    threads = [threading.Thread(target=guarded, args=(c, parts)) for c, parts in enumerate(lanes[1:], 1)]
    for t in threads:
        t.start()
    guarded(0, lanes[0])
    for t in threads:
        t.join()
    q.put(statistics.median(ts[len(ts) // 5:]))


def sliced(n, conns):
    """A message of `n` bytes cut into `conns` slices on `ALIGN` bounds (the
    last takes the rest)."""
    cut = [n * c // conns // ALIGN * ALIGN for c in range(conns)] + [n]
    return [cut[c + 1] - cut[c] for c in range(conns)]


def numpy_add():
    """`add(inputs, out)`: out = ((in0 + in1) + in2) + ... as float32."""
    try:
        import numpy as np
    except ImportError:
        raise SystemExit("--sum needs numpy (try the MXNet venv of ../shared/peers)")

    def add(inputs, out):
        o = np.frombuffer(out, dtype=np.float32)
        ins = [np.frombuffer(i, dtype=np.float32) for i in inputs]
        np.add(ins[0], ins[1], out=o)
        for i in ins[2:]:
            np.add(o, i, out=o)
    return add


def run(workers, servers, sizes, rounds, add=None, sndbuf=0, conns=1):
    """One workload: `sizes` (bytes per tensor, in send order), each split
    over the servers (and over `conns` connections). The mean over clients
    of their median round."""
    parts = [[n // servers + (1 if k < n % servers else 0) for n in sizes]
             for k in range(servers)]
    # lanes[c][k]: the messages over connection c to server k; a tensor is
    # sliced where every server's share of it is at least SLICED bytes (so
    # all servers agree), else it goes whole over connection 0.
    to_slice = [conns > 1 and n // servers >= SLICED for n in sizes]
    pieces = [[sliced(p, conns) if big else [p] for p, big in zip(ps, to_slice)] for ps in parts]
    lanes = [[[pc[c] for pc in pcs if c < len(pc)] for pcs in pieces] for c in range(conns)]
    listeners, srvs = [], []
    for k in range(servers):
        l = socket.socket()
        l.bind(("127.0.0.1", 0))
        l.listen(64)
        listeners.append(l)
        srvs.append(mp.Process(target=serve, args=(l, workers, [ln[k] for ln in lanes], rounds, add, sndbuf)))
    for p in srvs:
        p.start()
    q = mp.Queue()
    ports = [l.getsockname()[1] for l in listeners]
    cs = [mp.Process(target=client, args=(ports, lanes, rounds, q, sndbuf))
          for _ in range(workers)]
    for c in cs:
        c.start()
    meds = [q.get(timeout=600) for _ in cs]
    for p in cs + srvs:
        p.join()
    for l in listeners:
        l.close()
    return statistics.mean(meds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--sizes", default="4194304,33554432")
    ap.add_argument("--tensors", default=None)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--sndbuf", type=int, default=0,
                    help="SO_SNDBUF of every socket, bytes (0: the kernel's autotuning)")
    ap.add_argument("--conns", type=int, default=1,
                    help="connections between each client and server (each message cut in slices)")
    ap.add_argument("--sum", action="store_true",
                    help="the servers sum the pushes (float32, numpy)")
    a = ap.parse_args()
    if a.conns < 1 or (a.conns > 1 and a.sum):
        raise SystemExit("--conns takes 1 or more, and more than 1 only without --sum")
    add = numpy_add() if a.sum else None
    loads = []
    if a.tensors:
        ts = json.load(open(a.tensors))
        name = os.path.splitext(os.path.basename(a.tensors))[0]
        loads.append((name, [4 * math.prod(t["shape"]) for t in reversed(ts)]))
    else:
        loads += [("%dB" % n, [n]) for n in (int(x) for x in a.sizes.split(","))]
    cases = []
    for name, sizes in loads:
        m = run(a.workers, a.servers, sizes, a.rounds, add, a.sndbuf, a.conns)
        total = sum(sizes)
        print("raw tcp%s, %d clients, %d servers, %s (%d bytes in %d tensors): %.2f ms per round"
              " (%.3f GB/s per client)" % (" with sums" if add else "", a.workers, a.servers, name,
                                           total, len(sizes), m * 1e3, total / m / 1e9), flush=True)
        cases.append({"case": name, "bytes": total, "nkeys": len(sizes), "iters": a.rounds,
                      "check_ok": True, "median_us": m * 1e6,
                      "algbw_gbps_median": total / m / 1e9})
    print("RESULT " + json.dumps({"num_workers": a.workers, "num_servers": a.servers,
                                  "cases": cases}), flush=True)


if __name__ == "__main__":
    main()
