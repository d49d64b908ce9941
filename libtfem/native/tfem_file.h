/*
 * tfem_file.h: the native client core. The whole life of a file on the
 * memory path, one call per operation, for any process that maps the
 * segment: Python's TfemFile and the C API (libtfem.so) are thin layers
 * over these calls.
 *
 * Calls return 0 (or a byte count) or an errno value (negative for the
 * calls that return counts). Create and open return EIDRM once the segment
 * was replaced (its `moved` flag): the caller maps the new one and asks again. What only the broker can do (spill) is left to
 * the caller: a transfer that stops short says why in `need`.
 */
#ifndef TFEM_FILE_H
#define TFEM_FILE_H

#include <stdint.h>

#include "tfem_geometry.h"
#include "tfem_segment.h"
#include "tfem_table.h"

/* How a wait spends its first microseconds (see tfem_file.c). */
#define TFEM_WAIT_ADAPTIVE 0 /* spin while CPUs are idle and recent waits were short, else sleep */
#define TFEM_WAIT_SPIN 1     /* always spin (yielding) before sleeping */
#define TFEM_WAIT_SLEEP 2    /* sleep on the futex at once */

/* Why a transfer stopped short. */
#define TFEM_NEED_NOTHING 0
#define TFEM_NEED_ROOM 1  /* the arena is full, or the file at its extent limit: the broker
                             must make room for `want` bytes (ALLOC) */
#define TFEM_NEED_SPILL 2 /* the bytes at `pos` live in the spill store */

/* tfem_f_open modes */
#define TFEM_OPEN_READ 0
#define TFEM_OPEN_AUTO 2 /* read the name if it exists, else create it */

struct tfem_file {
    struct tfem_header *h;
    const struct tfem_geometry *g; /* where things are in it, as checked at attach */
    struct tfem_slot *slot;
    uint64_t file_id;
    uint64_t pos;        /* the file position */
    uint64_t size;       /* bytes in the file */
    uint64_t memory_end; /* bytes [0, memory_end) live in the segment */
    uint64_t inline_size; /* bytes [0, inline_size) are in the slot's inline buffer */
    uint64_t want;       /* TFEM_NEED_ROOM: the capacity asked for */
    uint64_t crc_end;    /* bytes [0, crc_end) are covered by crc */
    uint64_t max_size;   /* the segment's max_file_size: a write past it is EFBIG */
    uint32_t crc;
    uint32_t index;      /* slot number */
    uint32_t generation;
    uint32_t pid;        /* the holder recorded in the state word */
    uint32_t hash;       /* crc32 of the name */
    uint32_t hold;       /* a shared read: its hold-table entry + 1; 0 otherwise */
    int32_t writing;
    int32_t spilled;
    int32_t checked;     /* a reader compared the checksum: it matched */
    int32_t damaged;     /* ... it did not: reads fail, close gives the file back */
    int32_t need;        /* TFEM_NEED_* after a short transfer */
    int32_t held;        /* 1 from open to close */
};

int tfem_f_create(struct tfem_header *h, const char *name, uint32_t len, uint32_t pid,
                  int64_t room_timeout_ns, struct tfem_file *f);
int tfem_f_open(struct tfem_header *h, const char *name, uint32_t len, uint32_t pid, int mode,
                int wait, int64_t timeout_ns, struct tfem_file *f, int32_t *state_found);
int tfem_f_reload(struct tfem_file *f);

int64_t tfem_f_pwrite(struct tfem_file *f, const void *buf, uint64_t n, uint64_t pos);
int64_t tfem_f_write(struct tfem_file *f, const void *buf, uint64_t n);
int64_t tfem_f_pread(struct tfem_file *f, void *buf, uint64_t n, uint64_t pos);
int64_t tfem_f_read(struct tfem_file *f, void *buf, uint64_t n);
int64_t tfem_f_view(struct tfem_file *f, uint64_t pos, char **ptr);
int tfem_f_reserve(struct tfem_file *f, uint64_t size, int checked);
int64_t tfem_f_seek(struct tfem_file *f, int64_t offset, int whence);
int tfem_f_verify(struct tfem_file *f);
/* A spilled file (tfem_f_verify says EXDEV): the verdict on the whole
 * file's crc32c, which the caller took with the spill store's part. */
int tfem_f_spilled_verdict(struct tfem_file *f, uint32_t crc);
/* After the caller copied n spilled bytes at pos into buf. */
int tfem_f_spilled_read(struct tfem_file *f, const void *buf, uint64_t n);
int tfem_f_fstat(struct tfem_file *f, struct tfem_fileinfo *out);

uint32_t tfem_f_memory_crc(struct tfem_file *f);
/* A writer chooses its file's lifetime before publishing it: `readers`
 * opens (1, the default: consume-once), or kept (0) until unlinked;
 * expires_ns (CLOCK_REALTIME, 0: never) is when the broker frees it. */
int tfem_f_set_lifetime(struct tfem_file *f, uint32_t readers, uint64_t expires_ns);
/* A keeper's hold of slot s (tfem_t_keep_shared), as a file held for reading. */
int tfem_f_keep(struct tfem_header *h, uint32_t slot, uint32_t generation, uint32_t pid, struct tfem_file *f);
/* A shared read's holder moves reads to or from its file's count
 * (tfem_t_add_reads). EBADF: not a shared read. */
int tfem_f_add_reads(struct tfem_file *f, int64_t delta, uint32_t *moved);
int tfem_f_close(struct tfem_file *f);
int tfem_f_publish(struct tfem_file *f, uint32_t checksum);
int tfem_f_abort(struct tfem_file *f);
int tfem_f_wait_space(struct tfem_header *h, uint32_t seen, int64_t timeout_ns);


void tfem_set_wait_mode(int mode, int64_t spin_ns);
void tfem_wait_counters(uint64_t *spun, uint64_t *slept);

#endif
