/* Lifetimes through the C API: a file for three readers read by three
 * descriptors at once, a kept file read five times then unlinked, a file
 * with a time limit, and the flags refused. Prints one line per check:
 * "label value"; the test compares them with what it expects. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <tfem.h>
#include <unistd.h>

static int put(const char *name, int flags, const char *text) {
    int fd = tfem_open(name, TFEM_WRONLY | flags);
    if (fd < 0) return -errno;
    if (tfem_write(fd, text, strlen(text)) != (ssize_t)strlen(text)) return -errno;
    return tfem_close(fd) ? -errno : 0;
}

/* "rc errno-name" of a call that must fail, its errno read after it. */
static void failure(const char *label, int rc, int expected, const char *expected_name) {
    int e = errno;
    printf("%s %d %s\n", label, rc, e == expected ? expected_name : strerror(e));
}

static int read_matches(int fd, const char *text) {
    char buf[64] = {0};
    ssize_t n = tfem_read(fd, buf, sizeof buf - 1);
    return n == (ssize_t)strlen(text) && memcmp(buf, text, (size_t)n) == 0;
}

int main(void) {
    struct tfem_stat st;
    printf("put-three %d\n", put("c/three", TFEM_READERS(3), "shared bytes"));
    int fds[3];
    for (int i = 0; i < 3; i++) fds[i] = tfem_open("c/three", TFEM_RDONLY | TFEM_NONBLOCK);
    printf("three-open %d\n", fds[0] >= 0 && fds[1] >= 0 && fds[2] >= 0);
    tfem_stat("c/three", &st);
    printf("three-stat %d %d %d %d\n", st.state, st.readers, st.readers_left, st.holders);
    failure("fourth-open", tfem_open("c/three", TFEM_RDONLY | TFEM_NONBLOCK), EAGAIN, "EAGAIN");
    int all = 1;
    for (int i = 0; i < 3; i++) all &= read_matches(fds[i], "shared bytes") && tfem_close(fds[i]) == 0;
    printf("three-read %d\n", all);
    failure("three-gone", tfem_stat("c/three", &st), ENOENT, "ENOENT");

    printf("put-kept %d\n", put("c/kept", TFEM_KEEP, "kept bytes"));
    all = 1;
    for (int i = 0; i < 5; i++) {
        int fd = tfem_open("c/kept", TFEM_RDONLY | TFEM_NONBLOCK);
        all &= fd >= 0 && read_matches(fd, "kept bytes") && tfem_close(fd) == 0;
    }
    tfem_stat("c/kept", &st);
    printf("kept-read %d %d %d\n", all, st.state, st.readers);
    printf("kept-unlink %d\n", tfem_unlink("c/kept"));
    failure("kept-gone", tfem_stat("c/kept", &st), ENOENT, "ENOENT");

    int fd = tfem_open("c/brief", TFEM_WRONLY | TFEM_KEEP);
    printf("ttl-set %d\n", tfem_set_ttl(fd, 0.3));
    tfem_write(fd, "x", 1);
    tfem_close(fd);
    tfem_stat("c/brief", &st);
    printf("ttl-stat %d\n", st.expires > st.created);
    usleep(1500000);
    failure("ttl-gone", tfem_stat("c/brief", &st), ENOENT, "ENOENT");

    failure("keep-and-readers", tfem_open("c/bad", TFEM_WRONLY | TFEM_KEEP | TFEM_READERS(2)), EINVAL, "EINVAL");
    failure("reader-chooses", tfem_open("c/bad", TFEM_RDONLY | TFEM_KEEP), EINVAL, "EINVAL");
    failure("ttl-bad-fd", tfem_set_ttl(12345, 1.0), EBADF, "EBADF");
    return 0;
}
