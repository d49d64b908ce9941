"""What the broker holds for its clients, shared by its parts: the segment
clients use now and its table, the spill store, and replaced segments whose
files are still moving out (relocation.py)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable, Protocol

from tfem._native import ffi
from tfem.segment import Segment
from tfem.table import SlotTable

from .spill import SpillStore

if TYPE_CHECKING:
    from .relocation import Relocation


class Slot(Protocol):
    """The fields of a slot (a cffi struct tfem_slot) the broker reads."""

    file_id: int
    size: int
    flags: int
    extent_count: int
    waiting_ns: int


_STATE_OFFSET = ffi.offsetof("struct tfem_slot", "state")


def state_words(segment: Segment) -> list[int]:
    """Every slot's state word, in slot order, read in one pass at C speed
    (one aligned 8-byte load each, as SlotTable.state_of does one at a
    time): the broker's scans of all slots (STATS, eviction candidates,
    DISCARD) cost a millisecond or more per 4096 slots through cffi, and
    STATS must be answered within a few."""
    assert segment.view is not None, "the segment is mapped"
    start, stride = segment.slots_offset, segment.slot_size
    assert start % 8 == 0 and stride % 8 == 0 and _STATE_OFFSET % 8 == 0
    with segment.view[start: start + segment.slot_count * stride] as raw, raw.cast("Q") as words, \
            words[_STATE_OFFSET // 8:: stride // 8] as states:
        return states.tolist()


@dataclasses.dataclass
class Holdings:
    segment: Segment  # replaced when its name is removed (relocation.py)
    table: SlotTable  # the segment's, for the broker's pid
    spill: SpillStore | None = None  # None: spilling is off
    relocations: list[Relocation] = dataclasses.field(default_factory=list)
    segments_replaced: int = 0

    def tables(self) -> list[SlotTable]:
        """The segment's table, and those of replaced segments still in use."""
        return [self.table, *(r.table for r in self.relocations)]

    def owned_spilled(self) -> set[int]:
        """The ids of spilled files a slot of any table holds: every record
        the broker wrote belongs to one, until its file is freed."""
        return set[int]().union(*(table.spilled_ids() for table in self.tables()))

    def discard(self, file_ids: Iterable[int]) -> None:
        """Drop the spill records of files that are gone."""
        if self.spill is not None:
            self.spill.discard(file_ids)

    def close(self, destroy: bool) -> None:
        """Unmap every segment and close the spill store; with `destroy`,
        also remove the store and the segment's name."""
        if self.spill is not None:
            self.spill.close()
            if destroy:
                self.spill.remove()
            self.spill = None
        for relocation in self.relocations:
            relocation.old.close()
        self.relocations.clear()
        name = self.segment.name
        self.segment.close()
        if destroy:
            Segment.unlink(name)
