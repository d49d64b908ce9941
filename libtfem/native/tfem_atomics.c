/*
 * tfem_atomics.c: the few operations on the shared segment that Python
 * cannot do itself: sequentially consistent atomics on state words, shared
 * futex waits and wakes, the table lock, and the arena's block bitmap.
 *
 * Why sequentially consistent everywhere: a publisher stores a state and
 * then reads the waiter count; a waiter bumps the count and then reads the
 * state. With anything weaker the two reads can both see the old values and
 * a wake-up is lost (measured on x86 too). These calls cost ~100 ns; the
 * ordering is not worth saving.
 *
 * The futexes are the shared kind (no FUTEX_PRIVATE_FLAG): each process maps
 * the segment itself, so the kernel keys the wait on the file page.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "tfem_segment.h"
#include "tfem_atomics.h"

#ifndef FUTEX_WAITV_MAX /* kernel headers older than 5.16: the call may still be there */
#define FUTEX_WAITV_MAX 128
#define FUTEX_32 2
struct futex_waitv {
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t __reserved;
};
#endif
#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif

#define SC __ATOMIC_SEQ_CST

uint64_t tfem_load64(uint64_t *p) { return __atomic_load_n(p, SC); }
uint32_t tfem_load32(uint32_t *p) { return __atomic_load_n(p, SC); }
void tfem_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, SC); }

int tfem_cas64(uint64_t *p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, SC, SC);
}

static long futex(uint32_t *addr, int op, uint32_t val, const struct timespec *ts) {
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

/* Sleep while *addr == expected, at most timeout_ns (< 0: no limit).
 * Returns 0 when woken or the value changed, ETIMEDOUT, or EINTR. */
int tfem_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tsp = &ts;
    }
    if (futex(addr, FUTEX_WAIT, expected, tsp) == 0) return 0;
    if (errno == EAGAIN) return 0;
    return errno;
}

int tfem_futex_wake(uint32_t *addr, int count) {
    return (int)futex(addr, FUTEX_WAKE, (uint32_t)count, NULL);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A transition into WAIT: bump the bucket's sequence, wake its sleepers. */
void tfem_publish(uint32_t *seq, uint32_t *waiters) {
    __atomic_fetch_add(seq, 1, SC);
    if (__atomic_load_n(waiters, SC) != 0) futex(seq, FUTEX_WAKE, INT_MAX, NULL);
}

/* Sleep until the bucket's sequence moves past `seen`. The caller read
 * `seen` before it looked for its name, so a publish in between is not
 * lost: the sequence has moved and the wait returns at once.
 *
 * First it spins for up to spin_ns, yielding the CPU between looks: a
 * wake-up through the kernel costs 25-50 us on this kind of machine, and a
 * producer that is about to publish is often quicker than that. The spin
 * yields so that two processes sharing one CPU do not starve each other
 * (measured: 116 us without the yield, 10 us with it). spin_ns 0: sleep at
 * once, the asynchronous way, for loaded machines. *spun says whether
 * the spin saw the change. EINTR: a signal came; the caller looks again
 * (and Python runs its handlers). */
int tfem_wait_published(uint32_t *seq, uint32_t *waiters, uint32_t seen, int64_t timeout_ns,
                        int64_t spin_ns, int *spun) {
    *spun = 0;
    if (spin_ns > 0) {
        int64_t until = now_ns() + spin_ns;
        do {
            if (__atomic_load_n(seq, SC) != seen) return *spun = 1, 0;
            sched_yield();
        } while (now_ns() < until);
    }
    __atomic_fetch_add(waiters, 1, SC);
    int rc = 0;
    if (__atomic_load_n(seq, SC) == seen) rc = tfem_futex_wait(seq, seen, timeout_ns);
    __atomic_fetch_sub(waiters, 1, SC);
    return rc;
}

/* Sleep until any of n words differs from its expected value, or the
 * process-private *control from control_seen: one thread sleeping for many
 * names at once (tfem.aio's watcher). Its caller has counted itself in each
 * word's waiters, as tfem_wait_published does, so publishers wake it. One
 * futex_waitv (Linux 5.16); without it, or with more words than one call
 * takes, it sleeps a millisecond on the control word and the caller looks
 * again. Returns 0 when the caller should look again (a word moved, may
 * have, or the millisecond passed), else futex_waitv's errno (EINTR). */
int tfem_wait_any(uint32_t **words, const uint32_t *expected, uint32_t n, uint32_t *control, uint32_t control_seen) {
    static int no_waitv;
    if (!__atomic_load_n(&no_waitv, __ATOMIC_RELAXED) && n < FUTEX_WAITV_MAX) {
        struct futex_waitv v[FUTEX_WAITV_MAX];
        memset(v, 0, sizeof v);
        for (uint32_t i = 0; i < n; i++) {
            v[i].uaddr = (uintptr_t)words[i];
            v[i].val = expected[i];
            v[i].flags = FUTEX_32; /* shared: the words live in the segment */
        }
        v[n].uaddr = (uintptr_t)control;
        v[n].val = control_seen;
        v[n].flags = FUTEX_32; /* shared too: tfem_futex_wake wakes it */
        if (syscall(SYS_futex_waitv, v, n + 1, 0, NULL, CLOCK_MONOTONIC) >= 0) return 0;
        if (errno == EAGAIN) return 0; /* a word had moved already */
        if (errno != ENOSYS) return errno;
        __atomic_store_n(&no_waitv, 1, __ATOMIC_RELAXED);
    }
    int rc = tfem_futex_wait(control, control_seen, 1000000);
    return rc == ETIMEDOUT ? 0 : rc;
}

uint32_t tfem_add32(uint32_t *p, int32_t delta) { return __atomic_add_fetch(p, (uint32_t)delta, SC); }

/* Whether a process runs: it exists and is not a zombie waiting to be
 * reaped (a zombie holds nothing any more). */
int tfem_pid_alive(int32_t pid) {
    if (pid <= 0) return 0;
    if (kill(pid, 0) != 0 && errno != EPERM) return 0;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 1; /* no /proc: trust kill() */
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 1;
    buf[n] = 0;
    const char *paren = strrchr(buf, ')'); /* the name may hold spaces and parens */
    return !(paren && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X'));
}

/* Ask the kernel to send `sig` when the parent exits (servers started by
 * `tfem up` must not outlive it). Returns 0, or -1 if the parent is
 * already not `parent`. */
int tfem_die_with_parent(int sig, int32_t parent) {
    if (prctl(PR_SET_PDEATHSIG, sig) != 0) return -1;
    return getppid() == parent ? 0 : -1;
}

/* Take the table lock for `pid`. Spins briefly (yielding, so two processes
 * on one CPU do not starve each other), then sleeps on the lock word. A
 * lock whose holder has died is taken over: every change made under the
 * lock is a single store, so a dead holder leaves the table consistent.
 * Not re-entrant: threads of one process take turns before calling this.
 * Returns 0, or ETIMEDOUT after timeout_ns (< 0: no limit). */
int tfem_lock(uint32_t *lock, uint32_t *waiters, uint32_t pid, int64_t timeout_ns) {
    int64_t deadline = timeout_ns >= 0 ? now_ns() + timeout_ns : INT64_MAX;
    for (int spin = 0;; spin++) {
        uint32_t holder = 0;
        if (__atomic_compare_exchange_n(lock, &holder, pid, 0, SC, SC)) return 0;
        if (spin < 64) {
            sched_yield();
            continue;
        }
        if (!tfem_pid_alive((int32_t)holder)) {
            if (__atomic_compare_exchange_n(lock, &holder, pid, 0, SC, SC)) return 0;
            continue;
        }
        int64_t left = deadline - now_ns();
        if (left <= 0) return ETIMEDOUT;
        /* Sleep at most 10 ms so a holder that dies is noticed. */
        __atomic_fetch_add(waiters, 1, SC);
        tfem_futex_wait(lock, holder, left < 10000000 ? left : 10000000);
        __atomic_fetch_sub(waiters, 1, SC);
    }
}

void tfem_unlock(uint32_t *lock, uint32_t *waiters) {
    __atomic_store_n(lock, 0, SC);
    if (__atomic_load_n(waiters, SC) != 0) futex(lock, FUTEX_WAKE, 1, NULL);
}

/* Write one byte per page so the pages exist now, not at the first handoff. */
void tfem_touch(char *base, uint64_t length, uint64_t page) {
    for (uint64_t off = 0; off < length; off += page) ((volatile char *)base)[off] = 0;
}

/* ---- the arena's block bitmap: a set bit is a block in use ---- */

static int bit_is_set(uint64_t *bm, uint32_t i) {
    return (__atomic_load_n(&bm[i / 64], __ATOMIC_RELAXED) >> (i % 64)) & 1;
}

static void set_range(uint64_t *bm, uint32_t start, uint32_t count, int on) {
    for (uint32_t i = start; i < start + count;) {
        uint32_t word = i / 64, bit = i % 64;
        uint32_t n = 64 - bit < start + count - i ? 64 - bit : start + count - i;
        uint64_t mask = (n == 64 ? ~0ULL : ((1ULL << n) - 1)) << bit;
        if (on)
            __atomic_fetch_or(&bm[word], mask, SC);
        else
            __atomic_fetch_and(&bm[word], ~mask, SC);
        i += n;
    }
}

/* Set the bits of [start, start+count) if all are clear, word by word
 * with compare-and-swap; on a conflict, undo and return 0. */
static int try_claim(uint64_t *bm, uint32_t start, uint32_t count) {
    for (uint32_t i = start; i < start + count;) {
        uint32_t word = i / 64, bit = i % 64;
        uint32_t n = 64 - bit < start + count - i ? 64 - bit : start + count - i;
        uint64_t mask = (n == 64 ? ~0ULL : ((1ULL << n) - 1)) << bit;
        uint64_t old = __atomic_load_n(&bm[word], SC);
        do {
            if (old & mask) {
                if (i > start) set_range(bm, start, i - start, 0);
                return 0;
            }
        } while (!__atomic_compare_exchange_n(&bm[word], &old, old | mask, 0, SC, SC));
        i += n;
    }
    return 1;
}

/* Claim `want` contiguous free blocks, first fit. When no run is that long,
 * claim the longest run there is. Returns the number claimed (0: arena
 * full) and the first block in *start. Clients and the broker claim at
 * once: a run found free is taken by compare-and-swap, and looked for
 * again if another process took part of it first. */
uint32_t tfem_blocks_claim(uint64_t *bm, uint32_t nblocks, uint32_t want, uint32_t *start) {
    for (int attempt = 0; attempt < 64; attempt++) {
        uint32_t best_start = 0, best_len = 0, run_start = 0, run_len = 0;
        for (uint32_t i = 0; i < nblocks; i++) {
            if (i % 64 == 0 && run_len == 0 && i + 64 <= nblocks &&
                __atomic_load_n(&bm[i / 64], __ATOMIC_RELAXED) == ~0ULL) {
                i += 63;
                continue;
            }
            if (bit_is_set(bm, i)) {
                run_len = 0;
                continue;
            }
            if (run_len == 0) run_start = i;
            run_len++;
            if (run_len > best_len) {
                best_len = run_len;
                best_start = run_start;
            }
            if (run_len == want) break;
        }
        if (best_len == 0) return 0;
        if (try_claim(bm, best_start, best_len)) {
            *start = best_start;
            return best_len;
        }
    }
    return 0;
}

void tfem_blocks_release(uint64_t *bm, uint32_t start, uint32_t count) {
    set_range(bm, start, count, 0);
}

/* Mark blocks in use without searching (rebuilding the bitmap). */
void tfem_blocks_mark(uint64_t *bm, uint32_t start, uint32_t count) {
    set_range(bm, start, count, 1);
}

/* The longest run of free blocks (what a whole file can get at once). */
uint32_t tfem_blocks_longest_run(uint64_t *bm, uint32_t nblocks) {
    uint32_t best = 0, run = 0;
    for (uint32_t i = 0; i < nblocks; i++) {
        if (bit_is_set(bm, i)) {
            run = 0;
        } else if (++run > best) {
            best = run;
        }
    }
    return best;
}

uint32_t tfem_blocks_in_use(uint64_t *bm, uint32_t nblocks) {
    uint32_t used = 0;
    for (uint32_t w = 0; w < (nblocks + 63) / 64; w++)
        used += (uint32_t)__builtin_popcountll(__atomic_load_n(&bm[w], __ATOMIC_RELAXED));
    return used;
}
