/* Each tfem call that must fail, and the errno it sets: prints
 * "case errno-name" per line. A call that succeeds prints "case OK". */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <tfem.h>
#include <unistd.h>

static const char *errname(int e) {
    switch (e) {
    case ENOENT: return "ENOENT";
    case EEXIST: return "EEXIST";
    case EAGAIN: return "EAGAIN";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EBADF: return "EBADF";
    case EINVAL: return "EINVAL";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ENOSPC: return "ENOSPC";
    case ECONNREFUSED: return "ECONNREFUSED";
    case EFAULT: return "EFAULT";
    case ENOSYS: return "ENOSYS";
    default: return strerror(e);
    }
}

#define CHECK(label, call)                                              \
    do {                                                                \
        errno = 0;                                                      \
        long long rc_ = (long long)(call);                              \
        printf("%s %s\n", label, rc_ == -1 ? errname(errno) : "OK");    \
    } while (0)

int main(int argc, char **argv) {
    char buf[64] = {0};
    struct tfem_stat st;
    if (argc > 1 && strcmp(argv[1], "noserver") == 0) {
        CHECK("open-no-server", tfem_open("x", TFEM_WRONLY));
        return 0;
    }
    CHECK("open-missing-nonblock", tfem_open("missing", TFEM_RDONLY | TFEM_NONBLOCK));
    CHECK("stat-missing", tfem_stat("missing", &st));
    CHECK("unlink-missing", tfem_unlink("missing"));
    CHECK("open-timeout", tfem_open_timeout("missing", TFEM_RDONLY, 0.2));

    int w = tfem_open("held", TFEM_WRONLY);
    printf("open-writer %s\n", w >= 0 ? "OK" : errname(errno));
    CHECK("open-existing-for-write", tfem_open("held", TFEM_WRONLY));
    CHECK("open-being-written-nonblock", tfem_open("held", TFEM_RDONLY | TFEM_NONBLOCK));
    CHECK("read-on-write-fd", tfem_read(w, buf, sizeof buf));
    CHECK("write-null-buffer", tfem_write(w, NULL, 10));
    CHECK("write-huge-count", tfem_write(w, buf, (size_t)SSIZE_MAX + 1));
    CHECK("lseek-negative", tfem_lseek(w, -5, SEEK_SET));
    CHECK("lseek-bad-whence", tfem_lseek(w, 0, 42));
    CHECK("write", tfem_write(w, "hello", 5));
    CHECK("fstat-null", tfem_fstat(w, NULL));
    CHECK("close-writer", tfem_close(w));
    CHECK("close-again", tfem_close(w));
    CHECK("write-closed", tfem_write(w, "x", 1));

    int r = tfem_open("held", TFEM_RDONLY);
    printf("open-reader %s\n", r >= 0 ? "OK" : errname(errno));
    CHECK("write-on-read-fd", tfem_write(r, "x", 1));
    CHECK("read-null-buffer", tfem_read(r, NULL, 10));
    ssize_t got = tfem_read(r, buf, sizeof buf);
    printf("read-bytes %zd %.*s\n", got, (int)(got > 0 ? got : 0), buf);
    CHECK("close-reader", tfem_close(r));

    CHECK("read-bad-fd", tfem_read(9999, buf, 1));
    CHECK("write-negative-fd", tfem_write(-1, buf, 1));
    CHECK("lseek-bad-fd", tfem_lseek(12345, 0, SEEK_SET));
    CHECK("close-bad-fd", tfem_close(777));
    CHECK("open-bad-flags", tfem_open("x", 0x77));
    CHECK("open-null-name", tfem_open(NULL, TFEM_WRONLY));
    CHECK("stat-null", tfem_stat("x", NULL));
    CHECK("open-empty-name", tfem_open("", TFEM_WRONLY));
    char longname[400];
    memset(longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = 0;
    CHECK("open-long-name", tfem_open(longname, TFEM_WRONLY));
    CHECK("open-not-utf8", tfem_open("bad\xff\xfe", TFEM_WRONLY));

    /* The instance has 2 slots: a third file is ENOSPC. */
    int a = tfem_open("slot-a", TFEM_WRONLY), b = tfem_open("slot-b", TFEM_WRONLY);
    printf("fill-slots %s\n", a >= 0 && b >= 0 ? "OK" : errname(errno));
    CHECK("open-table-full", tfem_open("slot-c", TFEM_WRONLY));
    tfem_close(a);
    tfem_close(b);
    tfem_unlink("slot-a");
    tfem_unlink("slot-b");
    return 0;
}
