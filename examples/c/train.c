/* A C worker of pskv: every worker pushes a gradient of (rank + 1) into each
 * element of one key; the servers sum them and run SGD (learning rate 0.1)
 * once per round; every worker then pulls the weights and checks them.
 *
 *   cc examples/c/train.c -Iinclude -Ltarget/release -lpskv -o target/train_c
 *   LD_LIBRARY_PATH=target/release target/release/pskv launch -n 2 -s 1 -- target/train_c
 */
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include "example.h"

#define N 1000
#define ROUNDS 5

int main(void) {
    pskv_kvstore *kv = NULL;
    check(pskv_create("dist_sync", &kv), "pskv_create");
    int rank = -1, workers = 0;
    check(pskv_rank(kv, &rank), "pskv_rank");
    check(pskv_num_workers(kv, &workers), "pskv_num_workers");

    static float w[N], g[N];
    for (int i = 0; i < N; i++) w[i] = 1.0f;
    check(pskv_init(kv, 3, w, N), "pskv_init");
    check(pskv_set_optimizer(kv, "sgd", "learning_rate=0.1"), "pskv_set_optimizer");

    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < N; i++) g[i] = (float)(rank + 1);
        check(pskv_pushpull(kv, 3, g, w, N, 0), "pskv_pushpull");
    }
    /* Each round subtracts 0.1 * (1 + 2 + ... + workers). */
    float step = 0.1f * (float)(workers * (workers + 1) / 2);
    float want = 1.0f;
    for (int r = 0; r < ROUNDS; r++) want -= step;
    for (int i = 0; i < N; i++) {
        if (fabsf(w[i] - want) > 1e-4f) {
            fprintf(stderr, "train_c: rank %d: w[%d] = %f, want %f\n", rank, i, w[i], want);
            return 1;
        }
    }

    /* A bad call is an error code and a message, not an abort. */
    if (pskv_pull(kv, 99, w, N, 0) == PSKV_OK) {
        fprintf(stderr, "train_c: pulling a key never initialized succeeded\n");
        return 1;
    }
    printf("train_c: rank %d of %d: %d rounds, weights %.3f as expected; "
           "a bad pull said: %s\n", rank, workers, ROUNDS, w[0], pskv_last_error());
    check(pskv_barrier(kv), "pskv_barrier");
    check(pskv_free(kv), "pskv_free");
    return 0;
}
