"""The slot table and the name index: the paper's object array, map1, map2.

Theory of operation:
- Every change to the name index, the free-slot stack and the header's
  counters, and every claim or release of a slot, happens under the table
  lock in the segment header (a pid; a dead holder's lock is taken over).
  Each such change is a single store, so a holder that dies mid-way leaves
  a table that is still consistent. The lock is held for microseconds.
- A slot's state word changes only by compare-and-swap, and only to the
  word that `states.apply` computes: the pure state machine decides, this
  module makes it so. The word carries a generation bumped on every claim,
  so a handle to a slot that has since been freed and reused is refused.
- File data is not touched here and never under the lock: a holder owns its
  slot's inline buffer and extents until it closes.
- A consumer waiting for a name sleeps on the wake sequence of the name's
  bucket (crc32 % TFEM_WAKE_BUCKETS); every transition into WAIT bumps it.
- The index is linear probing with backward-shift deletion, so it never
  fills with tombstones; it has at least twice as many entries as slots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import zlib
from typing import Iterator

from ._atomics import ffi, lib
from .errors import AlreadyExists, Busy, InvalidArgument, NameTooLong, NoSpace, NotFound, TfemError, Timeout, WouldBlock
from .segment import Segment
from .states import Event, State, apply, unpack_word

LOCK_TIMEOUT_NS = 10 * 1_000_000_000
WAKE_BUCKETS = lib.TFEM_WAKE_BUCKETS
NAME_MAX = lib.TFEM_NAME_MAX


class HandleInvalidated(TfemError):
    """The slot behind a handle was freed or taken over by someone else."""


def encode_name(name: str | bytes) -> bytes:
    """A name as stored: UTF-8, 1 to NAME_MAX bytes, no NUL. Names are
    names, not paths: '/' is an ordinary character."""
    if isinstance(name, str):
        try:
            raw = name.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(f"name {name!r} is not valid Unicode text") from None
    elif isinstance(name, (bytes, bytearray, memoryview)):
        raw = bytes(name)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"name {raw!r} is not UTF-8 text") from None
    else:
        raise InvalidArgument(f"a name is text, not {type(name).__name__}")
    if not raw:
        raise InvalidArgument("a name cannot be empty")
    if len(raw) > NAME_MAX:
        raise NameTooLong(f"name is {len(raw)} bytes, the limit is {NAME_MAX}")
    if b"\0" in raw:
        raise InvalidArgument("a name cannot contain a NUL character")
    return raw


def name_hash(raw: bytes) -> int:
    """Stable across processes, unlike hash()."""
    return zlib.crc32(raw)


class Deadline:
    """A wait's time limit: None or infinity means no limit."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._end = None if timeout is None or timeout == float("inf") else time.monotonic() + timeout

    def left_ns(self, what: str) -> int:
        """Nanoseconds left (-1: no limit); Timeout once none are."""
        if self._end is None:
            return -1
        remaining = self._end - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"{what} within {self.timeout} s")
        return int(remaining * 1e9)


@dataclasses.dataclass(frozen=True)
class Settled:
    """What settling a dead holder's files did."""

    dropped: int = 0  # being written: dropped
    returned: int = 0  # being read: back to WAIT
    discard_file_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Handle:
    """What a holder knows of the slot it holds."""

    slot: int
    generation: int
    file_id: int
    bucket: int


@dataclasses.dataclass(frozen=True)
class FileStat:
    name: str
    size: int
    state: str  # "WRITE", "WAIT", "READ" or "INVALID"
    created: float  # seconds since the epoch
    spilled: bool
    slot: int


class SlotTable:
    """Slot operations for one process (`pid`) on one mapped segment."""

    def __init__(self, segment: Segment, pid: int) -> None:
        self.seg = segment
        self.pid = pid
        h = segment.header
        self._h = h
        self._lock = ffi.addressof(h, "table_lock")
        self._lock_waiters = ffi.addressof(h, "lock_waiters")
        self._wake_seq = ffi.cast("uint32_t *", ffi.addressof(h, "wake_seq"))
        self._wake_waiters = ffi.cast("uint32_t *", ffi.addressof(h, "wake_waiters"))
        self._space_seq = ffi.addressof(h, "space_seq")
        self._space_waiters = ffi.addressof(h, "space_waiters")
        # The shared lock knows processes, not threads: threads take turns here.
        self._thread_lock = threading.Lock()

    # ---- the lock ----

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self._thread_lock:
            if lib.tfem_lock(self._lock, self._lock_waiters, self.pid, LOCK_TIMEOUT_NS):
                raise Busy(f"the table lock has been held by pid {self._h.table_lock} for over "
                           f"{LOCK_TIMEOUT_NS // 10**9} s")
            try:
                yield
            finally:
                lib.tfem_unlock(self._lock, self._lock_waiters)

    # ---- the name index (under the lock) ----

    def _slot_name(self, s: int) -> bytes:
        slot = self.seg.slot(s)
        return ffi.buffer(slot.name, slot.name_len)[:]

    def _find(self, raw: bytes, h: int) -> int:
        index, mask = self.seg.index, self.seg.index_mask
        i = h & mask
        while True:
            entry = index[i]
            if entry == 0:
                return -1
            slot = self.seg.slot(entry - 1)
            if slot.name_hash == h and slot.name_len == len(raw) and ffi.buffer(slot.name, len(raw))[:] == raw:
                return entry - 1
            i = (i + 1) & mask

    def _index_insert(self, s: int, h: int) -> None:
        index, mask = self.seg.index, self.seg.index_mask
        i = h & mask
        while index[i] != 0:
            i = (i + 1) & mask
        index[i] = s + 1

    def _index_remove(self, s: int) -> None:
        index, mask = self.seg.index, self.seg.index_mask
        i = self.seg.slot(s).name_hash & mask
        while index[i] != s + 1:
            if index[i] == 0:
                return  # not indexed (unlinked while held)
            i = (i + 1) & mask
        # Backward shift: pull later entries of the probe run into the hole.
        hole, j = i, i
        while True:
            j = (j + 1) & mask
            entry = index[j]
            if entry == 0:
                break
            home = self.seg.slot(entry - 1).name_hash & mask
            # Move the entry unless its home lies cyclically in (hole, j].
            if (hole < j and hole < home <= j) or (hole > j and (home > hole or home <= j)):
                continue
            index[hole] = entry
            hole = j
        index[hole] = 0

    # ---- state words ----

    def _state_ptr(self, s: int):  # type: ignore[no-untyped-def]
        return ffi.addressof(self.seg.slot(s), "state")

    def _transition(self, s: int, event: Event, generation: int | None, holder: int = 0) -> int:
        """Apply `event` to slot `s` by compare-and-swap; the old word."""
        ptr = self._state_ptr(s)
        word = lib.tfem_load64(ptr)
        if generation is not None and unpack_word(word)[1] != generation:
            raise HandleInvalidated(f"slot {s} was freed and reused")
        new = apply(word, event, holder)
        if not lib.tfem_cas64(ptr, word, new):
            raise HandleInvalidated(f"slot {s} changed state under the lock")
        return word

    def state_of(self, s: int) -> tuple[State, int, int]:
        return unpack_word(lib.tfem_load64(self._state_ptr(s)))

    def _publish(self, bucket: int) -> None:
        lib.tfem_publish(self._wake_seq + bucket, self._wake_waiters + bucket)

    # ---- producers ----

    def _claim(self, raw: bytes, h: int) -> Handle:
        """Claim a free slot for `raw` (under the lock, name known absent)."""
        hdr = self._h
        if hdr.free_top == 0:
            raise NoSpace(f"the slot table is full: all {self.seg.slot_count} slots hold files")
        s = self.seg.free_stack[hdr.free_top - 1]
        slot = self.seg.slot(s)
        old = self._transition(s, Event.OPEN_WRITE, None, self.pid)
        hdr.free_top -= 1
        file_id = hdr.next_file_id
        hdr.next_file_id = file_id + 1
        slot.size = 0
        slot.file_id = file_id
        slot.created_ns = time.time_ns()
        slot.waiting_ns = 0
        slot.name_hash = h
        slot.name_len = len(raw)
        slot.flags = 0
        slot.checksum = 0
        slot.extent_count = 0
        ffi.memmove(slot.name, raw, len(raw))
        slot.name[len(raw)] = b"\0"
        self._index_insert(s, h)
        hdr.opened_write += 1
        generation = (unpack_word(old)[1] + 1) & 0xFFFFFF
        return Handle(s, generation, file_id, h % WAKE_BUCKETS)

    def create(self, raw: bytes, room_timeout: float | None = 0) -> Handle:
        """Open a new name for writing; AlreadyExists if the name is held.
        A full table is NoSpace at once, or after waiting up to
        `room_timeout` seconds for a slot to be freed (None: no limit)."""
        h = name_hash(raw)
        deadline = Deadline(room_timeout)
        while True:
            seen = self.space_seen()
            with self.locked():
                if self._find(raw, h) >= 0:
                    raise AlreadyExists(f"{raw.decode()!r} already exists")
                if self._h.free_top or room_timeout == 0:
                    return self._claim(raw, h)
            self.wait_for_space(seen, deadline, "no slot was freed")

    def space_seen(self) -> int:
        """The space sequence, read before looking for room."""
        return lib.tfem_load32(self._space_seq)

    def wait_for_space(self, seen: int, deadline: Deadline, what: str) -> None:
        """Sleep until a slot or blocks are freed after `seen` was read."""
        try:
            left = deadline.left_ns(what)
        except Timeout as exc:
            raise NoSpace(str(exc)) from None
        lib.tfem_wait_published(self._space_seq, self._space_waiters, seen, left)

    def publish(self, handle: Handle, size: int, checksum: int = 0) -> int | None:
        """A producer's close: WRITE -> WAIT and wake the waiters. If the
        name was unlinked meanwhile the file is freed instead; then the
        returned file id, if not None, has spill records to discard."""
        with self.locked():
            slot = self.seg.slot(handle.slot)
            self._check_holder(handle)
            if slot.flags & lib.TFEM_SLOT_DOOMED:
                return self._free(handle.slot, Event.UNLINK, handle.generation)
            slot.size = size
            slot.checksum = checksum
            slot.waiting_ns = time.monotonic_ns()
            self._transition(handle.slot, Event.CLOSE_WRITE, handle.generation)
            self._h.closed_write += 1
        self._publish(handle.bucket)
        return None

    def abort(self, handle: Handle) -> int | None:
        """A producer gives up: the file is dropped."""
        with self.locked():
            self._check_holder(handle)
            return self._free(handle.slot, Event.ABORT_WRITE, handle.generation)

    # ---- consumers ----

    def open_existing(self, raw: bytes, create: bool, wait: bool, timeout: float | None, holder: int | None = None) -> tuple[Handle, bool]:
        """Take `raw` for reading once it is in WAIT, or, with `create`,
        claim it for writing if nobody holds the name. Returns the handle
        and whether it was opened for writing. Waits on the name's bucket
        unless `wait` is false; `timeout` None waits without limit."""
        h = name_hash(raw)
        bucket = h % WAKE_BUCKETS
        deadline = Deadline(timeout)
        who = self.pid if holder is None else holder
        while True:
            seen = lib.tfem_load32(self._wake_seq + bucket)
            with self.locked():
                s = self._find(raw, h)
                if s < 0 and create:
                    return self._claim(raw, h), True
                if s >= 0:
                    state, generation, _ = self.state_of(s)
                    if state is State.WAIT:
                        self._transition(s, Event.OPEN_READ, generation, who)
                        self._h.opened_read += 1
                        return Handle(s, generation, self.seg.slot(s).file_id, bucket), False
            if not wait:
                if s < 0:
                    raise NotFound(f"no file named {raw.decode()!r}")
                raise WouldBlock(f"{raw.decode()!r} is {state.name}, not ready to read")
            left = deadline.left_ns(f"{raw.decode()!r} was not ready to read")
            lib.tfem_wait_published(self._wake_seq + bucket, self._wake_waiters + bucket, seen, left)

    def consume(self, handle: Handle) -> int | None:
        """A consumer's close: READ -> INVALID, the slot is freed."""
        with self.locked():
            self._check_holder(handle)
            return self._free(handle.slot, Event.CLOSE_READ, handle.generation)

    def release(self, handle: Handle) -> int | None:
        """Give a file back unread: READ -> WAIT, and wake the waiters. If
        the name was unlinked meanwhile the file is freed instead; then the
        returned file id, if not None, has spill records to discard."""
        with self.locked():
            if self.seg.slot(handle.slot).flags & lib.TFEM_SLOT_DOOMED:
                return self._free(handle.slot, Event.UNLINK, handle.generation)
            self._transition(handle.slot, Event.RELEASE_READ, handle.generation)
        self._publish(handle.bucket)
        return None

    # ---- anyone ----

    def unlink(self, raw: bytes) -> int | None:
        """Remove a name. A WAIT file is freed now; a held file leaves the
        index now and is freed when its holder closes it."""
        h = name_hash(raw)
        with self.locked():
            s = self._find(raw, h)
            if s < 0:
                raise NotFound(f"no file named {raw.decode()!r}")
            state, generation, _ = self.state_of(s)
            if state is State.WAIT:
                return self._free(s, Event.UNLINK, generation)
            slot = self.seg.slot(s)
            self._index_remove(s)
            slot.flags |= lib.TFEM_SLOT_DOOMED
            return None

    def stat(self, raw: bytes) -> FileStat:
        with self.locked():
            s = self._find(raw, name_hash(raw))
            if s < 0:
                raise NotFound(f"no file named {raw.decode()!r}")
            return self._stat_slot(s)

    def list(self) -> list[FileStat]:
        with self.locked():
            return [self._stat_slot(s) for s in range(self.seg.slot_count)
                    if self.state_of(s)[0] is not State.INVALID
                    and not self.seg.slot(s).flags & lib.TFEM_SLOT_DOOMED]

    def _stat_slot(self, s: int) -> FileStat:
        slot = self.seg.slot(s)
        return FileStat(
            name=self._slot_name(s).decode(),
            size=slot.size,
            state=self.state_of(s)[0].name,
            created=slot.created_ns / 1e9,
            spilled=bool(slot.flags & lib.TFEM_SLOT_SPILLED),
            slot=s,
        )

    # ---- extents ----

    def capacity(self, s: int) -> int:
        slot = self.seg.slot(s)
        blocks = sum(slot.extents[i].count for i in range(slot.extent_count))
        return self.seg.buf_size + blocks * self.seg.block_size

    def pieces(self, s: int) -> list[tuple[int, int, int]]:
        """(file offset, segment offset, length) of each memory piece."""
        seg, slot = self.seg, self.seg.slot(s)
        out = [(0, seg.inline_data_offset(s), seg.buf_size)] if seg.buf_size else []
        pos = seg.buf_size
        for i in range(slot.extent_count):
            extent = slot.extents[i]
            length = extent.count * seg.block_size
            out.append((pos, seg.block_data_offset(extent.start), length))
            pos += length
        return out

    def add_extent(self, s: int, start: int, count: int) -> None:
        """Append blocks to a file held for writing (the broker's job)."""
        slot = self.seg.slot(s)
        slot.extents[slot.extent_count].start = start
        slot.extents[slot.extent_count].count = count
        slot.extent_count += 1

    def release_extents(self, s: int) -> None:
        slot = self.seg.slot(s)
        if not slot.extent_count:
            return
        for i in range(slot.extent_count):
            lib.tfem_blocks_release(self.seg.bitmap, slot.extents[i].start, slot.extents[i].count)
        slot.extent_count = 0
        lib.tfem_publish(self._space_seq, self._space_waiters)

    # ---- helpers under the lock ----

    def _check_holder(self, handle: Handle) -> None:
        state, generation, holder = self.state_of(handle.slot)
        if generation != handle.generation or holder != self.pid:
            raise HandleInvalidated(f"slot {handle.slot} is no longer held by this process")

    def _free(self, s: int, event: Event, generation: int) -> int | None:
        """Free slot `s` by `event`. Returns the file id when the file had
        spill records, which the broker must discard."""
        slot = self.seg.slot(s)
        doomed = slot.flags & lib.TFEM_SLOT_DOOMED
        if not doomed:
            self._index_remove(s)
        self.release_extents(s)
        spilled_id = slot.file_id if slot.flags & lib.TFEM_SLOT_SPILLED else None
        slot.flags = 0
        slot.name_len = 0
        self._transition(s, event, generation)
        if event is Event.CLOSE_READ:
            self._h.closed_read += 1
        self.seg.free_stack[self._h.free_top] = s
        self._h.free_top += 1
        lib.tfem_publish(self._space_seq, self._space_waiters)
        return spilled_id

    # ---- the dead and the restarted ----

    def settle_holder(self, pid: int) -> Settled:
        """Settle the files of a holder that has died: a file it was
        writing is dropped, a file it was reading goes back to WAIT."""
        dropped, returned, discard = 0, 0, []
        buckets = set()
        with self.locked():
            for s in range(self.seg.slot_count):
                state, generation, holder = self.state_of(s)
                if holder != pid or state not in (State.WRITE, State.READ):
                    continue
                slot = self.seg.slot(s)
                if state is State.WRITE or slot.flags & lib.TFEM_SLOT_DOOMED:
                    spilled = self._free(s, Event.ABORT_WRITE if state is State.WRITE else Event.UNLINK,
                                         generation)
                    discard += [spilled] if spilled is not None else []
                    dropped += state is State.WRITE
                else:
                    self._transition(s, Event.RELEASE_READ, generation)
                    buckets.add(slot.name_hash % WAKE_BUCKETS)
                    returned += 1
        for bucket in buckets:
            self._publish(bucket)
        return Settled(dropped, returned, tuple(discard))

    def holders(self) -> set[int]:
        """The pids holding files now."""
        return {self.state_of(s)[2] for s in range(self.seg.slot_count)} - {0}

    def wake_all(self) -> None:
        """Wake every waiter, to look again (after the table was rebuilt)."""
        for bucket in range(WAKE_BUCKETS):
            self._publish(bucket)
        lib.tfem_publish(self._space_seq, self._space_waiters)

    def mark_blocks(self, start: int, count: int) -> None:
        lib.tfem_blocks_mark(self.seg.bitmap, start, count)

    # ---- the broker's hold for spilling ----

    def hold_waiting(self, s: int) -> Handle | None:
        """Take a WAIT file as its reader (the broker, to move it to the
        spill store); None if it is not in WAIT."""
        with self.locked():
            state, generation, _ = self.state_of(s)
            if state is not State.WAIT:
                return None
            self._transition(s, Event.OPEN_READ, generation, self.pid)
            slot = self.seg.slot(s)
            return Handle(s, generation, slot.file_id, slot.name_hash % WAKE_BUCKETS)

    def set_flag(self, s: int, flag: int) -> None:
        with self.locked():
            self.seg.slot(s).flags |= flag

