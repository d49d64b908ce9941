"""The spill store: file bytes that do not fit in memory, in LMDB.

The broker alone writes it; clients read it themselves (tfem.spill_reader,
which also has the record reading used here). Records and their keys are
tfem.spill_format's. Transactions commit on a clean exit and abort on an
exception (py-lmdb's context managers), so a failed write leaves nothing
half-done; a full store is NoSpace to the caller, and what was stored stays.
A full disk under the store is a full store too: see `_write_failed`.

Theory of operation:
- A write puts its bytes as records straight from the caller's buffer (an
  arena extent, a request's frame): one copy, into LMDB's pages. Only the
  records a write overlaps are read back, to keep their parts outside it;
  sequential writes and evictions never overlap anything.
- Nobody asks for a freed file's records to go: `tidy` finds the records
  no slot owns (`owned`: one pass over the slots, in C) and deletes them in
  one transaction, every few tens of ms while the store holds files, and
  at once when a write finds the store full. So a consumer's close never
  waits for the broker, and a client that dies leaves nothing behind.
- A store that has emptied is made afresh (`renew`): LMDB never shrinks its
  data file, and a new one is a few pages. Readers notice by the inode.
- Durability is not the point of a temp-file cache, so LMDB runs with sync
  off: a crash of the machine loses spilled data, a crash of the broker not.
  No writemap: a write through a mapping onto a full disk is a SIGBUS, a
  write() is an error we can report.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pathlib
import struct
from typing import Callable, Iterable

import lmdb

from tfem import spill_format, spill_reader
from tfem.errors import NoSpace, TfemError
from tfem.spill_format import RECORD_MAX, Codec, Record

STORE_FILES = ("data.mdb", "lock.mdb")  # what LMDB makes in the store's directory
# Pages LMDB writes in a commit besides the values: branch pages, the free
# list, the meta page. Generous: a few per MiB of values are enough.
COMMIT_SLACK = 2 * RECORD_MAX
RENEW_AT = 4 << 20  # an empty store whose data file is larger is made afresh
MAX_READERS = 4096  # LMDB's reader table: every client process reading at once
LOCK_BYTES = MAX_READERS * 64 + 4096  # its lock file: 64 B per reader, and a header
FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid (64-bit off_t)
_REUSE_KEY = Record(2**64 - 1, 0, 0, Codec.NONE).key  # put and deleted in one commit, never stored
log = logging.getLogger("tfem.broker")


def delete_reserve(map_size: int) -> int:
    """Room kept past the limit on stored data. LMDB copies pages to delete
    as well as to write, and records the pages a delete frees (8 bytes per
    4 KiB page): with no room at all, a full store could not even discard
    records to make room (MDB_MAP_FULL), and would stay full for good."""
    return max(1 << 20, map_size // 64)


def default_limit(path: pathlib.Path) -> int:
    """Half of what the file system under `path` has free now: the store
    never promises room the disk does not have, and leaves the rest to
    everyone else on the node."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    vfs = os.statvfs(probe)
    return vfs.f_bavail * vfs.f_frsize // 2


class SpillStore:
    def __init__(self, path: pathlib.Path, limit: int, codec: Codec, owned: Callable[[], set[int]]) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        # The ids of spilled files some slot holds. Every record the broker
        # writes belongs to one, before its write returns (moves to the
        # store flag the slot in the same step), so any other is an orphan.
        self.owned = owned
        self.limit = limit  # pages of stored data, at most; writes past it are NoSpace
        self.map_size = limit + delete_reserve(limit)  # what readers map too
        self.codec = codec
        self.bytes_by_file: dict[int, int] = {}  # stored (maybe compressed) bytes
        self.raw_bytes = 0  # what the stored records hold, uncompressed
        self.written = 0  # raw bytes written since start, all told
        self.renewals = 0
        self._lock_fd = -1
        self._env: lmdb.Environment | None = self._open()
        with self.env.begin() as txn:
            for key, value in txn.cursor():
                record = spill_format.parse_key(key)
                self.bytes_by_file[record.file_id] = self.bytes_by_file.get(record.file_id, 0) + len(value)
                self.raw_bytes += record.length

    def _open(self) -> lmdb.Environment:
        self._reserve_lock_file()
        try:
            env = lmdb.open(str(self.path), map_size=self.map_size, sync=False, metasync=False, max_dbs=0,
                            mode=0o600, max_readers=MAX_READERS)
        except lmdb.DiskError as exc:  # ENOSPC: room for the lock file, none for the data file's first pages
            raise NoSpace(f"the spill store {self.path} has no room for its data file: {exc}") from None
        self._db = env.open_db()
        # Kept open as long as the environment, for `_open_elsewhere`:
        # closing any descriptor of a file drops every fcntl lock the process
        # holds on it (POSIX), LMDB's among them, and a reader opening the
        # store next would then take the lock file for its first opener and
        # reset it under the writer: commits lost.
        self._lock_fd = os.open(self.path / STORE_FILES[1], os.O_RDONLY | os.O_CLOEXEC)
        return env

    def bytes_of(self, file_ids: Iterable[int]) -> int:
        """Stored bytes of these files."""
        return sum(self.bytes_by_file.get(file_id, 0) for file_id in file_ids)

    def _reserve_lock_file(self) -> None:
        """Make LMDB's lock file with its disk blocks taken. LMDB sizes it
        with ftruncate and maps it; on a full tmpfs the first touch of a
        page that has no block is a SIGBUS, in the broker and in every
        reader. Taken now, a full disk is an error here instead."""
        fd = os.open(self.path / STORE_FILES[1], os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < LOCK_BYTES:
                os.posix_fallocate(fd, 0, LOCK_BYTES)
        except OSError as exc:
            raise NoSpace(f"the spill store {self.path} has no room for its lock file: {exc.strerror}") from None
        finally:
            os.close(fd)

    @property
    def file_bytes(self) -> int:
        """The size of the store's data file on disk."""
        try:
            return os.stat(self.path / STORE_FILES[0]).st_blocks * 512
        except FileNotFoundError:
            return 0

    def write(self, file_id: int, offset: int, data: memoryview) -> None:
        """Store `data` at `offset` (counted from the end of the inline buffer)."""
        self.write_pieces(file_id, [(offset, data)])

    def write_pieces(self, file_id: int, pieces: Iterable[tuple[int, memoryview]]) -> None:
        """Store each (offset, bytes) of `pieces`, all or none. A full store
        first lets go of the records of freed files, then is NoSpace."""
        pieces = list(pieces)
        try:
            self._write(file_id, pieces)
        except NoSpace:
            if not self.tidy():
                raise
            self.renew()  # all of the disk's room back, if that emptied it
            self._write(file_id, pieces)

    def _write(self, file_id: int, pieces: list[tuple[int, memoryview]]) -> None:
        added = raw_added = 0
        try:
            with self.env.begin(write=True, buffers=True) as txn:
                for offset, data in pieces:
                    removed, raw_removed = self._cut(txn, file_id, offset, offset + len(data))
                    added -= removed
                    raw_added -= raw_removed
                    for at in range(0, len(data), RECORD_MAX):
                        part = data[at: at + RECORD_MAX]
                        codec, value = spill_format.encode(self.codec, part)
                        txn.put(Record(file_id, offset + at, len(part), codec).key, value)
                        added += len(value)
                        raw_added += len(part)
                st = txn.stat(self._db)
                if (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"] > self.limit:
                    raise NoSpace(f"the spill store {self.path} is full ({self.limit >> 20} MiB)")  # aborts
        except lmdb.MapFullError:
            raise NoSpace(f"the spill store {self.path} is full") from None
        except lmdb.Error as exc:
            raise self._write_failed(exc, sum(len(data) for _, data in pieces)) from None
        self.bytes_by_file[file_id] = self.bytes_by_file.get(file_id, 0) + added
        self.raw_bytes += raw_added
        self.written += sum(len(data) for _, data in pieces)

    def _cut(self, txn: lmdb.Transaction, file_id: int, start: int, end: int) -> tuple[int, int]:
        """Make room for a write of [start, end): delete the records it
        overlaps, keeping their parts outside it as records of their own.
        The stored and raw bytes deleted, net of those kept."""
        overlapped = [(record, bytes(spill_format.decode(record, value)), len(value))
                      for record, value in spill_reader.records(txn, file_id, start, end)]
        stored = raw = 0
        for record, data, size in overlapped:
            txn.delete(record.key)
            stored += size
            raw += record.length
            for part in spill_format.split(record, start, end):
                if part is not None:
                    lo, hi = part
                    codec, value = spill_format.encode(self.codec, memoryview(data)[lo - record.start: hi - record.start])
                    txn.put(Record(file_id, lo, hi - lo, codec).key, value)
                    stored -= len(value)
                    raw -= hi - lo
        return stored, raw

    def _write_failed(self, exc: lmdb.Error, size: int) -> TfemError:
        """What a failed write transaction of `size` bytes means to the writer.

        A full disk is NoSpace however LMDB says it: ENOSPC when a write
        found no room at all (DiskError), and EIO when the file system wrote
        only part of a commit's pages (mdb_page_flush calls any short write
        EIO). EIO is also what a failing device says, so the disk decides:
        with less room left than the commit needed (its values plus
        COMMIT_SLACK), the disk is full; with more, the room was there and
        the error is a real one, passed on as EIO and logged. (Room freed
        by someone else between the failure and the look would make a full
        disk pass for an I/O error: the writer gets EIO, never a false
        promise of room.)"""
        if isinstance(exc, lmdb.DiskError):
            full = True
        else:
            try:
                vfs = os.statvfs(self.path)
                full = vfs.f_bavail * vfs.f_frsize < size + COMMIT_SLACK
            except OSError:
                full = False
        if full:
            return NoSpace(f"the spill store {self.path} is full: its disk has no room left")
        log.error("the spill store %s cannot write: %s", self.path, exc)
        return TfemError(f"the spill store {self.path} cannot write: {exc}")

    # ---- reading (moving files between segments: the broker as a client) ----

    def acquire(self) -> None:
        """Open already: the broker's store is open from start to stop."""

    def release(self) -> None:
        """Stays open."""

    def read_into(self, file_id: int, offset: int, out: memoryview) -> None:
        with self.env.begin(buffers=True) as txn:
            spill_reader.read_into(txn, file_id, offset, out)

    def checksum(self, file_id: int, length: int, crc: int) -> int:
        with self.env.begin(buffers=True) as txn:
            return spill_reader.checksum(txn, file_id, length, crc)

    def stored_end(self, file_id: int) -> int:
        """Where the file's records end (offset past the inline buffer):
        no byte past it was ever written."""
        with self.env.begin(buffers=True) as txn:
            return spill_reader.stored_end(txn, file_id)

    def file_ids(self) -> set[int]:
        """The files with records."""
        return set(self.bytes_by_file)

    # ---- deleting ----

    def tidy(self) -> int:
        """Delete the records of files no slot holds (freed, or left by a
        client that died). How many files' records went."""
        before = len(self.bytes_by_file)
        if before:
            self.discard(self.file_ids() - self.owned())
        return before - len(self.bytes_by_file)

    def discard(self, file_ids: Iterable[int]) -> None:
        """Delete files' records, a transaction per file: LMDB reuses the
        pages a transaction frees only two commits later, and on a full
        disk the later deletes, and the writes after them, need the pages
        the first ones freed. If the disk cannot take even a delete (it
        writes pages too), the records stay, still counted, for the next
        tidy to try again."""
        deleted = False
        for file_id in sorted(set(file_ids) & set(self.bytes_by_file)):
            raw = 0
            try:
                with self.env.begin(write=True, buffers=True) as txn:
                    for record, _ in list(spill_reader.records(txn, file_id, 0, 2**64 - 1)):
                        txn.delete(record.key)
                        raw += record.length
            except lmdb.Error as exc:
                log.warning("records of file %d stay in the spill store for now: %s", file_id, exc)
                continue
            self.bytes_by_file.pop(file_id, None)
            self.raw_bytes -= raw
            deleted = True
        if deleted:
            self._free_for_reuse()

    def _free_for_reuse(self) -> None:
        """Let the next write reuse the pages just freed. LMDB keeps the
        snapshot before the last commit intact, so it never hands out the
        pages the last commit freed: without a commit in between, a write
        after a discard must take new pages, and a store near its map's
        end stays full however much was deleted. A commit that changes
        nothing (a key put and deleted) is that commit."""
        try:
            with self.env.begin(write=True) as txn:
                txn.put(_REUSE_KEY, b"")
                txn.delete(_REUSE_KEY)
        except lmdb.Error as exc:  # the next discard, or write, tries again
            log.debug("the spill store's freed pages wait for the next commit: %s", exc)

    def renew(self) -> bool:
        """Make an empty store afresh if its data file has grown past
        RENEW_AT, so the disk gets the room back; not while another process
        has it open (a reader would keep the old file, and its room, while
        the new one grows). Whether it did."""
        if self.bytes_by_file or self.file_bytes <= RENEW_AT or self._open_elsewhere():
            return False
        self.close()
        remove_store(self.path, keep_directory=True)
        self.raw_bytes = 0
        self.renewals += 1
        try:
            self._env = self._open()
        except TfemError as exc:  # the disk filled up meanwhile: made at next use
            log.error("the spill store %s was emptied but cannot be made again yet: %s", self.path, exc)
        return True

    @property
    def env(self) -> lmdb.Environment:
        """The store's environment; made again here if a renewal could not."""
        if self._env is None:
            self._env = self._open()
        return self._env

    def _open_elsewhere(self) -> bool:
        """Whether another process has the store open: every process with
        an LMDB environment open holds a read lock (fcntl) on the first byte
        of its lock file; asking for a write lock says whose conflicts (this
        process's own never does, so its own lock stays untouched)."""
        if self._lock_fd < 0:  # the store is not open: nothing can be told
            return True
        probe = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        answer = fcntl.fcntl(self._lock_fd, fcntl.F_GETLK, probe)
        return bool(struct.unpack(FLOCK, answer)[0] != fcntl.F_UNLCK)

    def reader_check(self) -> int:
        """Free the reader slots of client processes that died mid-read (a
        stale one would keep freed pages from reuse). How many."""
        return int(self.env.reader_check())

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        if self._lock_fd >= 0:  # after the environment: see _open
            os.close(self._lock_fd)
            self._lock_fd = -1

    def remove(self) -> None:
        """Delete the store's files (the broker's clean stop)."""
        remove_store(self.path)


def remove_store(path: pathlib.Path, keep_directory: bool = False) -> bool:
    """Delete the store in `path`, if there is one: its own files, and then
    `path` if that leaves it empty (a --spill-dir may be a directory of the
    user's). Whether there was one. Also `tfem clean`'s, for a store no
    broker has open."""
    found = False
    for name in STORE_FILES:
        try:
            os.unlink(path / name)
            found = True
        except FileNotFoundError:
            pass
    if found and not keep_directory:
        try:
            path.rmdir()
        except OSError:
            pass
    return found
