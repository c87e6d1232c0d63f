/* What the C examples share: a check that stops the program with pskv's
 * message when a call fails, and a monotonic clock. */
#ifndef PSKV_EXAMPLE_H
#define PSKV_EXAMPLE_H

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "pskv.h"

/* Exits with the call's name, status and pskv_last_error() unless `status`
 * is PSKV_OK. */
static inline void check(int status, const char *what) {
    if (status != PSKV_OK) {
        fprintf(stderr, "%s failed (%d): %s\n", what, status, pskv_last_error());
        exit(1);
    }
}

/* Microseconds of a monotonic clock. */
static inline double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

#endif
