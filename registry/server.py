"""The registry (the paper's process R): hands out broker addresses.

It owns one SysV message queue whose key is ftok(key file, project id). It
reads only requests of type 1 and answers each with the requester's pid as
the message type. Brokers ANNOUNCE and WITHDRAW themselves (an endpoint a
live broker announced is its own: nobody else can announce or withdraw it);
a client REGISTERs and gets the endpoint of the least loaded live broker,
and UNREGISTERs when done. A malformed message is logged and dropped, a
reply too large for one message becomes an error reply; nothing a sender
does can stop the registry.

The key file records the registry's pid, its queue's project id and msqid
and the runtime directory (keyfile.py): a second registry for the same key
file refuses to start while the first lives, and a queue is replaced only
if the key file records it as left by a dead registry; a queue of anyone
else under the key makes it take the next project id (ownership.py).
Every CHECK_INTERVAL_S it checks that its queue is still under its key
(systemd's RemoveIPC=yes removes a user's queues when the last session
ends) and makes it again if not, and it drains the replies to askers that
died before reading them, which would otherwise fill the queue.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal
import time
from typing import Any, Callable

import sysv_ipc

from tfem import protocol
from tfem._native import lib
from tfem.config import Instance, resolve_keyfile
from tfem.discovery import largest_message
from tfem.errors import AlreadyExists, BrokerUnavailable, ProtocolError, TfemError, errno_of
from tfem.keyfile import DEFAULT_PROJECT, KeyRecord, ftok, identity, read_record, write_record
from tfem.protocol import Action, KeyIdentity, Reply
from tfem.segment import Segment

from .ownership import claim_queue

log = logging.getLogger("tfem.registry")

CHECK_INTERVAL_S = 2.0  # how often the queue is checked and dead askers' replies drained


@dataclasses.dataclass
class BrokerEntry:
    endpoint: str
    pid: int
    load: int


class Registry:
    queue: Any = None
    record: KeyRecord
    identity: KeyIdentity

    def __init__(self, keyfile: str | None = None) -> None:
        self.keyfile = resolve_keyfile(keyfile)
        self.brokers: dict[str, BrokerEntry] = {}
        self.clients: set[int] = set()
        self.answered: set[int] = set()  # pids sent a reply: what they leave unread is drained once they die
        self.dropped = 0
        self.max_message = largest_message()  # the longest message the queue takes, either way
        self._created_keyfile = False
        self._next_check = 0.0

    def start(self) -> None:
        previous = read_record(self.keyfile)
        if previous and previous.pid != os.getpid() and lib.tfem_pid_alive(previous.pid):
            raise TfemError(f"a registry (pid {previous.pid}) already serves {self.keyfile}")
        if previous is None and self.keyfile.exists() and self.keyfile.stat().st_size:
            raise TfemError(f"{self.keyfile} is not a tfem key file: choose another path "
                            "(tfem writes its registry pid into it)")
        self.keyfile.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._created_keyfile = not self.keyfile.exists()
        names = Instance.for_keyfile(self.keyfile)  # read before the rewrite: the recorded runtime directory stays
        # The segment's name is for C clients, which map it without asking
        # anyone (the broker derives the same name from this key file).
        self.record = KeyRecord(os.getpid(), names.segment, previous.project if previous else DEFAULT_PROJECT,
                                None, str(names.runtime))
        write_record(self.keyfile, self.record)  # ours from now on: ftok needs the file
        self._claim(previous)

    def _claim(self, previous: KeyRecord | None) -> None:
        """Make a queue under a key nobody else holds, and record it."""
        self.identity = identity(self.keyfile, os.getpid())
        self.queue, project = claim_queue(self.keyfile, previous, self.identity, self.max_message)
        self.record = dataclasses.replace(self.record, project=project, queue=self.queue.id)
        write_record(self.keyfile, self.record)
        log.info("registry %d serving key file %s (queue key 0x%08x, project id %d)", os.getpid(), self.keyfile,
                 self.queue.key & 0xFFFFFFFF, project)

    def serve(self, should_stop: Callable[[], bool]) -> None:
        # sysv_ipc's receive has no timeout: a timer signal interrupts it (EINTR) for the checks.
        signal.signal(signal.SIGALRM, lambda *_: None)
        signal.setitimer(signal.ITIMER_REAL, CHECK_INTERVAL_S, CHECK_INTERVAL_S)
        try:
            while not should_stop():
                try:
                    body, _ = self.queue.receive(type=protocol.REGISTRY_REQUEST_TYPE)
                    self.handle_message(body)
                except sysv_ipc.ExistentialError:  # EIDRM: the queue was removed under us
                    self._next_check = 0.0
                except sysv_ipc.Error as exc:
                    if "Signaled" not in str(exc):  # EINTR: the timer, or a stop
                        raise
                if time.monotonic() >= self._next_check:
                    self._next_check = time.monotonic() + CHECK_INTERVAL_S
                    self.check()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def check(self) -> None:
        """Drain what dead askers left; make the queue again if it is no
        longer the one under the key the key file gives."""
        self._drain_dead()
        if self._queue_in_place():
            if read_record(self.keyfile) != self.record:
                write_record(self.keyfile, self.record)  # overwritten: clients find the queue through it
            return
        log.warning("the queue of %s is gone (removed, or its key file replaced): making it again", self.keyfile)
        try:
            self.queue.remove()  # if it still exists, nobody can find it any more
        except sysv_ipc.ExistentialError:
            pass
        write_record(self.keyfile, self.record)  # the key file may be gone too
        self._claim(self.record)

    def _queue_in_place(self) -> bool:
        try:
            in_place: bool = sysv_ipc.MessageQueue(ftok(self.keyfile, self.record.project)).id == self.queue.id
            return in_place  # annotated: sysv_ipc carries no types
        except (sysv_ipc.Error, OSError):
            return False

    def _drain_dead(self) -> None:
        """Receive the replies nobody will read: those to pids that died
        (about 16 KB of them would fill the queue), or that named this one."""
        for pid in [p for p in self.answered if p == os.getpid() or not lib.tfem_pid_alive(p)]:
            self.answered.discard(pid)
            self.clients.discard(pid)  # a client that died never unregisters
            try:
                while True:
                    self.queue.receive(block=False, type=pid)
            except sysv_ipc.BusyError:
                pass
            except sysv_ipc.ExistentialError:
                return  # gone: check() makes it again

    def handle_message(self, body: bytes) -> None:
        try:
            request = protocol.decode_registry_request(body)
        except ProtocolError as exc:
            self.dropped += 1
            log.warning("dropped a malformed registry message (%d bytes): %s", len(body), exc)
            return
        try:
            reply = Reply(request.request_id, 0, self._handle(request))
        except TfemError as exc:
            reply = Reply(request.request_id, errno_of(exc), str(exc))
        body = protocol.encode_registry_reply(reply)
        if len(body) > self.max_message:  # sysv_ipc would raise ValueError
            body = protocol.encode_registry_reply(Reply(
                request.request_id, errno.EMSGSIZE, f"the reply would take {len(body)} bytes, more than a message holds"))
        try:
            self.queue.send(body, block=False, type=request.pid)
            self.answered.add(request.pid)
        except (sysv_ipc.BusyError, sysv_ipc.Error) as exc:
            log.warning("reply to pid %d not sent: %s", request.pid, exc)

    def _handle(self, request: protocol.RegistryRequest) -> Any:
        action, args = request.action, request.args
        if action is Action.ANNOUNCE:
            entry = self.brokers.get(args["endpoint"])
            if entry is not None and entry.pid != request.pid and lib.tfem_pid_alive(entry.pid):
                raise AlreadyExists(f"{args['endpoint']} is announced by broker {entry.pid}, which is running")
            self.brokers[args["endpoint"]] = BrokerEntry(args["endpoint"], request.pid, args["load"])
            return {}
        if action is Action.WITHDRAW:
            entry = self.brokers.get(args["endpoint"])
            if entry is not None and entry.pid == request.pid:
                del self.brokers[args["endpoint"]]
            return {}
        if action is Action.REGISTER:
            broker = self._pick()
            self.clients.add(request.pid)
            return {"endpoint": broker.endpoint}
        if action is Action.UNREGISTER:
            self.clients.discard(request.pid)
            return {}
        if action is Action.IDENTIFY:
            return dataclasses.asdict(self.identity)
        if action is Action.LIST:
            self._forget_dead()
            return {"brokers": [dataclasses.asdict(b) for b in self.brokers.values()],
                    "clients": len(self.clients), "dropped": self.dropped}
        raise ProtocolError(f"unhandled action {action.value}")

    def _forget_dead(self) -> None:
        for endpoint, entry in list(self.brokers.items()):
            if not lib.tfem_pid_alive(entry.pid):
                del self.brokers[endpoint]

    def _pick(self) -> BrokerEntry:
        self._forget_dead()
        if not self.brokers:
            raise BrokerUnavailable(f"no broker has announced itself to the registry of {self.keyfile}")
        return min(self.brokers.values(), key=lambda b: b.load)

    def close(self) -> None:
        """Remove the queue; and the key file if this registry made it (else
        empty it), unless the broker left its data, which the key file locates."""
        if self.queue is None:
            return
        try:
            self.queue.remove()
        except sysv_ipc.ExistentialError:
            pass
        self.queue = None
        if read_record(self.keyfile) != self.record or Segment.exists(self.record.segment):
            return
        if self._created_keyfile:
            self.keyfile.unlink(missing_ok=True)
        else:
            self.keyfile.write_text("")
