/*
 * tfem_file.c: the native client core, the life of one file in memory.
 *
 * Why C: with the table operations in C but the file object in Python, a
 * 4 KiB put+get cost 48 us against 26 us for a /dev/shm file, all of the
 * difference interpreter frames; and C callers paid 3.4 us per call to go
 * through an embedded interpreter. Here open, write, close, read are one
 * call each, for Python (tfem._native) and C (libtfem.so) alike.
 *
 * Theory of operation:
 * - A holder owns its slot's inline buffer and extents from open to close:
 *   data moves without a lock, straight between the caller's buffer and the
 *   segment. State changes go through tfem_table.c (lock, compare-and-swap).
 * - A file's bytes are the inline buffer, then its arena extents in order.
 *   A writer that needs more claims blocks itself (tfem_t_grow); when the
 *   arena is full, the transfer stops short with need = TFEM_NEED_ROOM and
 *   the caller asks the broker, which spills. Bytes of a spilled file past
 *   the inline buffer live in the broker's spill store: TFEM_NEED_SPILL.
 * - Checksums cost no pass of their own. A writer that appends continues
 *   the crc32c over each chunk right after copying it (still in cache); a
 *   writer that seeks back is checksummed in one pass at close. A reader
 *   that reads in order does the same and compares when it reaches the end:
 *   the read that would deliver the last byte, or report the end of the
 *   file, fails with EBADMSG instead. A reader that jumps around is checked
 *   in one pass at its first jump. A damaged file is given back at close
 *   (READ -> WAIT), never consumed. A spilled file is checked the same way:
 *   the caller copies its bytes from the spill store and reports them
 *   (tfem_f_spilled_read), and its one-pass check is the caller's too
 *   (EXDEV: the core has not the bytes).
 * - A write that would take a file past the segment's max_file_size is
 *   EFBIG before anything moves: one compare, no broker.
 * - Waits spin first or sleep at once by load: see choose_spin().
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "tfem_atomics.h"
#include "tfem_crc32c.h"
#include "tfem_file.h"
#include "tfem_layout.h"

#define SC __ATOMIC_SEQ_CST
#define RELAXED __ATOMIC_RELAXED
#define CRC_NONE UINT64_MAX      /* crc_end: the running checksum was given up */
#define POPULATE_FROM (1u << 20) /* writes this large map their pages in one call first */
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t real_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000 + (uint64_t)ts.tv_nsec;
}

/* ---- waits: spin or sleep by load ----
 *
 * A wake-up through the kernel costs 25-50 us on this kind of machine; a
 * spin that sees the change first costs a few. Spinning pays only while
 * (a) the wait is short: the recent waits of this process, averaged, are
 * under twice the spin window; and (b) the other runnable tasks fit on the
 * CPUs, so the process we wait for has one: the kernel's count of runnable
 * tasks (/proc/loadavg, read at most once a millisecond), less this
 * thread, is at most the number of CPUs. Otherwise the waiter sleeps on
 * the futex at once. The spin yields between looks, so two
 * processes on one CPU never spin against each other. */

static int wait_mode = TFEM_WAIT_ADAPTIVE;
static int64_t spin_window_ns = 50000;
static int64_t recent_wait_ns;  /* moving average of this process's waits */
static int64_t runnable_read_ns; /* when /proc/loadavg was last read */
static int runnable_tasks;
static uint64_t waits_spun, waits_slept;

void tfem_set_wait_mode(int mode, int64_t spin_ns) {
    __atomic_store_n(&wait_mode, mode, RELAXED);
    if (spin_ns >= 0) __atomic_store_n(&spin_window_ns, spin_ns, RELAXED);
}

void tfem_wait_counters(uint64_t *spun, uint64_t *slept) {
    *spun = __atomic_load_n(&waits_spun, RELAXED);
    *slept = __atomic_load_n(&waits_slept, RELAXED);
}

static int runnable_now(int64_t now) {
    if (now - __atomic_load_n(&runnable_read_ns, RELAXED) < 1000000)
        return __atomic_load_n(&runnable_tasks, RELAXED);
    char buf[128];
    int n = 0, fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) { /* "0.52 0.58 0.59 2/345 12345": 2 runnable */
        ssize_t got = read(fd, buf, sizeof buf - 1);
        close(fd);
        buf[got > 0 ? got : 0] = 0;
        char *p = buf;
        for (int field = 0; field < 3 && p; field++) p = strchr(p + 1, ' ');
        if (p) n = (int)strtol(p + 1, NULL, 10);
    }
    __atomic_store_n(&runnable_tasks, n, RELAXED);
    __atomic_store_n(&runnable_read_ns, now, RELAXED);
    return n;
}

static int64_t choose_spin(int64_t now) {
    int mode = __atomic_load_n(&wait_mode, RELAXED);
    int64_t window = __atomic_load_n(&spin_window_ns, RELAXED);
    if (mode == TFEM_WAIT_SLEEP) return 0;
    if (mode == TFEM_WAIT_SPIN) return window;
    static long cpus;
    if (!cpus) cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus < 2 || __atomic_load_n(&recent_wait_ns, RELAXED) > 2 * window) return 0;
    return runnable_now(now) - 1 <= cpus ? window : 0; /* the others, not counting this thread */
}

/* Wait for *seq to move past `seen`, spinning first by load. */
static int wait_seq(uint32_t *seq, uint32_t *waiters, uint32_t seen, int64_t deadline) {
    int64_t start = mono_ns();
    int64_t left = deadline < 0 ? -1 : deadline - start;
    if (deadline >= 0 && left <= 0) return ETIMEDOUT;
    int spun = 0;
    int rc = tfem_wait_published(seq, waiters, seen, left, choose_spin(start), &spun);
    int64_t took = mono_ns() - start, avg = __atomic_load_n(&recent_wait_ns, RELAXED);
    __atomic_store_n(&recent_wait_ns, avg + (took - avg) / 8, RELAXED);
    __atomic_fetch_add(spun ? &waits_spun : &waits_slept, 1, RELAXED);
    return rc;
}

/* The header's statistics: bumped where a wait or a refusal happens anyway. */
#define COUNT(h, counter) __atomic_fetch_add(&(h)->counter, 1, RELAXED)

static int64_t deadline_of(int64_t timeout_ns) { return timeout_ns < 0 ? -1 : mono_ns() + timeout_ns; }

/* The longest a non-waiting open waits for a file the broker holds: a move
 * of a large file to the spill store, in steps beside others' jobs. */
#define BROKER_HOLD_NS 5000000000LL

int tfem_f_wait_space(struct tfem_header *h, uint32_t seen, int64_t timeout_ns) {
    return wait_seq(&h->space_seq, &h->space_waiters, seen, deadline_of(timeout_ns));
}

/* ---- opening ---- */

int tfem_f_reload(struct tfem_file *f) {
    struct tfem_slot *slot = f->slot;
    f->spilled = (slot->flags & TFEM_SLOT_SPILLED) != 0;
    f->memory_end = f->spilled ? f->g->buf_size : tfem_t_capacity(f->h, f->index);
    f->inline_size = slot->flags & TFEM_SLOT_ARENA ? 0 : f->g->buf_size;
    return 0;
}

static void start_file(struct tfem_header *h, const struct tfem_claim *claim, uint32_t pid, uint32_t hash,
                       int writing, struct tfem_file *f) {
    memset(f, 0, sizeof *f);
    f->h = h;
    f->g = tfem_geometry(h);
    f->index = claim->slot;
    f->slot = tfem_slot_at(f->g, claim->slot);
    f->generation = claim->generation;
    f->file_id = claim->file_id;
    f->pid = pid;
    f->hash = hash;
    f->writing = writing;
    f->hold = claim->hold;
    f->held = 1;
    f->size = writing ? 0 : f->slot->size;
    f->max_size = h->max_file_size; /* here, not in the header's shared line, for the write path */
    tfem_f_reload(f);
    f->crc = 0;
    f->crc_end = 0;
    f->checked = !writing && ((f->size == 0 && f->slot->checksum == 0) || f->slot->flags & TFEM_SLOT_UNCHECKED);
}

int tfem_f_create(struct tfem_header *h, const char *name, uint32_t len, uint32_t pid,
                  int64_t room_timeout_ns, struct tfem_file *f) {
    uint32_t hash = tfem_name_hash(name, len);
    int64_t deadline = deadline_of(room_timeout_ns);
    struct tfem_claim claim;
    int waited = 0;
    for (;;) {
        if (__atomic_load_n(&h->moved, SC)) return EIDRM;
        uint32_t seen = __atomic_load_n(&h->space_seq, SC);
        int rc = tfem_t_create(h, name, len, hash, pid, real_ns(), &claim);
        if (rc == 0) {
            start_file(h, &claim, pid, hash, 1, f);
            return 0;
        }
        if (rc != ENOSPC || room_timeout_ns == 0) {
            if (rc == ENOSPC) COUNT(h, refused_full);
            return rc;
        }
        if (!waited++) COUNT(h, room_waits);
        rc = wait_seq(&h->space_seq, &h->space_waiters, seen, deadline);
        if (rc == ETIMEDOUT) {
            COUNT(h, timeouts);
            COUNT(h, refused_full);
            return ENOSPC;
        }
        if (rc == EINTR) return rc;
    }
}

int tfem_f_open(struct tfem_header *h, const char *name, uint32_t len, uint32_t pid, int mode,
                int wait, int64_t timeout_ns, struct tfem_file *f, int32_t *state_found) {
    uint32_t hash = tfem_name_hash(name, len), bucket = hash % TFEM_WAKE_BUCKETS;
    int64_t deadline = 0, moment = 0; /* set at the first wait: a hit reads no clock */
    struct tfem_claim claim;
    int waited = 0;
    for (;;) {
        if (__atomic_load_n(&h->moved, SC)) return EIDRM;
        uint32_t seen = __atomic_load_n(&h->wake_seq[bucket], SC);
        int rc = tfem_t_take(h, name, len, hash, pid, mode == TFEM_OPEN_AUTO, real_ns(), &claim);
        *state_found = claim.state;
        if (rc == 0) {
            start_file(h, &claim, pid, hash, claim.for_write, f);
            return 0;
        }
        if (rc == EINPROGRESS && !wait) {
            /* Published, and held by the broker a moment (a move to or from
             * the spill store): waited for even by an open that does not
             * wait, since to its caller the file is there; a timeout bounds
             * the moment too (0: not at all, what tfem.aio asks). */
            if (!moment)
                moment = deadline_of(timeout_ns >= 0 && timeout_ns < BROKER_HOLD_NS ? timeout_ns : BROKER_HOLD_NS);
            if (!waited++) COUNT(h, read_waits);
            rc = wait_seq(&h->wake_seq[bucket], &h->wake_waiters[bucket], seen, moment);
            if (rc == ETIMEDOUT) {
                COUNT(h, timeouts);
                return EAGAIN;
            }
            if (rc == EINTR) return rc;
            continue;
        }
        if (rc == EINPROGRESS) rc = EAGAIN;
        if ((rc != ENOENT && rc != EAGAIN) || !wait) return rc;
        if (!waited++) {
            COUNT(h, read_waits);
            deadline = deadline_of(timeout_ns);
        }
        rc = wait_seq(&h->wake_seq[bucket], &h->wake_waiters[bucket], seen, deadline);
        if (rc == ETIMEDOUT) COUNT(h, timeouts);
        if (rc == ETIMEDOUT || rc == EINTR) return rc;
    }
}

/* ---- where the bytes are ---- */

/* The address of file offset `pos` and how many bytes follow it there,
 * within the file's memory; NULL past it. */
static char *locate(struct tfem_file *f, uint64_t pos, uint64_t *run) {
    uint64_t start = f->inline_size;
    if (pos < start) {
        *run = start - pos;
        return tfem_inline_data(f->slot) + pos;
    }
    if (!f->spilled) {
        const struct tfem_geometry *g = f->g;
        struct tfem_slot *slot = f->slot;
        for (uint32_t i = 0; i < slot->extent_count && i < TFEM_MAX_EXTENTS; i++) {
            uint64_t length = (uint64_t)slot->extents[i].count * g->block_size;
            if (pos < start + length) {
                *run = start + length - pos;
                return tfem_block_data(g, slot->extents[i].start) + (pos - start);
            }
            start += length;
        }
    }
    *run = 0;
    return NULL;
}

enum direction { INTO_FILE, OUT_OF_FILE, ZERO_FILL };

/* Move n bytes at file offset pos (all within memory), continuing *crc
 * over them when crc is not NULL. */
static void transfer(struct tfem_file *f, enum direction dir, char *buf, uint64_t n, uint64_t pos,
                     uint32_t *crc) {
    while (n) {
        uint64_t run;
        char *at = locate(f, pos, &run);
        uint64_t k = run < n ? run : n;
        if (dir == OUT_OF_FILE) {
            if (crc) tfem_copy_crc(buf, at, k, crc);
            else memcpy(buf, at, k);
        } else {
            if (k >= POPULATE_FROM) { /* one call instead of a page fault per 4 KiB */
                uintptr_t page = (uintptr_t)at & ~(uintptr_t)4095;
                madvise((void *)page, k + ((uintptr_t)at - page), MADV_POPULATE_WRITE);
            }
            if (dir == ZERO_FILL) {
                memset(at, 0, k);
                if (crc) *crc = tfem_crc32c(*crc, at, k);
            } else if (crc) {
                tfem_copy_crc(at, buf, k, crc);
            } else {
                memcpy(at, buf, k);
            }
            if (buf) buf += k;
        }
        if (dir == OUT_OF_FILE) buf += k;
        pos += k;
        n -= k;
    }
}

/* crc32c of the file's bytes in memory, [0, min(size, memory_end)). */
uint32_t tfem_f_memory_crc(struct tfem_file *f) {
    uint32_t crc = 0;
    uint64_t pos = 0, end = f->size < f->memory_end ? f->size : f->memory_end;
    while (pos < end) {
        uint64_t run;
        char *at = locate(f, pos, &run);
        uint64_t k = run < end - pos ? run : end - pos;
        crc = tfem_crc32c(crc, at, k);
        pos += k;
    }
    return crc;
}

/* ---- zero copy ---- */

/* Make a new, empty file `size` bytes of zeros in one contiguous extent,
 * for a view over all of it (tfem_f_view). `checked` 0: no checksum is
 * taken or compared (TFEM_SLOT_UNCHECKED). ENOSPC: no run of free blocks
 * is that long; the caller asks the broker to make room, and tries again. */
int tfem_f_reserve(struct tfem_file *f, uint64_t size, int checked) {
    if (!f->held || !f->writing) return EBADF;
    if (size > f->max_size) {
        COUNT(f->h, refused_large);
        return EFBIG;
    }
    int rc = tfem_t_reserve(f->h, f->index, f->generation, f->pid, size, checked ? 0 : TFEM_SLOT_UNCHECKED);
    if (rc) return rc;
    tfem_f_reload(f);
    transfer(f, ZERO_FILL, NULL, size, 0, NULL); /* no other file's bytes show through */
    f->size = f->slot->size = size;
    f->crc_end = checked ? CRC_NONE : size; /* written through views: checksummed at close */
    f->crc = 0;
    return 0;
}

/* ---- writing ---- */

static void set_size(struct tfem_file *f, uint64_t size) {
    f->size = size;
    f->slot->size = size; /* so that stat of a file being written is current */
}

int64_t tfem_f_pwrite(struct tfem_file *f, const void *buf, uint64_t n, uint64_t pos) {
    f->need = TFEM_NEED_NOTHING;
    if (!f->held || !f->writing) return -EBADF;
    if (n == 0) return 0;
    if (pos > (uint64_t)INT64_MAX || n > (uint64_t)INT64_MAX - pos) return -EINVAL;
    uint64_t end = pos + n;
    if (end > f->max_size) { /* refused whole, at once: a gap past the limit costs nothing */
        COUNT(f->h, refused_large);
        return -EFBIG;
    }
    if (end > f->memory_end && !f->spilled) { /* room first: a write that fails leaves the file as it was */
        int rc = tfem_t_grow(f->h, f->index, f->generation, f->pid, end);
        tfem_f_reload(f);
        if (rc == ENOSPC || rc == E2BIG) {
            f->need = TFEM_NEED_ROOM;
            f->want = end;
            return 0;
        }
        if (rc) return -rc;
    }
    if (pos > f->size) { /* a gap reads back as zeros */
        uint64_t gap_end = pos < f->memory_end ? pos : f->memory_end;
        if (gap_end > f->size) {
            int running = f->crc_end == f->size;
            transfer(f, ZERO_FILL, NULL, gap_end - f->size, f->size, running ? &f->crc : NULL);
            if (running) f->crc_end = gap_end;
            set_size(f, gap_end);
        }
        if (gap_end < pos) {
            f->need = f->spilled ? TFEM_NEED_SPILL : TFEM_NEED_ROOM;
            f->want = end;
            return 0;
        }
    }
    uint64_t fits = pos >= f->memory_end ? 0 : (end <= f->memory_end ? n : f->memory_end - pos);
    if (fits) {
        int running = f->crc_end == pos && pos == f->size;
        if (!running && pos < f->crc_end && f->crc_end != CRC_NONE) f->crc_end = CRC_NONE; /* overwrite */
        transfer(f, INTO_FILE, (char *)buf, fits, pos, running ? &f->crc : NULL);
        if (running) f->crc_end = pos + fits;
        if (pos + fits > f->size) set_size(f, pos + fits);
    }
    if (fits < n) {
        f->need = f->spilled ? TFEM_NEED_SPILL : TFEM_NEED_ROOM;
        f->want = end;
    }
    return (int64_t)fits;
}

int64_t tfem_f_write(struct tfem_file *f, const void *buf, uint64_t n) {
    int64_t done = tfem_f_pwrite(f, buf, n, f->pos);
    if (done > 0) f->pos += (uint64_t)done;
    return done;
}

/* ---- reading ---- */

static int compare(struct tfem_file *f, uint32_t crc) {
    if (crc == f->slot->checksum) {
        f->checked = 1;
        return 0;
    }
    f->damaged = 1;
    COUNT(f->h, checksum_errors);
    return EBADMSG;
}

/* Check the whole file in one pass (a reader that does not read in order). */
int tfem_f_verify(struct tfem_file *f) {
    if (f->checked) return 0;
    if (f->damaged) return EBADMSG;
    if (f->spilled) return EXDEV; /* the caller checks it with the spill store: tfem_f_spilled_verdict */
    return compare(f, tfem_f_memory_crc(f));
}

int tfem_f_spilled_verdict(struct tfem_file *f, uint32_t crc) {
    if (f->checked) return 0;
    if (f->damaged) return EBADMSG;
    return compare(f, crc);
}

/* The caller copied n spilled bytes at pos into buf, from the spill store:
 * move on, and continue the checksum if they came in order. In order
 * before the file is checked, or the file checked first: the caller's. */
int tfem_f_spilled_read(struct tfem_file *f, const void *buf, uint64_t n) {
    if (!f->checked && f->pos == f->crc_end) {
        f->crc = tfem_crc32c(f->crc, buf, n);
        f->crc_end += n;
        f->pos += n;
        return f->crc_end == f->size ? compare(f, f->crc) : 0;
    }
    f->pos += n;
    return 0;
}

int64_t tfem_f_pread(struct tfem_file *f, void *buf, uint64_t n, uint64_t pos) {
    f->need = TFEM_NEED_NOTHING;
    if (!f->held || f->writing) return -EBADF;
    if (f->damaged) return -EBADMSG;
    int in_order = !f->checked && pos == f->crc_end;
    if (pos >= f->size || n == 0) { /* the end, or nothing: reported only for a checked file */
        if (pos >= f->size && !f->checked) {
            int rc = tfem_f_verify(f);
            if (rc) return -rc;
        }
        return 0;
    }
    if (!f->checked && !in_order) {
        int rc = tfem_f_verify(f);
        if (rc) return -rc;
    }
    if (n > f->size - pos) n = f->size - pos;
    uint64_t fits = pos >= f->memory_end ? 0 : (pos + n <= f->memory_end ? n : f->memory_end - pos);
    transfer(f, OUT_OF_FILE, buf, fits, pos, in_order ? &f->crc : NULL);
    if (in_order) {
        f->crc_end += fits;
        if (f->crc_end == f->size && compare(f, f->crc)) return -EBADMSG;
    }
    if (fits < n) f->need = TFEM_NEED_SPILL;
    return (int64_t)fits;
}

int64_t tfem_f_read(struct tfem_file *f, void *buf, uint64_t n) {
    int64_t done = tfem_f_pread(f, buf, n, f->pos);
    if (done > 0) f->pos += (uint64_t)done;
    return done;
}

/* The bytes at pos, in place: their address and how many follow there
 * (0 past the memory part). The file is checked first: a view is read
 * without us. */
int64_t tfem_f_view(struct tfem_file *f, uint64_t pos, char **ptr) {
    if (!f->held) return -EBADF;
    if (!f->writing) {
        int rc = tfem_f_verify(f);
        if (rc) return -rc;
    }
    uint64_t limit = f->writing ? f->memory_end : (f->size < f->memory_end ? f->size : f->memory_end);
    if (pos >= limit) {
        *ptr = NULL;
        return 0;
    }
    uint64_t run;
    *ptr = locate(f, pos, &run);
    return (int64_t)(run < limit - pos ? run : limit - pos);
}

int64_t tfem_f_seek(struct tfem_file *f, int64_t offset, int whence) {
    if (!f->held) return -EBADF;
    int64_t base;
    if (whence == SEEK_SET) base = 0;
    else if (whence == SEEK_CUR) base = (int64_t)f->pos;
    else if (whence == SEEK_END) base = (int64_t)f->size;
    else return -EINVAL;
    if ((offset > 0 && base > INT64_MAX - offset) || base + offset < 0) return -EINVAL;
    f->pos = (uint64_t)(base + offset);
    return (int64_t)f->pos;
}

int tfem_f_fstat(struct tfem_file *f, struct tfem_fileinfo *out) {
    if (!f->held) return EBADF;
    tfem_t_info(f->h, f->index, out);
    if (f->writing) out->size = f->size;
    return 0;
}

/* ---- lifetime and closing ---- */

int tfem_f_set_lifetime(struct tfem_file *f, uint32_t readers, uint64_t expires_ns) {
    if (!f->held || !f->writing) return EBADF;
    struct tfem_slot *slot = f->slot; /* the writer's own until it publishes */
    struct tfem_life *life = tfem_life_at(f->g, f->index);
    slot->readers = life->readers_left = readers;
    life->expires_ns = expires_ns;
    return 0;
}

int tfem_f_keep(struct tfem_header *h, uint32_t slot, uint32_t generation, uint32_t pid, struct tfem_file *f) {
    struct tfem_claim claim;
    int rc = tfem_t_keep_shared(h, slot, generation, pid, &claim);
    if (rc == 0) start_file(h, &claim, pid, tfem_slot_at(tfem_geometry(h), slot)->name_hash, 0, f);
    return rc;
}

int tfem_f_add_reads(struct tfem_file *f, int64_t delta, uint32_t *moved) {
    *moved = 0;
    if (!f->held || !f->hold) return EBADF;
    return tfem_t_add_reads(f->h, f->index, f->generation, f->pid, f->hold, delta, moved);
}

int tfem_f_publish(struct tfem_file *f, uint32_t checksum) {
    struct tfem_claim out;
    f->held = 0;
    return tfem_t_publish(f->h, f->index, f->generation, f->pid, f->size, checksum, (uint64_t)mono_ns(), &out);
}

/* Producer: publish (EXDEV: a spilled file whose checksum needs the spill
 * store; the caller takes it and calls tfem_f_publish). Consumer: free the
 * file, or give it back if it was damaged. A freed spilled file's records
 * are the broker's to delete: it finds them owned by no slot. */
int tfem_f_close(struct tfem_file *f) {
    if (!f->held) return EBADF;
    if (f->writing) {
        if (f->slot->flags & TFEM_SLOT_UNCHECKED) return tfem_f_publish(f, 0);
        if (f->crc_end == f->size) return tfem_f_publish(f, f->crc);
        if (f->spilled) return EXDEV;
        return tfem_f_publish(f, tfem_f_memory_crc(f));
    }
    if (f->damaged) return tfem_f_abort(f);
    struct tfem_claim out;
    f->held = 0;
    if (f->hold) return tfem_t_let_go_shared(f->h, f->index, f->generation, f->pid, f->hold, 0, &out);
    return tfem_t_consume(f->h, f->index, f->generation, f->pid, &out);
}

/* Producer: drop the file. Consumer: give it back unread (READ -> WAIT;
 * a shared read is not counted). */
int tfem_f_abort(struct tfem_file *f) {
    if (!f->held) return EBADF;
    struct tfem_claim out;
    f->held = 0;
    if (f->writing) return tfem_t_abort(f->h, f->index, f->generation, f->pid, &out);
    if (f->hold) return tfem_t_let_go_shared(f->h, f->index, f->generation, f->pid, f->hold, 1, &out);
    return tfem_t_release(f->h, f->index, f->generation, f->pid, &out);
}
