/*
 * tfem_table.h: operations on a segment's slot table and name index, for
 * any process that maps the segment (see tfem_table.c).
 *
 * Each returns 0 or an errno value: EEXIST (name held), ENOENT (no such
 * name), EAGAIN (name exists but is not in WAIT), ENOSPC (no free slot or
 * no free blocks), E2BIG (a file at its extent limit), ESTALE (the slot is
 * no longer held as the caller says), EBUSY (the table lock was held too
 * long), EPERM (the state machine forbids the transition), EMFILE (the
 * hold table is full: too many shared reads open at once).
 */
#ifndef TFEM_TABLE_H
#define TFEM_TABLE_H

#include <stdint.h>

#include "tfem_segment.h"

/* What stat and list report of a file. */
struct tfem_fileinfo {
    uint64_t size;
    uint64_t file_id;
    uint64_t created_ns;
    uint64_t expires_ns;  /* 0: no time limit */
    uint32_t slot;
    int32_t state;
    int32_t spilled;
    uint32_t name_len;
    uint32_t readers;      /* its lifetime: 1 consume-once, N readers, 0 kept */
    uint32_t readers_left; /* opens still to come (readers > 1) */
    uint32_t holders;      /* readers holding it now */
    char name[TFEM_NAME_MAX + 1];
};

struct tfem_claim {
    uint32_t slot;
    uint32_t generation;
    uint64_t file_id;
    int32_t for_write;    /* tfem_t_take: 1 if it created the name */
    int32_t state;        /* tfem_t_take: the state found when not WAIT */
    uint32_t hold;        /* tfem_t_take: a shared read's hold-table entry + 1, or 0 */
    uint64_t discard_id;  /* a file id whose spill records must go, or 0 */
};

int tfem_t_create(struct tfem_header *h, const char *name, uint32_t len, uint32_t hash,
                  uint32_t pid, uint64_t now_ns, struct tfem_claim *out);
int tfem_t_take(struct tfem_header *h, const char *name, uint32_t len, uint32_t hash,
                uint32_t holder, int create, uint64_t now_ns, struct tfem_claim *out);
int tfem_t_publish(struct tfem_header *h, uint32_t slot, uint32_t generation, uint32_t pid,
                   uint64_t size, uint32_t checksum, uint64_t now_ns, struct tfem_claim *out);
int tfem_t_abort(struct tfem_header *h, uint32_t slot, uint32_t generation, uint32_t pid,
                 struct tfem_claim *out);
int tfem_t_consume(struct tfem_header *h, uint32_t slot, uint32_t generation, uint32_t pid,
                   struct tfem_claim *out);
int tfem_t_release(struct tfem_header *h, uint32_t slot, uint32_t generation, uint32_t pid,
                   struct tfem_claim *out);
/* A shared read's reader lets go: closing it (give_back 0) or giving the
 * read back (1: abort). The last holder of a file with no readers to come,
 * or unlinked meanwhile, frees it (out->for_write = -1). */
int tfem_t_let_go_shared(struct tfem_header *h, uint32_t slot, uint32_t generation, uint32_t pid, uint32_t hold,
                         int give_back, struct tfem_claim *out);
/* The holder of a shared read (hold) of a file counted in reads (readers >
 * 1) moves reads to its count (delta > 0: at most up to its readers) or
 * from it (delta < 0: at most what is left); *moved says how many. For a
 * broker lending reads to another node's copy (broker/cluster.py). EINVAL:
 * not counted in reads, or more than its readers. */
int tfem_t_add_reads(struct tfem_header *h, uint32_t slot, uint32_t generation, uint32_t pid, uint32_t hold,
                     int64_t delta, uint32_t *moved);
/* A keeper's hold of a WAIT or SHARED file counted in reads, of that
 * generation: it holds the file (holders) without taking a read, so the
 * file stays between its readers even with none left to come; let go of,
 * or settled, it gives none back. For a broker keeping a copy pulled from
 * another node, published with no reads, that it then adds. */
int tfem_t_keep_shared(struct tfem_header *h, uint32_t slot, uint32_t generation, uint32_t pid,
                       struct tfem_claim *out);
int tfem_t_unlink(struct tfem_header *h, const char *name, uint32_t len, uint32_t hash,
                  uint32_t pid, struct tfem_claim *out);
int tfem_t_lookup(struct tfem_header *h, const char *name, uint32_t len, uint32_t hash,
                  uint32_t pid, struct tfem_claim *out);
int tfem_t_grow(struct tfem_header *h, uint32_t slot, uint32_t generation, uint32_t pid,
                uint64_t capacity);
/* The same for a file held as its reader: the broker bringing a spilled
 * file back into memory. */
int tfem_t_grow_read(struct tfem_header *h, uint32_t slot, uint32_t generation, uint32_t pid,
                     uint64_t capacity);
uint64_t tfem_t_capacity(struct tfem_header *h, uint32_t slot);
/* The first half of growing a file: mark its claim under way, then claim up
 * to `want` blocks (0: none free, and the claim is over). The caller
 * records them (or releases them) and ends the claim. Public for the test
 * that kills a process between the halves. */
uint32_t tfem_t_claim_blocks(struct tfem_header *h, uint32_t slot, uint32_t want, uint32_t *start);
/* The broker's sweep: free blocks in use that no slot records, claimed by
 * holders that died before recording them. Scratch: `unowned`, one word per
 * 64 blocks, and `claims`, one per slot. Returns the blocks freed, or
 * -EAGAIN when a live holder's claim was under way (try at the next sweep),
 * -EBUSY when the table lock could not be taken. */
int64_t tfem_t_reclaim_blocks(struct tfem_header *h, uint32_t pid, uint64_t *unowned, uint32_t *claims);
int tfem_t_reserve(struct tfem_header *h, uint32_t slot, uint32_t generation, uint32_t pid, uint64_t size,
                   uint32_t flags);
int tfem_t_stat(struct tfem_header *h, const char *name, uint32_t len, uint32_t hash, uint32_t pid,
                struct tfem_fileinfo *out);
int64_t tfem_t_list(struct tfem_header *h, uint32_t pid, uint32_t start, struct tfem_fileinfo *out,
                    uint32_t max);
void tfem_t_info(struct tfem_header *h, uint32_t slot, struct tfem_fileinfo *out);
/* The broker's looks over every slot, without the lock (what they find is
 * taken, or used, under it later). Each fills at most max entries and
 * returns how many it found. WAIT files not made whole for views, spilled
 * (spilled = 1: to bring back) or in arena blocks (0: to spill); their
 * slots, and when they entered WAIT. */
uint32_t tfem_t_waiting(struct tfem_header *h, int spilled, uint32_t *slots, uint64_t *since, uint32_t max);
/* Slots whose published file changed since the caller last looked: seen[s]
 * is the caller's mark for slot s (0: no published file; else
 * TFEM_PUBLISHED_MARK of the generation of a WAIT or SHARED file, not
 * doomed). Fills the slots that differ and their marks now. The broker's
 * way to learn of publications and unlinks without listing every file. */
#define TFEM_PUBLISHED_MARK(generation) ((1ull << 32) | (uint64_t)(generation))
uint32_t tfem_t_published_changes(struct tfem_header *h, const uint64_t *seen, uint32_t *slots, uint64_t *marks,
                                  uint32_t max);
/* The mark of slot s now: read again after its name, to know the name
 * belongs to the file that mark saw (a slot can be freed and reused
 * between the two reads). */
uint64_t tfem_t_published_mark(struct tfem_header *h, uint32_t slot);
/* open_next's candidates: the slots of the (at most max) oldest WAIT files
 * whose names start with the len bytes of prefix, oldest first, by their
 * creation. One pass, no lock: a caller opens each by name, rechecked. */
#define TFEM_OLDEST_MAX 64
uint32_t tfem_t_oldest_waiting(struct tfem_header *h, const char *prefix, uint32_t len, uint32_t *slots,
                               uint32_t max);
/* The file ids of spilled files a slot still holds (not INVALID). */
uint32_t tfem_t_spilled_ids(struct tfem_header *h, uint64_t *ids, uint32_t max);
/* Slots of files whose time limit has passed by now_ns (not yet unlinked),
 * and their generations. */
uint32_t tfem_t_expired(struct tfem_header *h, uint64_t now_ns, uint32_t *slots, uint32_t *generations, uint32_t max);
/* Unlink the file in slot s of that generation if its time is up by now_ns
 * (the broker, for a ttl): ESTALE if it is another file by now. */
int tfem_t_expire(struct tfem_header *h, uint32_t slot, uint32_t generation, uint32_t pid, uint64_t now_ns,
                  struct tfem_claim *out);
/* The pids of shared reads in the hold table (at most max of them, repeats
 * possible), for the broker's watch over clients. */
uint32_t tfem_t_hold_pids(struct tfem_header *h, uint32_t *pids, uint32_t max);
/* crc32 of a name (zlib's): keys the name index and the wake buckets. */
uint32_t tfem_name_hash(const char *name, uint32_t len);
int tfem_t_index_insert(struct tfem_header *h, uint32_t slot);
void tfem_t_push_free(struct tfem_header *h, uint32_t slot);
uint32_t tfem_t_lock_holder(struct tfem_header *h);
/* The caller holds the whole table (tfem_t_lock: every stripe, for the
 * broker's rarer paths). `event` numbers are the
 * order of states.Event; generation < 0 matches any. */
int tfem_t_transition_locked(struct tfem_header *h, uint32_t slot, int event, int64_t generation,
                             uint32_t holder);
int tfem_t_free_locked(struct tfem_header *h, uint32_t slot, int event, uint32_t generation,
                       struct tfem_claim *out);
/* Let go of the shared reads of a dead pid, giving back the reads it had
 * counted: the number let go of. *freed counts files freed (unlinked while
 * it read them); out names the last. */
uint32_t tfem_t_settle_holds_locked(struct tfem_header *h, uint32_t pid, uint32_t *freed);
/* Adoption, before it rebuilds the index and the free-slot stack: clear
 * hold entries of no SHARED file, count each SHARED file's holders again
 * from its entries, and turn a SHARED file nobody holds to WAIT, or to
 * INVALID (for adoption to empty) if it was unlinked or has no readers to
 * come. The number of slots or entries changed. */
uint32_t tfem_t_check_holds_locked(struct tfem_header *h);
int tfem_t_lock(struct tfem_header *h, uint32_t pid);
void tfem_t_unlock(struct tfem_header *h);

#endif
