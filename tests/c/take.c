/* A C reader of a cluster's node (tests/test_cluster.py):
 *
 *   take NAME TIMEOUT   open NAME for reading, waiting up to TIMEOUT
 *                       seconds ("-": no limit; "nonblock": TFEM_NONBLOCK),
 *                       write its bytes onto stdout, close it
 *
 * On stderr "opened in S s", or "ENAME in S s" (the open's errno) and exit
 * status 1: the test checks the bytes and the error, and how long the open took. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <tfem.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static const char *errno_name(int e) {
    switch (e) {
    case ENOENT: return "ENOENT";
    case EAGAIN: return "EAGAIN";
    case ETIMEDOUT: return "ETIMEDOUT";
    case ECONNREFUSED: return "ECONNREFUSED";
    case EINVAL: return "EINVAL";
    case ENOSYS: return "ENOSYS";
    default: return strerror(e);
    }
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: take NAME TIMEOUT\n"); return 2; }
    const char *name = argv[1], *limit = argv[2];
    double t0 = now();
    int fd = !strcmp(limit, "nonblock") ? tfem_open(name, TFEM_RDONLY | TFEM_NONBLOCK)
             : !strcmp(limit, "-")      ? tfem_open(name, TFEM_RDONLY)
                                        : tfem_open_timeout(name, TFEM_RDONLY, atof(limit));
    double spent = now() - t0;
    if (fd < 0) {
        fprintf(stderr, "%s in %.3f s\n", errno_name(errno), spent);
        return 1;
    }
    fprintf(stderr, "opened in %.3f s\n", spent);
    char buf[65536];
    for (;;) {
        ssize_t got = tfem_read(fd, buf, sizeof buf);
        if (got < 0) { fprintf(stderr, "read: %s\n", strerror(errno)); return 3; }
        if (got == 0) break;
        if (fwrite(buf, 1, (size_t)got, stdout) != (size_t)got) { perror("stdout"); return 3; }
    }
    if (tfem_close(fd) < 0) { fprintf(stderr, "close: %s\n", strerror(errno)); return 3; }
    return fflush(stdout) == 0 ? 0 : 3;
}
