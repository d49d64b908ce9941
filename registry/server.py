"""The registry (the paper's process R): hands out broker addresses.

It owns one SysV message queue whose key is ftok(key file). It reads only
requests of type 1 and answers each with the requester's pid as the
message type. Brokers ANNOUNCE and WITHDRAW themselves (an endpoint a live
broker announced is its own: nobody else can announce or withdraw it); a
client REGISTERs and gets the endpoint of the least loaded live broker, and
UNREGISTERs when done. A malformed message is logged and dropped, a reply
too large for one message becomes an error reply; nothing a sender does can
stop the registry.

The key file holds the registry's pid, so a second registry for the same
key file refuses to start while the first lives, and replaces the queue a
dead one left behind.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from typing import Any, Callable

import sysv_ipc

from tfem import protocol
from tfem._native import lib
from tfem.config import Instance, resolve_keyfile
from tfem.discovery import KEYFILE_HEADER, largest_message, queue_key, registry_pid
from tfem.errors import AlreadyExists, BrokerUnavailable, ProtocolError, TfemError, errno_of
from tfem.protocol import Action, Reply

log = logging.getLogger("tfem.registry")


@dataclasses.dataclass
class BrokerEntry:
    endpoint: str
    pid: int
    load: int


class Registry:
    queue: Any = None

    def __init__(self, keyfile: str | None = None) -> None:
        self.keyfile = resolve_keyfile(keyfile)
        self.brokers: dict[str, BrokerEntry] = {}
        self.clients: set[int] = set()
        self.dropped = 0
        self.max_message = largest_message()  # the longest message the queue takes, either way
        self._created_keyfile = False

    def start(self) -> None:
        other = registry_pid(self.keyfile)
        if other and other != os.getpid() and lib.tfem_pid_alive(other):
            raise TfemError(f"a registry (pid {other}) already serves {self.keyfile}")
        if other is None and self.keyfile.exists() and self.keyfile.stat().st_size:
            raise TfemError(f"{self.keyfile} is not a tfem key file: choose another path "
                            "(tfem writes its registry pid into it)")
        self.keyfile.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._created_keyfile = not self.keyfile.exists()
        fd = os.open(self.keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            # The segment's name is for C clients, which map it without asking
            # anyone (the broker derives the same name from this key file).
            f.write(f"{KEYFILE_HEADER}{os.getpid()}\nsegment {Instance.for_keyfile(self.keyfile).segment}\n")
        key = queue_key(self.keyfile)
        size = self.max_message
        try:
            self.queue = sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600, max_message_size=size)
        except sysv_ipc.ExistentialError:
            # Left by a registry that died: nobody alive owns it.
            sysv_ipc.MessageQueue(key).remove()
            self.queue = sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600, max_message_size=size)
        log.info("registry %d serving key file %s (queue key 0x%08x)", os.getpid(), self.keyfile, key & 0xFFFFFFFF)

    def serve(self, should_stop: Callable[[], bool]) -> None:
        while not should_stop():
            try:
                body, _ = self.queue.receive(type=protocol.REGISTRY_REQUEST_TYPE)
            except sysv_ipc.Error as exc:
                if "Signaled" in str(exc):  # EINTR: look at should_stop()
                    continue
                raise
            self.handle_message(body)

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
        """Remove the queue, and the key file if this registry made it."""
        if self.queue is not None:
            try:
                self.queue.remove()
            except sysv_ipc.ExistentialError:
                pass
            self.queue = None
            if self._created_keyfile:
                self.keyfile.unlink(missing_ok=True)
            elif registry_pid(self.keyfile) == os.getpid():
                self.keyfile.write_text("")
