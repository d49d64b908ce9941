"""The broker's requests: from the socket's frames to a reply, or to a disk job.

Theory of operation: a malformed or mistaken request gets an error reply;
nothing a client sends can stop the broker. A client says HELLO first (its
pid, for settling its files if it dies); each later request goes to the
handler its op maps to in `Dispatch`, which checks a slot it names against
what that client holds there.

Requests that need no disk work are answered at once, in the request loop:
HELLO, STATS, BYE, and an ALLOC or ROOM the arena can satisfy as it is (the
same checks, then the allocation, under the memory's lock). The others
become a disk job (worker.Work): the handler as a generator of steps, which
the server runs in the loop or hands to its disk worker (modes.py decides).
The handler checks the request when it runs, exactly as it always did.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Generator

import zmq

from tfem import protocol
from tfem._native import lib
from tfem.errors import FileTooLarge, InvalidArgument, NoSpace, ProtocolError, TfemError, UnknownClient, errno_of
from tfem.protocol import Op, Reply, Request, Wanting
from tfem.states import State

from .clients import Clients
if TYPE_CHECKING:
    from .cluster import Cluster
from .holdings import Holdings, Slot
from .memory import Memory
from .worker import Work

log = logging.getLogger("tfem.broker")

HandlerSteps = Generator[None, None, Reply]
Handler = Callable[[int, Request], HandlerSteps]  # (the client's pid, its request)
Answer = tuple[bytes, Reply]  # (the peer's identity, the reply)


def run(steps: HandlerSteps) -> Reply:
    """A handler's steps, all at once."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            reply: Reply = done.value
            return reply


class Dispatch:
    def __init__(self, holdings: Holdings, memory: Memory, clients: Clients,
                 stats: Callable[[], dict[str, Any]]) -> None:
        self.holdings = holdings
        self.memory = memory
        self.clients = clients
        self._stats = stats
        self.served: dict[str, int] = {op.value: 0 for op in Op}
        self.errors = 0
        # Whether the loop may allocate now: not while the disk worker runs
        # an exclusive job (a dead client's files, a replaced segment).
        self.may_allocate: Callable[[], bool] = lambda: True
        self.cluster: Cluster | None = None  # the peer link, with peers
        # Requests of any peer: they name no slot.
        self._greetings: dict[Op, Callable[[bytes, Request], Reply]] = {
            Op.HELLO: self._hello, Op.STATS: self._stats_of, Op.BYE: self._bye}
        # Requests of a client that said hello.
        self._handlers: dict[Op, Handler] = {
            Op.ROOM: self._room, Op.ALLOC: self._alloc, Op.SPILL_WRITE: self._spill_write}
        # ... those that can often be answered at once; None: it takes a disk job.
        self._quick: dict[Op, Callable[[int, Request], Reply | None]] = {
            Op.ALLOC: self._alloc_now, Op.ROOM: self._room_now}

    def take(self, frames: list[zmq.Frame]) -> Answer | Work | None:
        """The answer to one request's frames, or the disk job that will
        make it; None for a request too malformed to answer, or one the
        cluster answers later. (Error replies
        are counted in `errors` by whoever sends them.)"""
        identity, body = frames[0].bytes, [f.buffer for f in frames[1:]]
        try:
            request = protocol.decode_request(body)
        except ProtocolError as exc:
            rid = protocol.request_id_of(body[0]) if body else None
            log.debug("malformed request: %s", exc)
            if rid is None:
                self.errors += 1  # dropped; an error reply is counted as it is sent
                return None
            return identity, Reply(rid, errno_of(exc), str(exc))
        self.served[request.op.value] += 1
        try:
            greeting = self._greetings.get(request.op)
            if greeting is not None:
                return identity, greeting(identity, request)
            pid = self.clients.pids.get(identity)
            if pid is None:
                raise UnknownClient("this broker does not know you (it may have restarted): say hello")
            if request.op in (Op.WANT, Op.UNWANT, Op.NEXT):
                return self._across(identity, request)
            quick = self._quick.get(request.op)
            reply = quick(pid, request) if quick is not None and self.may_allocate() else None
            if reply is not None:
                return identity, reply
            return Work(self.serve_client(pid, request), request.op.value, identity, request.request_id,
                        self._size_of(request))
        except TfemError as exc:
            return identity, Reply(request.request_id, errno_of(exc), str(exc))
        except Exception as exc:  # a bug must not take the broker down
            log.exception("error serving %s", request.op.value)
            return identity, Reply(request.request_id, 5, f"broker error: {exc}")

    def serve_client(self, pid: int, request: Request) -> HandlerSteps:
        handler = self._handlers.get(request.op)
        if handler is None:
            raise ProtocolError(f"unhandled op {request.op.value}")
        return handler(pid, request)

    def ask_self(self, op: Op, args: dict[str, Any], data: Any = None) -> Reply:
        """A request of the broker's own, as a client (moving files into a
        new segment: relocation.py), served whole on the calling thread:
        the one running disk work."""
        return run(self.serve_client(os.getpid(), Request(0, op, args, data)))

    def _size_of(self, request: Request) -> int:
        """The bytes a disk job is known to move: the mode policy's signal
        (modes.py). 0 when unknown or for a request its handler will refuse."""
        args, seg = request.args, self.holdings.segment
        try:
            if request.op is Op.ALLOC:
                return self.memory.alloc_size(args["slot"], args["capacity"])
            if request.op is Op.ROOM:
                return int(args["blocks"]) * seg.block_size
            if request.op is Op.SPILL_WRITE:
                return len(request.data) if request.data is not None else 0
        except Exception:
            pass
        return 0

    # ---- any peer ----

    def _hello(self, identity: bytes, request: Request) -> Reply:
        self.clients.hello(identity, request.args["pid"])
        seg, spill = self.holdings.segment, self.holdings.spill
        return Reply(request.request_id, 0, {
            "segment": seg.name, "broker_pid": os.getpid(), "instance_id": seg.header.instance_id,
            # where clients read spilled bytes themselves (spill_reader.py)
            "spill": {"path": str(spill.path), "map_size": spill.map_size} if spill else None,
            "cluster": self.cluster is not None})

    def _stats_of(self, identity: bytes, request: Request) -> Reply:
        return Reply(request.request_id, 0, self._stats())

    def _bye(self, identity: bytes, request: Request) -> Reply:
        self.clients.bye(identity)
        return Reply(request.request_id, 0, {})

    # ---- clients: files on other nodes (cluster.py) ----

    def _across(self, identity: bytes, request: Request) -> Answer | None:
        """None: the cluster answers later."""
        cluster, args = self.cluster, request.args
        if cluster is None:
            raise InvalidArgument("this broker has no peers")
        if request.op is Op.WANT:
            try:
                wanting = Wanting(args["wait"])
            except ValueError:
                raise InvalidArgument(f"want: wait must be one of {[int(w) for w in Wanting]}") from None
            reply = cluster.want(identity, request.request_id, args["name"], wanting)
        elif request.op is Op.NEXT:
            reply = cluster.next(identity, request.request_id, args["prefix"])
        else:
            cluster.unwant(args["name"])
            reply = Reply(request.request_id, 0, {})
        return None if reply is None else (identity, reply)

    # ---- clients: at once, when no disk work is needed ----

    def _room_now(self, pid: int, request: Request) -> Reply | None:
        blocks = self._check_blocks(request.args["blocks"])
        return Reply(request.request_id, 0, {"room": True}) if self.memory.room_now(blocks) else None

    def _alloc_now(self, pid: int, request: Request) -> Reply | None:
        args = request.args
        self._check_holder(args["slot"], args["generation"], pid, State.WRITE)
        self._check_size(args["capacity"])
        spilled = self.memory.alloc_now(args["slot"], args["generation"], pid, args["capacity"])
        return None if spilled is None else Reply(request.request_id, 0, {"spilled": spilled})

    # ---- clients: disk jobs ----

    def _room(self, pid: int, request: Request) -> HandlerSteps:
        blocks = self._check_blocks(request.args["blocks"])
        room = yield from self.memory.make_run(blocks)
        return Reply(request.request_id, 0, {"room": room})

    def _alloc(self, pid: int, request: Request) -> HandlerSteps:
        args = request.args
        self._check_holder(args["slot"], args["generation"], pid, State.WRITE)
        self._check_size(args["capacity"])
        spilled = yield from self.memory.alloc(args["slot"], args["generation"], pid, args["capacity"])
        return Reply(request.request_id, 0, {"spilled": spilled})

    def _spill_write(self, pid: int, request: Request) -> HandlerSteps:
        args = request.args
        slot = self._check_spilled(args, pid)
        assert request.data is not None
        self._check_size(args["offset"] + len(request.data))
        yield from self.memory.write(slot.file_id, args["offset"] - self.holdings.segment.buf_size,
                                     memoryview(request.data))
        return Reply(request.request_id, 0, {})

    # ---- checks ----

    def _check_blocks(self, blocks: int) -> int:
        block_count = self.holdings.segment.block_count
        if not 0 < blocks <= block_count:
            raise NoSpace(f"{blocks} blocks is more than the arena's {block_count}")
        return blocks

    def _check_holder(self, s: int, generation: int, pid: int, *states: State, anywhere: bool = False) -> Slot:
        """Slot s, held by `pid` in one of `states`: in the segment, or with
        `anywhere` in a replaced one too (whose files live on until their
        holders let go; their spilled bytes are in the same store)."""
        if s >= self.holdings.segment.slot_count:
            raise InvalidArgument(f"no slot {s}")
        for table in self.holdings.tables() if anywhere else [self.holdings.table]:
            actual, gen, holder = table.state_of(s)
            if actual in states and gen == generation and holder == pid:
                slot: Slot = table.seg.slot(s)
                return slot
        raise InvalidArgument(f"slot {s} is not held in {'/'.join(s.name for s in states)} by pid {pid}")

    def _check_size(self, end: int) -> None:
        """The clients' cores refuse writes past the limit themselves; this
        is for a request that did not come through one."""
        largest = self.holdings.segment.header.max_file_size
        if end > largest:
            raise FileTooLarge(f"{end} bytes is past the largest file, {largest} bytes")

    def _check_spilled(self, args: dict[str, int], pid: int) -> Slot:
        """The spilled slot `pid` writes, named by a SPILL_WRITE."""
        slot = self._check_holder(args["slot"], args["generation"], pid, State.WRITE, anywhere=True)
        if not slot.flags & lib.TFEM_SLOT_SPILLED or self.holdings.spill is None:
            raise InvalidArgument(f"slot {args['slot']} is not spilled")
        if args["offset"] < self.holdings.segment.buf_size:
            raise InvalidArgument("spilled bytes start after the inline buffer")
        return slot
