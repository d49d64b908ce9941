"""Typed views of the cffi objects the native core hands out.

tfem._native is a compiled cffi module: at run time its structs and
pointers are cffi cdata, which type checkers see as nothing in particular.
These Protocols say which fields and operations Python relies on, so the
segment header, a slot, a file's core and the core's result structs are
typed where they cross module boundaries. _native.pyi declares what `ffi`
and `lib` return and take in these terms. They describe; nothing here runs,
and no cdata is ever an instance of them.
"""

from __future__ import annotations

from typing import Protocol, SupportsInt, TypeVar

T = TypeVar("T")


class Pointer(Protocol[T]):
    """A C pointer or array of T: indexing, and pointer arithmetic."""

    def __getitem__(self, index: int) -> T: ...

    def __setitem__(self, index: int, value: T) -> None: ...

    def __add__(self, offset: int) -> Pointer[T]: ...


class CharPtr(Protocol):
    """A `char *` (or a cdata over a Python buffer): bytes at an address."""

    def __add__(self, offset: int) -> CharPtr: ...

    def __len__(self) -> int: ...

    def __int__(self) -> int: ...


# An integer-valued cdata, e.g. ffi.cast("uintptr_t", pointer).
Address = SupportsInt


class Extent(Protocol):
    start: int
    count: int


class Header(Protocol):
    """struct tfem_header (tfem_segment.h): the segment's parameters, offsets and counters."""

    magic: int
    instance_id: int
    layout_version: int
    header_size: int
    segment_size: int
    slot_count: int
    slot_size: int
    buf_size: int
    index_size: int
    block_size: int
    block_count: int
    slots_offset: int
    index_offset: int
    free_stack_offset: int
    holds_offset: int
    lives_offset: int
    bitmap_offset: int
    arena_offset: int
    max_file_size: int
    broker_pid: int
    free_top: int
    free_head: int
    next_file_id: int
    opened_write: int
    opened_read: int
    closed_write: int
    closed_read: int
    read_waits: int
    room_waits: int
    timeouts: int
    refused_full: int
    refused_large: int
    checksum_errors: int
    moved: int
    cluster: int


class Slot(Protocol):
    """struct tfem_slot (tfem_segment.h): one file's entry in the slot table."""

    state: int
    size: int
    file_id: int
    created_ns: int
    waiting_ns: int
    name_hash: int
    name_len: int
    flags: int
    checksum: int
    extent_count: int
    claims: int
    readers: int
    extents: Pointer[Extent]
    name: CharPtr


class Life(Protocol):
    """struct tfem_life (tfem_segment.h): a slot's lifetime counts."""

    expires_ns: int
    readers_left: int
    holders: int


class FileCore(Protocol):
    """struct tfem_file (tfem_file.h): an open file's state, one per handle."""

    file_id: int
    pos: int
    size: int
    memory_end: int
    want: int
    crc_end: int
    max_size: int
    crc: int
    index: int
    generation: int
    pid: int
    hold: int
    writing: int
    spilled: int
    checked: int
    damaged: int
    need: int
    held: int
    slot: Slot


class FileInfo(Protocol):
    """struct tfem_fileinfo (tfem_table.h): what stat and list report of a file."""

    size: int
    file_id: int
    created_ns: int
    expires_ns: int
    slot: int
    state: int
    spilled: int
    readers: int
    readers_left: int
    holders: int
    name_len: int
    name: CharPtr


class Claim(Protocol):
    """struct tfem_claim (tfem_table.h): what a table operation claimed or freed."""

    slot: int
    generation: int
    file_id: int
    for_write: int
    state: int
    hold: int
    discard_id: int
