/*
 * tfem_embed.h: what libtfem.so asks of the embedded Python runtime, for
 * the calls that need the broker or the spill store (c_api.py implements
 * them). Spill offsets count from the end of the inline buffer.
 * A C program whose files fit in memory never calls these, so it never
 * starts an interpreter. Each returns -1 with errno set on failure.
 */
#ifndef TFEM_EMBED_H
#define TFEM_EMBED_H

#include <stdint.h>

/* Start the interpreter once; 0 if it runs, else -1 with errno ENOSYS. */
int tfem_python_ready(void);

int _tfem_py_ping(void);
int _tfem_py_segment(char *out, int size);
int _tfem_py_alloc(uint32_t slot, uint32_t generation, uint64_t capacity);
int64_t _tfem_py_spill_write(uint32_t slot, uint32_t generation, uint64_t offset, const char *buf, uint64_t count);
/* Open (1) or let go of (0) the spill store, for one spilled file; reads
 * and checksums come between. */
int _tfem_py_spill_hold(int hold);
int64_t _tfem_py_spill_read(uint64_t file_id, uint64_t offset, char *buf, uint64_t count);
int64_t _tfem_py_checksum(uint64_t file_id, uint64_t length, uint32_t crc);
/* Ask the broker to pull `name` from another node (WANT). Waiting (1):
 * returns at once, with how many nanoseconds to sleep on the futex before
 * asking again (which renews the want). Not waiting (0): returns 0 once the
 * copy is on this node (ENOENT: on no node). */
int64_t _tfem_py_want(const char *name, int wait);
/* The caller gave up waiting: the broker may stop pulling `name` for it. */
int _tfem_py_unwant(const char *name);

#endif
