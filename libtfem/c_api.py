"""The Python side of libtfem.so: the `_tfem_py_*` entry points.

libtfem.so does everything on the memory path in C (native/tfem_capi.c);
it calls these only for what needs the broker or the spill store: room in
a full arena, the writing, reading and checksum of a spilled file's bytes
(written through the broker, read from the store), the segment's name
when only a broker endpoint is known, and a name to pull from another
node. Each runs over
the process's default client (tfem.posix). Every error becomes -1 with
errno set, in one place (`_fail`); an exception never escapes to C, where
cffi would turn it into a silent 0.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable

from . import posix
from .client import WANT_SLICE_S
from .errors import TfemError, errno_of
from .files import SPILL_IO_CHUNK
from .protocol import Op, Wanting

if TYPE_CHECKING:  # the embedding module's FFI, as cffi's stubs type it
    from _cffi_backend import FFI

EntryPoint = Callable[..., int]


def install(ffi: FFI) -> None:
    """Bind the entry points declared in native/tfem_embed.h."""

    # exc_type is Any: cffi's stubs say an Exception where cffi passes its type
    def _fail(exc_type: Any, exc: BaseException, tb: TracebackType) -> int:
        ffi.errno = errno_of(exc)
        if not isinstance(exc, (TfemError, OSError, ValueError)):
            import traceback

            traceback.print_exception(exc_type, exc, tb)  # a bug: say so on stderr
        return -1

    def extern(fn: EntryPoint) -> EntryPoint:
        return ffi.def_extern(name=fn.__name__, error=-1, onerror=_fail)(fn)

    def held(slot: int, generation: int) -> dict[str, int]:
        return {"slot": slot, "generation": generation}

    def text(name: FFI.CData) -> str:
        raw = ffi.string(name)  # of a char *, bytes (cffi's stubs allow str)
        assert isinstance(raw, bytes)
        return raw.decode()  # checked UTF-8 by the C side

    @extern
    def _tfem_py_ping() -> int:
        return 1

    @extern
    def _tfem_py_segment(out: FFI.CData, size: int) -> int:
        name = posix.default_client().table.seg.name.encode()
        if len(name) >= size:
            raise TfemError(f"segment name {name!r} is too long")
        ffi.memmove(out, name + b"\0", len(name) + 1)
        return 0

    @extern
    def _tfem_py_alloc(slot: int, generation: int, capacity: int) -> int:
        posix.default_client().call(Op.ALLOC, {**held(slot, generation), "capacity": capacity})
        return 0

    @extern
    def _tfem_py_spill_write(slot: int, generation: int, offset: int, buf: FFI.CData, count: int) -> int:
        client, data, chunk = posix.default_client(), ffi.buffer(buf, count), SPILL_IO_CHUNK
        for start in range(0, count, chunk):
            piece = memoryview(data)[start: start + chunk]
            client.call(Op.SPILL_WRITE, {**held(slot, generation), "offset": offset + start}, piece)
        return count

    @extern
    def _tfem_py_spill_hold(hold: int) -> int:
        spill = posix.default_client().spill
        spill.acquire() if hold else spill.release()
        return 0

    @extern
    def _tfem_py_spill_read(file_id: int, offset: int, buf: FFI.CData, count: int) -> int:
        posix.default_client().spill.read_into(file_id, offset, memoryview(ffi.buffer(buf, count)))
        return count

    @extern
    def _tfem_py_checksum(file_id: int, length: int, crc: int) -> int:
        return posix.default_client().spill.checksum(file_id, length, crc)

    # The C side waits on its own futex between these (client.py's _open_across, in C).
    @extern
    def _tfem_py_want(name: FFI.CData, wait: int) -> int:
        wanting = Wanting.NOW if wait else Wanting.WHEN_PULLED  # answered: the C side waits for the reply
        posix.default_client().call(Op.WANT, {"name": text(name), "wait": int(wanting)})
        return int(WANT_SLICE_S * 1e9) if wait else 0

    @extern
    def _tfem_py_unwant(name: FFI.CData) -> int:
        posix.default_client().call(Op.UNWANT, {"name": text(name)})
        return 0


