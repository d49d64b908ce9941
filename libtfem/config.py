"""Where things live for a key file, and sizes written the way people write them.

A key file names one tfem instance: its registry queue is ftok(key file,
recorded project id), and the broker's segment, socket and default spill
directory are derived from the key file's real path, so two key files never
share anything and `tfem clean` can find exactly what belongs to one. The
runtime directory holding the socket and state file is the one the key
file records (keyfile.py), so any shell finds them, whatever its
XDG_RUNTIME_DIR.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re

from .keyfile import read_record

ENV_KEYFILE = "TFEM_KEYFILE"
ENV_BROKER = "TFEM_BROKER"


def _private(path: pathlib.Path) -> bool:
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o077


def runtime_dir() -> pathlib.Path:
    """A private per-user directory: $XDG_RUNTIME_DIR/tfem or /tmp/tfem-UID."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = pathlib.Path(xdg) / "tfem" if xdg and os.path.isdir(xdg) else pathlib.Path(f"/tmp/tfem-{os.getuid()}")
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private(base):
        raise PermissionError(f"{base} must be owned by you and private (mode 0700)")
    return base


def _recorded_runtime_dir(keyfile: pathlib.Path) -> pathlib.Path | None:
    """The runtime directory the key file records, if it is still a private directory of ours."""
    record = read_record(keyfile)
    if record is None or record.runtime is None:
        return None
    path = pathlib.Path(record.runtime)
    return path if path.is_dir() and _private(path) else None


def default_keyfile() -> pathlib.Path:
    """The key file used when none is given: one per user, and one per Slurm
    job when SLURM_JOB_ID is set, so two jobs on a node never share."""
    job = os.environ.get("SLURM_JOB_ID")
    name = f"registry-job{job}.key" if job else "registry.key"
    return runtime_dir() / name


def resolve_keyfile(keyfile: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The key file from the argument, else $TFEM_KEYFILE, else the default."""
    chosen = keyfile or os.environ.get(ENV_KEYFILE)
    path = pathlib.Path(chosen) if chosen else default_keyfile()
    return path.expanduser().absolute()


@dataclasses.dataclass(frozen=True)
class Instance:
    """The names that belong to one key file."""

    keyfile: pathlib.Path
    segment: str  # POSIX shared-memory name
    socket_path: pathlib.Path  # the broker's ipc:// socket
    spill_dir: pathlib.Path  # default spill directory
    state_path: pathlib.Path  # what the broker tells `tfem clean`: its spill store
    ident: str
    runtime: pathlib.Path  # the directory of the socket, state file and default spill store

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.socket_path}"

    @classmethod
    def for_keyfile(cls, keyfile: str | os.PathLike[str] | None = None) -> Instance:
        path = resolve_keyfile(keyfile)
        real = os.path.realpath(path)
        ident = f"{os.getuid()}-{hashlib.sha1(real.encode()).hexdigest()[:12]}"
        base = _recorded_runtime_dir(path) or runtime_dir()
        return cls(
            keyfile=path,
            segment=f"/tfem-{ident}",
            socket_path=base / f"tfem-{ident}.sock",
            spill_dir=base / f"tfem-{ident}.spill",
            state_path=base / f"tfem-{ident}.json",
            ident=ident,
            runtime=base,
        )

    def write_state(self, state: dict[str, object]) -> None:
        """Written whole or not at all (temp file, then rename)."""
        temp = self.state_path.with_suffix(".json.tmp")
        temp.write_text(json.dumps(state))
        temp.replace(self.state_path)

    def read_state(self) -> dict[str, object]:
        try:
            value = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def remove_state(self) -> None:
        self.state_path.unlink(missing_ok=True)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes from '4096', '4K', '512M', '1.5G', '2GiB' (binary units)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64K, 512M, 2G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)
