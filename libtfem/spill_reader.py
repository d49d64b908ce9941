"""Reading spilled files straight from the spill store.

LMDB is made for many reader processes beside one writer: a reader sees a
consistent snapshot and copies from the store's mapping, with no lock held
against the writer. So a consumer reads a spilled file's bytes itself,
through a read-only environment of its own, and the broker's socket is not
on the path. The broker writes (broker/spill.py) and reads through the same
functions below.

Each read is a short transaction: a long one would keep the writer from
reusing freed pages, and the store would grow.

The broker starts the store afresh when it has emptied, so that its file
gives its room back, but only when no other process has it open (LMDB's
lock file says so): a reader must not be left mapping the old file, and
its room. A process therefore keeps the store open only while it reads
spilled files: from the first (`acquire`) until it turns to files in
memory or disconnects (`close_idle`). While anyone holds a spilled file
with records the store is not empty, so the file under a reader never
changes.

LMDB opens an environment once per process: the clients of one process
share one reader per store (`reader_for`).
"""

from __future__ import annotations

import os
import pathlib
import threading
import time
from typing import Any, Iterator, Protocol

import crc32c
import lmdb

from . import spill_format
from ._native import lib
from .errors import TfemError
from .spill_format import Record

DATA_FILE = "data.mdb"
OPEN_TRIES = 20  # a reader meeting the store mid-renewal tries again, 1 ms apart


def records(txn: lmdb.Transaction, file_id: int, start: int, end: int) -> Iterator[tuple[Record, Any]]:
    """The records of `file_id` holding bytes of [start, end), in order,
    with their stored values (valid while `txn` is)."""
    def holds_start(record: Record) -> bool:
        return record.file_id == file_id and record.start <= start < record.end

    cursor = txn.cursor()
    if cursor.set_range(spill_format.seek_key(file_id, start)):
        first = spill_format.parse_key(cursor.key())
        if (first.file_id, first.start) != (file_id, start):  # the record before may hold `start`
            if not cursor.prev():
                cursor.first()
            elif not holds_start(spill_format.parse_key(cursor.key())):
                cursor.next()
    elif not cursor.last() or not holds_start(spill_format.parse_key(cursor.key())):
        return
    for key, value in cursor:
        record = spill_format.parse_key(key)
        if record.file_id != file_id or record.start >= end:
            return
        if record.end > start:
            yield record, value


def read_into(txn: lmdb.Transaction, file_id: int, offset: int, out: memoryview) -> None:
    """Fill `out` with the file's bytes from `offset`: zeros where no record is."""
    end, done = offset + len(out), offset
    for record, value in records(txn, file_id, offset, end):
        if record.start > done:
            out[done - offset: record.start - offset] = bytes(record.start - done)
        lo, hi = max(record.start, offset), min(record.end, end)
        raw = spill_format.decode(record, value)
        out[lo - offset: hi - offset] = raw[lo - record.start: hi - record.start]
        done = hi
    if done < end:
        out[done - offset:] = bytes(end - done)


def checksum(txn: lmdb.Transaction, file_id: int, length: int, crc: int) -> int:
    """Continue crc32c `crc` over the file's first `length` spilled bytes.
    The zeros between records are checksummed without being made, so a gap
    of any size costs next to nothing."""
    done = 0
    for record, value in records(txn, file_id, 0, length):
        crc = lib.tfem_crc32c_zeros(crc, record.start - done)
        have = min(record.end, length) - record.start
        crc = crc32c.crc32c(memoryview(spill_format.decode(record, value))[:have], crc)
        done = record.start + have
    return int(lib.tfem_crc32c_zeros(crc, length - done))


def stored_end(txn: lmdb.Transaction, file_id: int) -> int:
    """Where the file's records end: no byte past it was ever written."""
    cursor = txn.cursor()
    found = cursor.prev() if cursor.set_range(spill_format.seek_key(file_id + 1)) else cursor.last()
    if not found:
        return 0
    record = spill_format.parse_key(cursor.key())
    return record.end if record.file_id == file_id else 0


class SpillSource(Protocol):
    """Where a file reads its spilled bytes: a client's SpillReader, or the
    broker's own store (moving files between segments). Between acquire()
    and release(), read_into() and checksum() may be called."""

    def acquire(self) -> None: ...

    def release(self) -> None: ...

    def read_into(self, file_id: int, offset: int, out: memoryview) -> None: ...

    def checksum(self, file_id: int, length: int, crc: int) -> int: ...


_readers: dict[str, SpillReader] = {}  # this process's, by store
idle: set[SpillReader] = set()  # ... whose store is open with no file holding it (changed in place)
_readers_lock = threading.Lock()
_inherited: list[SpillReader] = []  # a parent's, in its forked child: kept, never used nor closed


def reader_for(path: str, map_size: int) -> SpillReader:
    """This process's reader of the store at `path`."""
    path = os.path.normpath(path)
    with _readers_lock:
        reader = _readers.get(path)
        if reader is not None and reader.pid != os.getpid():
            _inherited.append(reader)
            idle.discard(reader)
            reader = None
        if reader is None:
            reader = _readers[path] = SpillReader(pathlib.Path(path), map_size)
        return reader


def close_idle() -> None:
    """Close the stores no file of this process holds: when it turns to
    files in memory, or disconnects."""
    with _readers_lock:
        closing = [r for r in idle if r.pid == os.getpid()]
        idle.clear()
    for reader in closing:
        reader.close_if_idle()


class SpillReader:
    """The read-only view of a spill store that a process's clients share.

    Open from the first spilled file this process reads (acquire) until it
    turns to files in memory or disconnects (close_idle): consumers reading
    spilled files one after another open it once (~80 us to open and close).
    A store made afresh meanwhile is noticed by its inode at the next
    acquire and opened anew."""

    _env: lmdb.Environment | None = None
    _inode = 0

    def __init__(self, path: pathlib.Path, map_size: int) -> None:
        self.path = path
        self.data_file = str(path / DATA_FILE)
        self.map_size = map_size
        self.pid = os.getpid()
        self._users = 0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self._env is not None and self._users == 0 and self._renewed():
                self._close()
            if self._env is None:
                self._env = self._open()
            self._users += 1
            with _readers_lock:
                idle.discard(self)

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                with _readers_lock:
                    idle.add(self)

    def close_if_idle(self) -> None:
        with self._lock:
            if self._users == 0:
                self._close()

    def read_into(self, file_id: int, offset: int, out: memoryview) -> None:
        with self._opened().begin(buffers=True) as txn:
            read_into(txn, file_id, offset, out)

    def checksum(self, file_id: int, length: int, crc: int) -> int:
        with self._opened().begin(buffers=True) as txn:
            return checksum(txn, file_id, length, crc)

    def _opened(self) -> lmdb.Environment:
        env = self._env
        assert env is not None, "read between acquire() and release()"
        return env

    def _renewed(self) -> bool:
        try:
            return os.stat(self.data_file).st_ino != self._inode
        except FileNotFoundError:
            return True

    def _open(self) -> lmdb.Environment:
        problem: Exception | None = None
        for _ in range(OPEN_TRIES):
            try:
                inode = os.stat(self.data_file).st_ino
                # lock=True: LMDB's reader table keeps the writer from
                # reusing pages this reader still sees.
                env = lmdb.open(str(self.path), map_size=self.map_size, readonly=True, create=False,
                                max_dbs=0, lock=True)
                self._inode = inode
                return env
            except (FileNotFoundError, lmdb.Error) as exc:  # the old store removed, the new one not made yet
                problem = exc
                time.sleep(0.001)
        raise TfemError(f"the spill store {self.path} cannot be opened for reading: {problem}")

    def _close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
