/* How fast the kernel copies a TCP loopback message into the receiver's
 * buffer, by where that buffer sits in its page (BENCHMARKS.md, "The
 * floor's receives ran at the slow distance").
 *
 *     cc -O2 -o /tmp/tcp_copy_distance scripts/tcp_copy_distance.c
 *     /tmp/tcp_copy_distance [BYTES] [HEADER] [ROUNDS]
 *
 * A child process sends HEADER bytes (0 to 4096) and then a BYTES payload
 * from a page-aligned buffer, in one stream, and says when it is done; only
 * then (or after 100 ms, while the receive window is still growing) does
 * the parent read the header and the payload into a buffer at page offset
 * 0 to 36 in steps of 4, then 40, 48, 56, 64 and 128 (so the socket holds
 * the whole message: the copy is timed alone). Both sockets ask for 16 MiB buffers (the kernel caps them
 * at net.core.[rw]mem_max). Prints, per offset, the distance (the offset
 * minus HEADER, modulo 4096: how far past the kernel's copy of a byte, in
 * its page, the receiver's buffer puts it; the sender's stream starts a
 * message at the start of the kernel's page when the socket was drained)
 * and the median and best of ROUNDS receive copies, in GB/s.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void all(int fd, char *p, size_t n, int sending) {
    while (n > 0) {
        ssize_t k = sending ? send(fd, p, n, 0) : recv(fd, p, n, 0);
        if (k <= 0) die(sending ? "send" : "recv");
        p += k;
        n -= (size_t)k;
    }
}

int main(int argc, char **argv) {
    size_t len = argc > 1 ? strtoul(argv[1], 0, 10) : 4u << 20;
    size_t hdr = argc > 2 ? strtoul(argv[2], 0, 10) : 8;
    int rounds = argc > 3 ? atoi(argv[3]) : 8;
    static const int offsets[] = {0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 48, 56, 64, 128};
    int noff = sizeof offsets / sizeof offsets[0];
    if (hdr > 4096 || rounds < 2) {
        fprintf(stderr, "usage: %s [BYTES] [HEADER <= 4096] [ROUNDS >= 2]\n", argv[0]);
        return 2;
    }
    int big = 16 << 20, one = 1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof a;
    if (setsockopt(ls, SOL_SOCKET, SO_RCVBUF, &big, sizeof big) || bind(ls, (void *)&a, sizeof a) ||
        listen(ls, 1) || getsockname(ls, (void *)&a, &al))
        die("listen");
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) die("socketpair");
    char *hbuf = calloc(1, 4096);
    char *buf = mmap(0, len + 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!hbuf || buf == MAP_FAILED) die("alloc");
    memset(buf, 1, len + 8192);
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        close(sv[0]);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) die("socket");
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(s, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
        if (connect(s, (void *)&a, sizeof a)) die("connect");
        char c;
        /* One message per go from the parent; a byte back when it is sent. */
        while (read(sv[1], &c, 1) == 1) {
            all(s, hbuf, hdr, 1);
            all(s, buf, len, 1);
            if (write(sv[1], &c, 1) != 1) die("write");
        }
        exit(0);
    }
    close(sv[1]);
    /* The child's connection, for up to 10 s (a child that failed first
     * has said why). */
    struct pollfd lp = {ls, POLLIN, 0};
    if (poll(&lp, 1, 10000) != 1) {
        fprintf(stderr, "no connection from the sender in 10 s\n");
        return 1;
    }
    int c = accept(ls, 0, 0);
    if (c < 0) die("accept");
    /* The parent's own pages (the fill before the fork is shared
     * copy-on-write: the first receive would fault on every page). */
    memset(buf, 0, len + 8192);
    printf("%zu-byte payload after a %zu-byte header; receive copy of %d rounds, GB/s\n", len, hdr, rounds);
    printf("%8s %8s %8s %8s\n", "offset", "distance", "median", "best");
    for (int o = 0; o < noff; o++) {
        double *t = calloc((size_t)rounds, sizeof *t);
        if (!t) die("calloc");
        for (int r = 0; r < rounds; r++) {
            char x = 0;
            if (write(sv[0], &x, 1) != 1) die("go");
            /* Until the child has sent it all; at most 100 ms (a window
             * that has not yet grown to hold it all: then the copy is
             * timed with the sender's, and the round is not the best). */
            struct pollfd pf = {sv[0], POLLIN, 0};
            (void)poll(&pf, 1, 100);
            usleep(1000);
            double t0 = now();
            all(c, hbuf, hdr, 0);
            all(c, buf + offsets[o], len, 0);
            t[r] = now() - t0;
            if (read(sv[0], &x, 1) != 1) die("done");
        }
        qsort(t, rounds, sizeof t[0], by_value);
        printf("%8d %8d %8.2f %8.2f\n", offsets[o], (int)((offsets[o] - (long)hdr) & 4095),
               len / t[rounds / 2] / 1e9, len / t[0] / 1e9);
        free(t);
    }
    close(sv[0]);
    waitpid(pid, 0, 0);
    return 0;
}
