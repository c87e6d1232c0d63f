/* MXNet 1.9.1's dependency engine on the workloads of pskv's engine
 * dispatch bench (engine/benches/dispatch.rs), through MXNet's C API:
 * every op is a no-op C function pushed with MXEnginePushSyncND, its read
 * and write sets given as NDArrays (each NDArray owns one engine var).
 *
 *   (a) independent: 1,000,000 ops; op i writes var i % 1000
 *   (b) chain:       100,000 ops that all write one var
 *   (c) fan:         100 rounds of a root (reads s, writes r), 1,000 ops
 *                    (read r, each writes its own var), a sink (reads the
 *                    1,000, writes s)
 *
 * Each workload runs `reps` times after one warm-up run; prints one line
 * per workload: `RESULT name median_ms ops_per_s`. The worker count comes
 * from MXNET_CPU_WORKER_NTHREADS and the engine from MXNET_ENGINE_TYPE
 * (scripts/mxnet_engine_dispatch.sh sets both).
 *
 * Built and run by scripts/mxnet_engine_dispatch.sh against the libmxnet.so
 * of ../shared/peers/setup.sh's venv; the few prototypes it needs are
 * declared here (MXNet's c_api.h is C++-flavoured: default arguments). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef void *NDArrayHandle;
typedef const void *ContextHandle;
typedef const void *EngineFnPropertyHandle;
typedef void (*EngineSyncFunc)(void *, void *);
typedef void (*EngineFuncParamDeleter)(void *);

extern int MXNDArrayCreateEx(const uint32_t *shape, uint32_t ndim, int dev_type, int dev_id,
                             int delay_alloc, int dtype, NDArrayHandle *out);
extern int MXEnginePushSyncND(EngineSyncFunc sync_func, void *func_param,
                              EngineFuncParamDeleter deleter, ContextHandle ctx_handle,
                              NDArrayHandle *const_nds, int num_const, NDArrayHandle *mutable_nds,
                              int num_mutable, EngineFnPropertyHandle prop_handle, int priority,
                              const char *opr_name);
extern int MXNDArrayWaitAll(void);
extern const char *MXGetLastError(void);

/* mxnet::Context: a device type (kCPU = 1) and an id. */
struct mx_context {
    int32_t dev_type;
    int32_t dev_id;
};
static const struct mx_context CPU = {1, 0};

/* The op body: nothing, as pskv's bench closures (`black_box(i)`). */
static void noop(void *rctx, void *param) {
    (void)rctx;
    (void)param;
}

static void check(int rc, const char *what) {
    if (rc != 0) {
        fprintf(stderr, "%s failed: %s\n", what, MXGetLastError());
        exit(1);
    }
}

static NDArrayHandle var(void) {
    uint32_t shape[1] = {1};
    NDArrayHandle h;
    /* delay_alloc: the ops never touch the memory; only the var matters. */
    check(MXNDArrayCreateEx(shape, 1, 1, 0, 1, 0, &h), "MXNDArrayCreateEx");
    return h;
}

static void push(NDArrayHandle *reads, int nreads, NDArrayHandle write) {
    NDArrayHandle w = write;
    check(MXEnginePushSyncND(noop, NULL, NULL, &CPU, reads, nreads, &w, 1, NULL, 0, "noop"),
          "MXEnginePushSyncND");
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

#define WIDTH 1000

static NDArrayHandle vars[WIDTH], one, r, s;

static long independent(void) {
    const long n = 1000000;
    for (long i = 0; i < n; i++) push(NULL, 0, vars[i % WIDTH]);
    check(MXNDArrayWaitAll(), "MXNDArrayWaitAll");
    return n;
}

static long chain(void) {
    const long n = 100000;
    for (long i = 0; i < n; i++) push(NULL, 0, one);
    check(MXNDArrayWaitAll(), "MXNDArrayWaitAll");
    return n;
}

static long fan(void) {
    const int rounds = 100;
    for (int round = 0; round < rounds; round++) {
        push(&s, 1, r);
        for (int k = 0; k < WIDTH; k++) push(&r, 1, vars[k]);
        push(vars, WIDTH, s);
    }
    check(MXNDArrayWaitAll(), "MXNDArrayWaitAll");
    return (long)rounds * (WIDTH + 2);
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void bench(const char *name, long (*run)(void), int reps) {
    double times[64];
    long ops = run(); /* warm-up */
    for (int i = 0; i < reps; i++) {
        double t0 = now_ms();
        run();
        times[i] = now_ms() - t0;
    }
    qsort(times, reps, sizeof times[0], cmp);
    double med = times[reps / 2];
    printf("RESULT %s %.2f %.0f\n", name, med, ops / (med / 1e3));
    fflush(stdout);
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 10;
    if (reps < 1 || reps > 64) {
        fprintf(stderr, "usage: %s [reps, 1 to 64]\n", argv[0]);
        return 2;
    }
    for (int i = 0; i < WIDTH; i++) vars[i] = var();
    one = var();
    r = var();
    s = var();
    bench("independent", independent, reps);
    bench("chain", chain, reps);
    bench("fan", fan, reps);
    return 0;
}
