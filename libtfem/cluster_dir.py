"""The cluster directory: one file per broker on a file system every node sees.

A broker writes its TCP endpoint and CURVE public key into `DIR/<hash of
host and instance>.peer` (owner-only; written under a temporary name, then
renamed, so nobody reads half a file), reads the others', and removes its
own at stop. A broker killed outright leaves its file behind: its peers
find it silent (no heartbeat) and count it dead; the broker started again
for the same instance on that host replaces it, with its new endpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile

SUFFIX = ".peer"


@dataclasses.dataclass(frozen=True)
class PeerEntry:
    endpoint: str  # the broker's TCP endpoint for peers: its node name
    public_key: str  # its CURVE public key (Z85), or "" when run --insecure
    pid: int
    host: str
    instance: str  # the instance's segment name: the same across restarts of its broker


def entry_path(directory: pathlib.Path, entry: PeerEntry) -> pathlib.Path:
    key = f"{entry.host}\0{entry.instance}".encode()
    return directory / (hashlib.blake2b(key, digest_size=10).hexdigest() + SUFFIX)


def write_entry(directory: pathlib.Path, entry: PeerEntry) -> pathlib.Path:
    """Publish `entry` in `directory` (made owner-only if missing)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(dataclasses.asdict(entry), out)
        path = entry_path(directory, entry)
        os.rename(temp, path)
    except BaseException:
        pathlib.Path(temp).unlink(missing_ok=True)
        raise
    return path


def read_entries(directory: pathlib.Path) -> list[PeerEntry]:
    """Every well-formed entry in `directory`; others are skipped."""
    found = []
    try:
        paths = sorted(directory.glob("*" + SUFFIX))
    except OSError:
        return []
    for path in paths:
        try:
            value = json.loads(path.read_text())
            entry = PeerEntry(str(value["endpoint"]), str(value["public_key"]), int(value["pid"]), str(value["host"]),
                              str(value["instance"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # removed meanwhile, or not ours
        if entry_path(directory, entry) == path:
            found.append(entry)
    return found


def remove_entry(directory: pathlib.Path, entry: PeerEntry) -> None:
    """Remove our file, if it is still ours (not a successor's)."""
    path = entry_path(directory, entry)
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(value, dict) and value.get("pid") == entry.pid and value.get("host") == entry.host:
        path.unlink(missing_ok=True)
