/*
 * tfem_atomics.h: atomics, futexes, the table lock and the block bitmap on
 * a tfem segment (see tfem_atomics.c). Python binds these through cffi.
 */
#ifndef TFEM_ATOMICS_H
#define TFEM_ATOMICS_H

#include <stdint.h>

uint64_t tfem_load64(uint64_t *p);
uint32_t tfem_load32(uint32_t *p);
void tfem_store64(uint64_t *p, uint64_t v);
int tfem_cas64(uint64_t *p, uint64_t expected, uint64_t desired);
int tfem_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns);
int tfem_futex_wake(uint32_t *addr, int count);
void tfem_publish(uint32_t *seq, uint32_t *waiters);
int tfem_wait_published(uint32_t *seq, uint32_t *waiters, uint32_t seen, int64_t timeout_ns,
                        int64_t spin_ns, int *spun);
int tfem_wait_any(uint32_t **words, const uint32_t *expected, uint32_t n, uint32_t *control, uint32_t control_seen);
uint32_t tfem_add32(uint32_t *p, int32_t delta);
int tfem_pid_alive(int32_t pid);
int tfem_die_with_parent(int sig, int32_t parent);
int tfem_lock(uint32_t *lock, uint32_t *waiters, uint32_t pid, int64_t timeout_ns);
void tfem_unlock(uint32_t *lock, uint32_t *waiters);
void tfem_touch(char *base, uint64_t length, uint64_t page);
uint32_t tfem_blocks_claim(uint64_t *bm, uint32_t nblocks, uint32_t want, uint32_t *start);
void tfem_blocks_release(uint64_t *bm, uint32_t start, uint32_t count);
void tfem_blocks_mark(uint64_t *bm, uint32_t start, uint32_t count);
uint32_t tfem_blocks_in_use(uint64_t *bm, uint32_t nblocks);
uint32_t tfem_blocks_longest_run(uint64_t *bm, uint32_t nblocks);

#endif
