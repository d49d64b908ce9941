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
- Disk work (what touches the spill store, and what changes the table
  under the clients' feet: settling, the sweep, relocation) runs in the
  loop while the load is light, and on one worker thread (worker.py) when
  requests would wait behind it; modes.py decides, `--broker-mode` may
  force either. Only the loop touches the socket; the worker hands back
  finished jobs through an eventfd the loop polls, and their replies go
  out in any order.

This module is the broker's life: start, the serving loop, the sweep, stop.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import pathlib
import time
from typing import TYPE_CHECKING, Any, Callable

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
if TYPE_CHECKING:
    from .cluster import Cluster
from .dispatch import Dispatch
from .holdings import Holdings
from .memory import Memory
from .modes import ModePolicy, Route
from .recovery import Recovery, adopt
from .relocation import move_files, replace_segment
from .spill import SpillStore, default_limit
from .stats import stats
from .worker import DiskWorker, Steps, Work

log = logging.getLogger("tfem.broker")

SWEEP_INTERVAL_S = 2.0  # how often holders nobody introduced, and the segment's and socket's names, are checked
MOVE_INTERVAL_S = 0.05  # while a replaced segment has files: how often they are moved
# While the spill store holds files: how often the records of freed ones
# are looked for (one pass over the slots in C, ~10 us for 4096) and deleted.
TIDY_INTERVAL_S = 0.05
# How often files whose ttl has passed are looked for (one pass over the
# slots in C) and unlinked: a ttl is kept to within this.
EXPIRE_INTERVAL_S = 0.25


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
    mode: str = "adaptive"  # where disk work runs: modes.SETTINGS
    # Across nodes (cluster.py): peers from a shared directory or named; none: one node, no TCP.
    cluster_dir: pathlib.Path | None = None
    peers: list[str] = dataclasses.field(default_factory=list)  # ENDPOINT[=PUBLIC-KEY-FILE]
    listen: str | None = None  # TCP endpoint for peers (default: the host's primary address, any port)
    curve_key: pathlib.Path | None = None  # this broker's secret key file (`tfem keys`)
    trusted: pathlib.Path | None = None  # the directory of peers' public keys (default: the key's)
    insecure: bool = False  # peers without CURVE on a non-loopback address


class Broker:
    holdings: Holdings | None = None  # with the parts below, from start() to close()
    memory: Memory
    clients: Clients
    dispatch: Dispatch
    _socket: zmq.Socket[Any] | None = None
    cluster: Cluster | None = None

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
        self._next_expiry = 0.0
        self.expired = 0  # files unlinked because their ttl passed
        self.policy = ModePolicy(config.mode, now=time.monotonic())  # checks the setting
        self.worker = DiskWorker()
        self.jobs_inline = self.jobs_on_worker = 0
        self._own_jobs: set[str] = set()  # the broker's own jobs not yet finished, by what they do
        self._switches_logged = 0

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
        self.dispatch.may_allocate = lambda: not self.worker.exclusive_pending
        try:
            if c.spill:
                # Owned: held spilled files, and files whose move is under way.
                holdings.spill = SpillStore(self.spill_dir, spill_limit, c.spill_codec,
                                            lambda: holdings.owned_spilled() | self.memory.moving)
            if not self._owns_segment:
                self._adopt(holdings)
            elif holdings.spill is not None and holdings.spill.file_ids():
                # A new segment references nothing: records left in the store
                # (its segment was lost, e.g. to a reboot) can never be read.
                log.warning("discarding %d orphaned file(s) from the spill store %s",
                            len(holdings.spill.file_ids()), holdings.spill.path)
                holdings.discard(holdings.spill.file_ids())
            segment.header.broker_pid = os.getpid()
            peered = c.cluster_dir is not None or bool(c.peers)
            segment.header.cluster = int(peered)  # before it serves: C readers look here, not at HELLO
            self._context = zmq.Context()
            self._socket = self._context.socket(zmq.ROUTER)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
            if self.endpoint.startswith("ipc://"):
                stale = pathlib.Path(self.endpoint[len("ipc://"):])
                stale.unlink(missing_ok=True)  # the segment was free, so no broker owns it
            self._bind()
            self._announce()
            if peered:
                self._join()
            self.instance.write_state({"broker_pid": os.getpid(), "spill_dir": str(self.spill_dir),
                                       "segment": segment.name, "endpoint": self.endpoint})
            self._owns_segment = True
        except BaseException:
            self.close(destroy=True)  # only what it made itself: `_owns_segment`
            raise
        log.info("broker %d serving %s: segment %s, %d slots, %d MiB arena, spill %s",
                 os.getpid(), self.endpoint, segment.name, c.slots, c.memory >> 20,
                 holdings.spill.path if holdings.spill else "off")

    def _join(self) -> None:
        """Start the peer link (cluster.py)."""
        from .cluster import Cluster, Keys, explicit_peers

        c = self.config
        assert self.holdings is not None
        keys = Keys.load(c.curve_key, c.trusted) if c.curve_key is not None else None
        self.cluster = self.dispatch.cluster = Cluster(
            self.holdings, self.dispatch.ask_self, directory=c.cluster_dir, peers=explicit_peers(c.peers, keys),
            listen=c.listen, keys=keys, insecure=c.insecure,
            run_disk=lambda what, job: self._own_job(what, job, once=False, exclusive=False),
            reply=self._send)

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
        holdings, socket, worker = self.holdings, self._socket, self.worker
        self.clients.poller = poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(worker.fd, zmq.POLLIN)
        cluster = self.cluster
        if cluster is not None:
            poller.register(cluster.router, zmq.POLLIN)
        while not should_stop():
            try:
                events = dict(poller.poll(100 if cluster is None else cluster.wake_ms))
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:  # a signal: look at should_stop()
                    continue
                raise
            if worker.fd in events:
                for work in worker.take_finished():
                    self._finished(work)
            if not worker.alive():
                raise TfemError("the broker's disk worker thread died")
            if socket in events:
                for _ in range(256):  # drain, but check for stop now and then
                    try:
                        frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    if worker.jobs:  # it arrived while the worker was busy
                        self.policy.delayed(time.monotonic())
                    taken = self.dispatch.take(frames)
                    if isinstance(taken, Work):
                        self._disk(taken)
                    elif taken is not None:
                        self._send(*taken)
            if cluster is not None:
                if cluster.router in events:
                    cluster.receive()
                cluster.tick(time.monotonic())
            if self.memory.ahead_due:  # writers met a full arena: room for the next ones, off their path
                self.memory.ahead_due = False
                self._own_steps("evict ahead", self.memory.evict_ahead(), background=True)
            self.clients.exited(events)
            dead = self.clients.take_dead()
            if dead:
                self._own_job("settle dead clients", lambda: self.clients.settle(dead), once=False)
            if holdings.spill is not None and (holdings.spill.bytes_by_file or self.memory.restored_unsettled) \
                    and time.monotonic() >= self._next_tidy:
                self._next_tidy = time.monotonic() + TIDY_INTERVAL_S
                self._own_job("tidy the spill store", self._tidy_spill, exclusive=False, background=True)
            if holdings.relocations and time.monotonic() >= self._next_move:
                self._next_move = time.monotonic() + MOVE_INTERVAL_S
                self._own_job("move files", lambda: move_files(holdings, self.dispatch.ask_self))
            if time.monotonic() >= self._next_expiry:
                # In the loop, as a client's unlink would be: a stripe lock per file, no disk.
                self._next_expiry = time.monotonic() + EXPIRE_INTERVAL_S
                self.expired += sum(table.expire() for table in holdings.tables())
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + SWEEP_INTERVAL_S
                self._sweep()
            self.policy.tick(time.monotonic(), worker.jobs)
            self._log_switch()

    # ---- disk work: in the loop, or on the worker ----

    def _disk(self, work: Work) -> None:
        """Run a disk job here and now, or hand it to the worker, as the
        mode policy says; here only while the worker has no job (one thread
        at a time changes the table and the store)."""
        now = time.monotonic()
        if self.policy.route(now, work.size, self.worker.jobs) is Route.INLINE and not self.worker.jobs:
            started = time.perf_counter()
            work.run()
            took = time.perf_counter() - started
            self.jobs_inline += 1
            self.policy.inline_done(time.monotonic(), took, self._requests_waiting())
            self._finished(work)
        else:
            if self.worker.jobs and work.identity is not None:  # a client's job queues behind another
                self.policy.delayed(now)
            self.jobs_on_worker += 1
            self.worker.submit(work)
        self._log_switch()

    def _own_job(self, what: str, job: Callable[[], None], once: bool = True, exclusive: bool = True,
                 background: bool = False) -> None:
        """A job of the broker's own, run as disk work; `exclusive`, alone:
        it changes what every other job relies on; `background`, only when
        no other job waits. With `once`, not while the same job is still
        queued."""
        def steps() -> Steps:
            job()
            return None
            yield  # a generator: one step

        self._own_steps(what, steps(), once, exclusive, background)

    def _own_steps(self, what: str, steps: Steps, once: bool = True, exclusive: bool = False,
                   background: bool = False) -> None:
        """The same for a job that does its work in steps."""
        if once and what in self._own_jobs:
            steps.close()
            return
        self._own_jobs.add(what)
        self._disk(Work(steps, what, exclusive=exclusive, background=background))

    def _finished(self, work: Work) -> None:
        if work.identity is not None:
            assert work.reply is not None
            self._send(work.identity, work.reply)
            return
        self._own_jobs.discard(work.what)
        if work.reply is not None and work.reply.errno:
            log.error("%s failed: %s", work.what, work.reply.result)

    def _requests_waiting(self) -> bool:
        assert self._socket is not None
        events = self._socket.getsockopt(zmq.EVENTS)
        return isinstance(events, int) and bool(events & zmq.POLLIN)

    def _log_switch(self) -> None:
        policy = self.policy
        if policy.switches != self._switches_logged and policy.last_switch is not None:
            self._switches_logged = policy.switches
            log.info("disk work now %s: %s", policy.last_switch.to.value, policy.last_switch.why)

    def _send(self, identity: bytes, reply: Reply) -> None:
        assert self._socket is not None
        if reply.errno:
            self.dispatch.errors += 1
        try:
            self._socket.send_multipart([identity, *protocol.encode_reply(reply)], copy=False)
        except zmq.ZMQError as exc:
            log.debug("reply not sent: %s", exc)

    def mode_stats(self) -> dict[str, Any]:
        """Where disk work runs (STATS' broker_mode)."""
        policy, last = self.policy, self.policy.last_switch
        return {"setting": policy.setting, "mode": policy.mode.value, "switches": policy.switches,
                "last_switch": None if last is None else {
                    "to": last.to.value, "why": last.why, "seconds_ago": round(time.monotonic() - last.at, 1)},
                "disk_jobs_inline": self.jobs_inline, "disk_jobs_on_worker": self.jobs_on_worker,
                "worker_jobs_now": self.worker.jobs}

    def stats(self) -> dict[str, Any]:
        assert self.holdings is not None, "the broker has not started"
        limit_from = "--spill-size" if self.config.spill_size is not None else "half the disk's free room at start"
        result = stats(self.holdings, self.dispatch, self.clients, endpoint=self.endpoint, started=self.started,
                       recovery=self.recovery, limit_from=limit_from, broker_mode=self.mode_stats(),
                       expired=self.expired)
        result["cluster"] = self.cluster.stats() if self.cluster is not None else None
        return result

    # ---- the sweep ----

    def _sweep(self) -> None:
        """Undo the removal of the broker's names; settle what dead clients
        left; announce again, in case the registry was restarted and forgot
        this broker."""
        self._check_names()
        self._own_job("sweep", self._sweep_table_and_store)
        if self._announced:
            try:
                discovery.ask_registry(self.instance.keyfile, protocol.Action.ANNOUNCE,
                                       {"endpoint": self.endpoint, "load": 0}, timeout=1.0)
            except TfemError as exc:
                log.debug("registry not reached: %s", exc)

    def _sweep_table_and_store(self) -> None:
        """The sweep's disk work: what dead clients left in the table, and
        in the store (their reader slots and records)."""
        assert self.holdings is not None
        self.clients.sweep()
        if self.holdings.spill is not None:
            dead = self.holdings.spill.reader_check()
            if dead:
                log.info("freed %d spill store reader slot(s) of clients that died reading", dead)
            self._tidy_spill()

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
        holdings = self.holdings
        if not holdings.segment.name_is_ours():
            self._own_job("replace the segment", lambda: replace_segment(holdings, self.dispatch.ask_self))

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
        if self.cluster is not None:  # lent files given back, partial copies dropped, the peer file removed
            self.cluster.close()
            self.cluster = self.dispatch.cluster = None
            until = time.monotonic() + 5.0
            while self.worker.jobs and self.worker.alive() and time.monotonic() < until:  # the drops just queued
                self.worker.take_finished()
                time.sleep(0.001)
        self.worker.stop()  # before the store closes: its jobs use it
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
