/*
 * tfem_layout.h: addresses inside a mapped segment, for the C files of the
 * core (not part of what Python binds: cffi reads the other headers), all
 * from this process's checked copy of the geometry (tfem_geometry.h).
 */
#ifndef TFEM_LAYOUT_H
#define TFEM_LAYOUT_H

#include "tfem_geometry.h"
#include "tfem_segment.h"
#include "tfem_states.h"

static inline struct tfem_slot *tfem_slot_at(const struct tfem_geometry *g, uint32_t s) {
    return (struct tfem_slot *)((char *)g->h + g->slots_offset + (uint64_t)s * g->slot_size);
}
static inline struct tfem_hold *tfem_hold_at(const struct tfem_geometry *g, uint32_t i) {
    return (struct tfem_hold *)((char *)g->h + g->holds_offset) + i;
}
static inline struct tfem_life *tfem_life_at(const struct tfem_geometry *g, uint32_t s) {
    return (struct tfem_life *)((char *)g->h + g->lives_offset) + s;
}
static inline char *tfem_inline_data(struct tfem_slot *slot) { return (char *)(slot + 1); }
static inline char *tfem_block_data(const struct tfem_geometry *g, uint32_t block) {
    return g->arena + (uint64_t)block * g->block_size;
}
static inline uint64_t *tfem_bitmap_of(const struct tfem_geometry *g) {
    return (uint64_t *)((char *)g->h + g->bitmap_offset);
}

/* The state word, laid out as states.py says (tfem_states.h). */
static inline int tfem_word_state(uint64_t word) { return (int)(word & TFEM_WORD_STATE_MASK); }
static inline uint32_t tfem_word_generation(uint64_t word) {
    return (uint32_t)(word >> TFEM_WORD_GENERATION_SHIFT) & TFEM_WORD_GENERATION_MASK;
}
static inline uint32_t tfem_word_holder(uint64_t word) { return (uint32_t)(word >> TFEM_WORD_HOLDER_SHIFT); }
static inline uint64_t tfem_word(int state, uint32_t generation, uint32_t holder) {
    return ((uint64_t)holder << TFEM_WORD_HOLDER_SHIFT) |
           ((uint64_t)(generation & TFEM_WORD_GENERATION_MASK) << TFEM_WORD_GENERATION_SHIFT) | (uint64_t)state;
}

#endif
