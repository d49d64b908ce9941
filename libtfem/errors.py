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


class TfemError(OSError):
    """Base of every tfem error. ``errno`` says which."""

    errno_value = _errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(self.errno_value, message)

    def __str__(self) -> str:
        return str(self.strerror)


# ---- the caller's mistake ----


class InvalidArgument(TfemError, ValueError):
    errno_value = _errno.EINVAL


class NameTooLong(InvalidArgument):
    errno_value = _errno.ENAMETOOLONG


class BadDescriptor(TfemError):
    errno_value = _errno.EBADF


class WrongMode(TfemError, io.UnsupportedOperation):
    """Read on a write handle, write on a read handle."""

    errno_value = _errno.EBADF


class AlreadyExists(TfemError, FileExistsError):
    errno_value = _errno.EEXIST


# ---- the state of the store ----


class NotFound(TfemError, FileNotFoundError):
    errno_value = _errno.ENOENT


class WouldBlock(TfemError, BlockingIOError):
    """Non-blocking open of a name that is not ready."""

    errno_value = _errno.EAGAIN


class Timeout(TfemError, TimeoutError):
    errno_value = _errno.ETIMEDOUT


class NoSpace(TfemError):
    """The slot table, the arena or the spill store is full."""

    errno_value = _errno.ENOSPC


class FileTooLarge(NoSpace):
    """A write past the per-file limit (the broker's --max-file-size). A
    NoSpace, so that handlers of a full store catch it too."""

    errno_value = _errno.EFBIG


class Busy(TfemError):
    errno_value = _errno.EBUSY


class ChecksumMismatch(TfemError):
    """A file's bytes do not match the checksum its producer took."""

    errno_value = _errno.EBADMSG


class HandleInvalidated(TfemError):
    """The slot behind a handle was freed or taken over by someone else."""

    errno_value = _errno.ESTALE


class SegmentCorrupt(TfemError):
    """The segment does not carry a header this version understands."""


class SegmentExists(TfemError):
    """A segment of that name exists already (a broker runs, or crashed)."""

    errno_value = _errno.EEXIST


# ---- the other side ----


class BrokerUnavailable(TfemError, ConnectionError):
    """No registry or broker answers for this key file."""

    errno_value = _errno.ECONNREFUSED


class UnknownClient(TfemError):
    """The broker has no HELLO from this connection (it restarted)."""

    errno_value = _errno.ENOTCONN


class ProtocolError(TfemError):
    """A message that does not follow the wire format."""

    errno_value = _errno.EPROTO


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
