/* One C producer and one C consumer handing files of SIZE bytes over:
 * through tfem (one tfem_write, one tfem_read) or through a file in DIR
 * (write(2) and read(2), the name sent down the pipe NOTIFY_FD).
 *
 * usage: handoff produce|consume tfem SIZE
 *        handoff produce|consume file SIZE DIR NOTIFY_FD
 *
 * Both read names from stdin, one per line, and answer on stdout:
 *   at start, both:  "started" once the buffer is touched (and libtfem loaded)
 *   consumer:        "waiting" just before it waits for the file, then
 *                    "T1 ok" or "T1 bad" after the close (and unlink)
 *   producer:        "T0", taken just before its open for writing
 * T0 and T1 are CLOCK_MONOTONIC seconds, the clock of Python's
 * time.perf_counter. The first 8 bytes of each file carry its sequence
 * number; the rest is a pattern the consumer checks after timing.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <tfem.h>

#include "common.h"

static unsigned char pattern(size_t i) { return (unsigned char)(i * 131 + (i >> 12)); }

static int next_name(char *name, size_t cap) {
    if (!fgets(name, (int)cap, stdin)) return 0;
    name[strcspn(name, "\n")] = 0;
    return 1;
}

static void write_all(int fd, const unsigned char *buf, size_t n) {
    while (n) {
        ssize_t w = write(fd, buf, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            die("write");
        }
        buf += w;
        n -= (size_t)w;
    }
}

static size_t read_all(int fd, unsigned char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("read");
        }
        if (r == 0) break;
        got += (size_t)r;
    }
    return got;
}

/* The next line from the notify pipe, byte by byte: names are short. */
static void read_line(int fd, char *line, size_t cap) {
    size_t n = 0;
    for (;;) {
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) die("notify pipe");
        if (c == '\n' || n + 1 == cap) break;
        line[n++] = c;
    }
    line[n] = 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: handoff produce|consume tfem|file SIZE [DIR NOTIFY_FD]\n");
        return 2;
    }
    int producing = strcmp(argv[1], "produce") == 0;
    int via_tfem = strcmp(argv[2], "tfem") == 0;
    size_t size = strtoull(argv[3], NULL, 10);
    const char *dir = argc > 4 ? argv[4] : ".";
    int notify = argc > 5 ? atoi(argv[5]) : -1;
    if (size < 64 || (!via_tfem && notify < 0)) {
        fprintf(stderr, "handoff: SIZE must be at least 64; file needs DIR and NOTIFY_FD\n");
        return 2;
    }

    unsigned char *buf = malloc(size);
    if (!buf) die("malloc");
    for (size_t i = 0; i < size; i++) buf[i] = pattern(i); /* touches every page */
    if (via_tfem) {
        struct tfem_stat st; /* loads libtfem's Python before any timing */
        if (tfem_stat("handoff-warm-up", &st) == 0 || errno != ENOENT) die("tfem_stat");
    }
    printf("started\n");
    fflush(stdout);

    char name[TFEM_NAME_MAX + 1], path[4096];
    for (uint64_t seq = 1; next_name(name, sizeof name); seq++) {
        snprintf(path, sizeof path, "%s/%s", dir, name);
        if (producing) {
            memcpy(buf, &seq, 8);
            double t0 = now();
            if (via_tfem) {
                int fd = tfem_open(name, TFEM_WRONLY);
                if (fd < 0) die("tfem_open");
                if (tfem_write(fd, buf, size) != (ssize_t)size) die("tfem_write");
                if (tfem_close(fd) < 0) die("tfem_close");
            } else {
                int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
                if (fd < 0) die(path);
                write_all(fd, buf, size);
                if (close(fd) < 0) die("close");
                char line[TFEM_NAME_MAX + 2];
                int n = snprintf(line, sizeof line, "%s\n", name);
                write_all(notify, (unsigned char *)line, (size_t)n);
            }
            printf("%.9f\n", t0);
        } else {
            printf("waiting\n");
            fflush(stdout);
            size_t got;
            if (via_tfem) {
                int fd = tfem_open(name, TFEM_RDONLY);
                if (fd < 0) die("tfem_open");
                ssize_t r = tfem_read(fd, buf, size);
                if (r < 0) die("tfem_read");
                got = (size_t)r;
                if (tfem_close(fd) < 0) die("tfem_close");
            } else {
                char told[TFEM_NAME_MAX + 1];
                read_line(notify, told, sizeof told);
                snprintf(path, sizeof path, "%s/%s", dir, told);
                int fd = open(path, O_RDONLY);
                if (fd < 0) die(path);
                got = read_all(fd, buf, size);
                if (close(fd) < 0) die("close");
                if (unlink(path) < 0) die("unlink");
            }
            double t1 = now();
            uint64_t seen;
            memcpy(&seen, buf, 8);
            int ok = got == size && seen == seq;
            for (size_t i = 8; ok && i < size; i += 4093) ok = buf[i] == pattern(i);
            ok = ok && buf[size - 1] == pattern(size - 1);
            printf("%.9f %s\n", t1, ok ? "ok" : "bad");
        }
        fflush(stdout);
    }
    free(buf);
    return 0;
}
