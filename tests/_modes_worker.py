"""Client processes for tests/test_broker_modes.py, run as a script:

    python tests/_modes_worker.py writer NAME SIZE
    python tests/_modes_worker.py prober HELD SMALL

`writer` says "ready", waits for a line on stdin, then writes NAME (SIZE
bytes of pattern(NAME), in one write: a full arena makes that one ALLOC)
and closes it: "written".

`prober` says "ready", then watches the file HELD in the segment (no
broker involved) until the broker holds it as its reader, which it does
only while it moves it to the spill store; then, in order, asks the
broker for STATS, connects a second client (HELLO) and asks STATS through
it, writes a SMALL-byte file that needs room from the broker (ALLOC) and
asks STATS again. Each STATS reply is reported as it came: built by the
broker at one moment, it says whether the move was finished then.

The instance comes from the environment (TFEM_KEYFILE).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any

DIGITS = bytes(range(256))


def pattern(name: str, size: int) -> bytes:
    """Cheap distinct bytes per name: a byte pattern shifted by the name's hash."""
    shift = hashlib.sha256(name.encode()).digest()[0]
    unit = DIGITS[shift:] + DIGITS[:shift]
    return (unit * (size // 256 + 1))[:size]


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def _view(stats: dict[str, Any]) -> dict[str, Any]:
    """What the test needs of a STATS reply."""
    return {"by_state": stats["files_by_state"], "spilled_bytes": stats["spilled_bytes"],
            "spilled_files": stats["spilled_files"], "mode": stats["broker_mode"]}


def cmd_writer(name: str, size: int) -> int:
    import tfem

    data = pattern(name, size)
    with tfem.connect() as client:
        emit(event="ready", pid=os.getpid())
        sys.stdin.readline()
        with client.open(name, "w") as f:
            f.write(data)
        emit(event="written", name=name, size=size)
    return 0


def cmd_prober(held: str, small: int) -> int:
    import tfem

    with tfem.connect() as client:
        emit(event="ready", pid=os.getpid())
        deadline = time.monotonic() + 60
        while client.stat(held).state != "READ":  # the broker took it to move it
            if time.monotonic() > deadline:
                emit(event="missed")
                return 1
            time.sleep(0.0002)
        emit(event="held")
        first = _view(client.stats())
        with tfem.connect() as second:  # HELLO
            after_hello = _view(second.stats())
        name = f"probe/{os.getpid()}"
        with client.open(name, "w") as f:  # the arena is full: ALLOC
            f.write(pattern(name, small))
        after_alloc = _view(client.stats())
        emit(event="probed", first=first, after_hello=after_hello, after_alloc=after_alloc,
             small=name, small_spilled=client.stat(name).spilled)
    return 0


def main() -> int:
    command, *args = sys.argv[1:]
    if command == "writer":
        return cmd_writer(args[0], int(args[1]))
    if command == "prober":
        return cmd_prober(args[0], int(args[1]))
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main())
