/*
 * tfem_crc32c.h: CRC-32C (Castagnoli), the checksum every tfem file carries.
 *
 * The same function as the crc32c Python package: tfem_crc32c(0, data, n)
 * of "123456789" is 0xE3069283, and a crc can be continued by passing the
 * previous value.
 */
#ifndef TFEM_CRC32C_H
#define TFEM_CRC32C_H

#include <stddef.h>
#include <stdint.h>

uint32_t tfem_crc32c(uint32_t crc, const void *data, size_t length);

/* Copy `length` bytes and continue `*crc` over them while they are in
 * cache: one pass over memory instead of two. */
void tfem_copy_crc(void *dst, const void *src, size_t length, uint32_t *crc);

/* Continue `crc` over `length` zero bytes without making them: O(log
 * length), for the never-written gaps of spilled files. */
uint32_t tfem_crc32c_zeros(uint32_t crc, uint64_t length);

#endif
