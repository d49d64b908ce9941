"""The key file: what a registry records for whoever comes after it.

A registry writes it; clients (Python and C), the broker, the next registry
and `tfem clean` read it, so everything an instance makes can be found from
the key file alone, whatever the reader's environment. One line each:

    tfem registry key file; pid 4242      the registry (C clients check this line first)
    segment /tfem-0-ab12cd34ef56          the broker's segment (C clients map it)
    project 84                            the queue key is ftok(key file, project)
    queue 98310                           the msqid of the queue the registry made
    runtime /run/user/0/tfem              the directory of the socket and state file
    end                                   the record is whole

ftok keeps 16 bits of the inode, so two key files can share a key: the
registry then takes another project id and records it here. The file is
rewritten in place, never replaced by a rename: its inode is part of the key.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import sysv_ipc

from .protocol import KeyIdentity

HEADER = "tfem registry key file; pid "
END = "end"  # the last line: a reader that does not see it caught the file being rewritten
REWRITE_WAIT_S = 0.05  # how long a reader waits for a rewrite to finish before it takes what is there
DEFAULT_PROJECT = ord("T")


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    pid: int
    segment: str
    project: int = DEFAULT_PROJECT
    queue: int | None = None  # None in key files of tfem before project ids
    runtime: str | None = None


def identity(path: pathlib.Path, pid: int) -> KeyIdentity:
    """Key file `path` as registry `pid` answers IDENTIFY."""
    info = os.stat(path)
    return KeyIdentity(os.path.realpath(path), info.st_dev, info.st_ino, pid)


def ftok(path: pathlib.Path, project: int) -> int:
    """The queue key of key file `path` under ftok project id `project`."""
    key: int = sysv_ipc.ftok(str(path), project, silence_warning=True)  # sysv_ipc carries no types
    return key


def format_record(record: KeyRecord) -> str:
    lines = [f"{HEADER}{record.pid}", f"segment {record.segment}", f"project {record.project}"]
    if record.queue is not None:
        lines.append(f"queue {record.queue}")
    if record.runtime is not None:
        lines.append(f"runtime {record.runtime}")
    return "\n".join([*lines, END]) + "\n"


def parse_record(text: str) -> KeyRecord | None:
    """The record in a key file's text; None if it is not one of ours."""
    first, _, rest = text.partition("\n")
    if not first.startswith(HEADER):
        return None
    fields = dict(line.partition(" ")[::2] for line in rest.splitlines())
    try:
        pid = int(first[len(HEADER):])
        project = int(fields.get("project", DEFAULT_PROJECT))
        queue = int(fields["queue"]) if "queue" in fields else None
    except ValueError:
        return None
    if pid <= 0 or not 1 <= project <= 255 or not fields.get("segment"):
        return None
    return KeyRecord(pid, fields["segment"], project, queue, fields.get("runtime") or None)


def read_record(path: pathlib.Path) -> KeyRecord | None:
    """The record in a key file. The registry rewrites it in place
    (truncated, then written), so a file that does not end with the END
    line is read again for a moment: it may be one being rewritten, or
    simply empty (a stopped instance's)."""
    deadline = time.monotonic() + REWRITE_WAIT_S
    while True:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            return None
        if text.endswith(f"\n{END}\n") or time.monotonic() > deadline:
            return parse_record(text)
        time.sleep(0.001)


def registry_pid(path: pathlib.Path) -> int | None:
    """The pid recorded in a key file, if the file is one of ours."""
    record = read_record(path)
    return record.pid if record else None


def write_record(path: pathlib.Path, record: KeyRecord) -> None:
    """Rewrite the key file in place (same inode, so the same ftok key), in
    one write after the truncation."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, format_record(record).encode())
    finally:
        os.close(fd)
