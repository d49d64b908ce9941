/*
 * tfem.h: the C API of tfem, temporary files handed between processes
 * through memory.
 *
 * POSIX-style: every call returns -1 and sets errno on failure.
 *
 *   int fd = tfem_open("run1/part0", TFEM_WRONLY);
 *   tfem_write(fd, buf, n);
 *   tfem_close(fd);                      publishes the file (WRITE -> WAIT)
 *
 *   int fd = tfem_open("run1/part0", TFEM_RDONLY);    waits for the producer
 *   ssize_t got = tfem_read(fd, buf, n);
 *   tfem_close(fd);                      consumes the file (READ -> freed)
 *
 * A producer may give its file more than one reader, TFEM_WRONLY |
 * TFEM_READERS(4) (freed after the fourth reader closes it; readers may
 * hold it at once), or keep it, TFEM_WRONLY | TFEM_KEEP (freed by
 * tfem_unlink, its time limit, or the instance's stop); tfem_set_ttl(fd,
 * seconds) sets that time limit on any file being written.
 *
 * The instance is found as in Python: TFEM_KEYFILE (else the per-user
 * default key file) names the registry, whose key file names the shared
 * segment; the library maps it and works on it in plain C. Only a broker
 * endpoint in TFEM_BROKER, without a key file, asks the broker instead.
 * Calls on files in memory never start an interpreter; the few that need
 * the broker's protocol (a full arena, a spilled file) start the embedded
 * Python runtime on first use.
 *
 * Across nodes: when the instance's broker has peers on other nodes, a
 * TFEM_RDONLY open of a name this node does not have asks the broker to
 * pull it from the node that has it (through the embedded runtime, so the
 * first such open pays the runtime's start) and takes the copy here; an
 * open of a file already on this node is plain C, as without peers. The
 * open waits as a local one does: up to tfem_open_timeout's timeout for a
 * name published later on any node; TFEM_NONBLOCK waits for no producer,
 * only for the copy of a name published somewhere, and gives ENOENT when
 * no node has it published (one being read elsewhere counts as none).
 *
 * Build with:  gcc prog.c $(tfem config --cflags --libs)
 *
 * errno values: ENOENT no such name (TFEM_NONBLOCK: on any node; stat,
 * unlink: on this node); EEXIST name already held (TFEM_WRONLY); EAGAIN not ready (TFEM_NONBLOCK);
 * ETIMEDOUT tfem_open_timeout expired; EBADF bad descriptor, or read on a
 * write descriptor and the reverse; EINVAL bad flags, whence or offset;
 * ENAMETOOLONG name over TFEM_NAME_MAX bytes; ENOSPC slot table, memory or
 * spill store (or the disk under it) full; EFBIG tfem_write past the
 * per-file limit (the broker's --max-file-size; by default all the
 * instance holds), refused whole and at once, the file left as it was; ECONNREFUSED no registry or broker,
 * or, for a reader waiting for a name from another node, that node or the
 * name's home died; EFAULT NULL
 * pointer; EBADMSG the file's bytes do not match its checksum (tfem_read;
 * closing gives the file back); ENOSYS a call that needs the broker's
 * protocol, and the embedded Python could not start (see stderr).
 *
 * Descriptors are tfem's own, not the operating system's. In a forked
 * child, descriptors opened by the parent are the parent's (EBADF).
 */
#ifndef TFEM_H
#define TFEM_H

#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TFEM_NAME_MAX 255

/* tfem_open flags */
#define TFEM_RDONLY 0   /* take the file once its producer has closed it */
#define TFEM_WRONLY 1   /* create the name; EEXIST if it is held */
#define TFEM_AUTO 2     /* the paper's open: read if it exists, else create */
#define TFEM_NONBLOCK 04000 /* do not wait: ENOENT or EAGAIN (a file the broker holds a moment is
                               waited for up to 5 s, or tfem_open_timeout's timeout if shorter; a
                               writer waits for no slot, its writes up to the timeout for room) */
#define TFEM_KEEP 010000    /* with TFEM_WRONLY: kept for any number of readers until unlinked */
#define TFEM_READERS_MAX 0x7fff
#define TFEM_READERS(n) (((n) & TFEM_READERS_MAX) << 16) /* with TFEM_WRONLY: freed after n readers */

/* File states, as in the paper. */
#define TFEM_STATE_INVALID 0
#define TFEM_STATE_WRITE 1 /* being written by its producer */
#define TFEM_STATE_WAIT 2  /* closed by its producer, waiting for a consumer */
#define TFEM_STATE_READ 3  /* being read by a consumer */
#define TFEM_STATE_SHARED 4 /* being read by readers of a kept or several-reader file */

struct tfem_stat {
    uint64_t size;    /* bytes */
    int state;        /* TFEM_STATE_* */
    int spilled;      /* 1 if part of it lives in the spill store */
    double created;   /* seconds since the epoch */
    int readers;      /* its lifetime: 1 consume-once, n readers, 0 kept */
    int readers_left; /* reads still to come (readers > 1) */
    int holders;      /* readers holding it now */
    double expires;   /* when its time limit frees it, seconds since the epoch; 0: none */
};

int tfem_open(const char *name, int flags);
int tfem_open_timeout(const char *name, int flags, double timeout_seconds);
ssize_t tfem_write(int fd, const void *buf, size_t count);
ssize_t tfem_read(int fd, void *buf, size_t count);
off_t tfem_lseek(int fd, off_t offset, int whence); /* SEEK_SET, SEEK_CUR, SEEK_END */
int tfem_stat(const char *name, struct tfem_stat *st);
int tfem_fstat(int fd, struct tfem_stat *st);
int tfem_close(int fd);
int tfem_unlink(const char *name);
int tfem_set_ttl(int fd, double seconds); /* a file being written: freed that long after now */

#ifdef __cplusplus
}
#endif

#endif
