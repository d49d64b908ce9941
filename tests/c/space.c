/* What a C caller sees when room runs out (tests/test_space.py).
 *
 *   space fill PREFIX SIZE   files PREFIX/0, PREFIX/1, ... of SIZE bytes until a
 *                            call fails: "stored N", then "failed CALL ERRNO"
 *   space hole NAME          a 1-byte write at 1 TiB: "hole ERRNO MICROSECONDS",
 *                            then the file is written ("ok" at 0) and published
 *   space gap NAME SIZE GAP  SIZE bytes, a gap of GAP bytes, then "!": "gap OK"
 *
 * Byte i of file number n is (i + n) % 251 (the gap file is number 0). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tfem.h>
#include <time.h>

static const char *errname(int e) {
    switch (e) {
    case ENOSPC: return "ENOSPC";
    case EFBIG: return "EFBIG";
    case EIO: return "EIO";
    default: return strerror(e);
    }
}

static int write_pattern(int fd, long n, long long size) {
    static char buf[256 << 10];
    for (long long done = 0; done < size;) {
        long long k = size - done < (long long)sizeof buf ? size - done : (long long)sizeof buf;
        for (long long i = 0; i < k; i++) buf[i] = (char)((done + i + n) % 251);
        if (tfem_write(fd, buf, (size_t)k) != k) return -1;
        done += k;
    }
    return 0;
}

static int fill(const char *prefix, long long size) {
    char name[256];
    for (long n = 0;; n++) {
        snprintf(name, sizeof name, "%s/%ld", prefix, n);
        int fd = tfem_open(name, TFEM_WRONLY);
        const char *call = "open";
        if (fd >= 0) {
            call = "write";
            if (write_pattern(fd, n, size) == 0) {
                call = "close";
                if (tfem_close(fd) == 0) continue;
            } else {
                int e = errno;
                tfem_unlink(name); /* dropped, never half-published */
                tfem_close(fd);
                errno = e;
            }
        }
        printf("stored %ld\nfailed %s %s\n", n, call, errname(errno));
        return 0;
    }
}

static int hole(const char *name) {
    int fd = tfem_open(name, TFEM_WRONLY);
    if (fd < 0 || tfem_lseek(fd, (off_t)1 << 40, SEEK_SET) < 0) return perror("open/lseek"), 1;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    ssize_t rc = tfem_write(fd, "x", 1);
    int e = errno;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long us = (t1.tv_sec - t0.tv_sec) * 1000000L + (t1.tv_nsec - t0.tv_nsec) / 1000;
    printf("hole %s %ld\n", rc == 1 ? "OK" : errname(e), us);
    if (tfem_lseek(fd, 0, SEEK_SET) != 0 || tfem_write(fd, "ok", 2) != 2 || tfem_close(fd) != 0)
        return perror("after the hole"), 1;
    return 0;
}

static int gap(const char *name, long long size, long long gap_bytes) {
    int fd = tfem_open(name, TFEM_WRONLY);
    if (fd < 0 || write_pattern(fd, 0, size) != 0) return perror("write"), 1;
    if (tfem_lseek(fd, (off_t)(size + gap_bytes), SEEK_SET) < 0 || tfem_write(fd, "!", 1) != 1)
        return printf("gap %s\n", errname(errno)), 0;
    if (tfem_close(fd) != 0) return printf("gap close %s\n", errname(errno)), 0;
    printf("gap OK\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "fill") == 0) return fill(argv[2], atoll(argv[3]));
    if (argc == 3 && strcmp(argv[1], "hole") == 0) return hole(argv[2]);
    if (argc == 5 && strcmp(argv[1], "gap") == 0) return gap(argv[2], atoll(argv[3]), atoll(argv[4]));
    fprintf(stderr, "usage: space fill PREFIX SIZE | hole NAME | gap NAME SIZE GAP\n");
    return 2;
}
