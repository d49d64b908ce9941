"""Adopting a segment after a broker crash: check every slot, rebuild the rest.

Theory of operation: the slot table is the truth; everything else in the
segment (the name index, the free-slot stack, the block bitmap) is derived
from it and is rebuilt from scratch, under the table lock, so whatever state
a crash left them in does not matter. A slot that is not self-consistent
(unknown state, a name that is not text, extents outside the arena or
overlapping another file's) is dropped rather than trusted. Then the files
of dead holders are settled as the state machine says for a holder's death:
a file being written is dropped, a file being read goes back to WAIT. Files
whose holders are alive stay theirs: on one node a producer or consumer does
not need the broker to finish a small file.

A move to the spill store that the crash interrupted is finished or undone:
a slot flagged SPILLED has all its bytes in the store (the flag is set after
the copy), so its extents are freed; spill records of a file that is not
flagged are partial and are discarded. A spilled file's size has no extents
to be checked against: it is bounded by the segment's largest file and by
where the file's records end, so a garbage size can neither be read past
nor make the broker checksum terabytes of zeros (the checksum then tells
the consumer the file is damaged).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Mapping

from tfem._native import ffi, lib
from tfem.states import State, generation_of, holder_of, pack_word, unpack_word
from tfem.table import NAME_MAX, SlotTable, name_hash

_KNOWN_FLAGS = lib.TFEM_SLOT_SPILLED | lib.TFEM_SLOT_DOOMED | lib.TFEM_SLOT_ARENA | lib.TFEM_SLOT_UNCHECKED
log = logging.getLogger("tfem.broker")


@dataclasses.dataclass
class Recovery:
    """What adoption found and did."""

    kept: int = 0  # files kept as they were (WAIT, or held by a live process)
    returned_to_wait: int = 0  # READ by a dead consumer
    dropped_writing: int = 0  # WRITE by a dead producer
    dropped_corrupt: int = 0  # slots that did not make sense
    spill_finished: int = 0  # interrupted moves to the spill store
    sizes_bounded: int = 0  # spilled files whose size was past what they can hold
    holds_changed: int = 0  # shared reads and SHARED files made consistent
    discard_file_ids: list[int] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        return (f"kept {self.kept}, returned to WAIT {self.returned_to_wait}, dropped "
                f"{self.dropped_writing} being written and {self.dropped_corrupt} corrupt")


def _slot_problem(table: SlotTable, s: int, claimed: bytearray) -> str | None:
    """Why slot s cannot be trusted, or None. Marks its blocks in `claimed`."""
    seg, slot = table.seg, table.seg.slot(s)
    if not 1 <= slot.name_len <= NAME_MAX:
        return "bad name length"
    raw = ffi.buffer(slot.name, slot.name_len)[:]
    if b"\0" in raw:
        return "NUL in name"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "name is not UTF-8"
    if slot.name_hash != name_hash(raw):
        return "name hash does not match the name"
    if slot.flags & ~_KNOWN_FLAGS:
        return "unknown flags"
    if not 0 < slot.file_id < 2**63:  # ids count up from 1
        return "impossible file id"
    if slot.extent_count > lib.TFEM_MAX_EXTENTS:
        return "too many extents"
    marked: list[tuple[int, int]] = []

    def unmark(why: str) -> str:
        for start, count in marked:
            claimed[start: start + count] = bytes(count)
        return why

    for i in range(slot.extent_count):
        start, count = slot.extents[i].start, slot.extents[i].count
        if count == 0 or start + count > seg.block_count:
            return unmark("extent outside the arena")
        if claimed.find(1, start, start + count) != -1:
            return unmark("extent overlaps another extent")
        claimed[start: start + count] = b"\1" * count
        marked.append((start, count))
    if slot.flags & lib.TFEM_SLOT_ARENA and slot.flags & lib.TFEM_SLOT_SPILLED:
        return unmark("both made whole and spilled")
    if not slot.flags & lib.TFEM_SLOT_SPILLED and slot.size > table.capacity(s):
        return unmark("size beyond what the file holds")
    return None


def _bound_spilled_size(table: SlotTable, s: int, stored_end: int) -> bool:
    """Bound the size of spilled slot s (published or being read: a live
    writer's size is its own until it publishes) by the largest file and by
    where its records end. True if it was past them."""
    seg, slot = table.seg, table.seg.slot(s)
    bound = min(seg.header.max_file_size, seg.buf_size + stored_end)
    if slot.size <= bound:
        return False
    log.warning("slot %d: spilled size %d bounded to %d at adoption (what its records hold)", s, slot.size, bound)
    slot.size = bound
    return True


def adopt(table: SlotTable, alive: Callable[[int], bool], spilled: Mapping[int, int]) -> Recovery:
    """Check and rebuild the table of an adopted segment. `alive(pid)` says
    whether a holder still runs; `spilled` maps the file ids the spill store
    holds records for to where their records end (bytes past the inline
    buffer). Returns what was done; the caller discards `discard_file_ids`
    from the spill store."""
    seg, report = table.seg, Recovery()
    hdr = seg.header
    hdr.moved = 0  # a replaced segment has lost its name: one found under the name is no such thing
    claimed = bytearray(seg.block_count)
    keep_spill: set[int] = set()
    with table.locked():
        report.holds_changed = table.check_holds()  # first: it may leave SHARED slots INVALID, to empty below
        live: list[int] = []
        for s in range(seg.slot_count):
            slot = seg.slot(s)
            word = slot.state
            try:
                state: State | None = unpack_word(word)[0]
            except ValueError:  # not a state at all
                state = None
            holder = holder_of(word)
            # Nobody holds these by their word (a SHARED file's readers are in
            # the hold table): a pid there is damage, not a process to ask about.
            if state in (State.INVALID, State.WAIT, State.SHARED) and holder:
                slot.state = pack_word(state, generation_of(word), 0)
            if state is State.INVALID:
                table.empty_locked(s)
                continue
            # A WAIT file cannot have been unlinked and kept: unlink frees it.
            problem = "unknown state" if state is None else \
                "unlinked but waiting" if slot.flags & lib.TFEM_SLOT_DOOMED and state is State.WAIT else \
                "held by no possible process" if state in (State.WRITE, State.READ) and not 0 < holder < 2**31 else \
                _slot_problem(table, s, claimed)
            if problem is not None:
                log.warning("slot %d dropped at adoption: %s", s, problem)
                table.empty_locked(s)
                report.dropped_corrupt += 1
                continue
            if slot.flags & lib.TFEM_SLOT_SPILLED:
                if slot.extent_count:
                    for i in range(slot.extent_count):
                        start, count = slot.extents[i].start, slot.extents[i].count
                        claimed[start: start + count] = bytes(count)
                    slot.extent_count = 0
                    report.spill_finished += 1
                keep_spill.add(slot.file_id)
                if state is not State.WRITE and _bound_spilled_size(table, s, spilled.get(slot.file_id, 0)):
                    report.sizes_bounded += 1
            live.append(s)
        # The derived structures, from scratch.
        for i in range(hdr.index_size):
            seg.index[i] = 0
        for w in range((seg.block_count + 63) // 64):
            seg.bitmap[w] = 0
        next_id = max(spilled, default=0) + 1
        hdr.free_top = 0
        hdr.free_head = 0
        indexed: set[bytes] = set()
        for s in live:
            slot = seg.slot(s)
            raw = ffi.buffer(slot.name, slot.name_len)[:]
            if not slot.flags & lib.TFEM_SLOT_DOOMED:
                duplicate = raw in indexed  # two live slots with one name: keep the first
                indexed.add(raw)
                # More names of one stripe than the index holds is damage too.
                if duplicate or not table.index_insert(s):
                    keep_spill.discard(slot.file_id)
                    table.empty_locked(s)
                    report.dropped_corrupt += 1
                    continue
            for i in range(slot.extent_count):
                table.mark_blocks(slot.extents[i].start, slot.extents[i].count)
            next_id = max(next_id, slot.file_id + 1)
        for s in reversed(range(seg.slot_count)):  # lowest slot numbers pop first
            if unpack_word(seg.slot(s).state)[0] is State.INVALID:
                table.push_free(s)
        # Past 2^63 the header's counter is damage: it would wrap and reuse ids.
        hdr.next_file_id = next_id if hdr.next_file_id >= 2**63 else max(hdr.next_file_id, next_id)
    # Settle the files of holders that are gone (settle_holder takes the lock).
    for pid in table.holders():
        if not alive(pid):
            settled = table.settle_holder(pid)
            report.dropped_writing += settled.dropped
            report.returned_to_wait += settled.returned
            report.discard_file_ids += settled.discard_file_ids
    report.kept = sum(1 for s in range(seg.slot_count)
                      if unpack_word(seg.slot(s).state)[0] is not State.INVALID) - report.returned_to_wait
    report.discard_file_ids += sorted(set(spilled) - keep_spill)
    table.wake_all()
    return report
