"""The spill store: file bytes that do not fit in memory, in LMDB.

Opened by the broker alone. Keys are (file id, chunk number), big-endian so
one file's chunks sort together; a chunk holds CHUNK bytes of the file past
its inline buffer. Transactions commit on a clean exit and abort on an
exception (py-lmdb's context managers), so a failed write leaves nothing
half-done; a full store is NoSpace to the caller, and what was stored stays.
A full disk under the store is a full store too: see `_write_failed`.
Durability is not the point of a temp-file cache, so LMDB runs with sync
off: a crash of the machine loses spilled data, a crash of the broker not.
No writemap: a write through a mapping onto a full disk is a SIGBUS, a
write() is an error we can report.
"""

from __future__ import annotations

import logging
import os
import pathlib
import struct

import crc32c
import lmdb

from tfem._native import lib
from tfem.errors import NoSpace, TfemError

CHUNK = 1 << 20
STORE_FILES = ("data.mdb", "lock.mdb")  # what LMDB makes in the store's directory
_KEY = struct.Struct(">QQ")
# Pages LMDB writes in a commit besides the values: branch pages, the free
# list, the meta page. Generous: a few per MiB of values are enough.
COMMIT_SLACK = 2 * CHUNK
log = logging.getLogger("tfem.broker")


def delete_reserve(map_size: int) -> int:
    """Room kept past the limit on stored data. LMDB copies pages to delete
    as well as to write, and records the pages a delete frees (8 bytes per
    4 KiB page): with no room at all, a full store could not even discard
    records to make room (MDB_MAP_FULL), and would stay full for good."""
    return max(1 << 20, map_size // 64)


class SpillStore:
    def __init__(self, path: pathlib.Path, map_size: int) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self.limit = map_size  # pages of stored data, at most; writes past it are NoSpace
        self.env = lmdb.open(str(path), map_size=map_size + delete_reserve(map_size), sync=False,
                             metasync=False, max_dbs=0, mode=0o600)
        self._db = self.env.open_db()
        self.bytes_by_file: dict[int, int] = {}
        with self.env.begin() as txn:
            for key, value in txn.cursor():
                file_id, _ = _KEY.unpack(key)
                self.bytes_by_file[file_id] = self.bytes_by_file.get(file_id, 0) + len(value)

    @property
    def bytes_used(self) -> int:
        return sum(self.bytes_by_file.values())

    def write(self, file_id: int, offset: int, data: memoryview) -> None:
        """Store `data` at `offset` (counted from the end of the inline buffer)."""
        added = 0
        try:
            with self.env.begin(write=True) as txn:
                pos, end = offset, offset + len(data)
                while pos < end:
                    chunk, within = divmod(pos, CHUNK)
                    n = min(CHUNK - within, end - pos)
                    key = _KEY.pack(file_id, chunk)
                    piece = data[pos - offset: pos - offset + n]
                    old = txn.get(key)
                    if old is None and within == 0:
                        value = bytes(piece)
                    else:
                        buf = bytearray(old or b"")
                        if len(buf) < within + n:
                            buf.extend(bytes(within + n - len(buf)))
                        buf[within: within + n] = piece
                        value = bytes(buf)
                    added += len(value) - (len(old) if old else 0)
                    txn.put(key, value)
                    pos += n
                st = txn.stat(self._db)
                if (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"] > self.limit:
                    raise NoSpace(f"the spill store {self.path} is full ({self.limit >> 20} MiB)")  # aborts
        except lmdb.MapFullError:
            raise NoSpace(f"the spill store {self.path} is full") from None
        except lmdb.Error as exc:
            raise self._write_failed(exc, len(data)) from None
        self.bytes_by_file[file_id] = self.bytes_by_file.get(file_id, 0) + added

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

    def read(self, file_id: int, offset: int, length: int) -> bytearray:
        """`length` bytes at `offset`; never-written bytes read as zeros."""
        out = bytearray(length)
        with self.env.begin(buffers=True) as txn:
            pos, end = offset, offset + length
            while pos < end:
                chunk, within = divmod(pos, CHUNK)
                n = min(CHUNK - within, end - pos)
                value = txn.get(_KEY.pack(file_id, chunk))
                if value is not None:
                    have = max(0, min(n, len(value) - within))
                    out[pos - offset: pos - offset + have] = value[within: within + have]
                pos += n
        return out

    def checksum(self, file_id: int, length: int, crc: int) -> int:
        """Continue crc32c `crc` over the first `length` spilled bytes. The
        file's records are visited in order; the zeros between them (bytes
        never written) are checksummed without being made, so a gap of any
        size costs next to nothing."""
        done = 0
        with self.env.begin(buffers=True) as txn:
            cursor = txn.cursor()
            if cursor.set_range(_KEY.pack(file_id, 0)):
                for key, value in cursor:
                    owner, chunk = _KEY.unpack(key)
                    start = chunk * CHUNK
                    if owner != file_id or start >= length:
                        break
                    crc = lib.tfem_crc32c_zeros(crc, start - done)
                    have = min(len(value), length - start)
                    crc = crc32c.crc32c(value[:have], crc)
                    done = start + have
        return lib.tfem_crc32c_zeros(crc, length - done)

    def discard(self, file_id: int) -> None:
        """Delete a file's records. If the disk cannot take even that (a
        delete writes pages too), they stay, still counted: the broker's
        sweep discards records no file owns, and tries again."""
        try:
            with self.env.begin(write=True) as txn:
                cursor = txn.cursor()
                if cursor.set_range(_KEY.pack(file_id, 0)):
                    while cursor.key()[:8] == _KEY.pack(file_id, 0)[:8]:
                        if not cursor.delete():
                            break
        except lmdb.Error as exc:
            log.warning("records of file %d stay in the spill store for now: %s", file_id, exc)
            return
        self.bytes_by_file.pop(file_id, None)

    def stored_end(self, file_id: int) -> int:
        """Where the file's records end (offset past the inline buffer):
        no byte past it was ever written."""
        with self.env.begin(buffers=True) as txn:
            cursor = txn.cursor()
            found = cursor.prev() if cursor.set_range(_KEY.pack(file_id + 1, 0)) else cursor.last()
            if not found:
                return 0
            owner, chunk = _KEY.unpack(cursor.key())
            return chunk * CHUNK + len(cursor.value()) if owner == file_id else 0

    def file_ids(self) -> set[int]:
        return set(self.bytes_by_file)

    def close(self) -> None:
        self.env.close()

    def remove(self) -> None:
        """Delete the store's files (the broker's clean stop)."""
        remove_store(self.path)


def remove_store(path: pathlib.Path) -> bool:
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
    if found:
        try:
            path.rmdir()
        except OSError:
            pass
    return found
