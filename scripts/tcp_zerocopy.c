/* What MSG_ZEROCOPY does to a large TCP send over loopback (issue 16 item
 * 2's "MSG_ZEROCOPY for large payloads"; BENCHMARKS.md, "Two of item 2's
 * ideas at the floor").
 *
 *     cc -O2 -o /tmp/tcp_zerocopy scripts/tcp_zerocopy.c
 *     /tmp/tcp_zerocopy MODE [BYTES] [MESSAGES]
 *
 * MODE 0 sends each message with plain send(2); MODE 1 sets SO_ZEROCOPY on
 * the socket and sends with MSG_ZEROCOPY, reaping the kernel's completion
 * notices from the socket's error queue after each message. A child
 * process receives each BYTES message (default 1 MiB) into a page-aligned
 * buffer and acknowledges it with one byte before the next is sent: one
 * message in flight at a time, so each message's time holds the
 * acknowledgement's round trip, in both modes alike. Prints the wall time
 * per message, the CPU time (user + system) of the sender and of the
 * receiver per message, and, for MODE 1, of the zero-copy send calls made,
 * how many the kernel's notices completed and how many of those it
 * reported as copied after all (SO_EE_CODE_ZEROCOPY_COPIED: it could not
 * hand the pages over as they are). Each successful send call gets one
 * notice id; a blocking call usually queues a whole message.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* CPU seconds (user + system) of `who`. */
static double cpu(int who) {
    struct rusage r;
    getrusage(who, &r);
    return r.ru_utime.tv_sec + r.ru_utime.tv_usec * 1e-6 + r.ru_stime.tv_sec +
           r.ru_stime.tv_usec * 1e-6;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void *page_buffer(size_t n) {
    void *p = aligned_alloc(4096, (n + 4095) / 4096 * 4096);
    if (!p) die("aligned_alloc");
    return p;
}

/* The child: receive `n` messages of `size` bytes, acknowledging each. */
static void receive(int listener, size_t size, int n) {
    int s = accept(listener, NULL, NULL);
    if (s < 0) die("accept");
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char *buf = page_buffer(size);
    for (int i = 0; i < n; i++) {
        size_t got = 0;
        while (got < size) {
            ssize_t r = recv(s, buf + got, size - got, 0);
            if (r <= 0) die("recv");
            got += (size_t)r;
        }
        char ack = 1;
        if (send(s, &ack, 1, 0) != 1) die("send ack");
    }
    exit(0);
}

/* Reads the completion notices waiting on `s`: adds the send calls they
 * cover to `*done`, and those the kernel copied to `*copied`. */
static void reap(int s, long *done, long *copied) {
    for (;;) {
        union {
            char bytes[CMSG_SPACE(sizeof(struct sock_extended_err)) * 4];
            struct cmsghdr align;
        } control;
        struct msghdr m = {.msg_control = control.bytes, .msg_controllen = sizeof control.bytes};
        if (recvmsg(s, &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            die("recvmsg MSG_ERRQUEUE");
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
            if (c->cmsg_level != SOL_IP || c->cmsg_type != IP_RECVERR) continue;
            struct sock_extended_err *e = (struct sock_extended_err *)CMSG_DATA(c);
            if (e->ee_origin != SO_EE_ORIGIN_ZEROCOPY) continue;
            long k = (long)e->ee_data - (long)e->ee_info + 1;
            *done += k;
            if (e->ee_code & SO_EE_CODE_ZEROCOPY_COPIED) *copied += k;
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODE(0 plain, 1 MSG_ZEROCOPY) [BYTES] [MESSAGES]\n", argv[0]);
        return 2;
    }
    if (strcmp(argv[1], "0") != 0 && strcmp(argv[1], "1") != 0) {
        fprintf(stderr, "MODE must be 0 (plain) or 1 (MSG_ZEROCOPY)\n");
        return 2;
    }
    int zc = argv[1][0] == '1';
    size_t size = argc > 2 ? strtoul(argv[2], NULL, 10) : 1 << 20;
    int n = argc > 3 ? atoi(argv[3]) : 3000;
    if (size == 0 || n <= 0) {
        fprintf(stderr, "BYTES and MESSAGES must be positive\n");
        return 2;
    }

    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    if (listener < 0 || bind(listener, (struct sockaddr *)&a, sizeof a) ||
        listen(listener, 1) || getsockname(listener, (struct sockaddr *)&a, &alen))
        die("listen");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) receive(listener, size, n);

    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) die("connect");
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (zc && setsockopt(s, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one)) die("SO_ZEROCOPY");
    char *buf = page_buffer(size);
    for (size_t i = 0; i < size; i++) buf[i] = (char)(i * 7 + 1);

    long calls = 0, done = 0, copied = 0;
    double t0 = now(), c0 = cpu(RUSAGE_SELF);
    for (int i = 0; i < n; i++) {
        size_t off = 0;
        while (off < size) {
            ssize_t w = send(s, buf + off, size - off, zc ? MSG_ZEROCOPY : 0);
            if (w < 0) {
                /* Out of the memory the kernel pins for zero-copy sends:
                 * reap the notices, then send again. */
                if (errno == ENOBUFS) {
                    reap(s, &done, &copied);
                    continue;
                }
                die("send");
            }
            calls += zc;
            off += (size_t)w;
        }
        char ack;
        if (recv(s, &ack, 1, 0) != 1) die("recv ack");
        if (zc) reap(s, &done, &copied);
    }
    double wall = now() - t0, sender = cpu(RUSAGE_SELF) - c0;
    /* The last notices may come after the last acknowledgement: wait for
     * them (at most a second). */
    for (int waited = 0; done < calls && waited < 100; waited++) {
        struct pollfd p = {.fd = s, .events = 0};
        poll(&p, 1, 10);
        reap(s, &done, &copied);
    }
    int status;
    if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
        die("the receiver failed");
    double receiver = cpu(RUSAGE_CHILDREN);
    printf("%s, %zu-byte messages: %.1f us a message, sender CPU %.1f us, receiver CPU %.1f us",
           zc ? "MSG_ZEROCOPY" : "plain send", size, wall / n * 1e6, sender / n * 1e6,
           receiver / n * 1e6);
    if (zc)
        printf("; zero-copy send calls %ld, completed %ld, copied by the kernel %ld", calls, done,
               copied);
    printf("\n");
    return 0;
}
