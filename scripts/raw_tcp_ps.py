#!/usr/bin/env python3
"""The floor of a parameter-server round over TCP loopback on this host:
W client processes each send SIZE bytes to one server process and get SIZE
bytes back, over plain sockets, with no summing and no framing beyond a
length prefix. This is the traffic of one dist_sync push-pull round with W
workers and one server; no parameter server over TCP can beat it.

    python3 scripts/raw_tcp_ps.py [--workers 2] [--sizes 4194304,33554432] [--rounds 30]

Prints one line per size: the median round time over the clients.
"""
import argparse
import multiprocessing as mp
import socket
import statistics
import struct
import time


def recv_exact(s, buf):
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = s.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n


def serve(listener, workers, size, rounds):
    conns = [listener.accept()[0] for _ in range(workers)]
    for c in conns:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    bufs = [bytearray(size) for _ in conns]
    for _ in range(rounds):
        # Receive every worker's push, then answer every worker (a round).
        for c, b in zip(conns, bufs):
            hdr = bytearray(8)
            recv_exact(c, hdr)
            recv_exact(c, b)
        for c, b in zip(conns, bufs):
            c.sendall(struct.pack("<Q", size))
            c.sendall(b)
    for c in conns:
        c.close()


def client(port, size, rounds, q):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = bytes(size)
    back = bytearray(size)
    hdr = bytearray(8)
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        s.sendall(struct.pack("<Q", size))
        s.sendall(data)
        recv_exact(s, hdr)
        recv_exact(s, back)
        ts.append(time.perf_counter() - t)
    s.close()
    q.put(statistics.median(ts[len(ts) // 5:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sizes", default="4194304,33554432")
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    for size in [int(x) for x in a.sizes.split(",")]:
        l = socket.socket()
        l.bind(("127.0.0.1", 0))
        l.listen(16)
        port = l.getsockname()[1]
        q = mp.Queue()
        srv = mp.Process(target=serve, args=(l, a.workers, size, a.rounds))
        srv.start()
        cs = [mp.Process(target=client, args=(port, size, a.rounds, q)) for _ in range(a.workers)]
        for c in cs:
            c.start()
        meds = [q.get(timeout=600) for _ in cs]
        for c in cs:
            c.join()
        srv.join()
        l.close()
        m = statistics.mean(meds)
        print("raw tcp, %d clients, %d bytes: %.2f ms per round (%.3f GB/s per client)"
              % (a.workers, size, m * 1e3, size / m / 1e9), flush=True)


if __name__ == "__main__":
    main()
