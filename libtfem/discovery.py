"""Asking the registry over its SysV message queue (the paper's msgsnd/msgrcv).

Requests go out with message type 1; the registry answers with the
requester's pid as the message type. Replies carry the request id, so a
reply left behind by an earlier timed-out request is recognised and dropped.
One request at a time per process: threads share the pid, so they take turns.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import random
import threading
import time
from typing import Any, Callable

import sysv_ipc

from . import forks, protocol
from ._native import lib
from .errors import BrokerUnavailable, ProtocolError, Timeout, from_errno
from .keyfile import DEFAULT_PROJECT, KeyRecord, ftok, read_record

_lock = threading.Lock()


@forks.in_child
def _renew_lock() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it


_ids = itertools.count(random.randrange(1 << 30))


def largest_message() -> int:
    """The kernel's limit on one SysV message (msgmax). Readers use a buffer
    this large: a message larger than the reader's buffer cannot be received
    (E2BIG) and stays at the head of its type for good."""
    try:
        msgmax = int(pathlib.Path("/proc/sys/kernel/msgmax").read_text())
    except (OSError, ValueError):
        msgmax = 1 << 16
    return max(msgmax, protocol.MAX_REGISTRY_MESSAGE)


def queue_key(keyfile: pathlib.Path) -> int:
    """ftok of the key file with the project id its registry recorded there
    (another one when a key file elsewhere has the same key)."""
    return _key(keyfile, read_record(keyfile))


def _key(keyfile: pathlib.Path, record: KeyRecord | None) -> int:
    return ftok(keyfile, record.project if record else DEFAULT_PROJECT)


def _check_registry_alive(keyfile: pathlib.Path, pid: int | None) -> None:
    """A registry killed without cleaning up leaves its queue: nobody will
    ever answer there, so say so now rather than after the timeout."""
    if pid is not None and not lib.tfem_pid_alive(pid):
        raise BrokerUnavailable(f"the registry of {keyfile} (pid {pid}) is not running: it died without "
                                "cleaning up; run `tfem clean` and start a new one with `tfem up`")


def ask_registry(keyfile: pathlib.Path, action: protocol.Action, args: dict[str, Any] | None = None,
                 timeout: float = 5.0) -> Any:
    """Send one request to the registry of `keyfile`; its result."""
    if not keyfile.exists():
        raise BrokerUnavailable(f"no registry: key file {keyfile} does not exist (start one with `tfem up`)")
    record = read_record(keyfile)
    try:
        queue = sysv_ipc.MessageQueue(_key(keyfile, record), max_message_size=largest_message())
    except sysv_ipc.ExistentialError:
        raise BrokerUnavailable(f"no registry queue for key file {keyfile} (start one with `tfem up`)") from None
    owner = record.pid if record else None
    _check_registry_alive(keyfile, owner)
    return ask_queue(queue, action, args or {}, timeout, f"the registry of {keyfile}",
                     lambda: _check_registry_alive(keyfile, owner))


def ask_queue(queue: sysv_ipc.MessageQueue, action: protocol.Action, args: dict[str, Any], timeout: float,
              who: str, check: Callable[[], None] = lambda: None) -> Any:
    """Send one request into `queue`; the result of the answer addressed to
    this process. `who` names the reader in errors; `check` raises if it
    is known to be gone."""
    pid = os.getpid()
    with _lock:
        request_id = next(_ids)
        body = protocol.encode_registry_request(protocol.RegistryRequest(request_id, action, pid, args))
        try:
            queue.send(body, block=False, type=protocol.REGISTRY_REQUEST_TYPE)
        except sysv_ipc.BusyError:
            raise BrokerUnavailable(f"the queue of {who} is full") from None
        except sysv_ipc.ExistentialError:
            raise BrokerUnavailable(f"{who} went away") from None
        deadline = time.monotonic() + timeout
        pause = 20e-6
        # sysv_ipc has no receive timeout: poll, backing off to 5 ms.
        while True:
            try:
                message, _ = queue.receive(block=False, type=pid)
            except sysv_ipc.BusyError:
                if time.monotonic() > deadline:
                    raise Timeout(f"{who} did not answer within {timeout} s") from None
                check()
                time.sleep(pause)
                pause = min(pause * 2, 0.005)
                continue
            except sysv_ipc.ExistentialError:
                raise BrokerUnavailable(f"{who} went away") from None
            try:
                reply = protocol.decode_registry_reply(message)
            except ProtocolError:
                continue
            if reply.request_id != request_id:
                continue  # left by an earlier request that timed out
            if reply.errno:
                raise from_errno(reply.errno, str(reply.result))
            return reply.result
