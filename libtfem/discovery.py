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
from typing import Any

import sysv_ipc

from . import forks, protocol
from ._native import lib
from .config import FTOK_PROJECT_ID
from .errors import BrokerUnavailable, ProtocolError, Timeout, from_errno

KEYFILE_HEADER = "tfem registry key file; pid "  # what a registry writes into its key file

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
    return sysv_ipc.ftok(str(keyfile), FTOK_PROJECT_ID, silence_warning=True)


def registry_pid(keyfile: pathlib.Path) -> int | None:
    """The pid recorded in a key file, if the file is one of ours."""
    try:
        text = keyfile.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith(KEYFILE_HEADER):
        return None
    try:
        return int(text[len(KEYFILE_HEADER):].split()[0])
    except (ValueError, IndexError):
        return None


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
    try:
        queue = sysv_ipc.MessageQueue(queue_key(keyfile), max_message_size=largest_message())
    except sysv_ipc.ExistentialError:
        raise BrokerUnavailable(f"no registry queue for key file {keyfile} (start one with `tfem up`)") from None
    owner = registry_pid(keyfile)
    _check_registry_alive(keyfile, owner)
    pid = os.getpid()
    with _lock:
        request_id = next(_ids)
        body = protocol.encode_registry_request(
            protocol.RegistryRequest(request_id, action, pid, args or {}))
        try:
            queue.send(body, block=False, type=protocol.REGISTRY_REQUEST_TYPE)
        except sysv_ipc.BusyError:
            raise BrokerUnavailable(f"the registry queue of {keyfile} is full") from None
        except sysv_ipc.ExistentialError:
            raise BrokerUnavailable(f"the registry of {keyfile} went away") from None
        deadline = time.monotonic() + timeout
        pause = 20e-6
        # sysv_ipc has no receive timeout: poll, backing off to 5 ms.
        while True:
            try:
                message, _ = queue.receive(block=False, type=pid)
            except sysv_ipc.BusyError:
                if time.monotonic() > deadline:
                    raise Timeout(f"the registry of {keyfile} did not answer within {timeout} s") from None
                _check_registry_alive(keyfile, owner)
                time.sleep(pause)
                pause = min(pause * 2, 0.005)
                continue
            except sysv_ipc.ExistentialError:
                raise BrokerUnavailable(f"the registry of {keyfile} went away") from None
            try:
                reply = protocol.decode_registry_reply(message)
            except ProtocolError:
                continue
            if reply.request_id != request_id:
                continue  # left by an earlier request that timed out
            if reply.errno:
                raise from_errno(reply.errno, str(reply.result))
            return reply.result
