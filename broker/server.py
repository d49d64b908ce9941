"""The broker (the paper's transfer process E): what needs one owner.

Theory of operation:
- It creates the segment, and alone unlinks it. Clients on the node make
  their own state transitions in it; the broker is not on the path of a
  small file's open, write, read or close. They ask it for room, spill and
  discard (dispatch.py): arena blocks and spilling are memory.py's; the
  files of clients that die, clients.py's.
- Started on a segment a crashed broker left, it adopts it (recovery.py)
  and its spill store: published files survive a broker crash.
- Every few seconds it sweeps: it makes the socket and the segment again
  if their names were removed (relocation.py), settles what dead clients
  left (clients.py), and announces itself to the registry again.

This module is the broker's life: start, the serving loop, the sweep, stop.
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
from tfem._native import lib
from tfem.config import Instance
from tfem.errors import SegmentCorrupt, SegmentExists, TfemError
from tfem.protocol import Reply
from tfem.segment import Layout, Segment
from tfem.spill_format import Codec
from tfem.table import SlotTable

from .clients import Clients
from .dispatch import Dispatch
from .holdings import Holdings
from .memory import Memory
from .recovery import Recovery, adopt
from .relocation import move_files, replace_segment
from .spill import SpillStore, default_limit
from .stats import stats

log = logging.getLogger("tfem.broker")

SWEEP_INTERVAL_S = 2.0  # how often holders nobody introduced, and the segment's and socket's names, are checked
MOVE_INTERVAL_S = 0.05  # while a replaced segment has files: how often they are moved
# While the spill store holds files: how often the records of freed ones
# are looked for (one pass over the slots in C, ~10 us for 4096) and deleted.
TIDY_INTERVAL_S = 0.05


@dataclasses.dataclass
class BrokerConfig:
    keyfile: str | None = None
    slots: int = 4096
    buf_size: int = 8 << 10
    block_size: int = 64 << 10
    memory: int = 512 << 20
    spill_dir: pathlib.Path | None = None  # None: the instance's default
    spill: bool = True
    spill_size: int | None = None  # None: half of what the spill directory's disk has free at start
    spill_codec: Codec = Codec.NONE
    max_file_size: int | None = None  # None: all the instance holds (inline + memory + spill)
    endpoint: str | None = None  # default: ipc:// socket of the instance
    keep: bool = False  # leave segment and spill files on stop


class Broker:
    holdings: Holdings | None = None  # with the parts below, from start() to close()
    memory: Memory
    clients: Clients
    dispatch: Dispatch
    _socket: zmq.Socket[Any] | None = None

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.instance = Instance.for_keyfile(config.keyfile)
        self.endpoint = config.endpoint or self.instance.endpoint
        self.started = time.time()
        self._announced = False
        self._owns_segment = False  # created it, or finished adopting it: ours to destroy
        self.recovery: Recovery | None = None
        self._next_sweep = 0.0
        self._socket_inode = 0  # of the ipc:// socket file, to notice its removal
        self._next_move = 0.0
        self._next_tidy = 0.0

    # ---- start ----

    def start(self) -> None:
        c = self.config
        layout = Layout(c.slots, c.buf_size, c.block_size, c.memory)  # checks the geometry first
        spill_limit = (c.spill_size if c.spill_size is not None else default_limit(self.spill_dir)) if c.spill else 0
        held = layout.max_file_size + spill_limit  # all the instance holds
        layout = Layout(c.slots, c.buf_size, c.block_size, c.memory, held if c.max_file_size is None else c.max_file_size)
        try:
            segment = Segment.create(self.instance.segment, layout)
            self._owns_segment = True
        except SegmentExists:
            segment = self._attach_left_segment(layout)
        self.holdings = holdings = Holdings(segment, SlotTable(segment, os.getpid()))
        self.memory = Memory(holdings)
        self.clients = Clients(holdings)
        self.dispatch = Dispatch(holdings, self.memory, self.clients, self.stats)
        try:
            if c.spill:
                holdings.spill = SpillStore(self.spill_dir, spill_limit, c.spill_codec, holdings.owned_spilled)
            if not self._owns_segment:
                self._adopt(holdings)
            elif holdings.spill is not None and holdings.spill.file_ids():
                # A new segment references nothing: records left in the store
                # (its segment was lost, e.g. to a reboot) can never be read.
                log.warning("discarding %d orphaned file(s) from the spill store %s",
                            len(holdings.spill.file_ids()), holdings.spill.path)
                holdings.discard(holdings.spill.file_ids())
            segment.header.broker_pid = os.getpid()
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
                                       "segment": segment.name, "endpoint": self.endpoint})
            self._owns_segment = True
        except BaseException:
            self.close(destroy=True)  # only what it made itself: `_owns_segment`
            raise
        log.info("broker %d serving %s: segment %s, %d slots, %d MiB arena, spill %s",
                 os.getpid(), self.endpoint, segment.name, c.slots, c.memory >> 20,
                 holdings.spill.path if holdings.spill else "off")

    def _bind(self) -> None:
        assert self._socket is not None
        self._socket.bind(self.endpoint)
        if self.endpoint.startswith("ipc://"):
            path = self.endpoint[len("ipc://"):]
            os.chmod(path, 0o600)
            self._socket_inode = os.stat(path).st_ino

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

    def _adopt(self, holdings: Holdings) -> None:
        spill = holdings.spill
        spilled = {file_id: spill.stored_end(file_id) for file_id in spill.file_ids()} if spill else {}
        self.recovery = adopt(holdings.table, lambda pid: bool(lib.tfem_pid_alive(pid)), spilled)
        holdings.discard(self.recovery.discard_file_ids)
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

    # ---- serving ----

    def serve(self, should_stop: Callable[[], bool]) -> None:
        """Answer requests until should_stop() is true (checked every 100 ms)."""
        assert self.holdings is not None and self._socket is not None, "the broker has not started"
        holdings, socket = self.holdings, self._socket
        self.clients.poller = poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        while not should_stop():
            try:
                events = dict(poller.poll(100))
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:  # a signal: look at should_stop()
                    continue
                raise
            if socket in events:
                for _ in range(256):  # drain, but check for stop now and then
                    try:
                        frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    answer = self.dispatch.reply_to(frames)
                    if answer is not None:
                        self._send(*answer)
            self.clients.exited(events)
            if holdings.spill is not None and holdings.spill.bytes_by_file and time.monotonic() >= self._next_tidy:
                self._next_tidy = time.monotonic() + TIDY_INTERVAL_S
                self._tidy_spill()
            if holdings.relocations and time.monotonic() >= self._next_move:
                self._next_move = time.monotonic() + MOVE_INTERVAL_S
                move_files(holdings, self.dispatch.ask_self)
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + SWEEP_INTERVAL_S
                self._sweep()

    def _send(self, identity: bytes, reply: Reply) -> None:
        assert self._socket is not None
        try:
            self._socket.send_multipart([identity, *protocol.encode_reply(reply)], copy=False)
        except zmq.ZMQError as exc:
            log.debug("reply not sent: %s", exc)

    def stats(self) -> dict[str, Any]:
        assert self.holdings is not None, "the broker has not started"
        limit_from = "--spill-size" if self.config.spill_size is not None else "half the disk's free room at start"
        return stats(self.holdings, self.dispatch, self.clients, endpoint=self.endpoint, started=self.started,
                     recovery=self.recovery, limit_from=limit_from)

    # ---- the sweep ----

    def _sweep(self) -> None:
        """Undo the removal of the broker's names; settle what dead clients
        left; announce again, in case the registry was restarted and forgot
        this broker."""
        self._check_names()
        self.clients.sweep()
        if self.holdings is not None and self.holdings.spill is not None:
            dead = self.holdings.spill.reader_check()
            if dead:
                log.info("freed %d spill store reader slot(s) of clients that died reading", dead)
            self._tidy_spill()
        if self._announced:
            try:
                discovery.ask_registry(self.instance.keyfile, protocol.Action.ANNOUNCE,
                                       {"endpoint": self.endpoint, "load": 0}, timeout=1.0)
            except TfemError as exc:
                log.debug("registry not reached: %s", exc)

    def _tidy_spill(self) -> None:
        """Delete the records of freed files; bring spilled files back into
        memory that freed up; make an emptied store afresh."""
        assert self.holdings is not None and self.holdings.spill is not None
        spill = self.holdings.spill
        spill.tidy()
        self.memory.restore()
        if spill.renew():
            log.info("the spill store %s emptied: made it afresh, its disk room given back", spill.path)

    def _check_names(self) -> None:
        """Make the socket and the segment again if their names were removed
        (systemd's RemoveIPC at the end of a user's last session, a cleaner
        of /run or /dev/shm): old clients keep what they have, new clients
        must find them."""
        assert self.holdings is not None and self._socket is not None
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
        if not self.holdings.segment.name_is_ours():
            replace_segment(self.holdings, self.dispatch.ask_self)

    # ---- stop ----

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
        if self.holdings is not None:
            self.clients.close()
        if self._socket is not None:
            self._socket.close()
            self._context.term()
            self._socket = None
            if self.endpoint.startswith("ipc://"):
                pathlib.Path(self.endpoint[len("ipc://"):]).unlink(missing_ok=True)
        # What this broker did not make or finish adopting is not its to destroy.
        destroy = destroy and self._owns_segment and not self.config.keep
        if self.holdings is not None:
            self.holdings.close(destroy)
            self.holdings = None
            if destroy:
                self.instance.remove_state()
