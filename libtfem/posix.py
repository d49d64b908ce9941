"""The paper's calls on integer descriptors, over a default client.

tfem_open / tfem_write / tfem_read / tfem_lseek / tfem_stat / tfem_close:
the same operations the C API offers, for code ported from C. The default
client connects on first use (TFEM_BROKER or the registry of TFEM_KEYFILE)
and is replaced in a forked child.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import forks
from .client import Client, connect
from .errors import BadDescriptor, InvalidArgument
from .files import TfemFile
from .table import FileStat, file_stat

TFEM_RDONLY = 0
TFEM_WRONLY = 1
TFEM_AUTO = 2  # the paper's open: read the name if it is waiting, else create it
TFEM_NONBLOCK = 0o4000  # as O_NONBLOCK: fail with EAGAIN instead of waiting
TFEM_KEEP = 0o10000  # with TFEM_WRONLY: kept for any number of readers until unlinked
TFEM_READERS_MAX = 0x7FFF
_ACCESS_MASK = 3
_READERS_SHIFT = 16


def TFEM_READERS(n: int) -> int:
    """With TFEM_WRONLY: freed after `n` readers (as tfem.h's macro)."""
    return (n & TFEM_READERS_MAX) << _READERS_SHIFT

_lock = threading.Lock()
_client: Client | None = None
_files: dict[int, TfemFile] = {}
_next_fd = 3


@forks.in_child
def _renew() -> None:
    # A thread of the parent may have held the lock; the parent's
    # descriptors are the parent's (their files are held by its pid).
    global _lock
    _lock = threading.Lock()
    _files.clear()



def default_client() -> Client:
    global _client
    with _lock:
        if _client is None:
            _client = connect()
        return _client


def _file(fd: Any) -> TfemFile:
    f = _files.get(fd) if isinstance(fd, int) else None
    if f is None or f.closed:
        raise BadDescriptor(f"bad tfem descriptor {fd!r}")
    return f


def tfem_open(name: str | bytes, flags: int = TFEM_RDONLY, timeout: float | None = None) -> int:
    """Open `name`; a descriptor. Readers wait for the producer's close
    unless TFEM_NONBLOCK is in `flags`; a writer's TFEM_KEEP or
    TFEM_READERS(n) chooses the file's lifetime."""
    global _next_fd
    known = _ACCESS_MASK | TFEM_NONBLOCK | TFEM_KEEP | TFEM_READERS(TFEM_READERS_MAX)
    if not isinstance(flags, int) or flags & ~known or flags & _ACCESS_MASK == 3:
        raise InvalidArgument(f"bad flags {flags!r}")
    mode = {TFEM_RDONLY: "r", TFEM_WRONLY: "w", TFEM_AUTO: "a"}[flags & _ACCESS_MASK]
    lifetime: dict[str, Any] = {}
    if flags & TFEM_KEEP:
        lifetime["keep"] = True
    if flags >> _READERS_SHIFT:
        lifetime["readers"] = flags >> _READERS_SHIFT
    f = default_client().open(name, mode, timeout=timeout, wait=not flags & TFEM_NONBLOCK, **lifetime)
    with _lock:
        fd, _next_fd = _next_fd, _next_fd + 1
        _files[fd] = f
    return fd


def tfem_write(fd: int, data: Any) -> int:
    return _file(fd).write(data)


def tfem_read(fd: int, n: int) -> bytes:
    if not isinstance(n, int) or n < 0:
        raise InvalidArgument(f"cannot read {n!r} bytes")
    return _file(fd).read(n)


def tfem_readinto(fd: int, buffer: Any) -> int:
    """Read into `buffer` (one copy out of the segment); bytes read."""
    return _file(fd).readinto(buffer)


def tfem_lseek(fd: int, offset: int, whence: int = os.SEEK_SET) -> int:
    return _file(fd).seek(offset, whence)


def tfem_stat(name: str | bytes) -> FileStat:
    return default_client().stat(name)


def tfem_fstat(fd: int) -> FileStat:
    """The held file's facts, from its slot (right after an unlink too)."""
    return file_stat(_file(fd).fstat())


def tfem_close(fd: int) -> None:
    f = _file(fd)
    with _lock:
        _files.pop(fd, None)
    f.close()


def tfem_unlink(name: str | bytes) -> None:
    default_client().unlink(name)


