"""The slot table and the name index: the paper's object array, map1, map2.

Theory of operation:
- The operations themselves are C (tfem_table.c), one call each: claiming,
  publishing, taking, consuming, releasing and unlinking a file, and growing
  it with arena blocks. They take the table lock in the segment header (a
  pid; a dead holder's lock is taken over), change state words only by
  compare-and-swap to what the state machine of states.py gives, and bump
  a generation on every claim, so a handle to a reused slot is refused.
- This module turns their return codes into tfem's errors, for the
  broker's work on the table (settling dead holders, holding files to spill
  them, rebuilding after a crash) and for stat, unlink and list. A file's
  own life (open, write, read, wait, close) is the native core's
  (native/tfem_file.c, files.py).
- File data is not touched here and never under the lock: a holder owns its
  slot's inline buffer and extents until it closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import threading
import time
import zlib
from typing import Any, Iterator, NamedTuple

from ._native import ffi, lib
from .cdata import Claim, FileInfo, Header, Pointer
from .errors import InvalidArgument, NameTooLong, NoSpace, TfemError, Timeout, from_errno
from .segment import Segment
from .states import EVENT_NUMBER, KEPT, Event, State, generation_of, pack_word, unpack_word

WAKE_BUCKETS = lib.TFEM_WAKE_BUCKETS
LIST_BATCH = 256
NAME_MAX = lib.TFEM_NAME_MAX


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

    def remaining_ns(self) -> int:
        """Nanoseconds left, at least 0 (-1: no limit)."""
        if self._end is None:
            return -1
        return max(0, int((self._end - time.monotonic()) * 1e9))

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


class Handle(NamedTuple):
    """What a holder knows of the slot it holds (a tuple: made per open)."""

    slot: int
    generation: int
    file_id: int
    bucket: int


@dataclasses.dataclass(frozen=True)
class FileStat:
    name: str
    size: int
    state: str  # "WRITE", "WAIT", "READ", "SHARED" or "INVALID"
    created: float  # seconds since the epoch
    spilled: bool
    slot: int
    readers: int = 1  # its lifetime: opens it was written for; 0 when kept
    readers_left: int | None = 1  # opens still to come; None when kept
    holders: int = 0  # readers holding it now
    expires: float | None = None  # when its ttl frees it (seconds since the epoch)

    @property
    def lifetime(self) -> str:
        """"once", "3 readers" or "keep"."""
        return "keep" if self.readers == KEPT else "once" if self.readers == 1 else f"{self.readers} readers"


def table_error(rc: int, what: str, header: Header) -> TfemError:
    """The error for a table operation's errno value, said of `what`: the
    messages are here, the classes are errors.py's."""
    if rc in (errno.ESTALE, errno.EPERM):
        return from_errno(errno.ESTALE, f"{what or 'the file'} is no longer held by this process")
    message = {
        errno.EBUSY: f"a lock of the slot table has been held by pid {lib.tfem_t_lock_holder(header)} for over 10 s",
        errno.EEXIST: f"{what} already exists",
        errno.ENOSPC: f"the slot table is full: all {header.slot_count} slots hold files",
        errno.ENOENT: f"no file named {what}",
        errno.EMFILE: f"{header.slot_count * lib.TFEM_HOLDS_PER_SLOT} shared reads are open at once, "
                      "as many as the instance holds",
    }.get(rc, f"{what}: {os.strerror(rc)}")
    return from_errno(rc, message)


def raw_name(info: FileInfo) -> bytes:
    """The name in the core's struct tfem_fileinfo, as stored."""
    name: bytes = ffi.buffer(info.name, info.name_len)[:]
    return name


def file_stat(info: FileInfo) -> FileStat:
    """A FileStat from the core's struct tfem_fileinfo."""
    return FileStat(
        name=raw_name(info).decode(errors="replace"),
        size=info.size,
        state=State(info.state).name,
        created=info.created_ns / 1e9,
        spilled=bool(info.spilled),
        slot=info.slot,
        readers=info.readers,
        readers_left=None if info.readers == KEPT else info.readers_left,
        holders=info.holders if info.state == State.SHARED else int(info.state == State.READ),
        expires=info.expires_ns / 1e9 if info.expires_ns else None,
    )


class SlotTable:
    """Slot operations for one process (`pid`) on one mapped segment."""

    def __init__(self, segment: Segment, pid: int) -> None:
        self.seg = segment
        self.pid = pid
        h = segment.header
        self._h = h
        self._wake_seq = ffi.cast("uint32_t *", ffi.addressof(h, "wake_seq"))
        self._wake_waiters = ffi.cast("uint32_t *", ffi.addressof(h, "wake_waiters"))
        self._space_seq = ffi.addressof(h, "space_seq")
        self._space_waiters = ffi.addressof(h, "space_waiters")
        self._local = threading.local()  # a result struct per thread, reused
        self._reclaim_scratch: tuple[Any, Any] | None = None

    def _claim_struct(self) -> Claim:
        claim: Claim | None = getattr(self._local, "claim", None)
        if claim is None:
            claim = self._local.claim = ffi.new("struct tfem_claim *")
        return claim

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the table lock (for the broker's rarer paths). The C
        operations take it themselves: do not call them inside."""
        self._check(lib.tfem_t_lock(self._h, self.pid))
        try:
            yield
        finally:
            lib.tfem_t_unlock(self._h)

    def _check(self, rc: int, what: str = "") -> None:
        """Raise the error for a C operation's return code."""
        if rc:
            raise table_error(rc, what, self._h)

    def state_of(self, s: int) -> tuple[State, int, int]:
        return unpack_word(lib.tfem_load64(ffi.addressof(self.seg.slot(s), "state")))

    # ---- producers ----

    def space_seen(self) -> int:
        """The space sequence, read before looking for room."""
        return lib.tfem_load32(self._space_seq)

    def wait_for_space(self, seen: int, deadline: Deadline, what: str) -> None:
        """Sleep until a slot or blocks are freed after `seen` was read."""
        try:
            left = deadline.left_ns(what)
        except Timeout as exc:
            raise NoSpace(str(exc)) from None
        lib.tfem_f_wait_space(self._h, seen, left)

    def release(self, handle: Handle) -> int | None:
        """Give a file back unread: READ -> WAIT, and wake the waiters. If
        the name was unlinked meanwhile the file is freed instead; then the
        returned file id, if not None, has spill records to discard."""
        claim = self._claim_struct()
        self._check(lib.tfem_t_release(self._h, handle.slot, handle.generation, self.pid, claim))
        return claim.discard_id or None

    def consume(self, handle: Handle) -> None:
        """Free a file held as its reader (READ -> INVALID): the broker,
        dropping a copy pulled from another node that goes back to its
        owner. A spilled copy's records are left to the sweep (owned by no
        slot), which runs where the store may be written. A reader that
        found it held a moment is woken, to find it gone at once."""
        claim = self._claim_struct()
        self._check(lib.tfem_t_consume(self._h, handle.slot, handle.generation, self.pid, claim))
        lib.tfem_publish(self._wake_seq + handle.bucket, self._wake_waiters + handle.bucket)

    # ---- anyone ----

    def unlink(self, raw: bytes) -> None:
        """Remove a name. A WAIT file is freed now; a held file leaves the
        index now and is freed when its holder closes it."""
        claim = self._claim_struct()
        self._check(lib.tfem_t_unlink(self._h, raw, len(raw), name_hash(raw), self.pid, claim),
                    repr(raw.decode()))

    def stat(self, raw: bytes) -> FileStat:
        info = ffi.new("struct tfem_fileinfo *")
        self._check(lib.tfem_t_stat(self._h, raw, len(raw), name_hash(raw), self.pid, info), repr(raw.decode()))
        return file_stat(info)

    def list(self) -> builtins_list[FileStat]:
        """Every named file, in slot order (one pass under the lock per
        LIST_BATCH files)."""
        out, start = [], 0
        batch = ffi.new("struct tfem_fileinfo[]", LIST_BATCH)
        while True:
            n = lib.tfem_t_list(self._h, self.pid, start, batch, LIST_BATCH)
            if n < 0:
                self._check(-n)
            out += [file_stat(batch[i]) for i in range(n)]
            if n < LIST_BATCH:
                return out
            start = batch[n - 1].slot + 1

    # ---- extents ----

    def capacity(self, s: int) -> int:
        return lib.tfem_t_capacity(self._h, s)

    def pieces(self, s: int) -> builtins_list[tuple[int, int, int]]:
        """(file offset, segment offset, length) of each memory piece."""
        seg, slot = self.seg, self.seg.slot(s)
        inline = 0 if slot.flags & lib.TFEM_SLOT_ARENA else seg.buf_size
        out = [(0, seg.inline_data_offset(s), inline)] if inline else []
        pos = inline
        for i in range(slot.extent_count):
            extent = slot.extents[i]
            length = extent.count * seg.block_size
            out.append((pos, seg.block_data_offset(extent.start), length))
            pos += length
        return out

    def grow(self, s: int, generation: int, pid: int, capacity: int) -> int:
        """Give slot s, written by `pid`, arena blocks to hold `capacity`
        bytes (the broker, for a writer whose own claim fell short). 0 when
        done, ENOSPC when the arena has too few free blocks, E2BIG when the
        file has all the extents it may: the caller decides what then. Any
        other failure raises."""
        rc = lib.tfem_t_grow(self._h, s, generation, pid, capacity)
        if rc not in (0, errno.ENOSPC, errno.E2BIG):
            raise InvalidArgument(f"slot {s} cannot grow: {os.strerror(rc)}")
        return rc

    def reclaim_blocks(self) -> int:
        """Free arena blocks in use that no slot records: claimed by writers
        that died before recording them (the broker's sweep). Returns how
        many; 0 also when a live writer's claim was under way or the lock
        was busy, for the next sweep to try again."""
        if self._reclaim_scratch is None:  # the C look's scratch: a bit per block, a word per slot
            self._reclaim_scratch = (ffi.new("uint64_t[]", max(1, (self.seg.block_count + 63) // 64)),
                                     ffi.new("uint32_t[]", self.seg.slot_count))
        return max(0, lib.tfem_t_reclaim_blocks(self._h, self.pid, *self._reclaim_scratch))

    def release_extents(self, s: int) -> None:
        """Free a file's arena blocks (the broker, after moving its bytes to
        the spill store)."""
        slot = self.seg.slot(s)
        if not slot.extent_count:
            return
        for i in range(slot.extent_count):
            lib.tfem_blocks_release(self.seg.bitmap, slot.extents[i].start, slot.extents[i].count)
        slot.extent_count = 0
        lib.tfem_publish(self._space_seq, self._space_waiters)

    def mark_blocks(self, start: int, count: int) -> None:
        lib.tfem_blocks_mark(self.seg.bitmap, start, count)

    def index_insert(self, s: int) -> bool:
        """Enter slot s in the name index (rebuilding it, under the lock);
        False if its stripe of the index is full."""
        return lib.tfem_t_index_insert(self._h, s) == 0

    def empty_locked(self, s: int) -> None:
        """Make slot s free and empty, its generation kept (adoption
        dropping a slot, under the lock; the caller rebuilds the free-slot
        stack and the index)."""
        slot = self.seg.slot(s)
        slot.state = pack_word(State.INVALID, generation_of(slot.state), 0)
        slot.extent_count = slot.flags = slot.name_len = 0

    def push_free(self, s: int) -> None:
        """Put slot s on the free-slot stack (rebuilding it, under the lock)."""
        lib.tfem_t_push_free(self._h, s)

    # ---- the dead and the restarted ----

    def settle_holder(self, pid: int) -> Settled:
        """Settle the files of a holder that has died: a file it was
        writing is dropped, a file it was reading goes back to WAIT, a
        shared read it held is given back."""
        dropped, returned, discard = 0, 0, []
        buckets = set()
        claim = self._claim_struct()
        freed = ffi.new("uint32_t *")
        with self.locked():
            shared = lib.tfem_t_settle_holds_locked(self._h, pid, freed)
            for s in range(self.seg.slot_count):
                state, generation, holder = self.state_of(s)
                if holder != pid or state not in (State.WRITE, State.READ):
                    continue
                slot = self.seg.slot(s)
                if state is State.WRITE or slot.flags & lib.TFEM_SLOT_DOOMED:
                    event = Event.ABORT_WRITE if state is State.WRITE else Event.UNLINK
                    self._check(lib.tfem_t_free_locked(self._h, s, EVENT_NUMBER[event], generation, claim))
                    discard += [claim.discard_id] if claim.discard_id else []
                    dropped += state is State.WRITE
                else:
                    self._transition_locked(s, Event.RELEASE_READ, generation, 0)
                    buckets.add(slot.name_hash % WAKE_BUCKETS)
                    returned += 1
        if shared:  # reads given back: readers waiting for one of them may take it
            buckets.update(range(WAKE_BUCKETS))
        for bucket in buckets:
            lib.tfem_publish(self._wake_seq + bucket, self._wake_waiters + bucket)
        if dropped or freed[0]:  # after the lock: no system call under it
            lib.tfem_publish(self._space_seq, self._space_waiters)
        return Settled(dropped, returned + shared, tuple(discard))

    def holders(self) -> set[int]:
        """The pids holding files now, alone or shared."""
        return ({self.state_of(s)[2] for s in range(self.seg.slot_count)} | self.shared_readers()) - {0}

    def shared_readers(self) -> set[int]:
        """The pids holding shared reads now."""
        pids = ffi.new("uint32_t[]", self.seg.hold_count)
        return {pids[i] for i in range(lib.tfem_t_hold_pids(self._h, pids, self.seg.hold_count))}

    def check_holds(self) -> int:
        """Adoption (under the lock, first): hold entries and SHARED files
        made consistent; how many were changed."""
        return int(lib.tfem_t_check_holds_locked(self._h))

    def expire(self) -> int:
        """Unlink the files whose ttl has passed; how many."""
        count = self.seg.slot_count
        slots, generations = ffi.new("uint32_t[]", count), ffi.new("uint32_t[]", count)
        now = time.time_ns()
        claim = self._claim_struct()
        n = lib.tfem_t_expired(self._h, now, slots, generations, count)
        return sum(lib.tfem_t_expire(self._h, slots[i], generations[i], self.pid, now, claim) == 0 for i in range(n))

    def wake_all(self) -> None:
        """Wake every waiter, to look again (after the table was rebuilt)."""
        for bucket in range(WAKE_BUCKETS):
            lib.tfem_publish(self._wake_seq + bucket, self._wake_waiters + bucket)
        lib.tfem_publish(self._space_seq, self._space_waiters)

    def _transition_locked(self, s: int, event: Event, generation: int, holder: int) -> None:
        self._check(lib.tfem_t_transition_locked(self._h, s, EVENT_NUMBER[event], generation, holder))

    # ---- the broker's hold for spilling ----

    def evictable(self) -> builtins_list[int]:
        """Slots of files that could be spilled (WAIT, in arena blocks, not
        made whole for views), least recently published first."""
        return self._waiting(spilled=False)

    def restorable(self) -> builtins_list[int]:
        """Slots of spilled WAIT files, least recently published first."""
        return self._waiting(spilled=True)

    def _waiting(self, spilled: bool) -> builtins_list[int]:
        count = self.seg.slot_count
        slots, since = ffi.new("uint32_t[]", count), ffi.new("uint64_t[]", count)
        n = lib.tfem_t_waiting(self._h, int(spilled), slots, since, count)
        return [slots[i] for i in sorted(range(n), key=since.__getitem__)]

    def published_changes(self, seen: Pointer[int]) -> builtins_list[tuple[int, int]]:
        """(slot, mark) of each slot whose published file differs from
        `seen` (a uint64_t[slot_count] of marks: 0 none, else the core's
        mark of a WAIT or SHARED file's generation); one C pass, no lock."""
        count = self.seg.slot_count
        slots, marks = ffi.new("uint32_t[]", count), ffi.new("uint64_t[]", count)
        n = lib.tfem_t_published_changes(self._h, seen, slots, marks, count)
        return [(slots[i], marks[i]) for i in range(n)]

    def oldest_waiting(self, prefix: bytes, most: int) -> builtins_list[FileStat]:
        """Up to `most` (at most TFEM_OLDEST_MAX) WAIT files whose names
        start with `prefix`, oldest first: one C pass over the slots, not
        a listing of every file. No lock: each is checked again here, and
        opening it by name is where the state machine decides."""
        most = min(most, lib.TFEM_OLDEST_MAX)
        slots = ffi.new("uint32_t[]", most)
        out = ffi.new("struct tfem_fileinfo *")
        found = []
        for i in range(lib.tfem_t_oldest_waiting(self._h, prefix, len(prefix), slots, most)):
            lib.tfem_t_info(self._h, slots[i], out)
            stat = file_stat(out)
            if stat.state == "WAIT" and raw_name(out).startswith(prefix):
                found.append(stat)
        return found

    def published_name(self, s: int, mark: int) -> str | None:
        """The name of the published file `mark` saw in slot s; None if
        the slot holds another by now (freed, reused: no lock is taken)."""
        out = ffi.new("struct tfem_fileinfo *")
        lib.tfem_t_info(self._h, s, out)
        name = raw_name(out).decode(errors="replace")
        return name if lib.tfem_t_published_mark(self._h, s) == mark else None

    def spilled_ids(self) -> set[int]:
        """The file ids of spilled files a slot holds."""
        ids = ffi.new("uint64_t[]", self.seg.slot_count)
        return {ids[i] for i in range(lib.tfem_t_spilled_ids(self._h, ids, self.seg.slot_count))}

    def hold_waiting(self, s: int) -> Handle | None:
        """Take a WAIT file as its reader (the broker, to move it to the
        spill store); None if it is not in WAIT."""
        with self.locked():
            state, generation, _ = self.state_of(s)
            if state is not State.WAIT:
                return None
            self._transition_locked(s, Event.OPEN_READ, generation, self.pid)
            slot = self.seg.slot(s)
            return Handle(s, generation, slot.file_id, slot.name_hash % WAKE_BUCKETS)

    def set_flag(self, s: int, flag: int) -> None:
        with self.locked():
            self.seg.slot(s).flags |= flag

    def clear_flag(self, s: int, flag: int) -> None:
        with self.locked():
            self.seg.slot(s).flags &= ~flag

    def grow_held(self, handle: Handle, capacity: int) -> int:
        """Give the file this table's pid holds as its reader (`handle`:
        the broker, bringing a spilled file back) arena blocks for
        `capacity` bytes. 0, ENOSPC or E2BIG as for grow()."""
        rc = lib.tfem_t_grow_read(self._h, handle.slot, handle.generation, self.pid, capacity)
        if rc not in (0, errno.ENOSPC, errno.E2BIG):
            raise InvalidArgument(f"slot {handle.slot} cannot grow: {os.strerror(rc)}")
        return rc


builtins_list = list  # SlotTable.list shadows the name inside the class
