"""The broker's memory: files spilled to make room, and brought back.

Theory of operation:
- Writers claim arena blocks themselves (compare-and-swap on the bitmap),
  an extent at least as large as what the file already has, so a file of n
  bytes costs O(log n) claims; when the arena is full they ask the broker
  (ALLOC). Within the broker, the request loop (for a request that needs no
  disk work) and the disk worker both allocate, and every allocation and
  first-fit look of the broker's holds `lock`, so the broker is one
  allocator however many threads it runs. Freeing (release_extents) needs
  no lock.
- When the arena cannot satisfy a request it moves the least recently
  published WAIT files to the spill store (holding each as its reader so no
  consumer takes it mid-move), as many as the request needs, and if that is
  not enough, moves the requesting file itself; once it is answered, it
  goes on until 1/8 of the arena is free (`evict_ahead`, in the
  background). The memory tier is thus the spill store's cache. Bytes past
  a spilled file's inline buffer are written through the broker
  (SPILL_WRITE); consumers read them from the store themselves, and a
  consumer freeing a spilled file tells nobody: the broker finds records
  no slot owns and deletes them (`tidy`).
- When memory frees up, it brings spilled WAIT files back (`restore`),
  oldest first (the order they were spilled in, and are read in), while
  half the arena stays free for writers, at most 16 MiB a tidy: so a
  reader of a file that waited in the store reads it at memory speed. It copies the records into new
  extents while it holds the file as its reader, then clears the flag:
  the records, owned by no spilled slot, go at the next tidy. A crash
  before the flag is cleared leaves a spilled file whose extents adoption
  frees (recovery.py).
- What touches the spill store is a generator that yields after each
  transaction of at most one record (`STEP`): the disk worker (worker.py)
  runs jobs a step at a time, taking turns; the request loop runs them
  whole. A file being moved has records but no flag yet: `moving` names
  it, so that a tidy between two steps does not take its records for an
  orphan's.
"""

from __future__ import annotations

import errno
import threading
from typing import Generator

from tfem._native import lib
from tfem.errors import NoSpace
from tfem.spill_format import RECORD_MAX
from tfem.states import State
from tfem.table import Handle

from .holdings import Holdings

# Bytes per step: one record, one transaction (measured: 4 MiB in 1 MiB
# steps costs what it costs in one transaction; in 256 KiB steps, 2.5 times
# as much).
STEP = RECORD_MAX
_SKIP = lib.TFEM_SLOT_SPILLED | lib.TFEM_SLOT_ARENA  # never evicted: moved already, or made whole for views
AHEAD_FREE = 8  # after an ALLOC that made room, the broker goes on until this share is free (1/8)
RESTORE_KEEP_FREE = 2  # restoring stops where 1/2 of the arena would be left free
RESTORE_BATCH = 16 << 20  # bytes restored per tidy at most: a tidy is one step

Steps = Generator[None, None, bool]


def chunked(length: int) -> list[tuple[int, int]]:
    """(start, end) of the STEP-long pieces of `length` bytes."""
    return [(start, min(length, start + STEP)) for start in range(0, length, STEP)]


class Memory:
    def __init__(self, holdings: Holdings) -> None:
        self.holdings = holdings
        self.lock = threading.Lock()  # the broker's allocations: one at a time (see the module's docstring)
        self.moving: set[int] = set()  # ids of files whose move to the store is under way
        self.ahead_due = False  # an ALLOC found the arena full: evict ahead of the next ones
        self.spills = 0  # files moved to the spill store
        self.restores = 0  # files brought back into memory
        self.restore_hits = 0  # ... and consumed from there
        self.restores_evicted = 0  # ... and spilled again before that
        self._restored: dict[int, int] = {}  # file id -> slot, of restored files not yet settled

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
            self.ahead_due = True

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

    def evict_ahead(self) -> Generator[None, None, None]:
        """After an ALLOC that had to make room, and once it is answered:
        go on spilling the least recently published files until 1/8 of the
        arena is free, so that the writers that come next find room without
        waiting, while this runs on the other CPU. Files go in the order
        they would have gone anyway, a little sooner."""
        seg = self.holdings.segment
        target = seg.block_count // AHEAD_FREE
        if seg.block_count - seg.blocks_in_use() < target:
            try:
                yield from self._evict(target)
            except NoSpace:
                pass  # the store is full: writers will be told when they need the room

    def _evict(self, blocks_needed: int) -> Steps:
        """Move least recently published WAIT files to the spill store until
        `blocks_needed` blocks are free. False if nothing could be moved."""
        seg, table, spill = self.holdings.segment, self.holdings.table, self.holdings.spill
        if spill is None:
            return False
        moved = False
        for s in table.evictable():
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
                    spill.discard([unlinked])
            if seg.block_count - seg.blocks_in_use() >= blocks_needed:
                break
        return moved

    def _move_to_spill(self, s: int) -> Generator[None, None, None]:
        """Copy bytes past the inline buffer to the spill store, a record a
        step, free the extents, flag the slot. The caller holds the slot."""
        seg, table, spill = self.holdings.segment, self.holdings.table, self.holdings.spill
        assert spill is not None and seg.view is not None
        slot = seg.slot(s)
        size, file_id = slot.size, slot.file_id
        self.moving.add(file_id)
        try:
            for file_offset, seg_offset, length in table.pieces(s)[1 if seg.buf_size else 0:]:
                n = max(0, min(length, size - file_offset))
                at = file_offset - seg.buf_size
                for start, end in chunked(n):
                    spill.write(file_id, at + start, seg.view[seg_offset + start: seg_offset + end])
                    yield
            table.set_flag(s, lib.TFEM_SLOT_SPILLED)
        except BaseException:
            # A transaction per step: the steps already stored would never
            # be discarded (the file is not flagged), so they go now. Also
            # when the job is closed unfinished (GeneratorExit, at a stop).
            spill.discard([file_id])
            raise
        finally:
            self.moving.discard(file_id)
        table.release_extents(s)
        self.spills += 1

    def write(self, file_id: int, offset: int, data: memoryview) -> Generator[None, None, None]:
        """SPILL_WRITE's store write, a step at a time."""
        spill = self.holdings.spill
        assert spill is not None
        for start, end in chunked(len(data)):
            spill.write(file_id, offset + start, data[start:end])
            yield

    # ---- bringing spilled files back ----

    def restore(self) -> int:
        """Bring spilled WAIT files back into free memory, oldest first, while
        half the arena stays free; at most RESTORE_BATCH bytes. How many."""
        seg, table, spill = self.holdings.segment, self.holdings.table, self.holdings.spill
        self._settle_restored()
        if spill is None or not spill.bytes_by_file:
            return 0
        keep_free, budget, done = seg.block_count // RESTORE_KEEP_FREE, RESTORE_BATCH, 0
        for s in table.restorable():
            blocks = -(-max(0, seg.slot(s).size - seg.buf_size) // seg.block_size)
            if seg.block_count - seg.blocks_in_use() - blocks < keep_free or blocks * seg.block_size > budget:
                break
            handle = table.hold_waiting(s)
            if handle is None:
                continue
            try:
                if self._bring_back(s, handle):
                    done += 1
                    budget -= blocks * seg.block_size
            finally:
                table.release(handle)  # freed instead, if unlinked meanwhile: tidy drops its records
        self.restores += done
        return done

    def _bring_back(self, s: int, handle: Handle) -> bool:
        """Copy held spilled file s from the store into new extents."""
        seg, table, spill = self.holdings.segment, self.holdings.table, self.holdings.spill
        assert spill is not None and seg.view is not None
        slot = seg.slot(s)
        if not slot.flags & lib.TFEM_SLOT_SPILLED or slot.flags & lib.TFEM_SLOT_ARENA:
            return False
        size = slot.size
        with self.lock:
            grown = table.grow_held(handle, size) == 0
        if not grown:
            table.release_extents(s)  # what it got: the file stays spilled
            return False
        try:
            for file_offset, seg_offset, length in table.pieces(s)[1 if seg.buf_size else 0:]:
                n = max(0, min(length, size - file_offset))
                if n:
                    spill.read_into(slot.file_id, file_offset - seg.buf_size, seg.view[seg_offset: seg_offset + n])
        except BaseException:
            table.release_extents(s)
            raise
        table.clear_flag(s, lib.TFEM_SLOT_SPILLED)
        self._restored[slot.file_id] = s
        return True

    @property
    def restored_unsettled(self) -> bool:
        """Restored files not yet counted as read from memory or spilled
        again: the tidy goes on while there are some, store empty or not."""
        return bool(self._restored)

    def _settle_restored(self) -> None:
        """Count the restored files consumed from memory (hits) and those
        spilled again first."""
        seg, table = self.holdings.segment, self.holdings.table
        for file_id, s in list(self._restored.items()):
            slot = seg.slot(s)
            if slot.file_id == file_id and table.state_of(s)[0] is not State.INVALID:
                if not slot.flags & lib.TFEM_SLOT_SPILLED:
                    continue  # still waiting in memory
                self.restores_evicted += 1
            else:
                self.restore_hits += 1
            del self._restored[file_id]
