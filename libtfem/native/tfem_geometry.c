/* tfem_geometry.c: the checked copies of segment geometries (see the header). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "tfem_geometry.h"

static struct tfem_geometry *known; /* pushed at the head; entries are reused, never freed */
static pthread_mutex_t known_mutex = PTHREAD_MUTEX_INITIALIZER;

/* Every region in bounds and in order, so no computed address leaves the mapping. */
static const char *problem(const struct tfem_header *h, uint64_t size) {
    if (size < sizeof *h) return "smaller than a header";
    if (h->magic != TFEM_SEGMENT_MAGIC || h->layout_version != TFEM_LAYOUT_VERSION)
        return "no tfem header of this layout version";
    if (h->segment_size != size) return "its size is not the header's";
    if (h->slot_count == 0) return "no slots";
    if (h->index_size < TFEM_WAKE_BUCKETS || h->index_size & (h->index_size - 1))
        return "a name index that is not a power of two of at least one entry per stripe";
    if (h->block_size < 4096 || h->block_size & (h->block_size - 1)) return "a block size that is not a power of two";
    if ((uint64_t)h->slot_size < sizeof(struct tfem_slot) + h->buf_size) return "slots too small for their inline bytes";
    if (h->slots_offset < sizeof *h || h->slots_offset + (uint64_t)h->slot_count * h->slot_size > h->index_offset)
        return "the slot table overlaps what follows it";
    if (h->index_offset + 4ull * h->index_size > h->free_stack_offset) return "the name index overlaps what follows it";
    if (h->free_stack_offset + 4ull * h->slot_count > h->holds_offset) return "the free-slot stack overlaps the hold table";
    if (h->holds_offset + sizeof(struct tfem_hold) * TFEM_HOLDS_PER_SLOT * (uint64_t)h->slot_count > h->lives_offset)
        return "the hold table overlaps the lives";
    if (h->lives_offset + sizeof(struct tfem_life) * (uint64_t)h->slot_count > h->bitmap_offset)
        return "the lives overlap the bitmap";
    if (h->bitmap_offset + 8ull * ((h->block_count + 63ull) / 64) > h->arena_offset) return "the bitmap overlaps the arena";
    if (h->arena_offset + (uint64_t)h->block_count * h->block_size > size) return "the arena runs past the mapping";
    return NULL;
}

const char *tfem_geometry_attach(struct tfem_header *h, uint64_t size) {
    const char *why = problem(h, size);
    if (why) return why;
    pthread_mutex_lock(&known_mutex);
    struct tfem_geometry *g = known, *spare = NULL;
    for (; g && g->h != h; g = g->next) /* the same address again: a new mapping where one was */
        if (!g->h && !spare) spare = g;
    if (!g) g = spare;
    int fresh = !g;
    if (fresh && !(g = calloc(1, sizeof *g))) {
        pthread_mutex_unlock(&known_mutex);
        return "out of memory";
    }
    __atomic_store_n(&g->h, NULL, __ATOMIC_RELEASE); /* not found while it changes */
    g->size = size;
    g->slots_offset = h->slots_offset;
    g->index_offset = h->index_offset;
    g->free_stack_offset = h->free_stack_offset;
    g->holds_offset = h->holds_offset;
    g->hold_count = TFEM_HOLDS_PER_SLOT * h->slot_count;
    g->lives_offset = h->lives_offset;
    g->bitmap_offset = h->bitmap_offset;
    g->arena_offset = h->arena_offset;
    g->arena = (char *)h + h->arena_offset;
    g->slot_count = h->slot_count;
    g->slot_size = h->slot_size;
    g->buf_size = h->buf_size;
    g->index_size = h->index_size;
    g->block_size = h->block_size;
    g->block_count = h->block_count;
    __atomic_store_n(&g->h, h, __ATOMIC_RELEASE);
    if (fresh) {
        g->next = known;
        __atomic_store_n(&known, g, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&known_mutex);
    return NULL;
}

void tfem_geometry_detach(struct tfem_header *h) {
    pthread_mutex_lock(&known_mutex);
    for (struct tfem_geometry *g = known; g; g = g->next)
        if (g->h == h) __atomic_store_n(&g->h, NULL, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&known_mutex);
}

const struct tfem_geometry *tfem_geometry(const struct tfem_header *h) {
    for (const struct tfem_geometry *g = __atomic_load_n(&known, __ATOMIC_ACQUIRE); g; g = g->next)
        if (__atomic_load_n(&g->h, __ATOMIC_ACQUIRE) == h) return g;
    fprintf(stderr, "libtfem: a segment at %p was used without being attached\n", (const void *)h);
    abort();
}
