"""Which SysV queue under a key file's ftok key is ours to take or remove.

ftok keeps 16 bits of the inode, so another key file can share the key. A
queue under the key is ours to remove only if the key file records it
(project id and msqid) and the registry recorded with it is dead. A queue
of another user, one whose live registry serves another key file, or one
that nobody recorded and nobody answers for (it may be another program's)
is never touched: the registry takes the next project id instead.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Iterator

import sysv_ipc

from tfem import protocol
from tfem._native import lib
from tfem.discovery import ask_queue
from tfem.errors import TfemError
from tfem.keyfile import DEFAULT_PROJECT, KeyRecord, ftok
from tfem.protocol import KeyIdentity

log = logging.getLogger("tfem.registry")

IDENTIFY_TIMEOUT_S = 1.0  # a live registry answers in microseconds; this is for a busy machine


def _project_ids(first: int) -> Iterator[int]:
    """Every ftok project id (1 to 255), from `first` on, wrapping round."""
    for i in range(255):
        yield (first - 1 + i) % 255 + 1


def _existing(key: int) -> sysv_ipc.MessageQueue | None:
    """The queue under `key` if it exists and is this user's."""
    try:
        queue = sysv_ipc.MessageQueue(key)
    except (sysv_ipc.ExistentialError, sysv_ipc.PermissionsError):  # gone, or another user's (EACCES)
        return None
    # root opens any queue: the owner says whose it is.
    return queue if queue.uid == os.geteuid() else None


def recorded_queue(keyfile: pathlib.Path, record: KeyRecord) -> sysv_ipc.MessageQueue | None:
    """The queue the key file records, if it still exists under its key:
    the same key and the very msqid the recorded registry made."""
    if record.queue is None:
        return None
    queue = _existing(ftok(keyfile, record.project))
    return queue if queue is not None and queue.id == record.queue else None


def remove_left_queue(keyfile: pathlib.Path, record: KeyRecord) -> bool:
    """Remove the queue a dead registry of this key file left; True if there was one."""
    if lib.tfem_pid_alive(record.pid):
        return False
    queue = recorded_queue(keyfile, record)
    if queue is None:
        return False
    try:
        queue.remove()
    except sysv_ipc.ExistentialError:
        return False
    return True


def _answers_for(queue: sysv_ipc.MessageQueue, me: KeyIdentity) -> int | None:
    """The pid of a live registry serving key file `me` at `queue`, if it
    answers so; None if it serves another key file or nobody answers."""
    try:
        result = ask_queue(queue, protocol.Action.IDENTIFY, {}, IDENTIFY_TIMEOUT_S,
                           f"the queue 0x{queue.key & 0xFFFFFFFF:08x}")
        theirs = protocol.decode_identity(result)
    except TfemError:  # no answer, or not one a registry gives (ProtocolError)
        return None
    return theirs.pid if (theirs.dev, theirs.ino) == (me.dev, me.ino) else None


def claim_queue(keyfile: pathlib.Path, previous: KeyRecord | None, me: KeyIdentity,
                max_message: int) -> tuple[sysv_ipc.MessageQueue, int]:
    """A new queue for this key file and its project id: under the recorded
    project id if it is free or was left by our own dead registry, else the
    next free one."""
    if previous is not None:
        remove_left_queue(keyfile, previous)
    first = previous.project if previous is not None else DEFAULT_PROJECT
    for project in _project_ids(first):
        key = ftok(keyfile, project)
        try:
            return sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode=0o600, max_message_size=max_message), project
        except sysv_ipc.ExistentialError:
            pass
        queue = _existing(key)
        if queue is not None:
            pid = _answers_for(queue, me)
            if pid is not None:
                raise TfemError(f"a registry (pid {pid}) already serves {keyfile}")
        log.warning("queue key 0x%08x (project id %d) of %s is another's: trying the next project id",
                    key & 0xFFFFFFFF, project, keyfile)
    raise TfemError(f"every ftok project id of {keyfile} has a queue of someone else's: choose another key file")
