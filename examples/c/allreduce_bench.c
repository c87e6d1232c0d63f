/* An MPI-style benchmark of pskv's push-pull (the parameter-server
 * allreduce), for clusters: every rank is a worker started by
 * `pskv launch` (any launcher: local, ssh, mpi, slurm), over the van that
 * PSKV_VAN picks (tcp, shm, rdma). For each size it times ITERS rounds in
 * which every worker push-pulls one float32 key (its rank + 1 in every
 * element) into another buffer and waits for the result, checks each
 * round's result (every element of it with -c, else the first and the
 * last: the sum over the workers), and rank 0 prints a table as
 * nccl-tests and the OSU benchmarks do:
 *
 *   size (B)  time (us)  algbw (GB/s)  busbw (GB/s)
 *
 * algbw = size / time; busbw = 2 * size / time (what each worker moves:
 * its push and its pull; the servers' links carry the same in total).
 *
 *   cc -O2 examples/c/allreduce_bench.c -Iinclude target/release/libpskv.a \
 *      -lpthread -ldl -lm -o target/allreduce_bench
 *   pskv launch -n 4 -s 4 -- target/allreduce_bench -b 4 -e 64M -f 4
 *   PSKV_VAN=rdma pskv launch --launcher mpi -H hosts -n 16 -s 16 -- ./allreduce_bench
 *
 * Options: -b MIN and -e MAX bytes (K, M, G suffixes; default 4 and 16M),
 * -f FACTOR between sizes (default 4), -n ITERS (default 20), -w WARMUP
 * (default 5), -k KEYS in flight per round (default 1: the size is split
 * over that many keys, each its own request, as a framework's tensors
 * are), -c to check every element of every result (outside the timing:
 * the time then covers rounds and checks), -p to make each key's request
 * once (pskv_pushpull_persistent) and start it every round (pskv_start)
 * instead of a pskv_pushpull_async call per round, -s to push each key
 * from its push buffer (pskv_push_buffer: over shm, the worker's slots of
 * the key's shared segments, so a push copies nothing in) instead of
 * memory of the program's own.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "example.h"

static size_t parse_size(const char *s) {
    char *end;
    double v = strtod(s, &end);
    switch (*end) {
        case 'k': case 'K': v *= 1024; break;
        case 'm': case 'M': v *= 1024 * 1024; break;
        case 'g': case 'G': v *= 1024.0 * 1024 * 1024; break;
        default: break;
    }
    return (size_t)v;
}

int main(int argc, char **argv) {
    size_t min = 4, max = 16 << 20;
    int factor = 4, iters = 20, warmup = 5, nkeys = 1, full = 0, persistent = 0, pushbuf = 0;
    for (int i = 1; i < argc; i += 2) {
        if (!strcmp(argv[i], "-c") || !strcmp(argv[i], "-p") || !strcmp(argv[i], "-s")) {
            if (argv[i][1] == 'c') full = 1;
            else if (argv[i][1] == 'p') persistent = 1;
            else pushbuf = 1;
            i--;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "allreduce_bench: %s needs a value\n", argv[i]);
            return 2;
        }
        if (!strcmp(argv[i], "-b")) min = parse_size(argv[i + 1]);
        else if (!strcmp(argv[i], "-e")) max = parse_size(argv[i + 1]);
        else if (!strcmp(argv[i], "-f")) factor = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-n")) iters = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-w")) warmup = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-k")) nkeys = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "allreduce_bench: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (min < 4 || max < min || factor < 2 || iters < 1 || warmup < 0 || nkeys < 1 || nkeys > 1024) {
        fprintf(stderr, "allreduce_bench: bad options (need 4 <= -b <= -e, -f >= 2, -n >= 1, 1 <= -k <= 1024)\n");
        return 2;
    }
    pskv_kvstore *kv = NULL;
    check(pskv_create("dist_sync", &kv), "pskv_create");
    int rank = 0, workers = 1;
    check(pskv_rank(kv, &rank), "pskv_rank");
    check(pskv_num_workers(kv, &workers), "pskv_num_workers");

    /* Every size's keys, initialized in one collective call. */
    int nsizes = 0;
    for (size_t s = min; s <= max; s *= (size_t)factor) nsizes++;
    int64_t *keys = malloc(sizeof(int64_t) * nsizes * nkeys);
    pskv_buffer *bufs = malloc(sizeof(pskv_buffer) * nsizes * nkeys);
    pskv_buffer *outs = malloc(sizeof(pskv_buffer) * nsizes * nkeys);
    float **data = malloc(sizeof(float *) * nsizes * nkeys);
    float **res = malloc(sizeof(float *) * nsizes * nkeys);
    uint64_t *counts = malloc(sizeof(uint64_t) * nsizes * nkeys);
    int j = 0;
    for (size_t s = min; s <= max; s *= (size_t)factor) {
        uint64_t total = s / 4, each = total / nkeys ? total / nkeys : 1;
        for (int k = 0; k < nkeys; k++, j++) {
            counts[j] = k + 1 < nkeys ? each : (total > each * (nkeys - 1) ? total - each * (nkeys - 1) : 1);
            data[j] = malloc(counts[j] * sizeof(float));
            res[j] = calloc(counts[j], sizeof(float));
            for (uint64_t e = 0; e < counts[j]; e++) data[j][e] = (float)(rank + 1);
            keys[j] = j;
            pskv_buffer b = {data[j], counts[j], PSKV_FLOAT32, PSKV_DEVICE_CPU, 0, 0, NULL};
            pskv_buffer o = {res[j], counts[j], PSKV_FLOAT32, PSKV_DEVICE_CPU, 0, 0, NULL};
            bufs[j] = b;
            outs[j] = o;
        }
    }
    check(pskv_init_batch(kv, j, keys, bufs), "pskv_init_batch");
    float want = (float)workers * (float)(workers + 1) / 2.0f;
    /* -s: each key pushed from its push buffer, filled as data[] was. */
    int in_shm = 0;
    for (int i = 0; pushbuf && i < j; i++) {
        int shared = 0;
        check(pskv_push_buffer(kv, keys[i], &bufs[i], &shared), "pskv_push_buffer");
        float *d = bufs[i].data;
        for (uint64_t e = 0; e < counts[i]; e++) d[e] = (float)(rank + 1);
        in_shm += shared;
    }

    pskv_request **reqs = malloc(sizeof(pskv_request *) * nkeys);
    int *prio = malloc(sizeof(int) * nkeys);
    if (rank == 0) {
        printf("# pskv push-pull: %d workers, %d key(s) per round, %d iterations (+%d warm-up), %s requests\n",
               workers, nkeys, iters, warmup, persistent ? "persistent" : "one-shot");
        if (pushbuf)
            printf("# push buffers: %d of %d keys in shared memory\n", in_shm, j);
        printf("# %12s %12s %12s %12s\n", "size (B)", "time (us)", "algbw (GB/s)", "busbw (GB/s)");
    }
    int first = 0;
    for (size_t s = min; s <= max; s *= (size_t)factor, first += nkeys) {
        double t0 = 0;
        /* Persistent: each key's request made once for the size. */
        for (int k = 0; persistent && k < nkeys; k++) {
            prio[k] = -k;
            check(pskv_pushpull_persistent(kv, 1, &keys[first + k], &bufs[first + k],
                                           &outs[first + k], &prio[k], &reqs[k]),
                  "pskv_pushpull_persistent");
        }
        for (int it = 0; it < warmup + iters; it++) {
            if (it == warmup) {
                check(pskv_barrier(kv), "pskv_barrier");
                t0 = now_us();
            }
            if (persistent) {
                check(pskv_start_all(nkeys, reqs), "pskv_start_all");
            } else {
                for (int k = 0; k < nkeys; k++) {
                    prio[k] = -k;
                    check(pskv_pushpull_async(kv, 1, &keys[first + k], &bufs[first + k],
                                              &outs[first + k], &prio[k], &reqs[k]),
                          "pskv_pushpull_async");
                }
            }
            check(pskv_wait_all(nkeys, reqs, NULL), "pskv_wait_all");
            for (int k = 0; k < nkeys; k++) {
                float *d = res[first + k];
                uint64_t n = counts[first + k];
                for (uint64_t e = 0; e < n; e = (full || e + 1 == n) ? e + 1 : n - 1) {
                    if (d[e] != want) {
                        fprintf(stderr, "allreduce_bench: rank %d: size %zu key %d element %llu: got %g, want %g\n",
                                rank, s, k, (unsigned long long)e, d[e], want);
                        return 1;
                    }
                    d[e] = 0; /* the next round must write it again */
                }
            }
        }
        double us = (now_us() - t0) / iters;
        for (int k = 0; persistent && k < nkeys; k++)
            check(pskv_request_free(reqs[k]), "pskv_request_free");
        if (rank == 0)
            printf("  %12zu %12.1f %12.3f %12.3f\n", s, us, s / us / 1e3, 2.0 * s / us / 1e3);
    }
    if (rank == 0)
        printf("# every result checked (%s): the sum over the workers\n",
               full ? "every element" : "its first and last elements");
    check(pskv_free(kv), "pskv_free");
    return 0;
}
