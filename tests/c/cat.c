/* A C consumer that hands back what it read (tests/test_spill_store.py):
 *
 *   cat NAME CHUNK   take NAME (waiting up to 30 s), read it CHUNK bytes at a
 *                    time onto stdout, close it; "size N spilled S" on stderr
 *
 * The test compares stdout with what it wrote, byte for byte: any content,
 * however made, is checked the same way. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tfem.h>

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: cat NAME CHUNK\n"); return 2; }
    size_t chunk = strtoull(argv[2], NULL, 10);
    char *buf = malloc(chunk ? chunk : 1);
    int fd = tfem_open_timeout(argv[1], TFEM_RDONLY, 30.0);
    if (fd < 0) { fprintf(stderr, "cat: open %s: %s\n", argv[1], strerror(errno)); return 1; }
    struct tfem_stat st;
    if (tfem_fstat(fd, &st) < 0) { fprintf(stderr, "cat: fstat: %s\n", strerror(errno)); return 1; }
    unsigned long long total = 0;
    for (;;) {
        ssize_t got = tfem_read(fd, buf, chunk);
        if (got < 0) { fprintf(stderr, "cat: read %s at %llu: %s\n", argv[1], total, strerror(errno)); return 1; }
        if (got == 0) break;
        if (fwrite(buf, 1, (size_t)got, stdout) != (size_t)got) { perror("cat: stdout"); return 1; }
        total += (unsigned long long)got;
    }
    if (tfem_close(fd) < 0) { fprintf(stderr, "cat: close %s: %s\n", argv[1], strerror(errno)); return 1; }
    if (fflush(stdout) != 0) { perror("cat: stdout"); return 1; }
    fprintf(stderr, "size %llu spilled %d\n", (unsigned long long)st.size, st.spilled);
    free(buf);
    return total == st.size ? 0 : 1;
}
