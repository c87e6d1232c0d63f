/* Overlapping communication with compute through pskv's requests.
 *
 * Every worker trains the same MLP (LAYERS layers of D x D, tanh between)
 * on its own synthetic shard; the servers sum the workers' gradients and
 * run SGD. A round is a forward pass, a backward pass from the last layer
 * to the first, and a push-pull of every layer's gradient that brings the
 * new weights back.
 *
 * Two ways, on two copies of the model (keys 0.. and 100..) from one start,
 * one after the other (so that neither's traffic overlaps the other's):
 *   blocking:   backward whole, then push-pull every layer, wait for all;
 *   overlapped: each layer's push-pull is issued as soon as its gradient is
 *               ready (priority -layer: the first layer, needed first,
 *               goes first), and the next forward waits for each layer's
 *               request just before it uses that layer.
 * The two copies must end bit for bit equal (sums are deterministic), and
 * the loss must fall. Rank 0 prints the time per round of each way.
 *
 *   cc -O2 examples/c/overlap.c -Iinclude target/release/libpskv.a \
 *      -lpthread -ldl -lm -o target/overlap_c
 *   target/release/pskv launch -n 2 -s 1 -- target/overlap_c [rounds]
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "example.h"

#define LAYERS 6
#define D 384
#define B 4

static uint64_t rng = 88172645463325252ull;
static float uniform(void) { /* xorshift64 in [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

static pskv_buffer f32(float *p, uint64_t n) {
    pskv_buffer b = {p, n, PSKV_FLOAT32, PSKV_DEVICE_CPU, 0, 0, NULL};
    return b;
}

/* One copy of the model and its scratch. */
struct model {
    int64_t key0;
    float *w[LAYERS];     /* D x D, row-major: out = w * in */
    float *g[LAYERS];     /* gradients */
    float *act[LAYERS + 1]; /* B x D activations (act[0] the input) */
    pskv_request *req[LAYERS];
};

static void model_new(struct model *m, int64_t key0, float *const init[LAYERS]) {
    m->key0 = key0;
    for (int l = 0; l < LAYERS; l++) {
        m->w[l] = malloc(sizeof(float) * D * D);
        m->g[l] = malloc(sizeof(float) * D * D);
        memcpy(m->w[l], init[l], sizeof(float) * D * D);
        m->req[l] = NULL;
    }
    for (int l = 0; l <= LAYERS; l++) m->act[l] = calloc(B * D, sizeof(float));
}

/* Forward; waits for layer l's request (if any) before using layer l. */
static float forward(struct model *m, const float *x, const float *y) {
    memcpy(m->act[0], x, sizeof(float) * B * D);
    for (int l = 0; l < LAYERS; l++) {
        if (m->req[l]) {
            check(pskv_wait(m->req[l]), "pskv_wait");
            m->req[l] = NULL;
        }
        for (int b = 0; b < B; b++)
            for (int i = 0; i < D; i++) {
                const float *wr = m->w[l] + (size_t)i * D, *in = m->act[l] + b * D;
                float s = 0;
                for (int j = 0; j < D; j++) s += wr[j] * in[j];
                m->act[l + 1][b * D + i] = l + 1 < LAYERS ? tanhf(s) : s;
            }
    }
    float loss = 0;
    for (int k = 0; k < B * D; k++) {
        float e = m->act[LAYERS][k] - y[k];
        loss += e * e;
    }
    return loss / (B * D);
}

/* Backward from the last layer; `each(l)` runs as soon as g[l] is ready
 * (and w[l] is no longer needed by this pass). */
static void backward(struct model *m, const float *y, void (*each)(struct model *, int)) {
    static float delta[B * D], prev[B * D];
    for (int k = 0; k < B * D; k++) delta[k] = 2.0f * (m->act[LAYERS][k] - y[k]) / (B * D);
    for (int l = LAYERS - 1; l >= 0; l--) {
        const float *in = m->act[l];
        for (int i = 0; i < D; i++)
            for (int j = 0; j < D; j++) {
                float s = 0;
                for (int b = 0; b < B; b++) s += delta[b * D + i] * in[b * D + j];
                m->g[l][(size_t)i * D + j] = s;
            }
        if (l > 0) {
            for (int b = 0; b < B; b++)
                for (int j = 0; j < D; j++) {
                    float s = 0;
                    for (int i = 0; i < D; i++) s += m->w[l][(size_t)i * D + j] * delta[b * D + i];
                    float a = in[b * D + j];
                    prev[b * D + j] = s * (1.0f - a * a);
                }
            memcpy(delta, prev, sizeof(delta));
        }
        if (each) each(m, l);
    }
}

static pskv_kvstore *kv;

/* The push-pull of layer l: gradient in, new weights out, in place. */
static void issue(struct model *m, int l) {
    int64_t key = m->key0 + l;
    pskv_buffer g = f32(m->g[l], (uint64_t)D * D), w = f32(m->w[l], (uint64_t)D * D);
    int prio = -l;
    check(pskv_pushpull_async(kv, 1, &key, &g, &w, &prio, &m->req[l]), "pskv_pushpull_async");
}

/* The blocking way: every layer in one batch after the whole backward. */
static void all_at_once(struct model *m) {
    int64_t keys[LAYERS];
    pskv_buffer gs[LAYERS], ws[LAYERS];
    int prio[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        keys[l] = m->key0 + l;
        gs[l] = f32(m->g[l], (uint64_t)D * D);
        ws[l] = f32(m->w[l], (uint64_t)D * D);
        prio[l] = -l;
    }
    pskv_request *r;
    check(pskv_pushpull_async(kv, LAYERS, keys, gs, ws, prio, &r), "pskv_pushpull_async");
    check(pskv_wait(r), "pskv_wait");
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 6;
    if (pskv_abi_version() != PSKV_ABI_VERSION) {
        fprintf(stderr, "overlap_c: built for ABI %d, library has %d\n", PSKV_ABI_VERSION,
                pskv_abi_version());
        return 1;
    }
    check(pskv_create("dist_sync", &kv), "pskv_create");
    int rank = -1, workers = 0;
    check(pskv_rank(kv, &rank), "pskv_rank");
    check(pskv_num_workers(kv, &workers), "pskv_num_workers");

    /* One start for both copies (the same on every worker: rank 0's is
     * stored anyway). */
    float *init[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        init[l] = malloc(sizeof(float) * D * D);
        for (int k = 0; k < D * D; k++) init[l][k] = uniform() * (1.5f / sqrtf((float)D));
    }
    struct model a, b;
    model_new(&a, 0, init);
    model_new(&b, 100, init);
    int64_t keys[2 * LAYERS];
    pskv_buffer vals[2 * LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        keys[l] = a.key0 + l;
        keys[LAYERS + l] = b.key0 + l;
        vals[l] = vals[LAYERS + l] = f32(init[l], (uint64_t)D * D);
    }
    check(pskv_init_batch(kv, 2 * LAYERS, keys, vals), "pskv_init_batch");
    check(pskv_set_optimizer(kv, "sgd", "learning_rate=0.05"), "pskv_set_optimizer");

    static float x[B * D], y[B * D];
    rng ^= (uint64_t)(rank + 1) * 0x9E3779B97F4A7C15ull;
    double t_block = 0, t_overlap = 0, t_compute = 0;
    float first = 0, last = 0;
    for (int k = 0; k < B * D; k++) { /* this worker's shard */
        x[k] = uniform();
        y[k] = 0.5f * sinf(3.0f * x[k]);
    }
    /* The two ways one after the other, so that neither's traffic runs
     * during the other's rounds; each timed from its second round to the
     * end of its last (the overlapped way's last requests included). */
    float *loss = malloc(sizeof(float) * rounds);
    double t_start = 0;
    for (int r = 0; r < rounds; r++) {
        if (r == 1) t_start = now_us();
        double t0 = now_us();
        loss[r] = forward(&a, x, y);
        backward(&a, y, NULL);
        if (r > 0) t_compute += (now_us() - t0) / 1e3;
        all_at_once(&a);
    }
    t_block = (now_us() - t_start) / 1e3;
    check(pskv_barrier(kv), "pskv_barrier");
    for (int r = 0; r < rounds; r++) {
        if (r == 1) t_start = now_us();
        float lb = forward(&b, x, y);
        backward(&b, y, issue);
        if (lb != loss[r]) {
            fprintf(stderr, "overlap_c: rank %d round %d: losses differ: %.9g vs %.9g\n", rank, r,
                    loss[r], lb);
            return 1;
        }
    }
    /* The last round's requests of the overlapped way. */
    check(pskv_wait_all(LAYERS, b.req, NULL), "pskv_wait_all");
    t_overlap = (now_us() - t_start) / 1e3;
    first = loss[0];
    last = loss[rounds - 1];
    for (int l = 0; l < LAYERS; l++)
        if (memcmp(a.w[l], b.w[l], sizeof(float) * D * D) != 0) {
            fprintf(stderr, "overlap_c: rank %d: layer %d differs between the two ways\n", rank, l);
            return 1;
        }
    if (!(last < first)) {
        fprintf(stderr, "overlap_c: rank %d: the loss did not fall (%g -> %g)\n", rank, first, last);
        return 1;
    }
    if (rank == 0) {
        int n = rounds > 1 ? rounds - 1 : 1;
        printf("overlap_c: %d workers, %d layers of %dx%d (%.1f MiB of gradients per round), %d rounds\n",
               workers, LAYERS, D, D, LAYERS * D * D * 4.0 / (1 << 20), n);
        printf("overlap_c: compute %.2f ms/round; blocking %.2f ms/round; overlapped %.2f ms/round (%.0f%% of blocking)\n",
               t_compute / n, t_block / n, t_overlap / n, 100.0 * t_overlap / t_block);
        printf("overlap_c: loss %.5f -> %.5f; both ways bit for bit equal\n", first, last);
    }
    check(pskv_free(kv), "pskv_free");
    return 0;
}
