/*
 * tfem_segment.h: the layout of a tfem shared-memory segment.
 *
 * This header is the one definition of the segment. The broker creates the
 * segment; every client on the node maps it and changes slot states itself
 * with atomic operations. Python reads these structures through cffi, C
 * callers include this file; nobody restates the layout by hand.
 *
 *   [ header | slot table | name index | free-slot stack | hold table | lives | block bitmap | arena ]
 *
 * - A slot is the paper's temp-file object: a state word, the file's size,
 *   name and times, a list of arena extents, and an inline buffer of
 *   buf_size bytes that holds the first bytes of the file.
 * - The name index (the paper's map1) is an open-addressing table of slot
 *   numbers keyed by a crc32 of the name; the name kept in each slot is map2.
 *   It is cut into TFEM_WAKE_BUCKETS stripes by that crc32, each with a lock
 *   of its own (a pid; a dead holder's lock is taken over): a name's claims,
 *   look-ups and state changes take its stripe's lock only, so pairs of
 *   processes on different names do not wait for each other.
 * - The free-slot stack is a linked stack without a lock: free_stack[s] is
 *   the next free slot + 1 (0 ends it), free_head the top, tagged against
 *   ABA, changed by compare-and-swap.
 * - A slot's lifetime: `readers` opens of it (1: consume-once, the
 *   default), or kept (0) until unlinked or its `expires_ns`. A file with
 *   more than one reader is SHARED while read: `holders` readers hold it,
 *   `readers_left` opens are still to come. All but `readers` live in the
 *   slot's entry of the lives array (struct tfem_life), not in the slot:
 *   a slot record of 448 bytes plus an 8 KiB inline buffer fills whole
 *   cache lines, and 16 bytes more would pad every slot by 64. Each shared read is an entry of
 *   the hold table (pid, slot, generation), claimed by compare-and-swap on
 *   its pid and changed under the name's stripe lock: the broker finds a
 *   dead reader's holds there, as it finds a dead holder's pid in a word.
 *   `counted` is set once the slot's counts include the entry, so a reader
 *   killed inside its open is settled by what it had done.
 * - The block bitmap has a set bit per arena block in use. Writers claim
 *   runs themselves by compare-and-swap; the last holder of a file clears
 *   them. A slot's `claims` count is odd while blocks are claimed for it
 *   but not yet recorded in its extents: the broker's sweep frees blocks no
 *   slot records only when it saw no claim under way (tfem_t_reclaim_blocks).
 * - Consumers waiting for a name sleep on the wake sequence of the name's
 *   bucket; every transition into WAIT bumps it and wakes the sleepers.
 *   Producers waiting for room sleep on space_seq, bumped whenever a slot
 *   or arena blocks are freed.
 * - instance_id is drawn at creation: a client that reconnects to a broker
 *   learns from it whether the segment it maps is still the live one. A
 *   segment made again after its name was removed keeps the instance_id
 *   and file ids of the one it replaces, whose files the broker moves in.
 * - max_file_size bounds every file: a write past it is EFBIG, refused by
 *   the writer's own core before a byte moves (a hole at 1 TiB costs
 *   nothing). The broker sets it at creation (--max-file-size; by default
 *   all the instance can hold).
 * - The counters after next_file_id are bumped by every process with
 *   atomic adds; they are statistics, read without a lock.
 * - `cluster` is the broker's, set before it serves (and kept by a segment
 *   made again): C readers learn from it, without asking, that a name
 *   missing here may be on another node. Last, so the fields before it
 *   stay where they were.
 *
 * Everything here is 8-byte aligned and fixed-width, so the layout is the
 * same in every process that maps the segment.
 */
#ifndef TFEM_SEGMENT_H
#define TFEM_SEGMENT_H

#include <stdint.h>

#define TFEM_SEGMENT_MAGIC 0x314d454654ULL /* "TFEM1", little-endian */
#define TFEM_LAYOUT_VERSION 11
#define TFEM_NAME_MAX 255
#define TFEM_MAX_EXTENTS 16
#define TFEM_WAKE_BUCKETS 64
#define TFEM_INDEX_EMPTY 0u

/* The state word of a slot holds the state, a generation bumped each time
 * the slot is claimed (so a stale compare-and-swap fails) and the pid of
 * the process holding the file (0 when none). Its layout and the state
 * numbers are states.py's, generated into tfem_states.h. */

/* Slot flags. */
#define TFEM_SLOT_SPILLED 1u /* bytes past the inline buffer are in the spill store */
#define TFEM_SLOT_DOOMED 2u  /* unlinked while held: the holder frees it at close */
#define TFEM_SLOT_ARENA 4u   /* made whole (zero copy): its bytes start at its first extent, the
                                inline buffer is unused, and it stays in memory (never spilled) */
#define TFEM_SLOT_UNCHECKED 8u /* its producer chose no checksum (zero copy): none is compared */

/* One shared read (see above); a free entry has pid 0. */
struct tfem_hold {
    uint32_t pid;
    uint32_t slot;
    uint32_t generation;
    uint32_t counted; /* 1 once the slot's holders and readers_left include this read; 2: a keeper's
                         hold, in holders only (tfem_t_keep_shared) */
};

/* A slot's lifetime counts (see above), one per slot, changed under the
 * name's stripe lock. */
struct tfem_life {
    uint64_t expires_ns;   /* CLOCK_REALTIME when the broker frees it; 0: never */
    uint32_t readers_left; /* opens still to come (readers > 1) */
    uint32_t holders;      /* readers holding it now (SHARED) */
};

/* Hold-table entries per slot: shared reads open at once, on average. */
#define TFEM_HOLDS_PER_SLOT 2

struct tfem_extent {
    uint32_t start; /* first arena block */
    uint32_t count; /* number of blocks */
};

/* The names whose crc32 % TFEM_WAKE_BUCKETS is i: their lock and waiters,
 * a cache line each (their part of the name index is index_size /
 * TFEM_WAKE_BUCKETS entries from i times that). */
struct tfem_stripe {
    uint32_t lock; /* pid of the holder, 0 when free */
    uint32_t waiters;
    uint32_t unused[14];
};

struct tfem_header {
    uint64_t magic;
    uint64_t instance_id;
    uint32_t layout_version;
    uint32_t header_size;
    uint64_t segment_size;
    uint32_t slot_count;
    uint32_t slot_size;   /* bytes per slot, inline buffer included */
    uint32_t buf_size;    /* inline bytes per slot */
    uint32_t index_size;  /* entries in the name index, a power of two */
    uint32_t block_size;  /* bytes per arena block */
    uint32_t block_count;
    uint64_t slots_offset;
    uint64_t index_offset;
    uint64_t free_stack_offset;
    uint64_t holds_offset;  /* TFEM_HOLDS_PER_SLOT * slot_count entries */
    uint64_t lives_offset;  /* slot_count entries */
    uint64_t bitmap_offset;
    uint64_t arena_offset;
    uint64_t max_file_size; /* bytes a file may reach */
    int32_t broker_pid;
    uint32_t free_top;      /* slots on the free-slot stack: a count, for statistics and checks */
    uint64_t free_head;     /* the free-slot stack: (tag << 32) | (top slot + 1), 0 below when empty */
    uint64_t next_file_id;  /* atomic counters */
    uint64_t opened_write;
    uint64_t opened_read;
    uint64_t closed_write;
    uint64_t closed_read;
    /* Counted off the fast path only, where a wait or a refusal happens
     * anyway (for `tfem status --prometheus`): */
    uint64_t read_waits;      /* opens for read that waited for their file */
    uint64_t room_waits;      /* opens for write that waited for a free slot */
    uint64_t timeouts;        /* of those, the waits that ran out */
    uint64_t refused_full;    /* opens for write refused: no slot free (ENOSPC) */
    uint64_t refused_large;   /* writes past max_file_size (EFBIG) */
    uint64_t checksum_errors; /* files a reader found damaged (EBADMSG) */
    uint32_t space_seq;     /* bumped when slots or blocks are freed */
    uint32_t space_waiters;
    uint32_t moved;         /* set when the broker made a new segment because this one's name was
                               removed: opens fail with EIDRM, and the caller maps the new one */
    uint32_t wake_seq[TFEM_WAKE_BUCKETS];
    uint32_t wake_waiters[TFEM_WAKE_BUCKETS];
    struct tfem_stripe stripes[TFEM_WAKE_BUCKETS];
    uint32_t cluster;       /* 1 while the broker has a peer link (--cluster, --peers): a reader whose
                               name is not on this node asks the broker to pull it (WANT) */
};

struct tfem_slot {
    uint64_t state;       /* the state word, changed only by compare-and-swap */
    uint64_t size;        /* bytes written; set by the producer */
    uint64_t file_id;     /* unique per claim; keys the spill store */
    uint64_t created_ns;  /* CLOCK_REALTIME at open for write */
    uint64_t waiting_ns;  /* when it last entered WAIT: least recent spills first */
    uint32_t name_hash;   /* crc32 of the name */
    uint16_t name_len;
    uint16_t flags;
    uint32_t checksum;    /* crc32c of the whole file, taken at the producer's close */
    uint32_t extent_count;
    uint32_t claims;      /* odd while blocks are claimed and not yet recorded; bumped by the claimer only */
    uint32_t readers;     /* its lifetime: opens it was written for; 0: kept until unlinked or expired */
    struct tfem_extent extents[TFEM_MAX_EXTENTS];
    char name[TFEM_NAME_MAX + 1];
    /* buf_size inline bytes follow; slot_size rounds the whole up to 64 */
};

#endif
