/* Two threads of each worker ask for the same key's push buffer at once,
 * for KEYS fresh keys: every call must succeed and give the same memory
 * (tests/c_abi.rs runs it under `pskv launch` over shared memory, where
 * a key's first push buffer is made from its slots, once). */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "example.h"

#define KEYS 48
#define N 4096

static pskv_kvstore *kv;
static pthread_barrier_t start;
static int64_t key;
static pskv_buffer got[2];
static int rc[2];
static char err[2][512];

static void *maker(void *arg) {
    int i = (int)(intptr_t)arg;
    pthread_barrier_wait(&start);
    rc[i] = pskv_push_buffer(kv, key, &got[i], NULL);
    if (rc[i] != PSKV_OK) snprintf(err[i], sizeof err[i], "%s", pskv_last_error());
    return NULL;
}

int main(void) {
    check(pskv_create("dist_sync", &kv), "pskv_create");
    int rank = -1;
    check(pskv_rank(kv, &rank), "pskv_rank");
    static float w[N];
    for (int k = 0; k < KEYS; k++) check(pskv_init(kv, k, w, N), "pskv_init");
    int shared = 0;
    for (int k = 0; k < KEYS; k++) {
        key = k;
        pthread_barrier_init(&start, NULL, 2);
        pthread_t t[2];
        for (int i = 0; i < 2; i++) {
            if (pthread_create(&t[i], NULL, maker, (void *)(intptr_t)i) != 0) {
                fprintf(stderr, "push_buffer_race: rank %d: pthread_create failed\n", rank);
                return 1;
            }
        }
        for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
        pthread_barrier_destroy(&start);
        for (int i = 0; i < 2; i++) {
            if (rc[i] != PSKV_OK) {
                fprintf(stderr, "push_buffer_race: rank %d key %d thread %d: %s\n", rank, k, i, err[i]);
                return 1;
            }
        }
        if (got[0].data != got[1].data) {
            fprintf(stderr, "push_buffer_race: rank %d key %d: two buffers\n", rank, k);
            return 1;
        }
        int s = 0;
        check(pskv_push_buffer(kv, key, &got[0], &s), "pskv_push_buffer");
        shared += s;
    }
    printf("push_buffer_race: rank %d: %d keys, one buffer each, %d in shared memory\n", rank, KEYS, shared);
    check(pskv_barrier(kv), "pskv_barrier");
    check(pskv_free(kv), "pskv_free");
    return 0;
}
