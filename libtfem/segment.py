"""The shared-memory segment: create (broker), attach (clients), typed views.

Theory of operation: the broker alone creates and unlinks a segment; clients
only attach and detach, as with CPython's shared_memory (`close()` detaches,
`unlink()` destroys). The layout comes from tfem_segment.h through cffi; this
module only computes the offsets at creation, writes them into the header,
and reads them back on attach, so every process agrees with the header.

Creation reserves every page up front (posix_fallocate) so a full /dev/shm is
a clear error at start rather than a SIGBUS in the middle of a handoff, and
touches them so no handoff pays for first-touch page faults.
"""

from __future__ import annotations

import mmap
import os

import posix_ipc

from ._native import ffi, lib
from .cdata import CharPtr, Header, Life, Slot
from .errors import InvalidArgument, NoSpace, NotFound, SegmentCorrupt, SegmentExists

PAGE = mmap.PAGESIZE
CACHE_LINE = 64
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory by name
_MADV_POPULATE_WRITE = 23  # linux/mman.h; not in Python's mmap module yet


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class Layout:
    """Offsets and sizes of a segment for given parameters, and the largest
    file it allows (default: what the inline buffer and the arena hold)."""

    def __init__(self, slots: int, buf_size: int, block_size: int, memory: int,
                 max_file_size: int | None = None) -> None:
        if not 1 <= slots < 2**31:
            raise InvalidArgument("slots must be between 1 and 2^31")
        if buf_size < 0 or buf_size >= 2**31:
            raise InvalidArgument("buf_size must be between 0 and 2 GiB")
        if block_size < PAGE or block_size & (block_size - 1) or block_size >= 2**31:
            raise InvalidArgument(f"block_size must be a power of two, at least {PAGE}")
        self.slot_count = slots
        self.buf_size = buf_size
        self.block_size = block_size
        self.block_count = memory // block_size
        if self.block_count >= 2**32:
            raise InvalidArgument("memory / block_size must be below 2^32 blocks")
        self.header_size = _round_up(ffi.sizeof("struct tfem_header"), CACHE_LINE)
        self.slot_size = _round_up(ffi.sizeof("struct tfem_slot") + buf_size, CACHE_LINE)
        # A stripe of the index per wake bucket, each with room for four
        # times its share of the names (tfem_table.c).
        stripes = lib.TFEM_WAKE_BUCKETS
        self.index_size = stripes * _next_power_of_two(max(8, 4 * -(-slots // stripes)))
        self.slots_offset = self.header_size
        self.index_offset = _round_up(self.slots_offset + slots * self.slot_size, CACHE_LINE)
        self.free_stack_offset = _round_up(self.index_offset + 4 * self.index_size, CACHE_LINE)
        self.holds_offset = _round_up(self.free_stack_offset + 4 * slots, CACHE_LINE)
        self.hold_count = lib.TFEM_HOLDS_PER_SLOT * slots
        self.lives_offset = _round_up(self.holds_offset + ffi.sizeof("struct tfem_hold") * self.hold_count,
                                      CACHE_LINE)
        self.bitmap_offset = _round_up(self.lives_offset + ffi.sizeof("struct tfem_life") * slots, CACHE_LINE)
        bitmap_bytes = 8 * ((self.block_count + 63) // 64)
        self.arena_offset = _round_up(self.bitmap_offset + bitmap_bytes, PAGE)
        self.size = self.arena_offset + self.block_count * block_size
        self.max_file_size = buf_size + self.block_count * block_size if max_file_size is None else max_file_size
        if not 0 < self.max_file_size < 2**63:
            raise InvalidArgument("the largest file must be between 1 byte and 2^63")


def _header_problem(h: Header, size: int) -> str | None:
    """Why a header cannot be trusted, or None. Every offset is recomputed
    from the four parameters and must match, so no garbage offset is ever
    followed."""
    if h.magic != lib.TFEM_SEGMENT_MAGIC or h.layout_version != lib.TFEM_LAYOUT_VERSION:
        return f"no tfem layout version {lib.TFEM_LAYOUT_VERSION} header"
    if h.segment_size != size:
        return f"it is {size} bytes, its header says {h.segment_size}"
    try:
        layout = Layout(h.slot_count, h.buf_size, h.block_size, h.block_count * h.block_size)
    except InvalidArgument as exc:
        return f"bad parameters in the header ({exc})"
    expected = {
        "header_size": layout.header_size, "segment_size": layout.size,
        "slot_size": layout.slot_size, "index_size": layout.index_size,
        "slots_offset": layout.slots_offset, "index_offset": layout.index_offset,
        "free_stack_offset": layout.free_stack_offset, "holds_offset": layout.holds_offset,
        "lives_offset": layout.lives_offset,
        "bitmap_offset": layout.bitmap_offset,
        "arena_offset": layout.arena_offset,
    }
    for field, value in expected.items():
        if getattr(h, field) != value:
            return f"header field {field} is {getattr(h, field)}, the layout says {value}"
    if h.free_top > h.slot_count:
        return "free-slot stack deeper than the table"
    if not 0 < h.max_file_size < 2**63:
        return f"largest file size {h.max_file_size}"
    return None


class Segment:
    """One mapping of a tfem segment in this process."""

    # Class-level defaults so close() is safe after a failed constructor.
    _mmap: mmap.mmap | None = None
    _base: CharPtr | None = None
    view: memoryview | None = None

    def __init__(self, name: str, mapping: mmap.mmap, inode: int) -> None:
        self.name = name
        self.inode = inode  # of the shared-memory file the name led to when mapped
        self._mmap = mapping
        self.view = memoryview(mapping)
        self._base = base = ffi.from_buffer(mapping)
        self.size = len(mapping)  # bytes mapped
        self.header = ffi.cast("struct tfem_header *", base)
        h = self.header
        self.slot_count: int = h.slot_count
        self.slot_size: int = h.slot_size
        self.buf_size: int = h.buf_size
        self.block_size: int = h.block_size
        self.block_count: int = h.block_count
        self.index_mask: int = h.index_size - 1
        self.slots_offset: int = h.slots_offset
        self.arena_offset: int = h.arena_offset
        self.inline_offset = ffi.sizeof("struct tfem_slot")
        self.index = ffi.cast("uint32_t *", base + h.index_offset)
        self.free_stack = ffi.cast("uint32_t *", base + h.free_stack_offset)
        self.hold_count: int = lib.TFEM_HOLDS_PER_SLOT * h.slot_count
        self.lives = ffi.cast("struct tfem_life *", base + h.lives_offset)
        self.bitmap = ffi.cast("uint64_t *", base + h.bitmap_offset)

    # ---- life cycle ----

    @classmethod
    def create(cls, name: str, layout: Layout, replacing: Segment | None = None) -> Segment:
        """Create, reserve and initialise a segment (the broker's job). One
        `replacing` a segment whose name was removed keeps its instance id,
        and its file ids go on from the old one's, so the spill store's
        records of both never mix."""
        if os.path.isdir(SHM_DIR):
            vfs = os.statvfs(SHM_DIR)
            free = vfs.f_bavail * vfs.f_frsize
            if free < layout.size:
                raise NoSpace(
                    f"/dev/shm has {free >> 20} MiB free, the segment needs "
                    f"{layout.size >> 20} MiB: lower --memory/--slots/--buf-size"
                )
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
        except posix_ipc.ExistentialError:
            raise SegmentExists(f"shared-memory segment {name} already exists: another broker "
                                "runs for this key file, or run `tfem clean`") from None
        try:
            try:
                os.posix_fallocate(shm.fd, 0, layout.size)
            except OSError as exc:
                raise NoSpace(f"cannot reserve {layout.size >> 20} MiB in /dev/shm: {exc.strerror}") from None
            mapping = mmap.mmap(shm.fd, layout.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            inode = os.fstat(shm.fd).st_ino
        except BaseException:
            shm.close_fd()
            shm.unlink()
            raise
        shm.close_fd()
        lib.tfem_touch(ffi.from_buffer(mapping), layout.size, PAGE)
        h = ffi.cast("struct tfem_header *", ffi.from_buffer(mapping))
        h.layout_version = lib.TFEM_LAYOUT_VERSION
        h.header_size = layout.header_size
        h.segment_size = layout.size
        h.slot_count = layout.slot_count
        h.slot_size = layout.slot_size
        h.buf_size = layout.buf_size
        h.index_size = layout.index_size
        h.block_size = layout.block_size
        h.block_count = layout.block_count
        h.slots_offset = layout.slots_offset
        h.index_offset = layout.index_offset
        h.free_stack_offset = layout.free_stack_offset
        h.holds_offset = layout.holds_offset
        h.lives_offset = layout.lives_offset
        h.bitmap_offset = layout.bitmap_offset
        h.arena_offset = layout.arena_offset
        h.max_file_size = layout.max_file_size
        h.broker_pid = os.getpid()
        if replacing is None:
            h.instance_id = int.from_bytes(os.urandom(8), "little")
            h.next_file_id = 1
        else:  # past any id an old writer may still take before it sees `moved`
            h.instance_id = replacing.header.instance_id
            h.next_file_id = replacing.header.next_file_id + (1 << 32)
            h.cluster = replacing.header.cluster  # the same broker, with the same peers
        segment = cls(name, mapping, inode)
        for i in range(layout.slot_count):  # a linked stack: slot i, then i + 1 (stored + 1; 0 ends it)
            segment.free_stack[i] = i + 2 if i + 1 < layout.slot_count else 0
        h.free_head = 1  # slot 0 on top
        h.free_top = layout.slot_count
        lib.tfem_store64(ffi.addressof(h, "magic"), lib.TFEM_SEGMENT_MAGIC)  # last: now valid
        segment._check_geometry()
        return segment

    @classmethod
    def attach(cls, name: str) -> Segment:
        """Map an existing segment (a client's job)."""
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise NotFound(f"no tfem segment {name}: is the broker running?") from None
        try:
            info = os.fstat(shm.fd)
            if info.st_size < ffi.sizeof("struct tfem_header"):
                raise SegmentCorrupt(f"segment {name} is too small to be a tfem segment")
            mapping = mmap.mmap(shm.fd, info.st_size, flags=mmap.MAP_SHARED)
        finally:
            shm.close_fd()
        problem = _header_problem(ffi.cast("struct tfem_header *", ffi.from_buffer(mapping)), info.st_size)
        if problem:
            mapping.close()
            raise SegmentCorrupt(f"segment {name} cannot be used: {problem}")
        segment = cls(name, mapping, info.st_ino)
        segment._check_geometry()
        return segment

    def _check_geometry(self) -> None:
        """Give the native core its own checked copy of where things are: it
        never follows the shared header's offsets, which any process that
        maps the segment could damage later."""
        why = lib.tfem_geometry_attach(self.header, self.size)
        if why != ffi.NULL:
            reason = ffi.string(why).decode()
            self.close()
            raise SegmentCorrupt(f"segment {self.name} cannot be used: {reason}")

    def close(self) -> None:
        """Detach. Idempotent; the segment stays for the other processes."""
        if self._mmap is None or self.view is None or self._base is None:  # all three, or none
            return
        lib.tfem_geometry_detach(self.header)
        self.view.release()
        ffi.release(self._base)
        try:
            self._mmap.close()
        except BufferError:
            pass  # a view handed out (TfemFile.chunks) still lives: unmapped when it goes
        self._mmap = None
        self.view = None
        self._base = None

    def name_is_ours(self) -> bool:
        """Whether the name still leads to this mapping: systemd's RemoveIPC
        (at the end of a user's last session) or an rm in /dev/shm can
        remove it while every process keeps its mapping."""
        try:
            return os.stat(SHM_DIR + self.name).st_ino == self.inode
        except FileNotFoundError:
            return False

    @staticmethod
    def exists(name: str) -> bool:
        try:
            posix_ipc.SharedMemory(name).close_fd()
            return True
        except posix_ipc.ExistentialError:
            return False

    @staticmethod
    def unlink(name: str) -> bool:
        """Destroy the segment by name (the broker's job, or `tfem clean`)."""
        try:
            posix_ipc.unlink_shared_memory(name)
            return True
        except posix_ipc.ExistentialError:
            return False

    # ---- typed access ----

    def slot(self, index: int) -> Slot:
        assert self._base is not None, "the segment is closed"
        return ffi.cast("struct tfem_slot *", self._base + self.slots_offset + index * self.slot_size)

    def life(self, index: int) -> Life:
        """Slot `index`'s lifetime counts (struct tfem_life)."""
        assert self._base is not None, "the segment is closed"
        return self.lives[index]

    def slot_offset(self, index: int) -> int:
        return self.slots_offset + index * self.slot_size

    def inline_data_offset(self, index: int) -> int:
        return self.slots_offset + index * self.slot_size + self.inline_offset

    def block_data_offset(self, block: int) -> int:
        return self.arena_offset + block * self.block_size

    def populate(self, offset: int, length: int) -> None:
        """Map the pages of a range into this process for writing in one
        call (MADV_POPULATE_WRITE, Linux 5.14+) instead of one page fault
        per 4 KiB during a large copy. Only a hint: ignored where the
        kernel does not know it."""
        if self._mmap is None:
            return
        start = offset - offset % PAGE
        try:
            self._mmap.madvise(_MADV_POPULATE_WRITE, start, min(length + offset - start, len(self._mmap) - start))
        except OSError:
            pass

    def blocks_in_use(self) -> int:
        return lib.tfem_blocks_in_use(self.bitmap, self.block_count)

    def longest_free_run(self) -> int:
        """The most arena blocks free in a row."""
        return lib.tfem_blocks_longest_run(self.bitmap, self.block_count)
