"""The broker (the paper's transfer process E): what needs one owner.

Theory of operation:
- It creates the segment, and alone unlinks it. Clients on the node make
  their own state transitions in it; the broker is not on the path of a
  small file's open, write, read or close.
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
- A malformed or mistaken request gets an error reply; nothing a client
  sends can stop the broker.
- It settles the files of clients that die: it watches each client's
  process through a pidfd (the kernel says when it exits, no polling), and
  sweeps the table every few seconds for holders nobody introduced and for
  arena blocks a writer claimed but died before recording.
- Started on a segment a crashed broker left, it adopts it (recovery.py)
  and its spill store: published files survive a broker crash.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import pathlib
import time
from typing import Any, Callable

import zmq

from tfem import discovery, protocol
from tfem._native import ffi, lib
from tfem.config import Instance
from tfem.errors import (FileTooLarge, InvalidArgument, NoSpace, ProtocolError, SegmentCorrupt, SegmentExists,
                         TfemError, UnknownClient, errno_of)
from tfem.protocol import Op, Reply
from tfem.segment import Layout, Segment
from tfem.states import State
from tfem.table import SlotTable

from .recovery import Recovery, adopt
from .relocation import OwnWrites, Relocation
from .spill import SpillStore

log = logging.getLogger("tfem.broker")

SWEEP_INTERVAL_S = 2.0  # how often holders nobody introduced, and the segment's and socket's names, are checked
MOVE_INTERVAL_S = 0.05  # while a replaced segment has files: how often they are moved


@dataclasses.dataclass
class BrokerConfig:
    keyfile: str | None = None
    slots: int = 4096
    buf_size: int = 8 << 10
    block_size: int = 64 << 10
    memory: int = 512 << 20
    spill_dir: pathlib.Path | None = None  # None: the instance's default
    spill: bool = True
    spill_size: int = 64 << 30  # LMDB map size: address space, not disk
    max_file_size: int | None = None  # None: all the instance holds (inline + memory + spill)
    endpoint: str | None = None  # default: ipc:// socket of the instance
    keep: bool = False  # leave segment and spill files on stop


class Broker:
    segment: Segment | None = None
    spill: SpillStore | None = None
    _socket: Any = None

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.instance = Instance.for_keyfile(config.keyfile)
        self.endpoint = config.endpoint or self.instance.endpoint
        self.clients: dict[bytes, int] = {}
        self.served: dict[str, int] = {op.value: 0 for op in Op}
        self.errors = 0
        self.started = time.time()
        self._announced = False
        self._owns_segment = False  # created it, or finished adopting it: ours to destroy
        self.recovery: Recovery | None = None
        self._pidfds: dict[int, int] = {}  # pid -> pidfd of each client process
        self.settled_clients = 0
        self._poller: Any = None
        self._next_sweep = 0.0
        self._socket_inode = 0  # of the ipc:// socket file, to notice its removal
        self.relocations: list[Relocation] = []  # replaced segments with files still in them
        self.segments_replaced = 0
        self._next_move = 0.0

    # ---- life cycle ----

    def start(self) -> None:
        c = self.config
        layout = Layout(c.slots, c.buf_size, c.block_size, c.memory)  # checks the geometry first
        held = layout.max_file_size + (c.spill_size if c.spill else 0)  # all the instance holds
        layout = Layout(c.slots, c.buf_size, c.block_size, c.memory, held if c.max_file_size is None else c.max_file_size)
        try:
            self.segment = Segment.create(self.instance.segment, layout)
            self._owns_segment = True
        except SegmentExists:
            self.segment = self._attach_left_segment(layout)
        try:
            self.table = SlotTable(self.segment, os.getpid())
            # Scratch for the sweep's look at the arena (tfem_t_reclaim_blocks).
            self._unowned = ffi.new("uint64_t[]", max(1, (self.segment.block_count + 63) // 64))
            self._claims = ffi.new("uint32_t[]", self.segment.slot_count)
            if c.spill:
                self.spill = SpillStore(self.spill_dir, c.spill_size)
            if not self._owns_segment:
                self._adopt()
            elif self.spill is not None and self.spill.file_ids():
                # A new segment references nothing: records left in the store
                # (its segment was lost, e.g. to a reboot) can never be read.
                log.warning("discarding %d orphaned file(s) from the spill store %s",
                            len(self.spill.file_ids()), self.spill.path)
                for file_id in self.spill.file_ids():
                    self.spill.discard(file_id)
            self.segment.header.broker_pid = os.getpid()
            self._context = zmq.Context()
            self._socket = self._context.socket(zmq.ROUTER)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
            if self.endpoint.startswith("ipc://"):
                stale = pathlib.Path(self.endpoint[len("ipc://"):])
                stale.unlink(missing_ok=True)  # the segment was free, so no broker owns it
            self._bind()
            self._announce()
            self.instance.write_state({"broker_pid": os.getpid(), "spill_dir": str(self.spill_dir),
                                       "segment": self.segment.name, "endpoint": self.endpoint})
            self._owns_segment = True
        except BaseException:
            self.close(destroy=True)  # only what it made itself: `_owns_segment`
            raise
        log.info("broker %d serving %s: segment %s, %d slots, %d MiB arena, spill %s",
                 os.getpid(), self.endpoint, self.segment.name, c.slots, c.memory >> 20,
                 self.spill.path if self.spill else "off")

    def _bind(self) -> None:
        self._socket.bind(self.endpoint)
        if self.endpoint.startswith("ipc://"):
            path = self.endpoint[len("ipc://"):]
            os.chmod(path, 0o600)
            self._socket_inode = os.stat(path).st_ino

    @property
    def seg(self) -> Segment:
        assert self.segment is not None, "the broker has not started"
        return self.segment

    @property
    def spill_dir(self) -> pathlib.Path:
        return self.config.spill_dir or self.instance.spill_dir

    def _attach_left_segment(self, layout: Layout) -> Segment:
        """The segment a crashed broker left: attached to adopt it, or
        replaced if its header cannot be trusted."""
        name = self.instance.segment
        try:
            segment = Segment.attach(name)
        except SegmentCorrupt as exc:
            log.error("%s; replacing it with a new, empty segment", exc)
            Segment.unlink(name)
            segment = Segment.create(name, layout)
            self._owns_segment = True
            return segment
        other = segment.header.broker_pid
        if other != os.getpid() and lib.tfem_pid_alive(other):
            segment.close()
            raise TfemError(f"a broker (pid {other}) already serves {self.instance.keyfile}")
        h = segment.header
        if (h.slot_count, h.buf_size, h.block_size, h.block_count, h.max_file_size) != \
                (layout.slot_count, layout.buf_size, layout.block_size, layout.block_count, layout.max_file_size):
            log.warning("adopting the segment as it was made (%d slots, %d B inline, %d B blocks, %d blocks, "
                        "files up to %d B), not as the options ask",
                        h.slot_count, h.buf_size, h.block_size, h.block_count, h.max_file_size)
        return segment

    def _adopt(self) -> None:
        spilled = {file_id: self.spill.stored_end(file_id) for file_id in self.spill.file_ids()} if self.spill else {}
        self.recovery = adopt(self.table, lambda pid: bool(lib.tfem_pid_alive(pid)), spilled)
        for file_id in self.recovery.discard_file_ids:
            if self.spill:
                self.spill.discard(file_id)
        log.warning("adopted the segment a previous broker left: %s", self.recovery)

    def _announce(self) -> None:
        if not self.instance.keyfile.exists():
            log.warning("no registry for %s: clients must use TFEM_BROKER=%s",
                        self.instance.keyfile, self.endpoint)
            return
        try:
            discovery.ask_registry(self.instance.keyfile, protocol.Action.ANNOUNCE,
                                   {"endpoint": self.endpoint, "load": 0})
        except TfemError as exc:
            # Connected clients need no registry; the sweep announces again.
            log.warning("registry not reached (%s): announcing again every %g s", exc, SWEEP_INTERVAL_S)
        self._announced = True

    def serve(self, should_stop: Callable[[], bool]) -> None:
        """Answer requests until should_stop() is true (checked every 100 ms)."""
        self._poller = poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not should_stop():
            try:
                events = dict(poller.poll(100))
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:  # a signal: look at should_stop()
                    continue
                raise
            if self._socket in events:
                for _ in range(256):  # drain, but check for stop now and then
                    try:
                        frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._serve_one(frames)
            for pid, fd in list(self._pidfds.items()):
                if fd in events:
                    self._client_exited(pid)
            if self.relocations and time.monotonic() >= self._next_move:
                self._next_move = time.monotonic() + MOVE_INTERVAL_S
                self._move_files()
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + SWEEP_INTERVAL_S
                self._sweep()

    # ---- dead clients ----

    def _watch(self, pid: int) -> None:
        """Be told by the kernel when client process `pid` exits."""
        if pid in self._pidfds or pid == os.getpid():
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._settle(pid)
            return
        except OSError:  # no pidfds here (old kernel): the sweep covers it
            return
        self._pidfds[pid] = fd
        if self._poller is not None:
            self._poller.register(fd, zmq.POLLIN)

    def _client_exited(self, pid: int) -> None:
        fd = self._pidfds.pop(pid)
        self._poller.unregister(fd)
        os.close(fd)
        for identity in [i for i, p in self.clients.items() if p == pid]:
            del self.clients[identity]
        self._settle(pid)

    def _tables(self) -> list[SlotTable]:
        """The segment's table, and those of replaced segments still in use."""
        return [self.table, *(r.table for r in self.relocations)]

    def _settle(self, pid: int) -> None:
        for table in self._tables():
            settled = table.settle_holder(pid)
            for file_id in settled.discard_file_ids:
                if self.spill:
                    self.spill.discard(file_id)
            if settled.dropped or settled.returned:
                self.settled_clients += 1
                log.info("client %d died: dropped %d file(s) it was writing, returned %d it was reading",
                         pid, settled.dropped, settled.returned)

    def _sweep(self) -> None:
        """Settle holders that died unwatched (clients of an earlier broker,
        or of a kernel without pidfds); discard spill records no file owns
        any more; announce again, in case the registry was restarted and
        forgot this broker."""
        self._check_names()
        for pid in set().union(*(table.holders() for table in self._tables())):
            if pid not in self._pidfds and pid != os.getpid() and not lib.tfem_pid_alive(pid):
                self._settle(pid)
        freed = lib.tfem_t_reclaim_blocks(self.seg.header, os.getpid(), self._unowned, self._claims)
        if freed > 0:
            log.info("freed %d arena block(s) a writer claimed and died before recording", freed)
        if self.spill is not None and self.spill.file_ids():
            self._discard_orphans()
        if self._announced:
            try:
                discovery.ask_registry(self.instance.keyfile, protocol.Action.ANNOUNCE,
                                       {"endpoint": self.endpoint, "load": 0}, timeout=1.0)
            except TfemError as exc:
                log.debug("registry not reached: %s", exc)

    def _discard_orphans(self) -> None:
        """A client that frees a spilled file asks for its records to be
        discarded; one killed between the two leaves them behind (the soak
        run found 160 KB after 85 kills). Every record the broker wrote
        belongs to a slot flagged SPILLED and held or waiting, and the broker
        does its moves between sweeps, so any other record is an orphan."""
        spilled = lib.TFEM_SLOT_SPILLED
        owned = {table.seg.slot(s).file_id for table in self._tables() for s in range(table.seg.slot_count)
                 if table.seg.slot(s).flags & spilled and table.state_of(s)[0] is not State.INVALID}
        for file_id in self.spill.file_ids() - owned:
            self.spill.discard(file_id)

    # ---- names removed under a running broker ----

    def _check_names(self) -> None:
        """Make the socket and the segment again if their names were removed
        (systemd's RemoveIPC at the end of a user's last session, a cleaner
        of /run or /dev/shm): old clients keep what they have, new clients
        must find them."""
        if self.endpoint.startswith("ipc://"):
            try:
                bound = os.stat(self.endpoint[len("ipc://"):]).st_ino == self._socket_inode
            except FileNotFoundError:
                bound = False
            if not bound:
                log.warning("the socket %s was removed: binding it again", self.endpoint)
                try:
                    self._socket.unbind(self.endpoint)
                except zmq.ZMQError:
                    pass
                self._bind()
        if not self.seg.name_is_ours():
            self._replace_segment()

    def _replace_segment(self) -> None:
        old, h = self.seg, self.seg.header
        layout = Layout(h.slot_count, h.buf_size, h.block_size, h.block_count * h.block_size, h.max_file_size)
        try:
            new = Segment.create(old.name, layout, replacing=old)
        except TfemError as exc:
            log.error("the segment %s was removed and cannot be made again: %s", old.name, exc)
            return
        self.segment, self.table = new, SlotTable(new, os.getpid())
        self.relocations.append(Relocation(old))
        self.segments_replaced += 1
        log.warning("the segment %s was removed: made it again, moving its files there", old.name)
        self._move_files()

    def _move_files(self) -> None:
        into = OwnWrites(self.seg, self._ask_self)
        for relocation in list(self.relocations):
            relocation.move_published(into, self.spill)
            if relocation.finished():
                log.info("moved %d file(s) out of the replaced segment", relocation.moved)
                relocation.old.close()
                self.relocations.remove(relocation)

    def _ask_self(self, op: Op, args: dict[str, Any], data: Any = None) -> Reply:
        return self._serve_client(os.getpid(), protocol.Request(0, op, args, data))

    def close(self, destroy: bool = False) -> None:
        """Withdraw and stop listening. With `destroy` (a stop asked for),
        unless `keep`, also remove the segment and the spill store; without
        it (a crash) they stay for the next broker to adopt. Idempotent."""
        if self._announced:
            self._announced = False
            try:
                discovery.ask_registry(self.instance.keyfile, protocol.Action.WITHDRAW,
                                       {"endpoint": self.endpoint}, timeout=1.0)
            except TfemError:
                pass
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds.clear()
        if self._socket is not None:
            self._socket.close()
            self._context.term()
            self._socket = None
            if self.endpoint.startswith("ipc://"):
                pathlib.Path(self.endpoint[len("ipc://"):]).unlink(missing_ok=True)
        # What this broker did not make or finish adopting is not its to destroy.
        destroy = destroy and self._owns_segment and not self.config.keep
        if self.spill is not None:
            self.spill.close()
            if destroy:
                self.spill.remove()
            self.spill = None
        for relocation in self.relocations:
            relocation.old.close()
        self.relocations.clear()
        if self.segment is not None:
            name = self.segment.name
            self.segment.close()
            self.segment = None
            if destroy:
                Segment.unlink(name)
                self.instance.remove_state()

    # ---- requests ----

    def _serve_one(self, frames: list[Any]) -> None:
        identity, body = frames[0].bytes, [f.buffer for f in frames[1:]]
        try:
            request = protocol.decode_request(body)
        except ProtocolError as exc:
            self.errors += 1
            rid = protocol.request_id_of(body[0]) if body else None
            log.debug("malformed request: %s", exc)
            if rid is not None:
                self._send(identity, Reply(rid, exc.errno, str(exc)))
            return
        self.served[request.op.value] += 1
        try:
            reply = self._handle(identity, request)
        except TfemError as exc:
            self.errors += 1
            reply = Reply(request.request_id, errno_of(exc), str(exc))
        except Exception as exc:  # a bug must not take the broker down
            self.errors += 1
            log.exception("error serving %s", request.op.value)
            reply = Reply(request.request_id, 5, f"broker error: {exc}")
        self._send(identity, reply)

    def _send(self, identity: bytes, reply: Reply) -> None:
        try:
            self._socket.send_multipart([identity, *protocol.encode_reply(reply)], copy=False)
        except zmq.ZMQError as exc:
            log.debug("reply not sent: %s", exc)

    def _handle(self, identity: bytes, request: protocol.Request) -> Reply:
        op, args, rid = request.op, request.args, request.request_id
        if op is Op.HELLO:
            if not 0 < args["pid"] < 2**31:  # a pid_t; pidfd_open would raise OverflowError
                raise InvalidArgument(f"{args['pid']} is not a process id")
            self.clients[identity] = args["pid"]
            self._watch(args["pid"])
            return Reply(rid, 0, {"segment": self.segment.name, "broker_pid": os.getpid(),
                                  "instance_id": self.segment.header.instance_id})
        if op is Op.STATS:
            return Reply(rid, 0, self.stats())
        if op is Op.BYE:
            self.clients.pop(identity, None)
            return Reply(rid, 0, {})
        pid = self.clients.get(identity)
        if pid is None:
            raise UnknownClient("this broker does not know you (it may have restarted): say hello")
        return self._serve_client(pid, request)

    def _serve_client(self, pid: int, request: protocol.Request) -> Reply:
        op, args, rid = request.op, request.args, request.request_id
        if op is Op.ROOM:
            if not 0 < args["blocks"] <= self.seg.block_count:
                raise NoSpace(f"{args['blocks']} blocks is more than the arena's {self.seg.block_count}")
            return Reply(rid, 0, {"room": self._evict_for_run(args["blocks"])})
        if op is Op.ALLOC:
            self._check_holder(args["slot"], args["generation"], pid, State.WRITE)
            self._check_size(args["capacity"])
            return Reply(rid, 0, {"spilled": self._alloc(args["slot"], args["generation"], pid, args["capacity"])})
        if op is Op.SPILL_WRITE:
            slot = self._check_spilled(args, pid, State.WRITE)
            assert self.spill is not None and request.data is not None
            self._check_size(args["offset"] + len(request.data))
            self.spill.write(slot.file_id, args["offset"] - self.segment.buf_size, memoryview(request.data))
            return Reply(rid, 0, {})
        if op is Op.SPILL_READ:
            slot = self._check_spilled(args, pid, State.READ)
            assert self.spill is not None
            length = max(0, min(args["length"], slot.size - args["offset"], 64 << 20))
            data = self.spill.read(slot.file_id, args["offset"] - self.segment.buf_size, length)
            return Reply(rid, 0, {}, data)
        if op is Op.DISCARD:
            self._discard(args["file_id"])
            return Reply(rid, 0, {})
        if op is Op.CHECKSUM:
            slot = self._check_holder(args["slot"], args["generation"], pid, State.WRITE, State.READ, anywhere=True)
            if not slot.flags & lib.TFEM_SLOT_SPILLED or self.spill is None:
                raise InvalidArgument(f"slot {args['slot']} is not spilled")
            crc = self.spill.checksum(slot.file_id, max(0, slot.size - self.segment.buf_size),
                                      args["crc"] & 0xFFFFFFFF)
            return Reply(rid, 0, {"crc": crc})
        raise ProtocolError(f"unhandled op {op.value}")

    def _check_holder(self, s: int, generation: int, pid: int, *states: State, anywhere: bool = False) -> Any:
        """Slot s, held by `pid` in one of `states`: in the segment, or with
        `anywhere` in a replaced one too (whose files live on until their
        holders let go; their spilled bytes are in the same store)."""
        if s >= self.segment.slot_count:
            raise InvalidArgument(f"no slot {s}")
        for table in self._tables() if anywhere else [self.table]:
            actual, gen, holder = table.state_of(s)
            if actual in states and gen == generation and holder == pid:
                return table.seg.slot(s)
        raise InvalidArgument(f"slot {s} is not held in {'/'.join(s.name for s in states)} by pid {pid}")

    def _check_size(self, end: int) -> None:
        """The clients' cores refuse writes past the limit themselves; this
        is for a request that did not come through one."""
        if end > self.seg.header.max_file_size:
            raise FileTooLarge(f"{end} bytes is past the largest file, {self.seg.header.max_file_size} bytes")

    def _check_spilled(self, args: dict[str, int], pid: int, state: State) -> Any:
        slot = self._check_holder(args["slot"], args["generation"], pid, state, anywhere=True)
        if not slot.flags & lib.TFEM_SLOT_SPILLED or self.spill is None:
            raise InvalidArgument(f"slot {args['slot']} is not spilled")
        if args["offset"] < self.segment.buf_size:
            raise InvalidArgument("spilled bytes start after the inline buffer")
        return slot

    # ---- memory ----

    def _alloc(self, s: int, generation: int, pid: int, capacity: int) -> bool:
        """Grow slot s to `capacity` bytes for its writer `pid`, making room
        by spilling when the arena is full (the client tried the arena
        itself first). True if the file went to the spill store."""
        seg = self.seg
        if seg.slot(s).flags & lib.TFEM_SLOT_SPILLED:
            return True
        while True:
            rc = lib.tfem_t_grow(seg.header, s, generation, pid, capacity)
            if rc == 0:
                return False
            if rc == errno.E2BIG:
                return self._spill_or_fail(s, "the file has too many extents")
            if rc != errno.ENOSPC:
                raise InvalidArgument(f"slot {s} cannot grow: {os.strerror(rc)}")
            needed = -(-(capacity - self.table.capacity(s)) // seg.block_size)
            # More than the whole arena: spilling others would not help.
            if needed > seg.block_count or not self._evict(needed):
                if seg.slot(s).flags & lib.TFEM_SLOT_ARENA:  # made whole for views: it stays in memory
                    raise NoSpace(f"the arena is full ({seg.block_count * seg.block_size >> 20} MiB) and a file "
                                  "made for views is never spilled")
                return self._spill_or_fail(s, "the arena is full")

    def _spill_or_fail(self, s: int, why: str) -> bool:
        if self.spill is None:
            raise NoSpace(f"{why} and spilling is off ({self.segment.block_count * self.segment.block_size >> 20} MiB arena)")
        self._move_to_spill(s)
        return True

    def _evict_for_run(self, blocks: int) -> bool:
        """Spill least recently published files until the arena has a run
        of `blocks` free blocks (a file made whole for views). False if it
        cannot."""
        seg = self.seg
        while lib.tfem_blocks_longest_run(seg.bitmap, seg.block_count) < blocks:
            if not self._evict(seg.block_count - seg.blocks_in_use() + 1):
                return False
        return True

    def _evict(self, blocks_needed: int) -> bool:
        """Move least recently published WAIT files to the spill store until
        `blocks_needed` blocks are free. False if nothing could be moved."""
        if self.spill is None:
            return False
        seg = self.segment
        candidates = []
        for s in range(seg.slot_count):
            slot = seg.slot(s)
            if slot.extent_count and not slot.flags & (lib.TFEM_SLOT_SPILLED | lib.TFEM_SLOT_ARENA) \
                    and self.table.state_of(s)[0] is State.WAIT:
                candidates.append((slot.waiting_ns, s))
        moved = False
        for _, s in sorted(candidates):
            handle = self.table.hold_waiting(s)
            if handle is None:
                continue
            try:
                self._move_to_spill(s)
            finally:
                unlinked = self.table.release(handle)  # freed instead, if unlinked meanwhile
                if unlinked is not None:
                    self.spill.discard(unlinked)
            moved = True
            if seg.block_count - seg.blocks_in_use() >= blocks_needed:
                break
        return moved

    def _move_to_spill(self, s: int) -> None:
        """Copy bytes past the inline buffer to the spill store, free the
        extents, flag the slot. The caller holds the slot."""
        seg, slot = self.segment, self.segment.slot(s)
        assert self.spill is not None
        size = slot.size
        try:
            for file_offset, seg_offset, length in self.table.pieces(s)[1 if seg.buf_size else 0:]:
                n = max(0, min(length, size - file_offset))
                if n:
                    self.spill.write(slot.file_id, file_offset - seg.buf_size, seg.view[seg_offset: seg_offset + n])
        except BaseException:
            # One transaction per piece: the pieces already stored would
            # never be discarded (the file is not flagged), so they go now.
            self.spill.discard(slot.file_id)
            raise
        self.table.set_flag(s, lib.TFEM_SLOT_SPILLED)
        self.table.release_extents(s)

    def _discard(self, file_id: int) -> None:
        if self.spill is None:
            return
        seg = self.segment

        def held(s: int) -> bool:
            return seg.slot(s).file_id == file_id and self.table.state_of(s)[0] is not State.INVALID

        for s in range(seg.slot_count):
            if held(s):
                # A client claiming the freed slot sets its state before its
                # new file id: look again once that claim is complete.
                with self.table.locked():
                    if held(s):
                        raise InvalidArgument(f"file {file_id} is still held")
        self.spill.discard(file_id)

    # ---- statistics ----

    def stats(self) -> dict[str, Any]:
        seg = self.segment
        by_state = {state.name: 0 for state in State}
        for s in range(seg.slot_count):
            by_state[self.table.state_of(s)[0].name] += 1
        used_blocks = seg.blocks_in_use()
        h = seg.header
        return {
            "broker_pid": os.getpid(),
            "endpoint": self.endpoint,
            "segment": seg.name,
            "uptime_s": round(time.time() - self.started, 1),
            "slots_total": seg.slot_count,
            "slots_used": seg.slot_count - by_state["INVALID"],
            "slots_free": by_state["INVALID"],
            "files_by_state": {k: v for k, v in by_state.items() if k != "INVALID"},
            "buf_size": seg.buf_size,
            "block_size": seg.block_size,
            "arena_bytes_total": seg.block_count * seg.block_size,
            "arena_bytes_used": used_blocks * seg.block_size,
            "arena_bytes_free": (seg.block_count - used_blocks) * seg.block_size,
            "max_file_size": h.max_file_size,
            "spill": str(self.spill.path) if self.spill else None,
            "spilled_bytes": self.spill.bytes_used if self.spill else 0,
            "spilled_files": len(self.spill.file_ids()) if self.spill else 0,
            "clients": len(self.clients),
            "requests_served": dict(self.served),
            "request_errors": self.errors,
            "dead_clients_settled": self.settled_clients,
            "segments_replaced": self.segments_replaced,
            "recovery": {k: v for k, v in dataclasses.asdict(self.recovery).items()
                         if k != "discard_file_ids"} if self.recovery else None,
            "opened_for_write": h.opened_write,
            "opened_for_read": h.opened_read,
            "published": h.closed_write,
            "consumed": h.closed_read,
        }
