/* What calls into libtfem cost, against the same calls on a /dev/shm file.
 *
 * Writes a 4 KiB file NAME into tfem, opens it for reading, and times
 * ITERATIONS pairs of tfem_lseek + a 1-byte tfem_read; then the same with
 * lseek + read(2) on a 4 KiB file at PATH. Prints one line per round:
 *     tfem NS_PER_PAIR file NS_PER_PAIR
 *
 * usage: callcost ITERATIONS ROUNDS NAME PATH
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <tfem.h>

#include "common.h"

/* ns per lseek + 1-byte read, over `iterations` of them on fd. */
static double tfem_round(int fd, long iterations, unsigned *sum) {
    unsigned char c;
    double t0 = now();
    for (long i = 0; i < iterations; i++) {
        if (tfem_lseek(fd, i & 4095, SEEK_SET) < 0) die("tfem_lseek");
        if (tfem_read(fd, &c, 1) != 1) die("tfem_read");
        *sum += c;
    }
    return (now() - t0) * 1e9 / iterations;
}

static double file_round(int fd, long iterations, unsigned *sum) {
    unsigned char c;
    double t0 = now();
    for (long i = 0; i < iterations; i++) {
        if (lseek(fd, i & 4095, SEEK_SET) < 0) die("lseek");
        if (read(fd, &c, 1) != 1) die("read");
        *sum += c;
    }
    return (now() - t0) * 1e9 / iterations;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: callcost ITERATIONS ROUNDS NAME PATH\n");
        return 2;
    }
    long iterations = atol(argv[1]);
    int rounds = atoi(argv[2]);
    const char *name = argv[3], *path = argv[4];
    unsigned char buf[4096];
    unsigned sum = 0;
    for (int i = 0; i < 4096; i++) buf[i] = (unsigned char)(i * 7);

    int fd = tfem_open(name, TFEM_WRONLY);
    if (fd < 0) die("tfem_open for writing");
    if (tfem_write(fd, buf, sizeof buf) != (ssize_t)sizeof buf) die("tfem_write");
    if (tfem_close(fd) < 0) die("tfem_close");
    fd = tfem_open(name, TFEM_RDONLY);
    if (fd < 0) die("tfem_open for reading");

    int file = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (file < 0) die(path);
    if (write(file, buf, sizeof buf) != (ssize_t)sizeof buf) die("write");

    tfem_round(fd, iterations / 10 + 1, &sum); /* warm up */
    file_round(file, iterations / 10 + 1, &sum);
    for (int r = 0; r < rounds; r++) {
        double t = tfem_round(fd, iterations, &sum);
        double f = file_round(file, iterations, &sum);
        printf("tfem %.1f file %.1f\n", t, f);
        fflush(stdout);
    }
    if (tfem_close(fd) < 0) die("tfem_close");
    close(file);
    unlink(path);
    return sum == 0xFFFFFFFFu; /* keeps the reads */
}
