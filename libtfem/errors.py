"""tfem's errors, named by whose fault they are, and their errno values.

Every error is an OSError with the errno a C programmer would expect, and
also the built-in exception a Python programmer would catch
(FileNotFoundError, TimeoutError, ...). Broker replies, the native core and
C callers carry errno values: `from_errno` is the one place that turns one
into an exception, `errno_of` the one place that turns an exception into one.
"""

from __future__ import annotations

import errno as _errno
import io
from typing import Any


class TfemError(OSError):
    """Base of every tfem error. ``errno`` says which."""

    errno_value = _errno.EIO

    def __init_subclass__(cls, errno: int | None = None, **kwargs: Any) -> None:
        """`class NotFound(TfemError, errno=ENOENT)`: a subclass names its errno value."""
        super().__init_subclass__(**kwargs)
        if errno is not None:
            cls.errno_value = errno

    def __init__(self, message: str) -> None:
        super().__init__(self.errno_value, message)

    def __str__(self) -> str:
        return str(self.strerror)


# ---- the caller's mistake ----


class InvalidArgument(TfemError, ValueError, errno=_errno.EINVAL):
    pass


class NameTooLong(InvalidArgument, errno=_errno.ENAMETOOLONG):
    pass


class BadDescriptor(TfemError, errno=_errno.EBADF):
    pass


class WrongMode(TfemError, io.UnsupportedOperation, errno=_errno.EBADF):
    """Read on a write handle, write on a read handle."""


class AlreadyExists(TfemError, FileExistsError, errno=_errno.EEXIST):
    pass


# ---- the state of the store ----


class NotFound(TfemError, FileNotFoundError, errno=_errno.ENOENT):
    pass


class WouldBlock(TfemError, BlockingIOError, errno=_errno.EAGAIN):
    """Non-blocking open of a name that is not ready."""


class Timeout(TfemError, TimeoutError, errno=_errno.ETIMEDOUT):
    pass


class NoSpace(TfemError, errno=_errno.ENOSPC):
    """The slot table, the arena or the spill store is full."""


class FileTooLarge(NoSpace, errno=_errno.EFBIG):
    """A write past the per-file limit (the broker's --max-file-size). A
    NoSpace, so that handlers of a full store catch it too."""


class Busy(TfemError, errno=_errno.EBUSY):
    pass


class ChecksumMismatch(TfemError, errno=_errno.EBADMSG):
    """A file's bytes do not match the checksum its producer took."""


class HandleInvalidated(TfemError, errno=_errno.ESTALE):
    """The slot behind a handle was freed or taken over by someone else."""


class SegmentCorrupt(TfemError):
    """The segment does not carry a header this version understands."""


class SegmentExists(TfemError, errno=_errno.EEXIST):
    """A segment of that name exists already (a broker runs, or crashed)."""


# ---- the other side ----


class BrokerUnavailable(TfemError, ConnectionError, errno=_errno.ECONNREFUSED):
    """No registry or broker answers for this key file."""


class UnknownClient(TfemError, errno=_errno.ENOTCONN):
    """The broker has no HELLO from this connection (it restarted)."""


class ProtocolError(TfemError, errno=_errno.EPROTO):
    """A message that does not follow the wire format."""


_BY_ERRNO: dict[int, type[TfemError]] = {
    cls.errno_value: cls
    for cls in (
        InvalidArgument, NameTooLong, BadDescriptor, AlreadyExists, NotFound,
        WouldBlock, Timeout, NoSpace, FileTooLarge, Busy, ChecksumMismatch, HandleInvalidated, BrokerUnavailable,
        UnknownClient, ProtocolError,
    )
}


def from_errno(code: int, message: str) -> TfemError:
    """The exception for an errno carried in a reply."""
    cls = _BY_ERRNO.get(code)
    if cls is None:
        error = TfemError(message)
        error.errno = code
        return error
    return cls(message)


def errno_of(exc: BaseException) -> int:
    """The errno value an exception stands for, for a reply or a C caller:
    the other direction of `from_errno`."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, (ValueError, TypeError, OverflowError)):
        return _errno.EINVAL
    return _errno.EIO
