"""The client: finds a broker, maps its segment, opens files.

On the broker's node a client makes every state transition itself in the
shared segment (see table.py) and copies data straight into and out of it;
the broker is asked only for what needs one owner: arena extents beyond a
file's inline buffer, and the spill store. Requests travel on a ZeroMQ
DEALER socket with request ids, so replies may come back in any order.

A client notices when it finds itself in a forked child: the child gets a
connection of its own and never touches the parent's socket.

If the broker dies, a restarted broker adopts the segment, and the client
carries on: a request the dead broker never answered is sent again to the
new one (every request is idempotent), after a new HELLO. Only if no broker
takes over within TFEM_RECONNECT_TIMEOUT seconds (default 30), or the new
broker made a new segment (the old one was damaged), is it an error.
"""

from __future__ import annotations

import builtins
import errno
import itertools
import operator
import os
import threading
import time
from typing import Any

import zmq

from . import discovery, protocol
from ._native import ffi, lib
from .cdata import FileCore
from .config import ENV_BROKER, Instance
from .errors import (BrokerUnavailable, InvalidArgument, NoSpace, NotFound, ProtocolError, TfemError, Timeout,
                     WouldBlock, from_errno)
from . import forks
from .files import TfemFile
from .protocol import Op, Reply, Request, Wanting
from .segment import Segment
from . import spill_reader
from .spill_reader import SpillReader, reader_for
from .states import KEPT, State
from .table import NAME_MAX, Deadline, FileStat, SlotTable, encode_name, table_error

READERS_MAX = 2**31 - 1  # readers fit the slot's 32-bit counts
REPLY_TIMEOUT_S = 120.0  # a spill of a large file can take a while
CONNECT_TIMEOUT_S = 5.0  # for the broker's first answer: nobody may be listening at all
BYE_TIMEOUT_S = 1.0  # for its answer to goodbye: it may have stopped meanwhile
LIVENESS_POLL_MS = 200  # while waiting for a reply, how often the broker's pid is checked
# Across nodes: a client waiting for a file its broker pulls from another
# node waits on its futex this long at a time, then renews its want (the
# broker's answer is BrokerUnavailable once the owner or home died).
WANT_SLICE_S = 0.25
NEXT_POLL_S = 0.02  # open_next: how often a waiting caller looks again
NEXT_CANDIDATES = 8  # open_next: the oldest files tried before looking again
_MODES = {m: m[0] for m in ("r", "w", "a")} | {m + "b": m for m in "rwa"} | {"b" + m: m for m in "rwa"}
_FILE = ffi.typeof("struct tfem_file *")
_OPEN_MODE = {"r": lib.TFEM_OPEN_READ, "a": lib.TFEM_OPEN_AUTO}
WAIT_MODES = {"adaptive": lib.TFEM_WAIT_ADAPTIVE, "spin": lib.TFEM_WAIT_SPIN, "sleep": lib.TFEM_WAIT_SLEEP}


def set_wait_mode(mode: str, spin_us: float | None = None) -> None:
    """How this process waits for a name or for room: "adaptive" (spin
    while CPUs are idle and recent waits were short, else sleep; the
    default), "spin" (always spin first) or "sleep" (sleep at once on the
    futex). `spin_us` sets the spin window (default 50 us). The
    environment sets both at import: TFEM_WAIT and TFEM_SPIN_US."""
    if mode not in WAIT_MODES:
        raise InvalidArgument(f"wait mode must be one of {', '.join(WAIT_MODES)}, not {mode!r}")
    if spin_us is not None and not spin_us >= 0:
        raise InvalidArgument(f"spin_us must be at least 0, not {spin_us!r}")
    lib.tfem_set_wait_mode(WAIT_MODES[mode], -1 if spin_us is None else int(spin_us * 1000))


def _wait_mode_from_environment() -> None:
    try:
        spin_us = float(os.environ["TFEM_SPIN_US"]) if "TFEM_SPIN_US" in os.environ else None
        set_wait_mode(os.environ.get("TFEM_WAIT", "adaptive"), spin_us)
    except (ValueError, InvalidArgument) as exc:
        raise InvalidArgument(f"TFEM_WAIT / TFEM_SPIN_US: {exc}") from None


_wait_mode_from_environment()


def _lifetime(kind: str, readers: int, keep: bool, ttl: float | None) -> tuple[int, int]:
    """The core's (readers, expires_ns) for a writer's choice of lifetime;
    InvalidArgument for a choice that means nothing."""
    if kind == "r":
        raise InvalidArgument("readers, keep and ttl are the writer's choice: open with 'w' or 'a'")
    if type(keep) is not bool:
        raise InvalidArgument(f"keep must be True or False, not {keep!r}")
    if type(readers) is not int or not 1 <= readers <= READERS_MAX:
        raise InvalidArgument(f"readers must be an integer from 1 to {READERS_MAX}, not {readers!r}")
    if keep and readers != 1:
        raise InvalidArgument("a kept file has any number of readers: give keep=True or readers=N, not both")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < 1e9):
        raise InvalidArgument(f"ttl must be None or seconds greater than 0, not {ttl!r}")
    expires_ns = 0 if ttl is None else time.time_ns() + int(ttl * 1e9)
    return (KEPT if keep else readers), expires_ns


def _reconnect_timeout() -> float:
    try:
        return float(os.environ.get("TFEM_RECONNECT_TIMEOUT", "30"))
    except ValueError:
        return 30.0


class Client:
    """A connection to one broker. Use as a context manager, or close()."""

    _socket: Any = None
    _context: Any = None
    _broker_pid = 0  # the broker of the last HELLO
    segment: Segment | None = None
    _spill_store: dict[str, Any] | None = None  # where the broker's spill store is (HELLO)
    cluster = False  # the broker has peers on other nodes (HELLO)

    def __init__(self, endpoint: str, *, registry: Instance | None = None,
                 reply_timeout: float = REPLY_TIMEOUT_S, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.endpoint = endpoint
        self._registry = registry
        self._reply_timeout_ms = int(reply_timeout * 1000)
        self._connect_timeout_ms = int(connect_timeout * 1000)
        self._ids = itertools.count(1)
        self._socket_lock = threading.Lock()  # a ZeroMQ socket serves one thread at a time
        self.held: set[FileCore] = set()  # the cores of files open through this client
        self.pinned: dict[FileCore, TfemFile] = {}  # ... of them, those with views out (getbuffer)
        self._replaced: list[Segment] = []  # segments the broker replaced, kept for files still open on them
        self._connect()

    def _open_socket(self) -> Reply:
        """A socket of this process's own, and the broker's HELLO reply."""
        self.pid = os.getpid()
        self._epoch = forks.epoch
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.endpoint)
        try:
            # ZeroMQ connects lazily and retries quietly: only a reply
            # shows that a broker listens at the endpoint.
            return self._call(Op.HELLO, {"pid": self.pid}, timeout_ms=self._connect_timeout_ms)
        except BaseException:
            self._socket.close()
            self._context.term()
            self._socket = self._context = None
            raise

    def _connect(self) -> None:
        hello = self._open_socket()
        self._instance_id = hello.result["instance_id"]
        self._heard(hello)
        try:
            self._use(Segment.attach(hello.result["segment"]))
        except BaseException:
            self.close()
            raise
        self._state_found = ffi.new("int32_t *")

    def _use(self, segment: Segment) -> None:
        self.segment = segment
        self.table = SlotTable(segment, self.pid)
        self._header = segment.header
        assert segment.view is not None  # a segment is mapped until closed
        self.memory = segment.view
        self.base = int(ffi.cast("uintptr_t", self._header))

    def _follow_move(self) -> None:
        """The broker replaced the segment (its name was removed under it,
        see broker/relocation.py) and moves the files into the new one: map
        that. Files open on the old one keep it until this client closes."""
        hello = self.call(Op.HELLO, {"pid": self.pid})
        self._heard(hello)
        segment = Segment.attach(hello.result["segment"])
        assert self.segment is not None
        self._replaced.append(self.segment)
        self._use(segment)

    def _check_current(self) -> None:
        """Before an operation other than open: follow a moved segment; let
        go of a spill store no file of ours reads (spill_reader.py)."""
        self._check_fork()
        if spill_reader.idle:
            spill_reader.close_idle()
        if self._header.moved:
            self._follow_move()

    def _check_fork(self) -> None:
        if os.getpid() != self.pid:
            # In a forked child: abandon the parent's socket (closing it here
            # could disturb the parent) and keep the inherited mapping.
            self._socket = self._context = None
            self._socket_lock = threading.Lock()  # another thread may have held it at fork
            self.held = set()
            self.pinned = {}
            self._heard(self._open_socket())
            assert self.segment is not None
            self.table = SlotTable(self.segment, self.pid)

    def _heard(self, hello: Reply) -> None:
        """Note what a broker's HELLO says of it."""
        self._broker_pid = hello.result["broker_pid"]
        self._spill_store = hello.result.get("spill")
        self.cluster = bool(hello.result.get("cluster"))

    @property
    def spill(self) -> SpillReader:
        """The broker's spill store, read straight from its files."""
        if self._spill_store is None:
            raise TfemError(f"the broker at {self.endpoint} has no spill store")
        return reader_for(self._spill_store["path"], self._spill_store["map_size"])

    # ---- requests ----

    def call(self, op: Op, args: dict[str, Any], data: Any = None) -> Reply:
        """One request to the broker; raises the reply's error."""
        self._check_fork()
        return self._call(op, args, data)

    def _call(self, op: Op, args: dict[str, Any], data: Any = None, timeout_ms: int | None = None) -> Reply:
        wait_ms = self._reply_timeout_ms if timeout_ms is None else timeout_ms
        with self._socket_lock:
            if op not in (Op.HELLO, Op.BYE) and self._broker_replaced():
                self._rejoin()  # before asking: a new broker may answer for a new segment
            reply = self._exchange(Request(next(self._ids), op, args, data), wait_ms)
            if op not in (Op.HELLO, Op.BYE) and (reply is None or reply.errno == errno.ENOTCONN):
                self._rejoin()  # the broker restarted: introduce ourselves, ask again
                reply = self._exchange(Request(next(self._ids), op, args, data), wait_ms)
        if reply is None:  # HELLO and BYE are not asked again
            raise BrokerUnavailable(f"the broker at {self.endpoint} died before answering")
        if reply.errno:
            raise from_errno(reply.errno, str(reply.result))
        return reply

    def _tell(self, op: Op, args: dict[str, Any]) -> None:
        """A request the broker does not answer: sent, not waited for."""
        self._check_fork()
        with self._socket_lock:
            if self._broker_replaced():
                self._rejoin()
            self._send_request(Request(next(self._ids), op, args))

    def _send_request(self, request: Request) -> None:
        if self._socket is None:
            raise ValueError("the tfem client is closed")
        self._socket.send_multipart(protocol.encode_request(request), copy=False)

    def _exchange(self, request: Request, wait_ms: int) -> Reply | None:
        """Send `request` and wait for its reply; None if the broker died
        (or was replaced) before answering."""
        header = self.segment.header if self.segment is not None else None  # none before the first HELLO
        broker = header.broker_pid if header is not None else 0
        self._send_request(request)
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            left_ms = (deadline - time.monotonic()) * 1000
            if left_ms <= 0:
                raise BrokerUnavailable(f"the broker at {self.endpoint} did not answer within "
                                        f"{wait_ms / 1000:g} s")
            if not self._socket.poll(min(left_ms, LIVENESS_POLL_MS)):
                if header is not None and broker and (header.broker_pid != broker or not lib.tfem_pid_alive(broker)):
                    return None
                continue
            frames = self._socket.recv_multipart(copy=False)
            try:
                reply = protocol.decode_reply([f.buffer for f in frames])
            except ProtocolError:
                continue
            if reply.request_id == request.request_id:
                return reply

    def _broker_replaced(self) -> bool:
        """Whether the broker this client said hello to is gone: the segment
        names another, or it died. (Not only a missing reply shows it: a
        new broker on a new segment would answer a request it needs no
        hello for, and the client would be misled.)"""
        known = self._broker_pid
        return bool(known) and (self._header.broker_pid != known or not lib.tfem_pid_alive(known))

    def _rejoin(self) -> None:
        """Say hello to the broker that took over, once there is one."""
        timeout = _reconnect_timeout()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                hello = self._exchange(Request(next(self._ids), Op.HELLO, {"pid": self.pid}), 250)
            except BrokerUnavailable:
                continue  # nobody listening yet
            if hello is None or hello.errno:
                continue
            if hello.result.get("instance_id") != self._instance_id:
                raise BrokerUnavailable("the broker restarted with a new, empty segment (the old one was "
                                        "damaged): files this process had open are lost; connect again")
            self._heard(hello)
            return
        raise BrokerUnavailable(f"the broker at {self.endpoint} died and none took over within {timeout:g} s")

    # ---- files ----

    def open(self, name: str | bytes, mode: str = "r", timeout: float | None = None,
             wait: bool = True, *, readers: int = 1, keep: bool = False, ttl: float | None = None) -> TfemFile:
        """Open `name` for writing ("w") or reading ("r"), binary.

        "w" creates the name (AlreadyExists if it is held). "r" takes the
        file once its producer has closed it: it waits for a name that does
        not exist yet or is still being written, up to `timeout` seconds
        (None: no limit), or fails at once with `wait=False`. "a" (auto) is
        the paper's open: read the name if it exists, else create it.

        The writer chooses how long the file lives: for one reader (the
        default: freed when its consumer closes it), for `readers` readers
        (freed after the last of them closes it; they may read it at the
        same time), or `keep=True` for any number until it is unlinked.
        `ttl` seconds after it is created the broker unlinks it whatever
        its lifetime. A file with readers still to come may be spilled to
        disk under memory pressure, never freed.

        A writer meeting a full slot table, or a full arena with spilling
        off, gets NoSpace at once; with a `timeout` it waits that long for
        consumers to free room first (back-pressure).

        `wait=False` never waits for the open itself: a writer gets NoSpace
        at once for a full slot table (its writes still wait up to
        `timeout` for room), and a reader waits for a file the broker holds
        a moment (moving it to or from the spill store) up to 5 s, or
        `timeout` if shorter (0: not at all, WouldBlock).
        """
        if self._epoch != forks.epoch:
            self._check_fork()
        try:  # the common name: short, plain text
            raw = name.encode() if type(name) is str else None
        except UnicodeEncodeError:
            raw = None
        if raw is None or not 0 < len(raw) <= NAME_MAX or b"\0" in raw:
            raw = encode_name(name)
        kind = _MODES.get(mode) if type(mode) is str else None
        if kind is None:
            raise InvalidArgument(f"mode must be 'r', 'w' or 'a' (binary), not {mode!r}")
        if timeout is not None and not timeout >= 0:  # NaN too
            raise InvalidArgument(f"timeout must be None or at least 0 s, not {timeout!r}")
        plain = readers == 1 and type(readers) is int and keep is False and ttl is None  # consume-once
        lifetime = None if plain else _lifetime(kind, readers, keep, ttl)
        room_timeout = 0 if timeout is None else timeout
        deadline = None if timeout is None else Deadline(timeout)
        core = ffi.new(_FILE)
        if self.cluster and kind == "r":
            rc = lib.tfem_f_open(self._header, raw, len(raw), self.pid, _OPEN_MODE[kind], False, 0, core,
                                 self._state_found)
            # Not on this node, or every read of it here taken (of a copy
            # from another node, its owner may lend one more): the broker asks.
            if rc == errno.ENOENT or rc == errno.EAGAIN and self._state_found[0] == State.SHARED:
                return self._open_across(raw, timeout, wait, deadline, core)
            if rc == 0:
                return self._opened(core, name, raw, 0)
        rc = self._open_core(raw, kind, wait, deadline, bool(room_timeout) and wait, core)
        if rc:
            raise self._open_error(rc, raw, kind, timeout if wait else None)
        if lifetime is not None and core.writing:
            lib.tfem_f_set_lifetime(core, lifetime[0], lifetime[1])
        return self._opened(core, name, raw, room_timeout)

    def _open_core(self, raw: bytes, kind: str, wait: bool, deadline: Deadline | None, room: bool,
                   core: FileCore) -> int:
        """The core's create ("w", waiting for a slot if `room`) or open,
        again after a signal (EINTR, once Python has run its handlers) and
        in the new segment after a move (EIDRM); its errno value."""
        while True:
            left = -1 if deadline is None else deadline.remaining_ns()
            if kind == "w":
                rc = lib.tfem_f_create(self._header, raw, len(raw), self.pid, left if room else 0, core)
            else:
                rc = lib.tfem_f_open(self._header, raw, len(raw), self.pid, _OPEN_MODE[kind], wait, left, core,
                                     self._state_found)
            if rc == errno.EIDRM:
                self._follow_move()
            elif rc != errno.EINTR:
                return rc

    def _opened(self, core: FileCore, name: str | bytes, raw: bytes, room_timeout: float) -> TfemFile:
        f = TfemFile(core, name if type(name) is str else raw.decode(), self, room_timeout)
        self.held.add(core)
        return f

    def _open_across(self, raw: bytes, timeout: float | None, wait: bool, deadline: Deadline | None,
                     core: FileCore) -> TfemFile:
        """Open a name held on another node: the broker pulls it into this
        node's segment under the same name, and the client takes it there
        as any local file. Waiting, the client sleeps on its futex in
        slices and renews its want between them, so it hears within a
        slice that the owner or the home died (BrokerUnavailable)."""
        text = raw.decode()
        if not wait:
            self.call(Op.WANT, {"name": text, "wait": int(Wanting.WHEN_PULLED)})
            return self._opened(self._open_here(raw, False, 0, core, timeout), text, raw, 0)
        try:
            self._tell(Op.WANT, {"name": text, "wait": int(Wanting.NEVER)})  # the pull starts while we sleep
            while True:
                left = -1 if deadline is None else deadline.remaining_ns()
                if left == 0:
                    raise Timeout(f"{text!r} was not ready to read within {timeout} s")
                part = int(WANT_SLICE_S * 1e9) if left < 0 else min(left, int(WANT_SLICE_S * 1e9))
                try:
                    return self._opened(self._open_here(raw, True, part, core, timeout), text, raw, 0)
                except Timeout:
                    self.call(Op.WANT, {"name": text, "wait": int(Wanting.NOW)})  # renewed; its error, if it failed
        except BaseException:
            try:
                self.call(Op.UNWANT, {"name": text})
            except TfemError:
                pass
            raise

    def _open_here(self, raw: bytes, wait: bool, left_ns: int, core: FileCore, timeout: float | None) -> FileCore:
        rc = self._open_core(raw, "r", wait, Deadline(left_ns / 1e9), False, core)
        if rc:
            raise self._open_error(rc, raw, "r", timeout)
        return core

    def open_next(self, prefix: str = "", timeout: float | None = None, wait: bool = True) -> TfemFile:
        """Open the oldest published file whose name starts with `prefix`:
        on this node first, then, with peers, on any node of the job (the
        broker pulls it here). A caller that asks again as soon as it is
        done takes more files than a busy one. Waits up to `timeout`
        seconds (None: no limit) for one to appear, or not at all with
        `wait=False` (NotFound)."""
        if type(prefix) is not str:
            raise InvalidArgument(f"prefix must be text, not {type(prefix).__name__}")
        deadline = Deadline(timeout)
        raw = prefix.encode()
        while True:
            tried: set[str] = set()  # this look's: each name once, so that the look ends
            while candidates := [stat for stat in self.table.oldest_waiting(raw, NEXT_CANDIDATES + len(tried))
                                 if stat.name not in tried]:
                for stat in candidates:
                    tried.add(stat.name)
                    try:
                        return self.open(stat.name, "r", wait=False)
                    except (NotFound, WouldBlock):
                        continue  # another consumer took it first
            if self.cluster:
                try:
                    name = self.call(Op.NEXT, {"prefix": prefix}).result["name"]
                    return self.open(name, "r", wait=False)
                except (NotFound, WouldBlock):
                    pass
            if not wait or deadline.remaining_ns() == 0:
                raise NotFound(f"no file under {prefix!r} is published") if not wait else \
                    Timeout(f"no file under {prefix!r} was published within {timeout} s")
            time.sleep(NEXT_POLL_S)

    def create(self, name: str | bytes, size: int, *, timeout: float | None = None,
               checksum: bool = True, readers: int = 1, keep: bool = False, ttl: float | None = None) -> TfemFile:
        """A new file of `size` bytes (zeros), in one piece in memory, for
        writing in place: `getbuffer()` gives a writable view of all of it
        (for numpy and anything that takes the buffer protocol), and
        close() publishes it. Its consumer's getbuffer() is a read-only
        view of the same memory.

        The file stays in memory (never spilled). When the arena has no
        free run that long, the broker spills other files to make one;
        NoSpace if it cannot, at once or after waiting up to `timeout`
        seconds for room. `checksum=False` skips the producer's pass at
        close and the consumer's before its view: damage then goes
        unseen, the price of a handoff that costs no pass over the bytes.
        `readers`, `keep` and `ttl` choose its lifetime, as for open()."""
        try:
            size = operator.index(size)
        except TypeError:
            raise InvalidArgument(f"size must be an integer, not {type(size).__name__}") from None
        if size < 0:
            raise InvalidArgument(f"size must be at least 0, not {size}")
        f = self.open(name, "w", timeout=timeout, readers=readers, keep=keep, ttl=ttl)
        try:
            self._reserve(f, size, timeout, checksum)
        except BaseException:
            f.abort()
            raise
        return f

    def _reserve(self, f: TfemFile, size: int, timeout: float | None, checksum: bool) -> None:
        deadline = Deadline(timeout)
        blocks = -(-size // self.table.seg.block_size)
        while True:
            seen = self.room_seen()
            rc = lib.tfem_f_reserve(f._f, size, checksum)
            if rc == 0:
                return
            if rc != errno.ENOSPC:
                raise from_errno(rc, f"{f.name!r}: {os.strerror(rc)}")
            if self.call(Op.ROOM, {"blocks": blocks}).result["room"]:
                continue
            if not timeout:
                raise NoSpace(f"the arena has no free run of {blocks} blocks for {f.name!r} ({size} bytes), "
                              "and nothing more can be spilled")
            self.wait_for_room(seen, deadline, f"no room for {f.name!r} was freed")

    def _open_error(self, rc: int, raw: bytes, kind: str, timeout: float | None) -> TfemError:
        text = raw.decode()
        if rc == errno.EAGAIN and self._state_found[0] == State.SHARED:
            return WouldBlock(f"every read of {text!r} is taken: it is freed when its readers close it")
        if rc == errno.EAGAIN:
            return WouldBlock(f"{text!r} is {State(self._state_found[0]).name}, not ready to read")
        if rc == errno.ETIMEDOUT:
            return Timeout(f"{text!r} was not ready to read within {timeout} s")
        if rc == errno.ENOSPC and kind == "w" and timeout:
            return NoSpace(f"no slot was freed within {timeout} s")
        return table_error(rc, repr(text), self._header)

    # ---- what files need of their client (files.Owner) ----

    def room_seen(self) -> int:
        return self.table.space_seen()

    def wait_for_room(self, seen: int, deadline: Deadline, what: str) -> None:
        self.table.wait_for_space(seen, deadline, what)

    def stat(self, name: str | bytes) -> FileStat:
        self._check_current()
        return self.table.stat(encode_name(name))

    def unlink(self, name: str | bytes) -> None:
        """Remove a name. A file being written or read is freed when its
        holder closes it; its name is free at once."""
        self._check_current()
        self.table.unlink(encode_name(name))

    def list(self) -> list[str]:
        """The names held, in any state."""
        self._check_current()
        return [f.name for f in self.table.list()]

    def list_stats(self) -> builtins.list[FileStat]:
        self._check_current()
        return self.table.list()

    def stats(self) -> dict[str, Any]:
        """The broker's statistics (what `tfem status` shows)."""
        self._check_current()
        return dict(self.call(Op.STATS, {}).result)

    # ---- life cycle ----

    def close(self) -> None:
        """Close open files (producers' files are dropped), then disconnect.
        Idempotent; the segment stays for other processes."""
        if self._socket is None:
            return
        if os.getpid() == self.pid:
            for core in list(self.held):  # producers' files are dropped, consumers' consumed
                if core in self.pinned:
                    try:
                        self.pinned[core]._release_views()
                    except BufferError:
                        continue  # a view lives: the file stays held, and mapped, until it goes
                self.held.discard(core)
                lib.tfem_f_abort(core) if core.writing else lib.tfem_f_close(core)
            try:
                self._call(Op.BYE, {}, timeout_ms=int(BYE_TIMEOUT_S * 1000))
            except Exception:
                pass  # the broker may be gone; nothing is lost by not saying goodbye
            self._socket.close()
            self._context.term()
        else:
            self.held, self.pinned = set(), {}  # the parent's files
        self._socket = self._context = None
        if os.getpid() == self.pid:
            spill_reader.close_idle()
        if not self.held:  # the files still in view need the mappings
            for segment in [*self._replaced, self.segment]:
                if segment is not None:
                    segment.close()
        if self._registry is not None and os.getpid() == self.pid:
            try:
                discovery.ask_registry(self._registry.keyfile, protocol.Action.UNREGISTER, timeout=1.0)
            except Exception:
                pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._socket is not None and os.getpid() == self.pid:
                self.close()
        except Exception:
            pass


def connect(keyfile: str | os.PathLike[str] | None = None, *, broker: str | None = None,
            timeout: float = 5.0) -> Client:
    """A client for the broker of `keyfile` (else $TFEM_KEYFILE, else the
    per-user default), found through the registry; or for the broker at
    endpoint `broker` (else $TFEM_BROKER), without a registry. `timeout`
    bounds the wait for the registry's answer and for the broker's first
    reply: BrokerUnavailable when nobody answers."""
    endpoint = broker or (os.environ.get(ENV_BROKER) if keyfile is None else None)
    if endpoint:
        return Client(endpoint, connect_timeout=timeout)
    instance = Instance.for_keyfile(keyfile)
    result = discovery.ask_registry(instance.keyfile, protocol.Action.REGISTER, timeout=timeout)
    return Client(result["endpoint"], registry=instance, connect_timeout=timeout)
