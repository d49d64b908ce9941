/* THREADS threads, each handing FILES files to itself through tfem (write,
 * close, open for read, check, close), all at once. Exit 0 if every byte
 * arrived. usage: threads THREADS FILES SIZE */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tfem.h>

static int files;
static size_t size;

static void *worker(void *arg) {
    long id = (long)arg;
    unsigned char *out = malloc(size), *in = malloc(size + 1);
    char name[64];
    long bad = 0;
    for (int n = 0; n < files; n++) {
        snprintf(name, sizeof name, "t%ld/%d", id, n);
        for (size_t i = 0; i < size; i++) out[i] = (unsigned char)(i * 7 + n + id);
        int fd = tfem_open(name, TFEM_WRONLY);
        if (fd < 0 || tfem_write(fd, out, size) != (ssize_t)size || tfem_close(fd) < 0) {
            fprintf(stderr, "thread %ld write %s: %s\n", id, name, strerror(errno));
            bad++;
            break;
        }
        fd = tfem_open(name, TFEM_RDONLY);
        if (fd < 0 || tfem_read(fd, in, size + 1) != (ssize_t)size || memcmp(in, out, size) != 0) {
            fprintf(stderr, "thread %ld read %s failed\n", id, name);
            bad++;
        }
        if (fd >= 0) tfem_close(fd);
    }
    free(out);
    free(in);
    return (void *)bad;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 4;
    files = argc > 2 ? atoi(argv[2]) : 100;
    size = argc > 3 ? strtoull(argv[3], NULL, 10) : 4096;
    pthread_t t[64];
    long bad = 0;
    for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    for (int i = 0; i < threads; i++) {
        void *r;
        pthread_join(t[i], &r);
        bad += (long)r;
    }
    printf("threads: %d threads x %d files, %ld failures\n", threads, files, bad);
    return bad != 0;
}
