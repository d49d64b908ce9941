/* Fork after using tfem, and fork while other threads are inside tfem.
 * Every child hands one file of its own through tfem with a connection of
 * its own and exits; the parent's threads keep working throughout.
 * usage: fork FORKS */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <tfem.h>
#include <unistd.h>

static volatile int stop;

static int handoff(const char *name, const char *text) {
    char buf[128];
    int fd = tfem_open(name, TFEM_WRONLY);
    if (fd < 0 || tfem_write(fd, text, strlen(text)) < 0 || tfem_close(fd) < 0) return -1;
    fd = tfem_open(name, TFEM_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = tfem_read(fd, buf, sizeof buf);
    tfem_close(fd);
    return n == (ssize_t)strlen(text) && memcmp(buf, text, n) == 0 ? 0 : -1;
}

static void *busy(void *arg) {
    long id = (long)arg, done = 0;
    char name[64];
    while (!stop) {
        snprintf(name, sizeof name, "busy%ld/%ld", id, done);
        if (handoff(name, "from a busy thread") < 0) {
            fprintf(stderr, "busy thread %ld failed: %s\n", id, strerror(errno));
            return (void *)1;
        }
        done++;
    }
    return (void *)0;
}

int main(int argc, char **argv) {
    int forks = argc > 1 ? atoi(argv[1]) : 20;
    if (handoff("parent/before", "before any fork") < 0) { perror("parent handoff"); return 1; }
    pthread_t t[2];
    for (long i = 0; i < 2; i++) pthread_create(&t[i], NULL, busy, (void *)i);
    int failures = 0;
    for (int k = 0; k < forks; k++) {
        pid_t pid = fork();
        if (pid == 0) {
            char name[64];
            snprintf(name, sizeof name, "child/%d", k);
            _exit(handoff(name, "from a child") == 0 ? 0 : 3);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failures++;
    }
    stop = 1;
    for (int i = 0; i < 2; i++) {
        void *r;
        pthread_join(t[i], &r);
        if (r) failures++;
    }
    if (handoff("parent/after", "after the forks") < 0) failures++;
    printf("fork: %d forks, %d failures\n", forks, failures);
    return failures != 0;
}
