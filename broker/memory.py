"""The broker's memory: files spilled to make room, and brought back.

Theory of operation:
- Writers claim arena blocks themselves (atomic claims in the bitmap), an
  extent at least as large as what the file already has, so a file of n
  bytes costs O(log n) claims. Only when the arena is full do they ask the
  broker (ALLOC).
- When the arena cannot satisfy a request it moves the least recently
  published WAIT files to the spill store (holding each as its reader so no
  consumer takes it mid-move), and if that is not enough, moves the
  requesting file itself. The memory tier is thus the spill store's cache.
  Bytes past a spilled file's inline buffer are written through the broker
  (SPILL_WRITE); consumers read them from the store themselves, and a
  consumer freeing a spilled file tells nobody: the broker finds records no
  slot owns and deletes them (server.py, `_tidy_spill`).
- When memory frees up, it brings spilled WAIT files back (`restore`),
  oldest first (the order they were spilled in, and are read in), while
  half the arena stays free for writers: so a reader of a file that waited
  in the store reads it at memory speed. It copies the records into new
  extents while it holds the file as its reader, then clears the flag:
  the records, owned by no spilled slot, go at the next tidy. A crash
  before the flag is cleared leaves a spilled file whose extents adoption
  frees (recovery.py).
"""

from __future__ import annotations

import errno

from tfem._native import lib
from tfem.errors import InvalidArgument, NoSpace
from tfem.states import State
from tfem.table import Handle

from .holdings import Holdings

EVICT_AHEAD = 32  # an eviction frees at least this share of the arena (1/32)
RESTORE_KEEP_FREE = 2  # restoring stops where 1/2 of the arena would be left free
RESTORE_BATCH = 64 << 20  # bytes restored per call at most: the loop is not held long


class Memory:
    def __init__(self, holdings: Holdings) -> None:
        self.holdings = holdings
        self.restores = 0  # files brought back into memory
        self.restore_hits = 0  # ... and consumed from there
        self.restores_evicted = 0  # ... and spilled again before that
        self._restored: dict[int, int] = {}  # file id -> slot, of restored files not yet settled

    def alloc(self, s: int, generation: int, pid: int, capacity: int) -> bool:
        """Grow slot s to `capacity` bytes for its writer `pid`, making room
        by spilling when the arena is full (the client tried the arena
        itself first). True if the file went to the spill store."""
        seg, table = self.holdings.segment, self.holdings.table
        if seg.slot(s).flags & lib.TFEM_SLOT_SPILLED:
            return True
        while True:
            rc = table.grow(s, generation, pid, capacity)
            if rc == 0:
                return False
            if rc == errno.E2BIG:
                return self._spill_or_fail(s, "the file has too many extents")
            needed = -(-(capacity - table.capacity(s)) // seg.block_size)
            # More than the whole arena: spilling others would not help.
            if needed > seg.block_count or not self._evict(needed):
                if seg.slot(s).flags & lib.TFEM_SLOT_ARENA:  # made whole for views: it stays in memory
                    raise NoSpace(f"the arena is full ({seg.block_count * seg.block_size >> 20} MiB) and a file "
                                  "made for views is never spilled")
                return self._spill_or_fail(s, "the arena is full")

    def _spill_or_fail(self, s: int, why: str) -> bool:
        if self.holdings.spill is None:
            seg = self.holdings.segment
            raise NoSpace(f"{why} and spilling is off ({seg.block_count * seg.block_size >> 20} MiB arena)")
        self._move_to_spill(s)
        return True

    def make_run(self, blocks: int) -> bool:
        """Spill least recently published files until the arena has a run
        of `blocks` free blocks (a file made whole for views). False if it
        cannot."""
        seg = self.holdings.segment
        while seg.longest_free_run() < blocks:
            if not self._evict(seg.block_count - seg.blocks_in_use() + 1):
                return False
        return True

    def _evict(self, blocks_needed: int) -> bool:
        """Move least recently published WAIT files to the spill store until
        `blocks_needed` blocks are free. False if nothing could be moved."""
        seg, table, spill = self.holdings.segment, self.holdings.table, self.holdings.spill
        if spill is None:
            return False
        # A little past what is needed: each look over the slots serves
        # several writers' requests.
        blocks_needed = max(blocks_needed, seg.block_count // EVICT_AHEAD)
        moved = False
        for s in table.evictable():
            handle = table.hold_waiting(s)
            if handle is None:
                continue
            try:
                self._move_to_spill(s)
            finally:
                unlinked = table.release(handle)  # freed instead, if unlinked meanwhile
                if unlinked is not None:
                    spill.discard([unlinked])
            moved = True
            if seg.block_count - seg.blocks_in_use() >= blocks_needed:
                break
        return moved

    def _move_to_spill(self, s: int) -> None:
        """Copy bytes past the inline buffer to the spill store, in one
        transaction, free the extents, flag the slot. The caller holds the
        slot."""
        seg, table, spill = self.holdings.segment, self.holdings.table, self.holdings.spill
        assert spill is not None and seg.view is not None
        slot = seg.slot(s)
        size = slot.size
        pieces = []
        for file_offset, seg_offset, length in table.pieces(s)[1 if seg.buf_size else 0:]:
            n = max(0, min(length, size - file_offset))
            if n:
                pieces.append((file_offset - seg.buf_size, seg.view[seg_offset: seg_offset + n]))
        spill.write_pieces(slot.file_id, pieces)
        table.set_flag(s, lib.TFEM_SLOT_SPILLED)
        table.release_extents(s)

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
        if table.grow_held(handle, size) != 0:
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
