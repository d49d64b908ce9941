/*
 * tfem_embed.h: what libtfem.so asks of the embedded Python runtime, for
 * the calls that need the broker's protocol (c_api.py implements them).
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
int64_t _tfem_py_spill_read(uint32_t slot, uint32_t generation, uint64_t offset, char *buf, uint64_t count);
int64_t _tfem_py_checksum(uint32_t slot, uint32_t generation, uint32_t crc);
int _tfem_py_discard(uint64_t file_id);

#endif
