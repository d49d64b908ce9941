"""Which names this node holds published, learned without listing the table.

Producers publish without the broker; the peer link must still tell each
name's home (cluster.py). Listing every held file to find the new ones
cost ~4 us a file, 8 ms a scan with 2,000 files waiting. Instead a mark per
slot (the generation of the published file it held when last looked at,
or 0) is kept here, and one C pass (`SlotTable.published_changes`) returns
only the slots whose mark moved: new publications, files consumed,
unlinked or expired. Only their names are read.
"""

from __future__ import annotations

from typing import Any

from tfem._native import ffi
from tfem.table import SlotTable


class Publications:
    """The published names of one segment, as last looked at."""

    def __init__(self) -> None:
        self._table: SlotTable | None = None
        self._seen: Any = None  # uint64_t[slot_count]: the mark of each slot when last looked at
        self._name_of: dict[int, str] = {}  # slot -> the published name it held
        self._slot_of: dict[str, int] = {}

    def forget(self) -> None:
        """Look at every slot afresh at the next `changes`: every name
        published then is new (homes moved: all are announced again)."""
        self._table, self._name_of, self._slot_of = None, {}, {}

    def holds(self, name: str) -> bool:
        """`name` was published here when last looked at."""
        return name in self._slot_of

    def changes(self, table: SlotTable, passed_over: set[str]) -> tuple[set[str], set[str]]:
        """(names published since the last call, names gone since), not
        counting `passed_over` names, which are looked at again next time."""
        if table is not self._table:  # first look, forgotten, or a new segment (the old one's names gone)
            self._table, self._seen = table, ffi.new("uint64_t[]", table.seg.slot_count)
            gone = set(self._slot_of)
            self._name_of, self._slot_of = {}, {}
        else:
            gone = set()
        new: set[str] = set()
        for s, mark in table.published_changes(self._seen):
            old = self._name_of.pop(s, None)
            if old is not None and self._slot_of.get(old) == s:
                del self._slot_of[old]
                gone.add(old)
            if mark:
                name = table.published_name(s, mark)
                if name is None or name in passed_over:
                    continue  # its mark stays: looked at again next time
                self._name_of[s], self._slot_of[name] = name, s
                new.add(name)
            self._seen[s] = mark
        return new - gone, gone - set(self._slot_of)
