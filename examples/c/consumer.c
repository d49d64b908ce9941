/* Read PREFIX/0 .. PREFIX/COUNT-1 from tfem, waiting for each, and check
 * every byte.   usage: consumer [COUNT [SIZE [PREFIX]]] */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tfem.h>

#include "pattern.h"

int main(int argc, char **argv) {
    int count = argc > 1 ? atoi(argv[1]) : 100;
    size_t size = argc > 2 ? strtoull(argv[2], NULL, 10) : 4096;
    const char *prefix = argc > 3 ? argv[3] : "cdemo";
    unsigned char *buf = malloc(size + 1);
    char name[TFEM_NAME_MAX + 1];
    int bad = 0;
    for (int n = 0; n < count; n++) {
        snprintf(name, sizeof name, "%s/%d", prefix, n);
        int fd = tfem_open_timeout(name, TFEM_RDONLY, 60.0);
        if (fd < 0) { fprintf(stderr, "consumer: open %s: %s\n", name, strerror(errno)); return 1; }
        struct tfem_stat st;
        if (tfem_fstat(fd, &st) < 0 || st.size != size) {
            fprintf(stderr, "consumer: %s has %llu bytes, expected %zu\n", name,
                    (unsigned long long)st.size, size);
            return 1;
        }
        ssize_t got = tfem_read(fd, buf, size + 1);
        if (got != (ssize_t)size) { fprintf(stderr, "consumer: read %s: %zd\n", name, got); return 1; }
        for (size_t i = 0; i < size; i++)
            if (buf[i] != byte_at(name, i)) { bad++; break; }
        if (tfem_close(fd) < 0) { fprintf(stderr, "consumer: close %s: %s\n", name, strerror(errno)); return 1; }
    }
    printf("consumer: read %d files, %d with wrong bytes\n", count, bad);
    free(buf);
    return bad != 0;
}
