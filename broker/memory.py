"""The broker's memory: arena blocks handed out, files spilled to make room.

Theory of operation:
- It hands out arena blocks (ALLOC): one request per extent, an extent at
  least as large as what the file already has, so a file of n bytes costs
  O(log n) requests. Writers claim blocks themselves too, by
  compare-and-swap on the bitmap; within the broker, the request loop (for
  a request that needs no disk work) and the disk worker both allocate,
  and every allocation and first-fit look of the broker's holds `lock`,
  so the broker is one allocator however many threads it runs. Freeing
  (release_extents) needs no lock.
- When the arena cannot satisfy a request it moves the least recently
  published WAIT files to the spill store (holding each as its reader so no
  consumer takes it mid-move), and if that is not enough, moves the
  requesting file itself. The memory tier is thus the spill store's cache.
  Bytes past a spilled file's inline buffer are read and written through
  the broker (SPILL_READ, SPILL_WRITE).
- What touches the spill store is a generator that yields after each
  transaction of at most one store chunk (`STEP`): the disk worker
  (worker.py) runs jobs a step at a time, taking turns; the request loop
  runs them whole.
"""

from __future__ import annotations

import errno
import threading
from typing import Generator

from tfem._native import lib
from tfem.errors import InvalidArgument, NoSpace
from tfem.states import STATE_MASK, State

from .holdings import Holdings, state_words
from .spill import CHUNK

# Bytes per step: one chunk of the spill store, aligned with its chunks, so
# a step is one transaction that rewrites no chunk another step wrote
# (measured: 4 MiB in 1 MiB steps costs what it costs in one transaction;
# in 256 KiB steps, 2.5 times as much).
STEP = CHUNK
_SKIP = lib.TFEM_SLOT_SPILLED | lib.TFEM_SLOT_ARENA  # never evicted: moved already, or made whole for views

Steps = Generator[None, None, bool]


def chunked(offset: int, length: int) -> list[tuple[int, int]]:
    """(start, end) within [0, length) of the pieces of a write at spill
    offset `offset`, each within one STEP-aligned chunk of the store."""
    pieces, pos = [], 0
    while pos < length:
        end = min(length, pos + STEP - (offset + pos) % STEP)
        pieces.append((pos, end))
        pos = end
    return pieces


class Memory:
    def __init__(self, holdings: Holdings) -> None:
        self.holdings = holdings
        self.lock = threading.Lock()  # the broker's allocations: one at a time (see the module's docstring)

    def grow(self, s: int, generation: int, pid: int, capacity: int) -> int:
        """SlotTable.grow, as the broker's one allocator."""
        with self.lock:
            return self.holdings.table.grow(s, generation, pid, capacity)

    def alloc_now(self, s: int, generation: int, pid: int, capacity: int) -> bool | None:
        """ALLOC's answer if it needs no disk work: True if the file is
        spilled already, False once grown; None if room must be made."""
        if self.holdings.segment.slot(s).flags & lib.TFEM_SLOT_SPILLED:
            return True
        return False if self.grow(s, generation, pid, capacity) == 0 else None

    def alloc(self, s: int, generation: int, pid: int, capacity: int) -> Steps:
        """Grow slot s to `capacity` bytes for its writer `pid`, making room
        by spilling when the arena is full (the client tried the arena
        itself first). True if the file went to the spill store."""
        seg = self.holdings.segment
        if seg.slot(s).flags & lib.TFEM_SLOT_SPILLED:
            return True
        while True:
            rc = self.grow(s, generation, pid, capacity)
            if rc == 0:
                return False
            if rc == errno.E2BIG:
                return (yield from self._spill_or_fail(s, "the file has too many extents"))
            needed = -(-(capacity - self.holdings.table.capacity(s)) // seg.block_size)
            # More than the whole arena: spilling others would not help.
            if needed > seg.block_count or not (yield from self._evict(needed)):
                if seg.slot(s).flags & lib.TFEM_SLOT_ARENA:  # made whole for views: it stays in memory
                    raise NoSpace(f"the arena is full ({seg.block_count * seg.block_size >> 20} MiB) and a file "
                                  "made for views is never spilled")
                return (yield from self._spill_or_fail(s, "the arena is full"))

    def alloc_size(self, s: int, capacity: int) -> int:
        """Bytes an ALLOC of slot s to `capacity` is likely to move: the room
        it needs (evicted files move at least that much), or the file's own
        arena bytes (moved when nothing else can be)."""
        seg = self.holdings.segment
        if not 0 <= s < seg.slot_count:
            return 0
        have = self.holdings.table.capacity(s)
        return max(0, capacity - have, have - seg.buf_size)

    def _spill_or_fail(self, s: int, why: str) -> Steps:
        if self.holdings.spill is None:
            seg = self.holdings.segment
            raise NoSpace(f"{why} and spilling is off ({seg.block_count * seg.block_size >> 20} MiB arena)")
        yield from self._move_to_spill(s)
        return True

    def room_now(self, blocks: int) -> bool:
        """Whether the arena has a run of `blocks` free blocks now."""
        with self.lock:
            return self.holdings.segment.longest_free_run() >= blocks

    def make_run(self, blocks: int) -> Steps:
        """Spill least recently published files until the arena has a run
        of `blocks` free blocks (a file made whole for views). False if it
        cannot."""
        seg = self.holdings.segment
        while not self.room_now(blocks):
            if not (yield from self._evict(seg.block_count - seg.blocks_in_use() + 1)):
                return False
        return True

    def _evict(self, blocks_needed: int) -> Steps:
        """Move least recently published WAIT files to the spill store until
        `blocks_needed` blocks are free. False if nothing could be moved."""
        seg, table, spill = self.holdings.segment, self.holdings.table, self.holdings.spill
        if spill is None:
            return False
        wait = int(State.WAIT)
        candidates = []
        for s, word in enumerate(state_words(seg)):
            if word & STATE_MASK == wait:
                slot = seg.slot(s)
                if slot.extent_count and not slot.flags & _SKIP:
                    candidates.append((slot.waiting_ns, s))
        moved = False
        for _, s in sorted(candidates):
            handle = table.hold_waiting(s)
            if handle is None:
                continue
            try:
                slot = seg.slot(s)
                # Jobs take turns: another may have moved it since the look, or
                # it may be another file now, published in the freed slot.
                if slot.extent_count and not slot.flags & _SKIP:
                    yield from self._move_to_spill(s)
                    moved = True
            finally:
                unlinked = table.release(handle)  # freed instead, if unlinked meanwhile
                if unlinked is not None:
                    spill.discard(unlinked)
            if seg.block_count - seg.blocks_in_use() >= blocks_needed:
                break
        return moved

    def _move_to_spill(self, s: int) -> Generator[None, None, None]:
        """Copy bytes past the inline buffer to the spill store, a step at a
        time, free the extents, flag the slot. The caller holds the slot."""
        seg, table, spill = self.holdings.segment, self.holdings.table, self.holdings.spill
        assert spill is not None and seg.view is not None
        slot = seg.slot(s)
        size, file_id = slot.size, slot.file_id
        try:
            for file_offset, seg_offset, length in table.pieces(s)[1 if seg.buf_size else 0:]:
                n = max(0, min(length, size - file_offset))
                at = file_offset - seg.buf_size
                for start, end in chunked(at, n):
                    spill.write(file_id, at + start, seg.view[seg_offset + start: seg_offset + end])
                    yield
        except BaseException:
            # One transaction per step: the steps already stored would never
            # be discarded (the file is not flagged), so they go now. Also
            # when the job is closed unfinished (GeneratorExit, at a stop).
            spill.discard(file_id)
            raise
        table.set_flag(s, lib.TFEM_SLOT_SPILLED)
        table.release_extents(s)

    def write(self, file_id: int, offset: int, data: memoryview) -> Generator[None, None, None]:
        """SPILL_WRITE's store write, a step at a time."""
        spill = self.holdings.spill
        assert spill is not None
        for start, end in chunked(offset, len(data)):
            spill.write(file_id, offset + start, data[start:end])
            yield

    def discard(self, file_id: int) -> None:
        """Drop a freed file's spill records (DISCARD), unless a slot still
        holds the file."""
        seg, table = self.holdings.segment, self.holdings.table
        if self.holdings.spill is None:
            return

        def held(s: int) -> bool:
            return seg.slot(s).file_id == file_id and table.state_of(s)[0] is not State.INVALID

        invalid = int(State.INVALID)
        for s, word in enumerate(state_words(seg)):
            if word & STATE_MASK != invalid and held(s):
                # A client claiming the freed slot sets its state before its
                # new file id: look again once that claim is complete.
                with table.locked():
                    if held(s):
                        raise InvalidArgument(f"file {file_id} is still held")
        self.holdings.spill.discard(file_id)
