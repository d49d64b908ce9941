"""Moving the files of a segment whose name was removed into a new one.

systemd's RemoveIPC=yes removes a user's POSIX shared memory when the
user's last session ends, and an rm in /dev/shm does the same: every process
that maps the segment keeps it, but no new client can find it. The broker
notices in its sweep, makes a new segment under the name (same layout, same
instance id, file ids going on past the old ones), and sets the old one's
`moved` flag. From then on an open or create in the old segment fails with
EIDRM and the client maps the new one (client.py, tfem_capi.c); consumers
waiting there are woken to do so.

Every published file is moved: the broker takes it as its reader, writes
its bytes into a new file of the new segment through the same core and the
same room and spill paths as any client, publishes it, and discards the old
copy's spill records. The old copy stays held by the broker: the old
segment goes as a whole, once nobody else holds anything in it. Files still
held there stay until their holders let go: a producer's file moves once it
is published, a consumer's if it is given back. A file whose name was taken
in the new segment meanwhile waits until that name is free.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Callable, Iterator

from tfem._native import ffi, lib
from tfem.errors import NoSpace, TfemError
from tfem.files import TfemFile
from tfem.protocol import Op, Reply
from tfem.segment import Layout, Segment
from tfem.spill_format import RECORD_MAX
from tfem.states import State
from tfem.table import Deadline, SlotTable

from .holdings import Holdings, Slot
from .spill import SpillStore

log = logging.getLogger("tfem.broker")

Ask = Callable[[Op, dict[str, Any], Any], Reply]


class OwnWrites:
    """files.Owner for the broker writing into its own segment: what a
    client would ask over the socket goes straight to the broker."""

    def __init__(self, segment: Segment, ask: Ask, spill: SpillStore | None) -> None:
        assert segment.view is not None, "the segment is mapped"
        self.memory: memoryview = segment.view
        self.segment = segment
        self.base = int(ffi.cast("uintptr_t", segment.header))
        self.pid = os.getpid()
        self.held: set[Any] = set()
        self.pinned: dict[Any, TfemFile] = {}
        self._ask = ask
        self._spill = spill

    @property
    def spill(self) -> SpillStore:
        assert self._spill is not None, "a file spilled with spilling off"
        return self._spill

    def call(self, op: Op, args: dict[str, Any], data: Any = None) -> Reply:
        return self._ask(op, args, data)

    def room_seen(self) -> int:
        return 0

    def wait_for_room(self, seen: int, deadline: Deadline, what: str) -> None:
        raise NoSpace(what)  # the broker never waits for its own clients


class Relocation:
    """A replaced segment, and the moving of its published files."""

    def __init__(self, old: Segment) -> None:
        self.old = old
        self.table = SlotTable(old, os.getpid())
        self.moved = 0
        old.header.moved = 1
        self.table.wake_all()  # waiting consumers look again, and find the flag

    def move_published(self, into: OwnWrites, spill: SpillStore | None) -> None:
        """Move every file published in the old segment that can go now."""
        for s in range(self.old.slot_count):
            if self.table.state_of(s)[0] is State.WAIT:
                self._move(s, into, spill)

    def finished(self) -> bool:
        """Nothing left to move, nor held by anyone but the broker."""
        me = os.getpid()
        return self.table.holders() <= {me} and not any(
            self.table.state_of(s)[0] is State.WAIT for s in range(self.old.slot_count))

    def _move(self, s: int, into: OwnWrites, spill: SpillStore | None) -> None:
        handle = self.table.hold_waiting(s)
        if handle is None:
            return  # taken or freed meanwhile
        slot = self.old.slot(s)
        raw = bytes(ffi.buffer(slot.name, slot.name_len))
        core = ffi.new("struct tfem_file *")
        rc = lib.tfem_f_create(ffi.cast("struct tfem_header *", into.base), raw, len(raw), into.pid, 0, core)
        if rc:
            self.table.release(handle)  # the name is taken there, or no slot is free: later
            if rc not in (errno.EEXIST, errno.ENOSPC):
                log.error("cannot move %r into the new segment: %s", raw, os.strerror(rc))
            return
        life = self.old.life(s)
        lib.tfem_f_set_lifetime(core, slot.readers, life.expires_ns)
        into.segment.life(core.index).readers_left = life.readers_left  # reads already done stay done
        if slot.flags & lib.TFEM_SLOT_ARENA:
            self._make_whole(core, slot, into)
        f = TfemFile(core, raw.decode(), into)
        into.held.add(core)
        try:
            for offset, data in self._pieces(s, int(slot.size), spill):
                f.seek(offset)
                f.write(data)
            f.close()
        except BaseException as exc:
            f.abort()
            self.table.release(handle)
            if not isinstance(exc, TfemError):
                raise
            log.error("cannot move %r into the new segment yet: %s", raw, exc)
            return
        if slot.flags & lib.TFEM_SLOT_SPILLED and spill is not None:
            spill.discard([slot.file_id])
        self.moved += 1

    def _make_whole(self, core: Any, slot: Slot, into: OwnWrites) -> None:
        """A file made whole for views (Client.create) is made whole again,
        if the new arena has such a run; else its bytes go in pieces."""
        checked = not slot.flags & lib.TFEM_SLOT_UNCHECKED
        if lib.tfem_f_reserve(core, slot.size, checked) == errno.ENOSPC and \
                into.call(Op.ROOM, {"blocks": -(-slot.size // self.old.block_size)}).result["room"]:
            lib.tfem_f_reserve(core, slot.size, checked)

    def _pieces(self, s: int, size: int, spill: SpillStore | None) -> Iterator[tuple[int, memoryview]]:
        """(file offset, bytes) of the old copy, in order."""
        slot = self.old.slot(s)
        assert self.old.view is not None
        for offset, at, length in self.table.pieces(s):
            n = min(length, size - offset)
            if n > 0:
                yield offset, self.old.view[at: at + n]
        if slot.flags & lib.TFEM_SLOT_SPILLED and spill is not None:
            start = self.old.buf_size
            for offset in range(start, size, RECORD_MAX):
                out = memoryview(bytearray(min(RECORD_MAX, size - offset)))
                spill.read_into(slot.file_id, offset - start, out)
                yield offset, out


def replace_segment(holdings: Holdings, ask: Ask) -> None:
    """Make the segment again under its removed name, with its layout, and
    start moving the old one's files there."""
    old, h = holdings.segment, holdings.segment.header
    layout = Layout(h.slot_count, h.buf_size, h.block_size, h.block_count * h.block_size, h.max_file_size)
    try:
        new = Segment.create(old.name, layout, replacing=old)
    except TfemError as exc:
        log.error("the segment %s was removed and cannot be made again: %s", old.name, exc)
        return
    holdings.segment, holdings.table = new, SlotTable(new, os.getpid())
    holdings.relocations.append(Relocation(old))
    holdings.segments_replaced += 1
    log.warning("the segment %s was removed: made it again, moving its files there", old.name)
    move_files(holdings, ask)


def move_files(holdings: Holdings, ask: Ask) -> None:
    """Move what can go now out of every replaced segment; let go of those
    left empty."""
    into = OwnWrites(holdings.segment, ask, holdings.spill)
    for relocation in list(holdings.relocations):
        relocation.move_published(into, holdings.spill)
        if relocation.finished():
            log.info("moved %d file(s) out of the replaced segment", relocation.moved)
            relocation.old.close()
            holdings.relocations.remove(relocation)

