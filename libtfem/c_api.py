"""The Python side of libtfem.so: the `_tfem_py_*` entry points.

Each entry point runs one call of tfem.posix. Data moves between the C
caller's buffer and the shared segment in one copy: the caller's buffer is
wrapped (ffi.buffer, no copy) and handed to readinto/write. Every error
becomes -1 with errno set, in one place (`_fail`); an exception never
escapes to C, where cffi would turn it into a silent 0.
"""

from __future__ import annotations

import errno
from typing import Any

from . import posix
from .errors import TfemError
from .states import State
from .table import FileStat


def errno_of(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, ValueError):  # e.g. I/O on a closed file
        return errno.EINVAL
    if isinstance(exc, (TypeError, OverflowError)):
        return errno.EINVAL
    return errno.EIO


def install(ffi: Any) -> None:
    """Bind the entry points declared in _build_shim.INTERNAL_API."""

    def _fail(exc_type: Any, exc: BaseException, tb: Any) -> int:
        ffi.errno = errno_of(exc)
        if not isinstance(exc, (TfemError, OSError, ValueError)):
            import traceback

            traceback.print_exception(exc_type, exc, tb)  # a bug: say so on stderr
        return -1

    def extern(fn: Any) -> Any:
        return ffi.def_extern(name=fn.__name__, error=-1, onerror=_fail)(fn)

    def fill(st: Any, info: FileStat) -> int:
        st.size = info.size
        st.state = int(State[info.state])
        st.spilled = int(info.spilled)
        st.created = info.created
        return 0

    @extern
    def _tfem_py_ping() -> int:
        return 1

    @extern
    def _tfem_py_open(name: Any, flags: int, timeout: float) -> int:
        return posix.tfem_open(ffi.string(name), flags, None if timeout < 0 else timeout)

    @extern
    def _tfem_py_write(fd: int, buf: Any, count: int) -> int:
        return posix.tfem_write(fd, ffi.buffer(buf, count))

    @extern
    def _tfem_py_read(fd: int, buf: Any, count: int) -> int:
        return posix.tfem_readinto(fd, ffi.buffer(buf, count))

    @extern
    def _tfem_py_lseek(fd: int, offset: int, whence: int) -> int:
        return posix.tfem_lseek(fd, offset, whence)

    @extern
    def _tfem_py_stat(name: Any, st: Any) -> int:
        return fill(st, posix.tfem_stat(ffi.string(name)))

    @extern
    def _tfem_py_fstat(fd: int, st: Any) -> int:
        return fill(st, posix.tfem_fstat(fd))

    @extern
    def _tfem_py_close(fd: int) -> int:
        posix.tfem_close(fd)
        return 0

    @extern
    def _tfem_py_unlink(name: Any) -> int:
        posix.tfem_unlink(ffi.string(name))
        return 0
