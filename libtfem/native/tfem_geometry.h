/*
 * tfem_geometry.h: where things are in a mapped segment, as this process
 * checked it when it mapped it.
 *
 * The header's offsets and sizes live in shared memory, where any process
 * that maps the segment could damage them. Every address the core computes
 * comes from this process's own copy, checked once when the mapping was
 * made (tfem_geometry_attach): a header damaged after that sends nobody to
 * a wild address. The copies are kept per mapping, looked up by the
 * header's address (one entry per segment mapped, so a short list).
 */
#ifndef TFEM_GEOMETRY_H
#define TFEM_GEOMETRY_H

#include <stdint.h>

#include "tfem_segment.h"

struct tfem_geometry {
    struct tfem_header *h; /* the mapping described; NULL once detached */
    struct tfem_geometry *next;
    char *arena; /* the arena's address in this mapping */
    uint64_t size;
    uint64_t slots_offset;
    uint64_t index_offset;
    uint64_t free_stack_offset;
    uint64_t holds_offset;
    uint64_t lives_offset;
    uint64_t bitmap_offset;
    uint64_t arena_offset;
    uint32_t slot_count;
    uint32_t slot_size;
    uint32_t buf_size;
    uint32_t index_size;
    uint32_t block_size;
    uint32_t block_count;
    uint32_t hold_count;
};

/* Check the header of a mapping of `size` bytes and keep a copy of its
 * geometry: NULL, or why the mapping cannot be used. */
const char *tfem_geometry_attach(struct tfem_header *h, uint64_t size);
/* Forget the copy, before the mapping goes. */
void tfem_geometry_detach(struct tfem_header *h);
/* The copy for an attached mapping (a call with any other is a bug: abort). */
const struct tfem_geometry *tfem_geometry(const struct tfem_header *h);

#endif
