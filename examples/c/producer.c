/* Write COUNT files PREFIX/0 .. PREFIX/COUNT-1 of SIZE bytes into tfem.
 * Each byte is derived from the file's name and offset, so the consumer
 * can check it.   usage: producer [COUNT [SIZE [PREFIX]]] */
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
    unsigned char *buf = malloc(size ? size : 1);
    char name[TFEM_NAME_MAX + 1];
    for (int n = 0; n < count; n++) {
        snprintf(name, sizeof name, "%s/%d", prefix, n);
        for (size_t i = 0; i < size; i++) buf[i] = byte_at(name, i);
        int fd = tfem_open(name, TFEM_WRONLY);
        if (fd < 0) { fprintf(stderr, "producer: open %s: %s\n", name, strerror(errno)); return 1; }
        if (tfem_write(fd, buf, size) != (ssize_t)size) {
            fprintf(stderr, "producer: write %s: %s\n", name, strerror(errno));
            return 1;
        }
        if (tfem_close(fd) < 0) { fprintf(stderr, "producer: close %s: %s\n", name, strerror(errno)); return 1; }
    }
    printf("producer: wrote %d files of %zu bytes\n", count, size);
    free(buf);
    return 0;
}
