"""Start a server process and wait until it serves; stop one.

A tfem server given `--ready-fd N` writes "ready" to descriptor N once it
serves. Whoever starts one (`tfem up` its registry and broker; the tests and
benchmarks `tfem up` itself) waits for that word on a pipe: no polling, and
a server that exits first is seen at once (end of file).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
from typing import Any, Sequence

from .errors import TfemError


def start(argv: Sequence[str], what: str, timeout: float, **popen: Any) -> subprocess.Popen[bytes]:
    """Run `argv` with `--ready-fd N` added; return once it has said ready.

    A server that exits or says nothing within `timeout` seconds is stopped
    and TfemError("WHAT did not start (exit status S)") raised. `popen` goes
    to subprocess.Popen as it is (where stderr goes, the session, ...).
    """
    read_end, write_end = os.pipe()
    try:
        try:
            process = subprocess.Popen(_with_ready_fd(argv, write_end), pass_fds=(write_end,), **popen)
        finally:
            os.close(write_end)  # only the server holds it now: its exit is end of file here
        ready, _, _ = select.select([read_end], [], [], timeout)
        line = os.read(read_end, 64) if ready else b""
    finally:
        os.close(read_end)
    if line.strip() != b"ready":
        stop(process)
        raise TfemError(f"{what} did not start (exit status {process.returncode})")
    return process


def _with_ready_fd(argv: Sequence[str], fd: int) -> list[str]:
    # Before any "--": what follows it is the command `tfem up` runs.
    words = list(argv)
    at = words.index("--") if "--" in words else len(words)
    return [*words[:at], "--ready-fd", str(fd), *words[at:]]


def stop(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 30.0) -> int:
    """Send `sig` (a server's clean stop by default) and wait; SIGKILL after
    `grace` seconds. The exit status."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
