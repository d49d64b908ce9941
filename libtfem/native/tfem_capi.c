/*
 * tfem_capi.c: the C API of tfem.h, in plain C over the native core.
 *
 * Connecting: the key file (TFEM_KEYFILE, else the per-user default, as in
 * Python) names the registry's pid and the broker's segment; the library
 * maps the segment itself and checks its header. With TFEM_BROKER (an
 * endpoint, no key file) the segment's name comes from the broker's HELLO,
 * asked through the embedded Python runtime.
 *
 * Every call on a file whose bytes are in memory is C: no interpreter. The
 * calls that need the broker's protocol start the embedded runtime on first
 * use (tfem_embed.h): room when the arena is full (ALLOC, the broker
 * spills), bytes of a spilled file, a spilled file's checksum, and a read
 * of a name this node does not have when the broker has peers (WANT: the
 * broker pulls it from another node). DESIGN.md lists them.
 *
 * Descriptors are tfem's own (3, 4, ...), in a table shared by the threads
 * of the process. A descriptor belongs to the process that opened it: in a
 * forked child the parent's are EBADF, and the child holds files under its
 * own pid. The broker notices a dead C program through the holder pids in
 * the state words, like any other client.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tfem.h"
#include "tfem_atomics.h"
#include "tfem_embed.h"
#include "tfem_file.h"
#include "tfem_layout.h"

#define FIRST_FD 3
#define KEYFILE_HEADER "tfem registry key file; pid "

struct descriptor {
    struct tfem_file f;
    int64_t room_timeout_ns; /* how long a write may wait for memory */
    pid_t owner;             /* the process that opened it */
    int in_use;
    int spill_held;          /* a consumer of a spilled file: the spill store is open for it */
};

/* Descriptors live in pages that never move, so a look-up takes no lock:
 * the calls on an open file cost what the core costs (measured: a mutex
 * and a getpid() per call doubled lseek + 1-byte read). */
#define PAGE_DESCRIPTORS 256
#define MAX_PAGES 4096
static struct descriptor *pages[MAX_PAGES];
static pthread_mutex_t table_mutex = PTHREAD_MUTEX_INITIALIZER; /* opening and closing only */
static struct tfem_header *header; /* the mapped segment, once connected */
static pid_t my_pid;               /* this process: set at connection, and again in a forked child */

static void after_fork_in_child(void) {
    pthread_mutex_init(&table_mutex, NULL); /* another thread may have held it at fork */
    my_pid = getpid();
}

static int fail(int e) {
    errno = e;
    return -1;
}

/* ---- connecting ---- */

static int default_keyfile(char *out, size_t size) {
    const char *xdg = getenv("XDG_RUNTIME_DIR"), *job = getenv("SLURM_JOB_ID");
    char dir[PATH_MAX], file[64];
    struct stat st;
    if (xdg && *xdg && stat(xdg, &st) == 0 && S_ISDIR(st.st_mode))
        snprintf(dir, sizeof dir, "%s/tfem", xdg);
    else
        snprintf(dir, sizeof dir, "/tmp/tfem-%u", (unsigned)getuid());
    if (job && *job) snprintf(file, sizeof file, "registry-job%.40s.key", job);
    else snprintf(file, sizeof file, "registry.key");
    return snprintf(out, size, "%s/%s", dir, file) < (int)size ? 0 : ENAMETOOLONG;
}

/* The segment named in the key file; ECONNREFUSED when no registry runs. */
static int segment_from_keyfile(char *segment, size_t size) {
    char path[PATH_MAX], text[512];
    const char *chosen = getenv("TFEM_KEYFILE");
    if (chosen && *chosen) snprintf(path, sizeof path, "%s", chosen);
    else if (default_keyfile(path, sizeof path)) return ECONNREFUSED;
    /* The registry rewrites it in place (truncated, then written): a text
     * without its last line "end" is read again for up to 50 ms. */
    for (int tries = 0;; tries++) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return ECONNREFUSED;
        ssize_t n = read(fd, text, sizeof text - 1);
        close(fd);
        text[n > 0 ? n : 0] = 0;
        if (strstr(text, "\nend\n") || tries == 50) break;
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    if (strncmp(text, KEYFILE_HEADER, strlen(KEYFILE_HEADER)) != 0) return ECONNREFUSED;
    long pid = strtol(text + strlen(KEYFILE_HEADER), NULL, 10);
    if (pid <= 0 || !tfem_pid_alive((int32_t)pid)) return ECONNREFUSED; /* it died without cleaning up */
    const char *line = strstr(text, "\nsegment ");
    if (!line) return ECONNREFUSED;
    line += strlen("\nsegment ");
    size_t len = strcspn(line, "\n");
    if (len == 0 || len >= size) return ECONNREFUSED;
    memcpy(segment, line, len);
    segment[len] = 0;
    return 0;
}

static int map_segment(const char *name) {
    int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) return ECONNREFUSED;
    struct stat st;
    void *base = MAP_FAILED;
    if (fstat(fd, &st) == 0 && (uint64_t)st.st_size >= sizeof(struct tfem_header))
        base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) return ECONNREFUSED;
    const char *why = tfem_geometry_attach(base, (uint64_t)st.st_size);
    if (why) {
        munmap(base, (size_t)st.st_size);
        fprintf(stderr, "libtfem: segment %s cannot be used: %s (layout version %d)\n", name, why, TFEM_LAYOUT_VERSION);
        return EIO;
    }
    __atomic_store_n(&header, (struct tfem_header *)base, __ATOMIC_RELEASE);
    return 0;
}

/* The mapped segment, connecting on first use, and again when the broker
 * replaced it (its name was removed; the broker made a new one and moves
 * the files there). A replaced mapping stays for the descriptors open on it. */
static struct tfem_header *connected(void) {
    struct tfem_header *h = __atomic_load_n(&header, __ATOMIC_ACQUIRE);
    if (h && !__atomic_load_n(&h->moved, __ATOMIC_ACQUIRE)) return h;
    pthread_mutex_lock(&table_mutex);
    if (header && __atomic_load_n(&header->moved, __ATOMIC_ACQUIRE)) __atomic_store_n(&header, NULL, __ATOMIC_RELEASE);
    int rc = 0;
    if (!header) {
        char segment[256];
        if (getenv("TFEM_BROKER") && *getenv("TFEM_BROKER") && !(getenv("TFEM_KEYFILE") && *getenv("TFEM_KEYFILE")))
            rc = tfem_python_ready() || _tfem_py_segment(segment, sizeof segment) < 0 ? errno : 0;
        else
            rc = segment_from_keyfile(segment, sizeof segment);
        if (!rc) rc = map_segment(segment);
        if (!rc && !my_pid) pthread_atfork(NULL, NULL, after_fork_in_child);
        if (!rc) my_pid = getpid();
    }
    pthread_mutex_unlock(&table_mutex);
    errno = rc;
    return rc ? NULL : header;
}

/* ---- descriptors ---- */

/* A free descriptor, marked in use; its index in *index. */
static struct descriptor *new_descriptor(int *index) {
    struct descriptor *d = NULL;
    pthread_mutex_lock(&table_mutex);
    for (int p = 0; p < MAX_PAGES && !d; p++) {
        if (!pages[p]) {
            struct descriptor *page = calloc(PAGE_DESCRIPTORS, sizeof *page);
            if (!page) break;
            __atomic_store_n(&pages[p], page, __ATOMIC_RELEASE);
        }
        for (int i = 0; i < PAGE_DESCRIPTORS; i++) {
            if (!pages[p][i].in_use) {
                d = &pages[p][i];
                d->in_use = 1;
                *index = p * PAGE_DESCRIPTORS + i;
                break;
            }
        }
    }
    pthread_mutex_unlock(&table_mutex);
    return d;
}

static void free_descriptor(struct descriptor *d) {
    if (d->spill_held) {
        _tfem_py_spill_hold(0);
        d->spill_held = 0;
    }
    pthread_mutex_lock(&table_mutex);
    d->in_use = 0;
    pthread_mutex_unlock(&table_mutex);
}

/* The file behind fd, held by this process; NULL with EBADF. */
static struct descriptor *lookup(int fd) {
    unsigned i = (unsigned)fd - FIRST_FD;
    struct descriptor *page = fd >= FIRST_FD && i / PAGE_DESCRIPTORS < MAX_PAGES
                                  ? __atomic_load_n(&pages[i / PAGE_DESCRIPTORS], __ATOMIC_ACQUIRE)
                                  : NULL;
    struct descriptor *d = page ? &page[i % PAGE_DESCRIPTORS] : NULL;
    if (!d || !d->in_use || !d->f.held || d->owner != my_pid) {
        errno = EBADF;
        return NULL;
    }
    return d;
}

/* ---- names ---- */

static int valid_utf8(const unsigned char *s, size_t n) {
    static const uint32_t least[] = {0, 0x80, 0x800, 0x10000};
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t extra = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : 4;
        if (extra == 4 || i + extra >= n) return 0;
        uint32_t cp = extra == 0 ? c : c & (0x3Fu >> extra);
        for (size_t k = 1; k <= extra; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if (cp < least[extra] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        i += extra + 1;
    }
    return 1;
}

/* 0, or the errno for a name tfem does not take (as Python's encode_name). */
static int check_name(const char *name, uint32_t *len) {
    if (!name) return EFAULT;
    size_t n = strnlen(name, TFEM_NAME_MAX + 1);
    if (n == 0) return EINVAL;
    if (n > TFEM_NAME_MAX) return ENAMETOOLONG;
    if (!valid_utf8((const unsigned char *)name, n)) return EINVAL;
    *len = (uint32_t)n;
    return 0;
}

/* ---- what needs the broker ---- */

/* crc32c of a spilled file: its memory part here, the rest in the spill
 * store, which the caller holds open. */
static int64_t spilled_checksum(struct tfem_file *f) {
    uint64_t spilled = f->size > f->memory_end ? f->size - f->memory_end : 0;
    return _tfem_py_checksum(f->file_id, spilled, tfem_f_memory_crc(f));
}

/* A consumer of a spilled file holds the spill store open until close. */
static int hold_spill(struct descriptor *d) {
    if (tfem_python_ready() || _tfem_py_spill_hold(1) < 0) return errno;
    d->spill_held = 1;
    return 0;
}

/* A spilled file read out of order, or at its end, before its check: the
 * one-pass check, with the store's part. */
static int check_spilled(struct descriptor *d) {
    int64_t crc = spilled_checksum(&d->f);
    return crc < 0 ? errno : tfem_f_spilled_verdict(&d->f, (uint32_t)crc);
}

/* A producer's spilled file, at close: the store is opened for the look alone. */
static int64_t producer_checksum(struct tfem_file *f) {
    if (tfem_python_ready() || _tfem_py_spill_hold(1) < 0) return -1;
    int64_t crc = spilled_checksum(f);
    int saved = errno;
    _tfem_py_spill_hold(0);
    errno = saved;
    return crc;
}

/* ---- across nodes ---- */

static int64_t monotonic_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* A name no file of this node has, and the broker has peers (the header's
 * `cluster`): the broker pulls it here under the same name (WANT, through
 * the embedded runtime) and the open takes the copy as any local file.
 * Waiting, it sleeps on its futex a slice at a time and asks again between
 * slices, which renews the want: a renewal is how the broker tells it that
 * the owner or the name's home died (ECONNREFUSED), and a want nobody
 * renews lapses, so a reader killed while waiting leaves nothing. Not
 * waiting, the WANT returns once the copy is here (ENOENT: on no node).
 * As client.py's _open_across. */
static int open_across(struct tfem_header *h, const char *name, uint32_t len, int wait, int64_t timeout_ns,
                       struct tfem_file *f) {
    int32_t state = 0;
    int rc;
    if (tfem_python_ready()) return errno;
    if (!wait) {
        if (_tfem_py_want(name, 0) < 0) return errno;
        while ((rc = tfem_f_open(h, name, len, (uint32_t)my_pid, TFEM_OPEN_READ, 0, 0, f, &state)) == EIDRM)
            if ((h = connected()) == NULL) return errno;
        return rc;
    }
    int64_t deadline = timeout_ns < 0 ? -1 : monotonic_ns() + timeout_ns;
    for (;;) {
        int64_t slice = _tfem_py_want(name, 1);
        if (slice < 0) return errno; /* the broker dropped the want, or is gone: nothing to give up */
        int64_t left = deadline < 0 ? slice : deadline - monotonic_ns();
        if (left <= 0) {
            rc = ETIMEDOUT;
            break;
        }
        rc = tfem_f_open(h, name, len, (uint32_t)my_pid, TFEM_OPEN_READ, 1, left < slice ? left : slice, f, &state);
        if (rc == EIDRM && (h = connected()) == NULL) {
            rc = errno;
            break;
        }
        if (rc != ETIMEDOUT && rc != EINTR && rc != EIDRM) break; /* else: the slice is over, ask again */
    }
    if (rc) _tfem_py_unwant(name); /* if that fails, the want lapses unrenewed */
    return rc;
}

/* ---- the API ---- */

int tfem_open_timeout(const char *name, int flags, double timeout_seconds) {
    uint32_t len = 0;
    int rc = check_name(name, &len);
    if (rc) return fail(rc);
    int access = flags & 3, keep = (flags & TFEM_KEEP) != 0;
    uint32_t readers = (uint32_t)(flags >> 16) & TFEM_READERS_MAX; /* 0: not chosen */
    if (flags & ~(3 | TFEM_NONBLOCK | TFEM_KEEP | TFEM_READERS(TFEM_READERS_MAX)) || access == 3 ||
        isnan(timeout_seconds))
        return fail(EINVAL);
    if ((keep || readers) && (access == TFEM_RDONLY || (keep && readers))) return fail(EINVAL);
    struct tfem_header *h = connected();
    if (!h) return -1;
    int i = 0;
    struct descriptor *d = new_descriptor(&i);
    if (!d) return fail(ENOMEM);
    int wait = !(flags & TFEM_NONBLOCK);
    int64_t timeout_ns = timeout_seconds < 0 ? -1 : (int64_t)(timeout_seconds * 1e9);
    d->room_timeout_ns = timeout_ns < 0 ? 0 : timeout_ns; /* TFEM_NONBLOCK: the open waits for no slot, writes may */
    int32_t state = 0;
    rc = -1; /* not tried yet */
    if (access == TFEM_RDONLY && __atomic_load_n(&h->cluster, __ATOMIC_RELAXED)) {
        /* With peers, a local hit costs what it costs without: one open that does not wait. */
        rc = tfem_f_open(h, name, len, (uint32_t)my_pid, TFEM_OPEN_READ, 0, 0, &d->f, &state);
        if (rc == ENOENT) rc = open_across(h, name, len, wait, timeout_ns, &d->f);
        else if (rc) rc = -1; /* here but not ready, or a signal or a move: the local open below */
    }
    while (rc < 0) {
        if (access == TFEM_WRONLY)
            rc = tfem_f_create(h, name, len, (uint32_t)my_pid, wait ? d->room_timeout_ns : 0, &d->f);
        else
            rc = tfem_f_open(h, name, len, (uint32_t)my_pid, access == TFEM_AUTO ? TFEM_OPEN_AUTO : TFEM_OPEN_READ, wait,
                             timeout_ns, &d->f, &state);
        if (rc == EIDRM && (h = connected()) == NULL) rc = errno;
        else if (rc == EINTR || rc == EIDRM) rc = -1;
    }
    if (rc == 0 && !d->f.writing && d->f.spilled && (rc = hold_spill(d)) != 0) {
        tfem_f_abort(&d->f); /* given back, left in place */
    }
    if (rc) {
        free_descriptor(d);
        return fail(rc);
    }
    if (d->f.writing && (keep || readers)) tfem_f_set_lifetime(&d->f, keep ? 0 : readers, 0);
    d->owner = my_pid;
    return FIRST_FD + i;
}

int tfem_open(const char *name, int flags) { return tfem_open_timeout(name, flags, -1.0); }

/* Ask the broker for room; with a room timeout, wait for consumers to free some. */
static int make_room(struct descriptor *d) {
    int64_t deadline_left = d->room_timeout_ns;
    for (;;) {
        uint32_t seen = __atomic_load_n(&d->f.h->space_seq, __ATOMIC_SEQ_CST);
        if (tfem_python_ready()) return errno;
        if (_tfem_py_alloc(d->f.index, d->f.generation, d->f.want) == 0) {
            tfem_f_reload(&d->f);
            return 0;
        }
        if (errno != ENOSPC || deadline_left == 0) return errno;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        if (tfem_f_wait_space(d->f.h, seen, deadline_left) == ETIMEDOUT) return ENOSPC;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (deadline_left > 0) {
            deadline_left -= (t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
            if (deadline_left <= 0) return ENOSPC;
        }
    }
}

/* A gap before pos is not sent: the spill store reads bytes never written as zeros. */
static int write_spilled(struct tfem_file *f, const char *buf, uint64_t n) {
    if (tfem_python_ready()) return errno;
    if (_tfem_py_spill_write(f->index, f->generation, f->pos, buf, n) < 0) return errno;
    f->pos += n;
    if (f->pos > f->size) f->size = f->slot->size = f->pos;
    f->crc_end = UINT64_MAX; /* checksummed at close, with the broker */
    return 0;
}

ssize_t tfem_write(int fd, const void *buf, size_t count) {
    struct descriptor *d = lookup(fd);
    if (!d) return -1;
    if (!d->f.writing) return fail(EBADF);
    if (buf == NULL && count) return fail(EFAULT);
    if (count > SSIZE_MAX) return fail(EINVAL);
    const char *p = buf;
    uint64_t done = 0;
    while (done < count) {
        int64_t n = tfem_f_write(&d->f, p + done, count - done);
        if (n < 0) return fail((int)-n);
        done += (uint64_t)n;
        if (done == count) break;
        int rc = d->f.need == TFEM_NEED_ROOM ? make_room(d) : write_spilled(&d->f, p + done, count - done);
        if (rc) return fail(rc);
        if (d->f.need == TFEM_NEED_SPILL) done = count;
    }
    return (ssize_t)count;
}

ssize_t tfem_read(int fd, void *buf, size_t count) {
    struct descriptor *d = lookup(fd);
    if (!d) return -1;
    if (d->f.writing) return fail(EBADF);
    if (buf == NULL && count) return fail(EFAULT);
    if (count > SSIZE_MAX) return fail(EINVAL);
    int64_t n = tfem_f_read(&d->f, buf, count);
    if (n == -EXDEV) { /* a spilled file out of order, or at its end, unchecked */
        int rc = check_spilled(d);
        if (rc) return fail(rc);
        n = tfem_f_read(&d->f, buf, count);
    }
    if (n < 0) return fail((int)-n);
    if (d->f.need != TFEM_NEED_SPILL) return (ssize_t)n;
    struct tfem_file *f = &d->f;
    uint64_t want = count - (uint64_t)n < f->size - f->pos ? count - (uint64_t)n : f->size - f->pos;
    if (!f->checked && f->pos != f->crc_end) {
        int rc = check_spilled(d);
        if (rc) return n ? n : fail(rc);
    }
    int64_t more = _tfem_py_spill_read(f->file_id, f->pos - f->memory_end, (char *)buf + n, want);
    if (more < 0) return n ? n : -1;
    int rc = tfem_f_spilled_read(f, (char *)buf + n, (uint64_t)more); /* checksummed as it comes */
    if (rc) return fail(rc);
    return (ssize_t)(n + more);
}

off_t tfem_lseek(int fd, off_t offset, int whence) {
    struct descriptor *d = lookup(fd);
    if (!d) return -1;
    int64_t pos = tfem_f_seek(&d->f, (int64_t)offset, whence);
    return pos < 0 ? fail((int)-pos) : (off_t)pos;
}

static void fill_stat(const struct tfem_fileinfo *info, struct tfem_stat *st) {
    st->size = info->size;
    st->state = info->state;
    st->spilled = info->spilled;
    st->created = (double)info->created_ns / 1e9;
    st->readers = (int)info->readers;
    st->readers_left = (int)info->readers_left;
    st->holders = info->state == TFEM_STATE_SHARED ? (int)info->holders : info->state == TFEM_STATE_READ;
    st->expires = (double)info->expires_ns / 1e9;
}

int tfem_stat(const char *name, struct tfem_stat *st) {
    uint32_t len = 0;
    int rc = check_name(name, &len);
    if (rc) return fail(rc);
    if (!st) return fail(EFAULT);
    struct tfem_header *h = connected();
    if (!h) return -1;
    struct tfem_fileinfo info;
    rc = tfem_t_stat(h, name, len, tfem_name_hash(name, len), (uint32_t)my_pid, &info);
    if (rc) return fail(rc);
    fill_stat(&info, st);
    return 0;
}

int tfem_fstat(int fd, struct tfem_stat *st) {
    struct descriptor *d = lookup(fd);
    if (!d) return -1;
    if (!st) return fail(EFAULT);
    struct tfem_fileinfo info;
    tfem_f_fstat(&d->f, &info);
    fill_stat(&info, st);
    return 0;
}

int tfem_close(int fd) {
    struct descriptor *d = lookup(fd);
    if (!d) return -1;
    int rc = tfem_f_close(&d->f);
    if (rc == EXDEV) { /* a spilled file: its checksum needs the spill store */
        int64_t crc = producer_checksum(&d->f);
        rc = crc < 0 ? errno : tfem_f_publish(&d->f, (uint32_t)crc);
        if (crc < 0) tfem_f_abort(&d->f); /* never half-published, never left held */
    }
    free_descriptor(d);
    return rc ? fail(rc == ESTALE ? EBADF : rc) : 0;
}

int tfem_set_ttl(int fd, double seconds) {
    struct descriptor *d = lookup(fd);
    if (!d) return -1;
    if (!d->f.writing) return fail(EBADF);
    if (!(seconds > 0 && seconds < 1e9)) return fail(EINVAL);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint64_t expires = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec + (uint64_t)(seconds * 1e9);
    return tfem_f_set_lifetime(&d->f, d->f.slot->readers, expires) ? fail(EBADF) : 0;
}

int tfem_unlink(const char *name) {
    uint32_t len = 0;
    int rc = check_name(name, &len);
    if (rc) return fail(rc);
    struct tfem_header *h = connected();
    if (!h) return -1;
    struct tfem_claim out;
    rc = tfem_t_unlink(h, name, len, tfem_name_hash(name, len), (uint32_t)my_pid, &out);
    if (rc) return fail(rc);
    return 0;
}
