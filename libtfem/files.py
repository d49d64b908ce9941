"""A file held in a tfem slot, as an io.RawIOBase over the native core.

Every method on the memory path is one call into the core (native/
tfem_file.c), which moves bytes straight between the caller's buffer and the
shared segment and keeps the checksum as it goes. What the core cannot do
alone it reports, and this module asks the broker: room in the arena when
it is full (ALLOC, which spills), and the writing of a spilled file's bytes
past its inline buffer (SPILL_WRITE, coalesced). Those bytes are read from
the spill store itself (the owner's `spill`, a spill_reader.SpillSource).

A producer's file is published (WRITE -> WAIT) by close(); leaving a `with`
block through an exception drops it instead, so a half-written file is
never seen. A consumer's close() frees the file; leaving a `with` block
through an exception gives it back (READ -> WAIT), so nothing is lost.

Every file carries a crc32c of its bytes. A consumer reading in order is
checked as it reads, before it sees the end of the file; a damaged file is
ChecksumMismatch and is given back at close, never consumed. A spilled file
is checked the same way, its spilled bytes as they are copied from the
store; a reader that jumps around one is checked in one pass over the store
at its first jump.
"""

from __future__ import annotations

import errno
import io
import operator
import os
import pickle
from typing import Any, Callable, Generator, Protocol

from . import forks
from ._native import ffi, lib
from .cdata import CharPtr, FileCore, FileInfo
from .errors import BadDescriptor, ChecksumMismatch, InvalidArgument, NoSpace, TfemError, WrongMode, from_errno
from .protocol import Op, Reply
from . import spill_reader
from .spill_reader import SpillSource
from .spill_reader import idle as _idle_spill_readers  # mutated in place, never rebound
from .table import Deadline

SPILL_IO_CHUNK = 4 << 20  # bytes per spill write request
BIG_READ = 1 << 20  # read() this large copies once from views; smaller, through readinto
CRC_NONE = 2**64 - 1  # the core's mark for "no running checksum"

class Owner(Protocol):
    """What a file needs of its client: the mapping, the broker (for room
    and spill writes), the spill store (None before a spilled file is
    met), and the set of files it must let go of when it closes."""

    memory: memoryview  # the segment's mapping
    base: int  # its address
    pid: int
    held: set[FileCore]  # the cores of files open through it
    pinned: dict[FileCore, TfemFile]  # ... of them, those with views (getbuffer)

    @property
    def spill(self) -> SpillSource: ...

    def call(self, op: Op, args: dict[str, Any], data: Any = None) -> Reply: ...

    def wait_for_room(self, seen: int, deadline: Deadline, what: str) -> None: ...

    def room_seen(self) -> int: ...


def _source(data: Any) -> tuple[CharPtr | bytes, int]:
    """Bytes to write, as the core takes them, and their length."""
    if type(data) is bytes:
        return data, len(data)
    try:
        buf: CharPtr | bytes = ffi.from_buffer(data)
    except (TypeError, ValueError, BufferError):  # not contiguous
        buf = memoryview(data).tobytes()
    return buf, len(buf)


def _target(buffer: Any) -> tuple[CharPtr, int]:
    """A buffer to read into, as the core takes it, and its length."""
    out = ffi.from_buffer(buffer, require_writable=True)
    return out, len(out)


class TfemFile(io.RawIOBase):
    # The spill path's state, made per file only when a file spills.
    _pending: bytearray | None = None  # spill writes not yet sent
    _pending_offset = 0
    _spill: SpillSource | None = None  # the store, held open while a consumer reads it
    _view_bases: list[memoryview] | None = None  # what getbuffer()'s views hold exports of

    _room_timeout: float | None = 0  # how long a write may wait for memory

    def __init__(self, core: FileCore, name: str, owner: Owner, room_timeout: float | None = 0) -> None:
        self._f = core  # struct tfem_file *, this object's alone
        self._owner = owner
        # The mapping the file lives in: its client may map a new segment
        # while it is open (the broker replaced a removed one).
        self._memory, self._base = owner.memory, owner.base
        self.name = name
        self._epoch = forks.epoch
        self._writing = writing = bool(core.writing)
        if _idle_spill_readers and not (core.spilled and not writing):
            spill_reader.close_idle()  # this process turns from spilled files to others
        if writing:
            if room_timeout:
                self._room_timeout = room_timeout
        elif core.spilled:
            try:
                spill = owner.spill
                spill.acquire()  # held open until close: its bytes are read there
            except BaseException:
                self.abort()  # given back
                raise
            self._spill = spill

    @property
    def mode(self) -> str:
        return "wb" if self._writing else "rb"

    # ---- io.RawIOBase ----

    def readable(self) -> bool:
        self._check_open()
        return not self._writing

    def writable(self) -> bool:
        self._check_open()
        return self._writing

    def seekable(self) -> bool:
        self._check_open()
        return True

    def tell(self) -> int:
        self._check_open()
        return int(self._f.pos)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check_open()
        offset = operator.index(offset)  # as io.BytesIO: TypeError for 1.5, never a float position
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
            raise InvalidArgument(f"whence must be SEEK_SET, SEEK_CUR or SEEK_END, not {whence}")
        if not -2**63 <= offset < 2**63:
            raise InvalidArgument(f"seek offset {offset} is out of range")
        pos = lib.tfem_f_seek(self._f, offset, whence)
        if pos < 0:
            raise InvalidArgument(f"seek to a negative offset ({self._f.pos if whence else 0} + {offset})")
        return int(pos)

    def readinto(self, buffer: Any) -> int:
        if self._epoch != forks.epoch or self._writing:
            self._check_mode(reading=True)
        out, n = _target(buffer)
        f = self._f
        got = lib.tfem_f_read(f, out, n)
        if got < 0 or (f.need and got < n):
            return self._read_rest(out, n, got)
        return int(got)

    def read(self, size: int | None = -1) -> bytes:
        if self._epoch != forks.epoch or self._writing:
            self._check_mode(reading=True)
        f = self._f
        left = max(0, f.size - f.pos) if f.held else 0
        n = left if size is None or size < 0 else min(size, left)
        if n >= BIG_READ and not f.spilled:  # one copy: the segment's pieces joined into the result
            data = b"".join(self._views(n))
            f.pos += len(data)
            if f.pos >= f.size:
                self._end_reached()
            return data
        out = bytearray(n)
        buf = ffi.from_buffer(out)
        got = lib.tfem_f_read(f, buf, n)
        if got < 0 or (f.need and got < n):
            got = self._read_rest(buf, n, got)
        return bytes(out) if got == n else bytes(out[:got])

    def readall(self) -> bytes:
        return self.read(-1)

    def chunks(self, size: int = 16 << 20) -> Generator[memoryview, None, None]:
        """Read the rest of the file as views, without copying what is in
        memory. A view is valid only until the file is closed."""
        self._check_mode(reading=True)
        f = self._f
        while f.pos < f.size:
            n = min(size, f.size - f.pos)
            if f.pos < f.memory_end:
                chunk = self._views(n)[0]
                f.pos += len(chunk)
            else:
                chunk = memoryview(bytearray(n))
                self.readinto(chunk)
            yield chunk

    def write(self, data: Any) -> int:
        if self._epoch != forks.epoch or not self._writing:
            self._check_mode(reading=False)
        buf, n = _source(data)
        done = lib.tfem_f_write(self._f, buf, n)
        if done != n:
            self._write_rest(buf, n, done)
        return n

    # ---- for callers that must not block (tfem.aio): what needs only the segment, at once ----

    def read_nowait(self, size: int | None = -1, most: int = BIG_READ) -> bytes | None:
        """read(size) if all it takes is a copy of at most `most` bytes out
        of the segment; None if it takes more (a longer copy, the spill
        store): the caller reads where it may block."""
        f = self._f
        if self._writing or not f.held or self._epoch != forks.epoch:
            return self.read(size)  # the error, at once
        left = max(0, f.size - f.pos)
        if f.spilled or (left if size is None or size < 0 else min(size, left)) > most:
            return None
        return self.read(size)

    def write_nowait(self, data: Any) -> int | Callable[[], int]:
        """write(data) as far as the segment takes it: its count if that
        was all, else a call that writes the rest (asking the broker for
        room, or sending it to the spill store), to make where it may block."""
        if self._epoch != forks.epoch or not self._writing:
            self._check_mode(reading=False)
        buf, n = _source(data)
        done = lib.tfem_f_write(self._f, buf, n)
        if done == n:
            return n

        def rest() -> int:
            self._write_rest(buf, n, done)
            return n
        return rest

    def close_nowait(self) -> bool:
        """close() if it needs neither the broker nor the spill store; False,
        and still open, if it does (spill writes not yet sent, a spilled
        producer's checksum): the caller closes where it may block."""
        if self._pending or (self._writing and self._f.spilled and self._f.held):
            return False
        self.close()
        return True

    def close(self) -> None:
        """Producer: publish the file. Consumer: free it (or give it back,
        if its bytes were found damaged). Idempotent."""
        f = self._f
        if not f.held or self._epoch != forks.epoch and self._in_forked_child():
            return
        if self._view_bases:
            self._release_views()
        if self._pending:
            try:
                self._flush_spill()  # sends with the handle, so before letting it go
            except BaseException:
                self.abort()  # never half-published, never left held
                raise
        rc = lib.tfem_f_close(f)
        if rc == errno.EXDEV:  # a spilled file: the core has not seen the bytes in the store
            try:
                crc = self._spilled_checksum()
            except BaseException:
                self.abort()
                raise
            rc = lib.tfem_f_publish(f, crc)
        self._owner.held.discard(f)
        if self._spill is not None:
            self._let_go_of_spill()
        if rc:
            self._after_release(rc)

    def abort(self) -> None:
        """Producer: drop the file instead of publishing it. Consumer: give
        it back unread (READ -> WAIT), for another consumer to take; of a
        file for several readers or kept, the read is not counted."""
        f = self._f
        if not f.held or self._epoch != forks.epoch and self._in_forked_child():
            return
        if self._view_bases:
            self._release_views()
        rc = lib.tfem_f_abort(f)
        self._owner.held.discard(f)
        if self._spill is not None:
            self._let_go_of_spill()
        if rc:
            self._after_release(rc)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()  # a producer's file is dropped, a consumer's given back
        else:
            self.close()

    def __del__(self) -> None:
        # An unclosed producer file is dropped, never half-published; an
        # unclosed consumer file is consumed, as a closed one would be.
        try:
            if self._f.held:
                self.abort() if self._writing else self.close()
        except Exception:
            pass

    def getbuffer(self) -> memoryview:
        """The file's bytes where they lie in the segment, without a copy:
        writable for its producer, read-only for a consumer (checked
        first, unless its producer chose no checksum). For a file in one
        piece: made with Client.create, or within its inline buffer.

        As with mmap, the memory is never reused while a view lives:
        close() and abort() raise BufferError until every view, and every
        view or array made from one, is released."""
        self._check_open()
        f = self._f
        if f.size == 0:
            return memoryview(bytearray() if self._writing else b"")
        ptr = ffi.new("char **")
        self._check_spilled_first()
        run = lib.tfem_f_view(f, 0, ptr)
        if run < 0:
            raise self._fail(-run)
        if run < f.size:
            raise BufferError(f"{self.name!r} is not one piece in memory: make it with Client.create for "
                              "views, or read it (chunks() gives views piece by piece)")
        offset = int(ffi.cast("uintptr_t", ptr[0])) - self._base
        base = self._memory[offset: offset + f.size]
        if not self._writing:
            base = base.toreadonly()
        # The view is taken through a PickleBuffer so that it, every slice
        # of it and every array made from it hold an export of `base`:
        # base.release() then refuses while any of them lives, as
        # mmap.close() does, with no mapping of its own to undo.
        holder = pickle.PickleBuffer(base)
        view = memoryview(holder)
        holder.release()
        if self._view_bases is None:
            self._view_bases = []
            self._owner.pinned[f] = self
        self._view_bases.append(base)
        return view

    def _release_views(self) -> None:
        """Let go of what getbuffer() handed out; BufferError while a view
        is still in use (the file's memory must not be reused under it)."""
        while self._view_bases:
            try:
                self._view_bases[-1].release()
            except BufferError:
                raise BufferError(f"{self.name!r}: a view from getbuffer() is still in use; release it "
                                  "(and arrays made from it) before closing the file") from None
            self._view_bases.pop()
        self._owner.pinned.pop(self._f, None)

    @property
    def closed(self) -> bool:
        return not self._f.held

    def flush(self) -> None:
        """Nothing to flush: bytes are in the segment as soon as written."""
        self._check_open()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a tfem file has no operating-system descriptor")

    def fstat(self) -> FileInfo:
        """The held slot's facts (struct tfem_fileinfo): right even after the
        name was unlinked or reused."""
        self._check_open()
        info = ffi.new("struct tfem_fileinfo *")
        lib.tfem_f_fstat(self._f, info)
        return info

    # ---- state and errors ----

    def _in_forked_child(self) -> bool:
        """A copy of a parent's file in a forked child: the file is the
        parent's, so the child lets go of its copy and touches nothing."""
        self._f.held = 0
        return True

    def _check_open(self) -> None:
        if self._epoch != forks.epoch:  # in a forked child: never touch the parent's file
            self._f.held = 0
            raise BadDescriptor(f"{self.name!r} was opened by process {self._owner.pid} before it forked: "
                                "it stays that process's file")
        if not self._f.held:
            raise ValueError("I/O operation on closed tfem file")

    def _check_mode(self, reading: bool) -> None:
        self._check_open()
        if reading and self._writing:
            raise WrongMode(f"{self.name!r} is open for writing, not reading")
        if not reading and not self._writing:
            raise WrongMode(f"{self.name!r} is open for reading, not writing")

    def _fail(self, rc: int) -> TfemError:
        """The exception for an errno the core returned (positive)."""
        self._check_open()
        if rc == errno.EBADMSG:
            return ChecksumMismatch(
                f"{self.name!r} does not match the checksum its producer took (crc32c "
                f"{self._f.crc:08x} of the bytes read, expected {self._f.slot.checksum:08x}): its bytes "
                "were damaged; closing gives it back, left in place (`tfem rm` removes it)")
        if rc == errno.ESTALE:
            return from_errno(rc, f"{self.name!r} is no longer held by this process")
        if rc == errno.EFBIG:
            return from_errno(rc, f"{self.name!r}: refused, it would take the file past the per-file limit of "
                                  f"{self._f.max_size} bytes (the broker's --max-file-size)")
        return from_errno(rc, f"{self.name!r}: {os.strerror(rc)}")

    def _after_release(self, rc: int) -> None:
        """After a close or abort that failed."""
        if rc not in (0, errno.EBADF):
            raise from_errno(rc, f"{self.name!r}: {os.strerror(rc)}")

    def _end_reached(self) -> None:
        """After a read that took the last bytes through views: the check."""
        self._check_spilled_first()
        rc = lib.tfem_f_verify(self._f)
        if rc:
            raise self._fail(rc)

    # ---- the slow paths: memory full, spilled bytes ----

    def _views(self, n: int) -> list[memoryview]:
        """Views of up to n bytes at the position, within memory."""
        f, ptr, views = self._f, ffi.new("char **"), []
        pos, end = f.pos, f.pos + n
        self._check_spilled_first()
        while pos < end:
            run = lib.tfem_f_view(f, pos, ptr)
            if run < 0:
                raise self._fail(-run)
            if run == 0:
                break
            run = min(run, end - pos)
            offset = int(ffi.cast("uintptr_t", ptr[0])) - self._base
            views.append(self._memory[offset: offset + run])
            pos += run
        return views

    def _read_rest(self, out: CharPtr, n: int, got: int) -> int:
        """After the core's read at the position came short: a spilled file
        read out of order (or at its end) before its check, checked first
        and read again (EXDEV), or the part of it in the store."""
        f = self._f
        if got == -errno.EXDEV:
            self._check_spilled()
            got = lib.tfem_f_read(f, out, n)
        if got < 0:
            raise self._fail(-got)
        done = got
        while done < n and f.pos < f.size:  # the spilled part, checked as it comes if in order
            if not f.checked and f.pos != f.crc_end:
                self._check_spilled()
            k = min(n - done, f.size - f.pos)
            assert self._spill is not None, "a consumer of a spilled file holds the store from open"
            self._spill.read_into(f.file_id, f.pos - f.memory_end, memoryview(ffi.buffer(out + done, k)))
            rc = lib.tfem_f_spilled_read(f, out + done, k)
            if rc:
                raise self._fail(rc)
            done += k
        return done


    def _write_rest(self, buf: CharPtr | bytes, n: int, done: int) -> None:
        f = self._f
        while True:
            if done < 0:
                raise self._fail(-done)
            if done == n:
                return
            if f.need == lib.TFEM_NEED_ROOM:
                self._make_room(f.want)
            else:  # TFEM_NEED_SPILL: the rest goes to the spill store
                # A gap before it is not sent: the store reads bytes never written as zeros.
                view = memoryview(buf)[done:] if isinstance(buf, bytes) else memoryview(ffi.buffer(buf + done, n - done))
                self._write_spilled(f.pos, view)
                f.pos += n - done
                if f.pos > f.size:
                    f.size = f.slot.size = f.pos
                f.crc_end = CRC_NONE  # checksummed at close, with the broker
                return
            rest = buf[done:] if isinstance(buf, bytes) else buf + done
            more = lib.tfem_f_write(f, rest, n - done)
            done = done + more if more >= 0 else more

    def _make_room(self, capacity: int) -> None:
        """Ask the broker for room up to `capacity`. A full arena (spill
        off) is NoSpace at once, or after waiting up to the open's
        room_timeout for blocks to be freed."""
        f = self._f
        deadline = Deadline(self._room_timeout)
        while True:
            seen = self._owner.room_seen()
            try:  # the broker can make room: it spills
                self._owner.call(Op.ALLOC, {"slot": f.index, "generation": f.generation, "capacity": capacity})
                break
            except NoSpace:
                if self._room_timeout == 0:
                    raise
                self._owner.wait_for_room(seen, deadline, "no memory was freed")
        lib.tfem_f_reload(f)

    def _spilled_checksum(self) -> int:
        """crc32c of the whole file: the memory part, then the spilled part
        (a producer's, at close, with the store opened for the look alone)."""
        f = self._f
        spill = self._spill or self._owner.spill
        if spill is not self._spill:
            spill.acquire()
        try:
            return spill.checksum(f.file_id, max(0, f.size - f.memory_end), lib.tfem_f_memory_crc(f))
        finally:
            if spill is not self._spill:
                spill.release()

    def _let_go_of_spill(self) -> None:
        if self._spill is not None:
            self._spill.release()
            self._spill = None

    def _check_spilled_first(self) -> None:
        """Before the core looks at a spilled file's bytes as a whole."""
        if self._spill is not None and not self._f.checked:
            self._check_spilled()

    def _check_spilled(self) -> None:
        """Check a spilled file in one pass: the memory part, then the
        store's. Damaged: ChecksumMismatch, and given back at close."""
        rc = lib.tfem_f_spilled_verdict(self._f, self._spilled_checksum())
        if rc:
            raise self._fail(rc)

    def _write_spilled(self, pos: int, mv: memoryview) -> None:
        if self._pending is None:
            self._pending = bytearray()
        if self._pending and pos == self._pending_offset + len(self._pending) \
                and len(self._pending) + len(mv) <= SPILL_IO_CHUNK:
            self._pending += mv
            return
        self._flush_spill()
        if len(mv) >= SPILL_IO_CHUNK:
            for i in range(0, len(mv), SPILL_IO_CHUNK):
                self._send_spill(pos + i, mv[i: i + SPILL_IO_CHUNK])
        else:
            self._pending_offset = pos
            self._pending += mv

    def _flush_spill(self) -> None:
        if self._pending:
            self._send_spill(self._pending_offset, self._pending)
            self._pending = bytearray()

    def _send_spill(self, pos: int, data: Any) -> None:
        f = self._f
        self._owner.call(Op.SPILL_WRITE, {"slot": f.index, "generation": f.generation, "offset": pos}, data)
