/*
 * tfem_table.c: the slot table's operations, one C call each.
 *
 * Why C: in Python each of these took 35-40 us of interpreter time (a dozen
 * cffi field accesses, enum constructions and context managers), ten times
 * a /dev/shm file's open+write+close. Here each is one call of a few
 * hundred nanoseconds, and the same calls serve the C API.
 *
 * Locks: a name belongs to one stripe (crc32 % TFEM_WAKE_BUCKETS). Every
 * claim, look-up and state change of a name happens under its stripe's
 * lock, and touches only that stripe's part of the name index: with one
 * table lock, 16 pairs of processes on 2 CPUs queued behind whichever
 * holder the scheduler had preempted. The broker's rarer paths (settling
 * the dead, spilling, adoption, list) take every stripe, in order. Each
 * change under a lock is a single store, so a holder that dies mid-way
 * leaves a table the next holder (a dead holder's lock is taken over) or
 * the broker's adoption can use. No system call happens under a lock:
 * wake-ups are sent after it is released.
 *
 * The free-slot stack has no lock: a pop or push is one compare-and-swap on
 * free_head, whose upper half is a tag bumped by every change (a stale
 * head fails, the ABA case). A process killed between popping a slot and
 * claiming it leaves that slot off the stack until the broker adopts the
 * segment again; nothing else is lost.
 *
 * Shared reads (files kept, or written for several readers) take more than
 * one store: a hold-table entry, the slot's counts, then the entry marked
 * counted. A reader killed among them is settled by its entry: counted, its
 * read is given back; not yet, nothing was taken.
 *
 * State words change only by compare-and-swap, to the word the state
 * machine gives: the transition table is generated from states.py
 * (tfem_states.h). Each stripe's index is linear probing with
 * backward-shift deletion, never tombstones.
 */
#include <errno.h>
#include <string.h>

#include "tfem_atomics.h"
#include "tfem_layout.h"
#include "tfem_table.h"

#define SC __ATOMIC_SEQ_CST
#define LOCK_TIMEOUT_NS (10LL * 1000000000LL)
#define STRIPES TFEM_WAKE_BUCKETS

#define slot_at tfem_slot_at
#define bitmap_of tfem_bitmap_of
static uint32_t *free_stack_of(const struct tfem_geometry *g) {
    return (uint32_t *)((char *)g->h + g->free_stack_offset);
}

static uint32_t stripe_of(uint32_t hash) { return hash % STRIPES; }

static int lock_stripe(struct tfem_header *h, uint32_t stripe, uint32_t pid) {
    struct tfem_stripe *st = &h->stripes[stripe];
    return tfem_lock(&st->lock, &st->waiters, pid, LOCK_TIMEOUT_NS) ? EBUSY : 0;
}

static void unlock_stripe(struct tfem_header *h, uint32_t stripe) {
    tfem_unlock(&h->stripes[stripe].lock, &h->stripes[stripe].waiters);
}

/* Every stripe, in order: the whole table (the broker's rarer paths). */
int tfem_t_lock(struct tfem_header *h, uint32_t pid) {
    for (uint32_t i = 0; i < STRIPES; i++) {
        if (lock_stripe(h, i, pid)) {
            while (i--) unlock_stripe(h, i);
            return EBUSY;
        }
    }
    return 0;
}

void tfem_t_unlock(struct tfem_header *h) {
    for (uint32_t i = STRIPES; i--;) unlock_stripe(h, i);
}

/* The pid holding some stripe's lock, or 0 (for error messages). */
uint32_t tfem_t_lock_holder(struct tfem_header *h) {
    for (uint32_t i = 0; i < STRIPES; i++) {
        uint32_t pid = __atomic_load_n(&h->stripes[i].lock, SC);
        if (pid) return pid;
    }
    return 0;
}

/* ---- state words ---- */

#define generation_of tfem_word_generation
#define holder_of tfem_word_holder
#define state_of tfem_word_state

/* Apply `event` to slot `s` by compare-and-swap. `generation` < 0: any. */
static int transition(struct tfem_slot *slot, int event, int64_t generation, uint32_t holder) {
    uint64_t word = __atomic_load_n(&slot->state, SC);
    int state = state_of(word);
    if (generation >= 0 && generation_of(word) != (uint32_t)generation) return ESTALE;
    if (state < 0 || state >= TFEM_STATE_COUNT) return EPERM;
    int next = TFEM_NEXT_STATE[state][event];
    if (next < 0) return EPERM;
    uint32_t gen = generation_of(word);
    if (TFEM_BUMPS_GENERATION[event]) gen = (gen + 1) & TFEM_WORD_GENERATION_MASK;
    uint64_t desired = tfem_word(next, gen, TFEM_HELD[next] ? holder : 0);
    return __atomic_compare_exchange_n(&slot->state, &word, desired, 0, SC, SC) ? 0 : ESTALE;
}

static int held_by(struct tfem_slot *slot, uint32_t generation, uint32_t pid, int state) {
    uint64_t word = __atomic_load_n(&slot->state, SC);
    return state_of(word) == state && generation_of(word) == generation && holder_of(word) == pid;
}

/* ---- the name index: a stripe each (under the stripe's lock) ---- */

struct stripe_index {
    uint32_t *entries; /* slot + 1, or TFEM_INDEX_EMPTY */
    uint32_t mask;
};

static struct stripe_index index_for(const struct tfem_geometry *g, uint32_t hash) {
    struct tfem_header *h = g->h;
    uint32_t size = g->index_size / STRIPES;
    uint32_t *index = (uint32_t *)((char *)h + g->index_offset);
    return (struct stripe_index){index + (uint64_t)stripe_of(hash) * size, size - 1};
}

/* Where a hash starts probing within its stripe. */
static uint32_t home_of(uint32_t hash, uint32_t mask) { return (hash / STRIPES) & mask; }

static int64_t find(const struct tfem_geometry *g, const char *name, uint32_t len, uint32_t hash) {
    struct stripe_index ix = index_for(g, hash);
    for (uint32_t n = 0, i = home_of(hash, ix.mask); n <= ix.mask; n++, i = (i + 1) & ix.mask) {
        uint32_t entry = ix.entries[i];
        if (entry == TFEM_INDEX_EMPTY) return -1;
        if (entry > g->slot_count) continue; /* damaged: never followed */
        struct tfem_slot *slot = slot_at(g, entry - 1);
        if (slot->name_hash == hash && slot->name_len == len && memcmp(slot->name, name, len) == 0)
            return entry - 1;
    }
    return -1;
}

/* Enter slot s under its name's hash; ENOSPC when its stripe is full. */
int tfem_t_index_insert(struct tfem_header *h, uint32_t s) {
    const struct tfem_geometry *g = tfem_geometry(h);
    uint32_t hash = slot_at(g, s)->name_hash;
    struct stripe_index ix = index_for(g, hash);
    for (uint32_t n = 0, i = home_of(hash, ix.mask); n <= ix.mask; n++, i = (i + 1) & ix.mask) {
        if (ix.entries[i] == TFEM_INDEX_EMPTY) {
            ix.entries[i] = s + 1;
            return 0;
        }
    }
    return ENOSPC;
}

static void index_remove(const struct tfem_geometry *g, uint32_t s) {
    uint32_t hash = slot_at(g, s)->name_hash;
    struct stripe_index ix = index_for(g, hash);
    uint32_t i = home_of(hash, ix.mask), n = 0;
    while (ix.entries[i] != s + 1) {
        if (ix.entries[i] == TFEM_INDEX_EMPTY || ++n > ix.mask) return; /* not indexed: unlinked while held */
        i = (i + 1) & ix.mask;
    }
    /* Backward shift: pull later entries of the probe run into the hole,
     * unless an entry's home lies cyclically in (hole, j]. */
    uint32_t hole = i;
    for (uint32_t j = (i + 1) & ix.mask; ix.entries[j] != TFEM_INDEX_EMPTY && j != i; j = (j + 1) & ix.mask) {
        uint32_t home = home_of(slot_at(g, ix.entries[j] - 1)->name_hash, ix.mask);
        int stays = hole < j ? (hole < home && home <= j) : (home > hole || home <= j);
        if (stays) continue;
        ix.entries[hole] = ix.entries[j];
        hole = j;
    }
    ix.entries[hole] = TFEM_INDEX_EMPTY;
}

/* ---- the free-slot stack, without a lock ---- */

static int64_t pop_free(const struct tfem_geometry *g) {
    struct tfem_header *h = g->h;
    uint32_t *next = free_stack_of(g);
    uint64_t head = __atomic_load_n(&h->free_head, SC);
    for (;;) {
        uint32_t top = (uint32_t)head;
        if (top == 0 || top > g->slot_count) return -1;
        uint32_t below = __atomic_load_n(&next[top - 1], SC);
        uint64_t desired = ((head >> 32) + 1) << 32 | below;
        if (__atomic_compare_exchange_n(&h->free_head, &head, desired, 0, SC, SC)) {
            __atomic_fetch_sub(&h->free_top, 1, SC);
            return top - 1;
        }
    }
}

void tfem_t_push_free(struct tfem_header *h, uint32_t s) {
    const struct tfem_geometry *g = tfem_geometry(h);
    uint32_t *next = free_stack_of(g);
    uint64_t head = __atomic_load_n(&h->free_head, SC);
    do {
        __atomic_store_n(&next[s], (uint32_t)head, SC);
    } while (!__atomic_compare_exchange_n(&h->free_head, &head, ((head >> 32) + 1) << 32 | (s + 1), 0, SC, SC));
    __atomic_fetch_add(&h->free_top, 1, SC);
}

/* ---- claiming and freeing (under the stripe's lock) ---- */

static int claim(const struct tfem_geometry *g, const char *name, uint32_t len, uint32_t hash, uint32_t pid,
                 uint64_t now_ns, struct tfem_claim *out) {
    struct tfem_header *h = g->h;
    int64_t popped = pop_free(g);
    if (popped < 0) return ENOSPC;
    uint32_t s = (uint32_t)popped;
    struct tfem_slot *slot = slot_at(g, s);
    int rc = transition(slot, TFEM_EVENT_OPEN_WRITE, -1, pid);
    if (rc) return rc; /* not free after all (damage): left off the stack for adoption to judge */
    slot->size = 0;
    slot->file_id = __atomic_fetch_add(&h->next_file_id, 1, SC);
    slot->created_ns = now_ns;
    slot->waiting_ns = 0;
    slot->name_hash = hash;
    slot->name_len = (uint16_t)len;
    slot->flags = 0;
    slot->checksum = 0;
    slot->extent_count = 0;
    slot->claims = 0; /* even: a dead holder's claim left odd is over */
    struct tfem_life *life = tfem_life_at(g, s);
    slot->readers = life->readers_left = 1; /* consume-once until the writer says otherwise */
    life->holders = 0;
    life->expires_ns = 0;
    memcpy(slot->name, name, len);
    slot->name[len] = 0;
    if (tfem_t_index_insert(h, s)) { /* this stripe of the index is full */
        slot->name_len = 0;
        transition(slot, TFEM_EVENT_ABORT_WRITE, -1, 0);
        tfem_t_push_free(h, s);
        return ENOSPC;
    }
    __atomic_fetch_add(&h->opened_write, 1, SC);
    out->slot = s;
    out->generation = generation_of(__atomic_load_n(&slot->state, SC));
    out->file_id = slot->file_id;
    out->for_write = 1;
    return 0;
}

static void release_extents(const struct tfem_geometry *g, struct tfem_slot *slot) {
    for (uint32_t i = 0; i < slot->extent_count && i < TFEM_MAX_EXTENTS; i++)
        tfem_blocks_release(bitmap_of(g), slot->extents[i].start, slot->extents[i].count);
    slot->extent_count = 0;
}

/* Free slot s by `event`; out->discard_id names spill records to drop.
 * The caller wakes the waiters for room after its lock is released. */
static int free_slot(const struct tfem_geometry *g, uint32_t s, int event, uint32_t generation,
                     struct tfem_claim *out) {
    struct tfem_header *h = g->h;
    struct tfem_slot *slot = slot_at(g, s);
    uint64_t word = __atomic_load_n(&slot->state, SC);
    if (generation_of(word) != generation) return ESTALE;
    if (!(slot->flags & TFEM_SLOT_DOOMED)) index_remove(g, s);
    release_extents(g, slot);
    out->discard_id = slot->flags & TFEM_SLOT_SPILLED ? slot->file_id : 0;
    slot->flags = 0;
    slot->name_len = 0;
    int rc = transition(slot, event, generation, 0);
    if (rc) return rc;
    if (event == TFEM_EVENT_CLOSE_READ || event == TFEM_EVENT_FINAL_CLOSE) __atomic_fetch_add(&h->closed_read, 1, SC);
    tfem_t_push_free(h, s);
    return 0;
}

static void publish_space(struct tfem_header *h) { tfem_publish(&h->space_seq, &h->space_waiters); }

static void publish_bucket(struct tfem_header *h, uint32_t hash) {
    uint32_t b = hash % TFEM_WAKE_BUCKETS;
    tfem_publish(&h->wake_seq[b], &h->wake_waiters[b]);
}

/* ---- shared reads: the hold table (entries under the name's stripe lock) ---- */

/* A free entry for pid's read of slot s, not yet counted; -1 if none. */
static int64_t claim_hold(const struct tfem_geometry *g, uint32_t pid, uint32_t s, uint32_t generation) {
    uint32_t n = g->hold_count, start = (uint32_t)(((uint64_t)s * 2654435761u + pid) % n);
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = (start + k) % n;
        struct tfem_hold *e = tfem_hold_at(g, i);
        uint32_t free_pid = 0;
        if (__atomic_load_n(&e->pid, SC) || !__atomic_compare_exchange_n(&e->pid, &free_pid, pid, 0, SC, SC))
            continue;
        e->slot = s;
        e->generation = generation;
        e->counted = 0;
        return i;
    }
    return -1;
}

static void free_hold(struct tfem_hold *e) {
    e->counted = 0;
    __atomic_store_n(&e->pid, 0, SC);
}

/* The event for a reader letting go (states.py's shared_close). */
static int shared_close_event(const struct tfem_slot *slot, const struct tfem_life *life) {
    if (life->holders) return TFEM_EVENT_CLOSE_SHARED;
    if (slot->readers == 0 || life->readers_left > 0) return TFEM_EVENT_LAST_CLOSE;
    return TFEM_EVENT_FINAL_CLOSE;
}

/* Open a WAIT or SHARED file of more than one reader for a shared read. */
static int open_shared(const struct tfem_geometry *g, uint32_t s, uint64_t word, uint32_t pid,
                       struct tfem_claim *out) {
    struct tfem_slot *slot = slot_at(g, s);
    struct tfem_life *life = tfem_life_at(g, s);
    uint32_t generation = generation_of(word);
    if (slot->readers > 1 && life->readers_left == 0) return EAGAIN; /* every read taken: gone at the last close */
    int64_t i = claim_hold(g, pid, s, generation);
    if (i < 0) return EMFILE;
    int rc = transition(slot, TFEM_EVENT_OPEN_SHARED, generation, 0);
    if (rc) {
        free_hold(tfem_hold_at(g, (uint32_t)i));
        return rc;
    }
    life->holders++;
    if (slot->readers > 1) life->readers_left--;
    tfem_hold_at(g, (uint32_t)i)->counted = 1;
    out->hold = (uint32_t)i + 1;
    return 0;
}

/* Let go of hold entry i (the caller checked it is of a SHARED slot of its
 * generation): the slot's counts and state follow. closing: a close, which
 * counts as a read done; else the read is given back. */
static int drop_hold(const struct tfem_geometry *g, uint32_t i, int closing, struct tfem_claim *out) {
    struct tfem_hold *e = tfem_hold_at(g, i);
    uint32_t s = e->slot, generation = e->generation;
    struct tfem_slot *slot = slot_at(g, s);
    struct tfem_life *life = tfem_life_at(g, s);
    int counted = e->counted;
    free_hold(e);
    if (!counted) return 0; /* its reader died before taking the read */
    if (!closing && slot->readers > 1 && counted == 1) life->readers_left++; /* a keeper took none */
    if (life->holders) life->holders--;
    int event = shared_close_event(slot, life);
    if (!life->holders && slot->flags & TFEM_SLOT_DOOMED) event = TFEM_EVENT_UNLINK;
    if (event == TFEM_EVENT_UNLINK || event == TFEM_EVENT_FINAL_CLOSE) {
        int rc = free_slot(g, s, event, generation, out);
        out->for_write = -1;
        return rc;
    }
    if (closing) __atomic_fetch_add(&g->h->closed_read, 1, SC);
    return transition(slot, event, generation, 0);
}

/* Entry i is pid's read of a SHARED file of that generation. */
static int holds(const struct tfem_geometry *g, uint32_t i, uint32_t pid, uint32_t s, uint32_t generation) {
    if (i >= g->hold_count || s >= g->slot_count) return 0;
    struct tfem_hold *e = tfem_hold_at(g, i);
    uint64_t word = __atomic_load_n(&slot_at(g, s)->state, SC);
    return __atomic_load_n(&e->pid, SC) == pid && e->slot == s && e->generation == generation &&
           state_of(word) == TFEM_STATE_SHARED && generation_of(word) == generation;
}

/* ---- the operations ---- */

int tfem_t_create(struct tfem_header *h, const char *name, uint32_t len, uint32_t hash,
                  uint32_t pid, uint64_t now_ns, struct tfem_claim *out) {
    const struct tfem_geometry *g = tfem_geometry(h);
    memset(out, 0, sizeof *out);
    if (lock_stripe(h, stripe_of(hash), pid)) return EBUSY;
    int rc = find(g, name, len, hash) >= 0 ? EEXIST : claim(g, name, len, hash, pid, now_ns, out);
    unlock_stripe(h, stripe_of(hash));
    return rc;
}

int tfem_t_take(struct tfem_header *h, const char *name, uint32_t len, uint32_t hash,
                uint32_t holder, int create, uint64_t now_ns, struct tfem_claim *out) {
    const struct tfem_geometry *g = tfem_geometry(h);
    memset(out, 0, sizeof *out);
    if (lock_stripe(h, stripe_of(hash), holder)) return EBUSY;
    int rc;
    int64_t s = find(g, name, len, hash);
    if (s < 0) {
        rc = create ? claim(g, name, len, hash, holder, now_ns, out) : ENOENT;
    } else {
        struct tfem_slot *slot = slot_at(g, (uint32_t)s);
        uint64_t word = __atomic_load_n(&slot->state, SC);
        out->state = state_of(word);
        if (state_of(word) == TFEM_STATE_READ &&
            holder_of(word) == (uint32_t)__atomic_load_n(&h->broker_pid, SC)) {
            rc = EINPROGRESS; /* the broker moving it to or from the spill store: WAIT again in a moment */
        } else if (slot->readers != 1 && (state_of(word) == TFEM_STATE_WAIT || state_of(word) == TFEM_STATE_SHARED)) {
            if ((rc = open_shared(g, (uint32_t)s, word, holder, out)) == 0) {
                __atomic_fetch_add(&h->opened_read, 1, SC);
                out->slot = (uint32_t)s;
                out->generation = generation_of(word);
                out->file_id = slot->file_id;
            }
        } else if (state_of(word) != TFEM_STATE_WAIT) {
            rc = EAGAIN;
        } else if ((rc = transition(slot, TFEM_EVENT_OPEN_READ, generation_of(word), holder)) == 0) {
            __atomic_fetch_add(&h->opened_read, 1, SC);
            out->slot = (uint32_t)s;
            out->generation = generation_of(word);
            out->file_id = slot->file_id;
        }
    }
    unlock_stripe(h, stripe_of(hash));
    return rc;
}

/* What a writer records as it publishes. */
struct published {
    uint64_t size;
    uint32_t checksum;
    uint64_t now_ns;
};

/* A holder of slot s in `state` lets go of it by `event`: publishing it
 * (`done` says what to record) or giving it back unread. A file unlinked
 * meanwhile is freed instead (out->for_write = -1). */
static int let_go(struct tfem_header *h, uint32_t s, uint32_t generation, uint32_t pid, int state, int event,
                  const struct published *done, struct tfem_claim *out) {
    const struct tfem_geometry *g = tfem_geometry(h);
    memset(out, 0, sizeof *out);
    if (s >= g->slot_count) return ESTALE;
    struct tfem_slot *slot = slot_at(g, s);
    uint32_t hash = slot->name_hash; /* fixed while the file is held */
    if (lock_stripe(h, stripe_of(hash), pid)) return EBUSY;
    int rc;
    if (!held_by(slot, generation, pid, state)) {
        rc = ESTALE;
    } else if (slot->flags & TFEM_SLOT_DOOMED) { /* unlinked while held: freed */
        rc = free_slot(g, s, TFEM_EVENT_UNLINK, generation, out);
        out->for_write = -1;
    } else {
        if (done) {
            slot->size = done->size;
            slot->checksum = done->checksum;
            slot->waiting_ns = done->now_ns;
        }
        rc = transition(slot, event, generation, 0);
        if (rc == 0 && done) __atomic_fetch_add(&h->closed_write, 1, SC);
    }
    unlock_stripe(h, stripe_of(hash));
    if (rc == 0) out->for_write == 0 ? publish_bucket(h, hash) : publish_space(h);
    return rc;
}

int tfem_t_publish(struct tfem_header *h, uint32_t s, uint32_t generation, uint32_t pid,
                   uint64_t size, uint32_t checksum, uint64_t now_ns, struct tfem_claim *out) {
    const struct published done = {size, checksum, now_ns};
    return let_go(h, s, generation, pid, TFEM_STATE_WRITE, TFEM_EVENT_CLOSE_WRITE, &done, out);
}

static int drop_held(const struct tfem_geometry *g, uint32_t s, uint32_t generation, uint32_t pid, int state,
                     int event, struct tfem_claim *out) {
    struct tfem_header *h = g->h;
    memset(out, 0, sizeof *out);
    if (s >= g->slot_count) return ESTALE;
    uint32_t hash = slot_at(g, s)->name_hash;
    if (lock_stripe(h, stripe_of(hash), pid)) return EBUSY;
    int rc = held_by(slot_at(g, s), generation, pid, state) ? free_slot(g, s, event, generation, out) : ESTALE;
    unlock_stripe(h, stripe_of(hash));
    if (rc == 0) publish_space(h);
    return rc;
}

int tfem_t_abort(struct tfem_header *h, uint32_t s, uint32_t generation, uint32_t pid,
                 struct tfem_claim *out) {
    const struct tfem_geometry *g = tfem_geometry(h);
    return drop_held(g, s, generation, pid, TFEM_STATE_WRITE, TFEM_EVENT_ABORT_WRITE, out);
}

int tfem_t_consume(struct tfem_header *h, uint32_t s, uint32_t generation, uint32_t pid,
                   struct tfem_claim *out) {
    const struct tfem_geometry *g = tfem_geometry(h);
    return drop_held(g, s, generation, pid, TFEM_STATE_READ, TFEM_EVENT_CLOSE_READ, out);
}

int tfem_t_release(struct tfem_header *h, uint32_t s, uint32_t generation, uint32_t pid,
                   struct tfem_claim *out) {
    return let_go(h, s, generation, pid, TFEM_STATE_READ, TFEM_EVENT_RELEASE_READ, NULL, out);
}

int tfem_t_let_go_shared(struct tfem_header *h, uint32_t s, uint32_t generation, uint32_t pid, uint32_t hold,
                         int give_back, struct tfem_claim *out) {
    const struct tfem_geometry *g = tfem_geometry(h);
    memset(out, 0, sizeof *out);
    if (s >= g->slot_count || hold == 0) return ESTALE;
    uint32_t hash = slot_at(g, s)->name_hash;
    if (lock_stripe(h, stripe_of(hash), pid)) return EBUSY;
    int rc = holds(g, hold - 1, pid, s, generation) ? drop_hold(g, hold - 1, !give_back, out) : ESTALE;
    unlock_stripe(h, stripe_of(hash));
    if (rc == 0 && out->for_write == -1) publish_space(h);
    else if (rc == 0 && give_back) publish_bucket(h, hash); /* a read to take again */
    return rc;
}

/* states.moved_reads: a file counted in reads (readers > 1) gets at most
 * its readers back; a take takes at most what is left. EINVAL otherwise. */
static int moved_reads(const struct tfem_slot *slot, const struct tfem_life *life, int64_t delta, int64_t *left) {
    if (slot->readers <= 1) return EINVAL;
    int64_t have = life->readers_left;
    if (delta >= 0 && delta > (int64_t)slot->readers - have) return EINVAL;
    *left = delta >= 0 ? have + delta : (-delta < have ? have + delta : 0);
    return 0;
}

int tfem_t_add_reads(struct tfem_header *h, uint32_t s, uint32_t generation, uint32_t pid, uint32_t hold,
                     int64_t delta, uint32_t *moved) {
    const struct tfem_geometry *g = tfem_geometry(h);
    *moved = 0;
    if (s >= g->slot_count || hold == 0) return ESTALE;
    struct tfem_slot *slot = slot_at(g, s);
    uint32_t hash = slot->name_hash;
    if (lock_stripe(h, stripe_of(hash), pid)) return EBUSY;
    int rc = ESTALE;
    if (holds(g, hold - 1, pid, s, generation)) {
        struct tfem_life *life = tfem_life_at(g, s);
        int64_t left = 0;
        if ((rc = moved_reads(slot, life, delta, &left)) == 0) {
            *moved = (uint32_t)(left > life->readers_left ? left - life->readers_left : life->readers_left - left);
            life->readers_left = (uint32_t)left;
        }
    }
    unlock_stripe(h, stripe_of(hash));
    if (rc == 0 && *moved && delta > 0) publish_bucket(h, hash); /* reads to take: waiting readers look again */
    return rc;
}

int tfem_t_keep_shared(struct tfem_header *h, uint32_t s, uint32_t generation, uint32_t pid,
                       struct tfem_claim *out) {
    const struct tfem_geometry *g = tfem_geometry(h);
    memset(out, 0, sizeof *out);
    if (s >= g->slot_count) return ESTALE;
    struct tfem_slot *slot = slot_at(g, s);
    uint32_t hash = slot->name_hash;
    if (lock_stripe(h, stripe_of(hash), pid)) return EBUSY;
    uint64_t word = __atomic_load_n(&slot->state, SC);
    int rc = ESTALE;
    if (slot->readers <= 1) {
        rc = EINVAL;
    } else if (generation_of(word) == generation && slot->name_hash == hash && !(slot->flags & TFEM_SLOT_DOOMED)) {
        int64_t i = claim_hold(g, pid, s, generation);
        rc = i < 0 ? EMFILE : transition(slot, TFEM_EVENT_OPEN_SHARED, generation, 0);
        if (i >= 0 && rc) free_hold(tfem_hold_at(g, (uint32_t)i));
        if (rc == 0) {
            tfem_life_at(g, s)->holders++;
            tfem_hold_at(g, (uint32_t)i)->counted = 2;
            out->slot = s;
            out->generation = generation;
            out->file_id = slot->file_id;
            out->hold = (uint32_t)i + 1;
        }
    }
    unlock_stripe(h, stripe_of(hash));
    return rc;
}

/* Unlink slot s (under its stripe's lock): freed now if nobody holds it,
 * else its name goes now and its last holder frees it. 1 if freed. */
static int unlink_at(const struct tfem_geometry *g, uint32_t s, struct tfem_claim *out, int *rc) {
    struct tfem_slot *slot = slot_at(g, s);
    uint64_t word = __atomic_load_n(&slot->state, SC);
    if (state_of(word) == TFEM_STATE_WAIT) {
        *rc = free_slot(g, s, TFEM_EVENT_UNLINK, generation_of(word), out);
        return *rc == 0;
    }
    index_remove(g, s);
    slot->flags |= TFEM_SLOT_DOOMED;
    *rc = 0;
    return 0;
}

int tfem_t_unlink(struct tfem_header *h, const char *name, uint32_t len, uint32_t hash,
                  uint32_t pid, struct tfem_claim *out) {
    const struct tfem_geometry *g = tfem_geometry(h);
    memset(out, 0, sizeof *out);
    if (lock_stripe(h, stripe_of(hash), pid)) return EBUSY;
    int rc = ENOENT, freed = 0;
    int64_t s = find(g, name, len, hash);
    if (s >= 0) freed = unlink_at(g, (uint32_t)s, out, &rc);
    unlock_stripe(h, stripe_of(hash));
    if (freed) publish_space(h);
    return rc;
}

static int expired(const struct tfem_slot *slot, const struct tfem_life *life, uint64_t word, uint64_t now_ns) {
    return life->expires_ns && life->expires_ns <= now_ns && state_of(word) != TFEM_STATE_INVALID &&
           state_of(word) != TFEM_STATE_WRITE && !(slot->flags & TFEM_SLOT_DOOMED);
}

uint32_t tfem_t_expired(struct tfem_header *h, uint64_t now_ns, uint32_t *slots, uint32_t *generations,
                        uint32_t max) {
    const struct tfem_geometry *g = tfem_geometry(h);
    uint32_t n = 0;
    for (uint32_t s = 0; s < g->slot_count && n < max; s++) {
        struct tfem_slot *slot = slot_at(g, s);
        uint64_t word = __atomic_load_n(&slot->state, SC);
        if (!expired(slot, tfem_life_at(g, s), word, now_ns)) continue;
        slots[n] = s;
        generations[n++] = generation_of(word);
    }
    return n;
}

int tfem_t_expire(struct tfem_header *h, uint32_t s, uint32_t generation, uint32_t pid, uint64_t now_ns,
                  struct tfem_claim *out) {
    const struct tfem_geometry *g = tfem_geometry(h);
    memset(out, 0, sizeof *out);
    if (s >= g->slot_count) return ESTALE;
    struct tfem_slot *slot = slot_at(g, s);
    uint32_t hash = slot->name_hash;
    if (lock_stripe(h, stripe_of(hash), pid)) return EBUSY;
    uint64_t word = __atomic_load_n(&slot->state, SC);
    int rc = ESTALE, freed = 0;
    if (generation_of(word) == generation && slot->name_hash == hash && expired(slot, tfem_life_at(g, s), word, now_ns))
        freed = unlink_at(g, s, out, &rc);
    unlock_stripe(h, stripe_of(hash));
    if (freed) publish_space(h);
    return rc;
}

uint32_t tfem_t_hold_pids(struct tfem_header *h, uint32_t *pids, uint32_t max) {
    const struct tfem_geometry *g = tfem_geometry(h);
    uint32_t n = 0;
    for (uint32_t i = 0; i < g->hold_count && n < max; i++) {
        uint32_t pid = __atomic_load_n(&tfem_hold_at(g, i)->pid, SC);
        if (pid) pids[n++] = pid;
    }
    return n;
}

int tfem_t_lookup(struct tfem_header *h, const char *name, uint32_t len, uint32_t hash,
                  uint32_t pid, struct tfem_claim *out) {
    const struct tfem_geometry *g = tfem_geometry(h);
    memset(out, 0, sizeof *out);
    if (lock_stripe(h, stripe_of(hash), pid)) return EBUSY;
    int64_t s = find(g, name, len, hash);
    if (s >= 0) {
        uint64_t word = __atomic_load_n(&slot_at(g, (uint32_t)s)->state, SC);
        out->slot = (uint32_t)s;
        out->generation = generation_of(word);
        out->state = state_of(word);
        out->file_id = slot_at(g, (uint32_t)s)->file_id;
    }
    unlock_stripe(h, stripe_of(hash));
    return s >= 0 ? 0 : ENOENT;
}

/* ---- what stat and list report ---- */

void tfem_t_info(struct tfem_header *h, uint32_t s, struct tfem_fileinfo *out) {
    const struct tfem_geometry *g = tfem_geometry(h);
    struct tfem_slot *slot = slot_at(g, s);
    uint32_t len = slot->name_len <= TFEM_NAME_MAX ? slot->name_len : TFEM_NAME_MAX;
    out->size = slot->size;
    out->file_id = slot->file_id;
    out->created_ns = slot->created_ns;
    const struct tfem_life *life = tfem_life_at(g, s);
    out->expires_ns = life->expires_ns;
    out->readers = slot->readers;
    out->readers_left = life->readers_left;
    out->holders = life->holders;
    out->slot = s;
    out->state = state_of(__atomic_load_n(&slot->state, SC));
    out->spilled = (slot->flags & TFEM_SLOT_SPILLED) != 0;
    out->name_len = len;
    memcpy(out->name, slot->name, len);
    out->name[len] = 0;
}

int tfem_t_stat(struct tfem_header *h, const char *name, uint32_t len, uint32_t hash, uint32_t pid,
                struct tfem_fileinfo *out) {
    const struct tfem_geometry *g = tfem_geometry(h);
    if (lock_stripe(h, stripe_of(hash), pid)) return EBUSY;
    int64_t s = find(g, name, len, hash);
    if (s >= 0) tfem_t_info(h, (uint32_t)s, out);
    unlock_stripe(h, stripe_of(hash));
    return s >= 0 ? 0 : ENOENT;
}

/* The named files of slots start.. (unlinked ones not), at most max of
 * them; a caller continues from the last one's slot + 1. */
int64_t tfem_t_list(struct tfem_header *h, uint32_t pid, uint32_t start, struct tfem_fileinfo *out,
                    uint32_t max) {
    const struct tfem_geometry *g = tfem_geometry(h);
    if (tfem_t_lock(h, pid)) return -EBUSY;
    int64_t n = 0;
    for (uint32_t s = start; s < g->slot_count && n < max; s++) {
        struct tfem_slot *slot = slot_at(g, s);
        if (state_of(__atomic_load_n(&slot->state, SC)) == TFEM_STATE_INVALID || slot->flags & TFEM_SLOT_DOOMED)
            continue;
        tfem_t_info(h, s, &out[n++]);
    }
    tfem_t_unlock(h);
    return n;
}

uint32_t tfem_t_waiting(struct tfem_header *h, int spilled, uint32_t *slots, uint64_t *since, uint32_t max) {
    const struct tfem_geometry *g = tfem_geometry(h);
    uint32_t n = 0;
    for (uint32_t s = 0; s < g->slot_count && n < max; s++) {
        struct tfem_slot *slot = slot_at(g, s);
        if (state_of(__atomic_load_n(&slot->state, SC)) != TFEM_STATE_WAIT) continue;
        if (slot->flags & TFEM_SLOT_ARENA || !(slot->flags & TFEM_SLOT_SPILLED) != !spilled) continue;
        if (!spilled && !slot->extent_count) continue;
        slots[n] = s;
        since[n++] = slot->waiting_ns;
    }
    return n;
}

uint64_t tfem_t_published_mark(struct tfem_header *h, uint32_t s) {
    struct tfem_slot *slot = slot_at(tfem_geometry(h), s);
    uint64_t word = __atomic_load_n(&slot->state, SC);
    int state = state_of(word);
    return (state == TFEM_STATE_WAIT || state == TFEM_STATE_SHARED) && !(slot->flags & TFEM_SLOT_DOOMED)
               ? TFEM_PUBLISHED_MARK(generation_of(word)) : 0;
}

uint32_t tfem_t_published_changes(struct tfem_header *h, const uint64_t *seen, uint32_t *slots, uint64_t *marks,
                                  uint32_t max) {
    const struct tfem_geometry *g = tfem_geometry(h);
    uint32_t n = 0;
    for (uint32_t s = 0; s < g->slot_count && n < max; s++) {
        uint64_t mark = tfem_t_published_mark(h, s);
        if (mark == seen[s]) continue;
        slots[n] = s;
        marks[n++] = mark;
    }
    return n;
}

uint32_t tfem_t_oldest_waiting(struct tfem_header *h, const char *prefix, uint32_t len, uint32_t *slots,
                               uint32_t max) {
    const struct tfem_geometry *g = tfem_geometry(h);
    if (max > TFEM_OLDEST_MAX) max = TFEM_OLDEST_MAX; /* the creation times live on the stack */
    uint64_t created[TFEM_OLDEST_MAX];
    uint32_t n = 0;
    for (uint32_t s = 0; s < g->slot_count && max; s++) {
        struct tfem_slot *slot = slot_at(g, s);
        if (state_of(__atomic_load_n(&slot->state, SC)) != TFEM_STATE_WAIT || slot->flags & TFEM_SLOT_DOOMED) continue;
        if (slot->name_len < len || memcmp(slot->name, prefix, len) != 0) continue;
        uint64_t when = slot->created_ns;
        if (n == max && when >= created[n - 1]) continue;
        uint32_t i = n < max ? n++ : n - 1; /* insertion into the sorted few, the youngest falling off */
        for (; i > 0 && created[i - 1] > when; i--) {
            created[i] = created[i - 1];
            slots[i] = slots[i - 1];
        }
        created[i] = when;
        slots[i] = s;
    }
    return n;
}

uint32_t tfem_t_spilled_ids(struct tfem_header *h, uint64_t *ids, uint32_t max) {
    const struct tfem_geometry *g = tfem_geometry(h);
    uint32_t n = 0;
    for (uint32_t s = 0; s < g->slot_count && n < max; s++) {
        struct tfem_slot *slot = slot_at(g, s);
        if (!(slot->flags & TFEM_SLOT_SPILLED)) continue;
        if (state_of(__atomic_load_n(&slot->state, SC)) == TFEM_STATE_INVALID) continue;
        ids[n++] = slot->file_id;
    }
    return n;
}

uint32_t tfem_name_hash(const char *name, uint32_t len) {
    static uint32_t table[256];
    static int ready;
    if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) { /* racing initialisers write the same values */
        for (uint32_t n = 0; n < 256; n++) {
            uint32_t c = n;
            for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0xEDB88320u : c >> 1;
            __atomic_store_n(&table[n], c, __ATOMIC_RELAXED);
        }
        __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
    }
    uint32_t crc = ~0u;
    for (uint32_t i = 0; i < len; i++) crc = (crc >> 8) ^ table[(crc ^ (unsigned char)name[i]) & 0xFF];
    return ~crc;
}

/* ---- growing a file held for writing: no lock, the holder owns its extents ---- */

static uint64_t inline_bytes(const struct tfem_geometry *g, struct tfem_slot *slot) {
    return slot->flags & TFEM_SLOT_ARENA ? 0 : g->buf_size;
}

uint64_t tfem_t_capacity(struct tfem_header *h, uint32_t s) {
    const struct tfem_geometry *g = tfem_geometry(h);
    struct tfem_slot *slot = slot_at(g, s);
    uint64_t blocks = 0;
    for (uint32_t i = 0; i < slot->extent_count && i < TFEM_MAX_EXTENTS; i++) blocks += slot->extents[i].count;
    return inline_bytes(g, slot) + blocks * g->block_size;
}

/* ---- claiming blocks: two steps, and a killed claimer ----
 *
 * A claim sets bits in the bitmap, then records them in the slot's extents.
 * A holder killed between the two leaves blocks in use that no slot
 * records. slot->claims is bumped before the bits are set and after they
 * are recorded (odd: a claim under way); only the claimer writes it, with
 * the slot held for writing (its holder, or the broker while the holder
 * waits for its ALLOC reply). The sweep (tfem_t_reclaim_blocks) frees
 * blocks nobody records only if no claim moved while it looked and every
 * claim still under way belongs to a dead holder: see there why that is
 * safe. Cost: two stores per extent claimed, none per write. */

static void end_claim(struct tfem_slot *slot) { __atomic_store_n(&slot->claims, slot->claims + 1, SC); }

uint32_t tfem_t_claim_blocks(struct tfem_header *h, uint32_t s, uint32_t want, uint32_t *start) {
    const struct tfem_geometry *g = tfem_geometry(h);
    struct tfem_slot *slot = slot_at(g, s);
    __atomic_store_n(&slot->claims, slot->claims + 1, SC); /* before the bits: the sweep sees it first */
    uint32_t got = tfem_blocks_claim(bitmap_of(g), g->block_count, want, start);
    if (got == 0) end_claim(slot);
    return got;
}

/* Record a claimed run as the slot's next extent, and end the claim. */
static void record_extent(struct tfem_slot *slot, uint32_t start, uint32_t count) {
    slot->extents[slot->extent_count].start = start;
    slot->extents[slot->extent_count].count = count;
    __atomic_store_n(&slot->extent_count, slot->extent_count + 1, SC);
    end_claim(slot);
}

/* Why freeing is safe. The whole table lock is held while the claims are
 * read (1), the bitmap copied (2), the extents of every live slot taken
 * out of the copy (3), and the claims read again (4): no slot is freed
 * meanwhile (free_slot runs under a stripe lock), so no recorded block is
 * released and claimed anew in between. A block set in (2) and recorded
 * nowhere in (3) was claimed by someone whose claim began before (2) and
 * had not ended by (3): if it ended before (4), or began after (1), the
 * count moved between (1) and (4), and nothing is freed. Otherwise it is
 * odd in both, its slot's holder is asked about after the lock is
 * released, and nothing is freed if it is alive (even stopped: SIGSTOP
 * must not lose it its blocks). A block whose claimer is dead can never
 * be recorded, nor cleared by anyone else, and no claim can take a set
 * bit: freeing it after the lock is released is safe. */
int64_t tfem_t_reclaim_blocks(struct tfem_header *h, uint32_t pid, uint64_t *unowned, uint32_t *claims) {
    const struct tfem_geometry *g = tfem_geometry(h);
    uint32_t words = (g->block_count + 63) / 64;
    uint64_t *bm = bitmap_of(g);
    if (tfem_t_lock(h, pid)) return -EBUSY;
    for (uint32_t s = 0; s < g->slot_count; s++) claims[s] = __atomic_load_n(&slot_at(g, s)->claims, SC);
    for (uint32_t w = 0; w < words; w++) unowned[w] = __atomic_load_n(&bm[w], SC);
    for (uint32_t s = 0; s < g->slot_count; s++) {
        struct tfem_slot *slot = slot_at(g, s);
        if (state_of(__atomic_load_n(&slot->state, SC)) == TFEM_STATE_INVALID) continue;
        uint32_t n = __atomic_load_n(&slot->extent_count, SC);
        for (uint32_t i = 0; i < n && i < TFEM_MAX_EXTENTS; i++) {
            uint64_t start = slot->extents[i].start, end = start + slot->extents[i].count;
            for (uint64_t b = start; b < end && b < g->block_count; b++) unowned[b / 64] &= ~(1ULL << (b % 64));
        }
    }
    int moved = 0;
    for (uint32_t s = 0; s < g->slot_count; s++) { /* then: the holder of each claim still under way */
        struct tfem_slot *slot = slot_at(g, s);
        uint32_t now = __atomic_load_n(&slot->claims, SC);
        moved |= now != claims[s];
        claims[s] = now & 1 ? holder_of(__atomic_load_n(&slot->state, SC)) : 0;
    }
    tfem_t_unlock(h);
    if (moved) return -EAGAIN;
    for (uint32_t s = 0; s < g->slot_count; s++)
        if (claims[s] && tfem_pid_alive((int32_t)claims[s])) return -EAGAIN;
    int64_t freed = 0;
    for (uint32_t w = 0; w < words; w++) {
        if (!unowned[w]) continue;
        __atomic_fetch_and(&bm[w], ~unowned[w], SC);
        freed += __builtin_popcountll(unowned[w]);
    }
    if (freed) publish_space(h);
    return freed;
}

/* Give a new, empty file held for writing one contiguous extent of `size`
 * bytes, its bytes starting there (TFEM_SLOT_ARENA), for views over the
 * whole file. ENOSPC when no run of free blocks is that long (the broker
 * can make room). `flags` may add TFEM_SLOT_UNCHECKED. */
int tfem_t_reserve(struct tfem_header *h, uint32_t s, uint32_t generation, uint32_t pid, uint64_t size,
                   uint32_t flags) {
    const struct tfem_geometry *g = tfem_geometry(h);
    if (s >= g->slot_count || flags & ~TFEM_SLOT_UNCHECKED) return EINVAL;
    struct tfem_slot *slot = slot_at(g, s);
    if (!held_by(slot, generation, pid, TFEM_STATE_WRITE) || slot->extent_count || slot->size) return ESTALE;
    uint64_t want = (size + g->block_size - 1) / g->block_size;
    if (want > g->block_count) return ENOSPC;
    uint32_t start = 0, got = want ? tfem_t_claim_blocks(h, s, (uint32_t)want, &start) : 0;
    uint32_t stripe = stripe_of(slot->name_hash);
    int rc = got < want ? ENOSPC : lock_stripe(h, stripe, pid) ? EBUSY : 0;
    if (rc) {
        if (got) {
            tfem_blocks_release(bitmap_of(g), start, got);
            end_claim(slot);
        }
        return rc;
    }
    if (got) record_extent(slot, start, got);
    slot->flags |= (uint16_t)(TFEM_SLOT_ARENA | flags); /* under the lock: unlink sets flags too */
    unlock_stripe(h, stripe);
    return 0;
}

/* Add extents from the arena until the file holds `capacity` bytes. Each
 * extent is at least as large as what the file has, so a file of n bytes
 * has O(log n) extents. ENOSPC when the arena has no room (the broker
 * can make some, by spilling), E2BIG at the extent limit. */
static int grow(struct tfem_header *h, uint32_t s, uint32_t generation, uint32_t pid, int state, uint64_t capacity) {
    const struct tfem_geometry *g = tfem_geometry(h);
    if (s >= g->slot_count) return ESTALE;
    struct tfem_slot *slot = slot_at(g, s);
    if (!held_by(slot, generation, pid, state)) return ESTALE;
    uint64_t have = tfem_t_capacity(h, s);
    while (have < capacity) {
        if (slot->extent_count >= TFEM_MAX_EXTENTS) return E2BIG;
        uint64_t needed = (capacity - have + g->block_size - 1) / g->block_size;
        uint64_t want = (have - inline_bytes(g, slot)) / g->block_size;
        if (want < needed) want = needed;
        if (want > g->block_count) want = g->block_count;
        uint32_t start = 0;
        uint32_t got = tfem_t_claim_blocks(h, s, (uint32_t)(want ? want : 1), &start);
        if (got == 0) return ENOSPC;
        record_extent(slot, start, got);
        have += (uint64_t)got * g->block_size;
    }
    return 0;
}

int tfem_t_grow(struct tfem_header *h, uint32_t s, uint32_t generation, uint32_t pid, uint64_t capacity) {
    return grow(h, s, generation, pid, TFEM_STATE_WRITE, capacity);
}

int tfem_t_grow_read(struct tfem_header *h, uint32_t s, uint32_t generation, uint32_t pid, uint64_t capacity) {
    return grow(h, s, generation, pid, TFEM_STATE_READ, capacity);
}

/* ---- for callers that hold the lock themselves (the broker's rarer paths) ---- */

int tfem_t_transition_locked(struct tfem_header *h, uint32_t s, int event, int64_t generation,
                             uint32_t holder) {
    const struct tfem_geometry *g = tfem_geometry(h);
    if (s >= g->slot_count || event < 0 || event >= TFEM_EVENT_COUNT) return ESTALE;
    return transition(slot_at(g, s), event, generation, holder);
}

int tfem_t_free_locked(struct tfem_header *h, uint32_t s, int event, uint32_t generation,
                       struct tfem_claim *out) {
    const struct tfem_geometry *g = tfem_geometry(h);
    memset(out, 0, sizeof *out);
    if (s >= g->slot_count || event < 0 || event >= TFEM_EVENT_COUNT) return ESTALE;
    return free_slot(g, s, event, generation, out);
}

uint32_t tfem_t_settle_holds_locked(struct tfem_header *h, uint32_t pid, uint32_t *freed) {
    const struct tfem_geometry *g = tfem_geometry(h);
    uint32_t n = 0;
    *freed = 0;
    for (uint32_t i = 0; i < g->hold_count; i++) {
        struct tfem_hold *e = tfem_hold_at(g, i);
        if (!pid || __atomic_load_n(&e->pid, SC) != pid) continue;
        struct tfem_claim out = {0};
        if (holds(g, i, pid, e->slot, e->generation)) {
            if (drop_hold(g, i, 0, &out) == 0 && out.for_write == -1) ++*freed;
        } else {
            free_hold(e); /* of no SHARED file (died between claiming it and the file changing) */
        }
        n++;
    }
    return n;
}

uint32_t tfem_t_check_holds_locked(struct tfem_header *h) {
    const struct tfem_geometry *g = tfem_geometry(h);
    uint32_t changed = 0;
    for (uint32_t i = 0; i < g->hold_count; i++) {
        struct tfem_hold *e = tfem_hold_at(g, i);
        if (!e->pid) continue;
        if (!holds(g, i, e->pid, e->slot, e->generation) || !e->counted) {
            free_hold(e);
            changed++;
        }
    }
    for (uint32_t s = 0; s < g->slot_count; s++) {
        struct tfem_slot *slot = slot_at(g, s);
        uint64_t word = __atomic_load_n(&slot->state, SC);
        if (state_of(word) != TFEM_STATE_SHARED) continue;
        uint32_t count = 0;
        for (uint32_t i = 0; i < g->hold_count; i++) {
            struct tfem_hold *e = tfem_hold_at(g, i);
            count += e->pid && e->slot == s && e->generation == generation_of(word);
        }
        struct tfem_life *life = tfem_life_at(g, s);
        if (count == life->holders && count) continue;
        life->holders = count;
        changed++;
        if (count) continue;
        /* Nobody holds it: WAIT again, or INVALID (unlinked, or no readers
         * to come), which adoption then empties like any free slot. */
        int event = slot->flags & TFEM_SLOT_DOOMED ? TFEM_EVENT_UNLINK : shared_close_event(slot, life);
        transition(slot, event, generation_of(word), 0);
    }
    return changed;
}
