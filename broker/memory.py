"""The broker's memory: arena blocks handed out, files spilled to make room.

Theory of operation:
- It hands out arena blocks (ALLOC): one request per extent, an extent at
  least as large as what the file already has, so a file of n bytes costs
  O(log n) requests. Only the broker sets bitmap bits, so the first-fit
  scan never races another allocator; holders clear bits as they free.
- When the arena cannot satisfy a request it moves the least recently
  published WAIT files to the spill store (holding each as its reader so no
  consumer takes it mid-move), and if that is not enough, moves the
  requesting file itself. The memory tier is thus the spill store's cache.
  Bytes past a spilled file's inline buffer are read and written through
  the broker (SPILL_READ, SPILL_WRITE).
"""

from __future__ import annotations

import errno

from tfem._native import lib
from tfem.errors import InvalidArgument, NoSpace
from tfem.states import STATE_MASK, State

from .holdings import Holdings, state_words


class Memory:
    def __init__(self, holdings: Holdings) -> None:
        self.holdings = holdings

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
        wait, candidates = int(State.WAIT), []
        for s, word in enumerate(state_words(seg)):
            if word & STATE_MASK == wait:
                slot = seg.slot(s)
                if slot.extent_count and not slot.flags & (lib.TFEM_SLOT_SPILLED | lib.TFEM_SLOT_ARENA):
                    candidates.append((slot.waiting_ns, s))
        moved = False
        for _, s in sorted(candidates):
            handle = table.hold_waiting(s)
            if handle is None:
                continue
            try:
                self._move_to_spill(s)
            finally:
                unlinked = table.release(handle)  # freed instead, if unlinked meanwhile
                if unlinked is not None:
                    spill.discard(unlinked)
            moved = True
            if seg.block_count - seg.blocks_in_use() >= blocks_needed:
                break
        return moved

    def _move_to_spill(self, s: int) -> None:
        """Copy bytes past the inline buffer to the spill store, free the
        extents, flag the slot. The caller holds the slot."""
        seg, table, spill = self.holdings.segment, self.holdings.table, self.holdings.spill
        assert spill is not None and seg.view is not None
        slot = seg.slot(s)
        size = slot.size
        try:
            for file_offset, seg_offset, length in table.pieces(s)[1 if seg.buf_size else 0:]:
                n = max(0, min(length, size - file_offset))
                if n:
                    spill.write(slot.file_id, file_offset - seg.buf_size, seg.view[seg_offset: seg_offset + n])
        except BaseException:
            # One transaction per piece: the pieces already stored would
            # never be discarded (the file is not flagged), so they go now.
            spill.discard(slot.file_id)
            raise
        table.set_flag(s, lib.TFEM_SLOT_SPILLED)
        table.release_extents(s)

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
