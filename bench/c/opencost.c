/* What a C reader's open of a file already on its node costs (run by hand:
 * DESIGN.md, "Across nodes"; a local hit must cost the same whether or not
 * the broker has peers).
 *
 * Each round publishes ITERATIONS consume-once 4 KiB files, one at a time,
 * and times tfem_open(NAME, TFEM_RDONLY) of each alone (the write and the
 * close are not timed); then times ITERATIONS pairs of tfem_open +
 * tfem_close of one kept file. Prints one line per round:
 *     once NS_PER_OPEN kept NS_PER_PAIR
 *
 * usage: opencost ITERATIONS ROUNDS NAME
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <tfem.h>

#include "common.h"

static void publish(const char *name, int flags, const char *buf, size_t size) {
    int fd = tfem_open(name, TFEM_WRONLY | flags);
    if (fd < 0) die("tfem_open for writing");
    if (tfem_write(fd, buf, size) != (ssize_t)size) die("tfem_write");
    if (tfem_close(fd) < 0) die("tfem_close");
}

/* ns per open of a consume-once file published just before. */
static double once_round(const char *name, long iterations, const char *buf) {
    double spent = 0;
    for (long i = 0; i < iterations; i++) {
        publish(name, 0, buf, 4096);
        double t0 = now();
        int fd = tfem_open(name, TFEM_RDONLY);
        spent += now() - t0;
        if (fd < 0) die("tfem_open for reading");
        if (tfem_close(fd) < 0) die("tfem_close");
    }
    return spent * 1e9 / iterations;
}

/* ns per open + close of a kept file. */
static double kept_round(const char *name, long iterations) {
    double t0 = now();
    for (long i = 0; i < iterations; i++) {
        int fd = tfem_open(name, TFEM_RDONLY);
        if (fd < 0) die("tfem_open of the kept file");
        if (tfem_close(fd) < 0) die("tfem_close");
    }
    return (now() - t0) * 1e9 / iterations;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: opencost ITERATIONS ROUNDS NAME\n");
        return 2;
    }
    long iterations = atol(argv[1]);
    int rounds = atoi(argv[2]);
    char once[TFEM_NAME_MAX + 1], kept[TFEM_NAME_MAX + 1], buf[4096];
    snprintf(once, sizeof once, "%.200s/once", argv[3]);
    snprintf(kept, sizeof kept, "%.200s/kept", argv[3]);
    for (int i = 0; i < 4096; i++) buf[i] = (char)(i * 7);
    publish(kept, TFEM_KEEP, buf, sizeof buf);
    once_round(once, iterations / 10 + 1, buf); /* warm up */
    kept_round(kept, iterations / 10 + 1);
    for (int r = 0; r < rounds; r++) {
        double o = once_round(once, iterations, buf);
        double k = kept_round(kept, iterations);
        printf("once %.1f kept %.1f\n", o, k);
        fflush(stdout);
    }
    if (tfem_unlink(kept) < 0) die("tfem_unlink");
    return 0;
}
