"""Processes for tests/test_spill_store.py, run as a script:

    python tests/_spill_store_worker.py reader PATH MAP_SIZE
        a process's shared SpillReader of the store at PATH, driven by
        lines on stdin: "acquire", "release", "close_idle", "read FILE_ID
        LENGTH" (the sha256 of the file's first LENGTH spilled bytes),
        "mapped"
    python tests/_spill_store_worker.py open-store PATH
        open a SpillStore at PATH: "opened", or exit 3 with the NoSpace
    python tests/_spill_store_worker.py raw-lmdb PATH
        open PATH as LMDB itself would for the broker, without tfem's care
    python tests/_spill_store_worker.py produce PREFIX COUNT SIZE AHEAD
        write PREFIX/0 .. PREFIX/COUNT-1 (see `data`), one after the other,
        at most AHEAD files ahead of their consumer
    python tests/_spill_store_worker.py consume PREFIX COUNT SIZE
        take them in order, waiting for each, and check every byte

Each reports JSON events on stdout, one per line (tests/_proc_tools.Worker).
Also imported by the test for `data`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from typing import Any

KIB = 1 << 10


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def compressible(seed: str, size: int) -> bytes:
    """Bytes that lz4 and zstd shrink a lot, but not to nothing: words
    drawn from a small random vocabulary."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(3, 12)) for _ in range(64)]
    out = bytearray()
    while len(out) < size:
        out += b"".join(rng.choices(words, k=4096))
    return bytes(out[:size])


def incompressible(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def data(name: str, size: int) -> bytes:
    """File `name`'s bytes: compressible for an even last part, random
    for an odd one."""
    last = name.rsplit("/", 1)[-1]
    return compressible(name, size) if not last.isdigit() or int(last) % 2 == 0 else incompressible(name, size)


def mapped(path: str) -> list[int]:
    """The inodes of the store's data files this process maps."""
    target = os.path.join(path, "data.mdb")
    inodes = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().removesuffix(" (deleted)") == target:
                inodes.append(int(fields[4]))
    return sorted(set(inodes))


def cmd_reader(path: str, map_size: int) -> int:
    from tfem import spill_reader

    reader = spill_reader.reader_for(path, map_size)
    emit(event="ready")
    for line in sys.stdin:
        op, *args = line.split()
        if op == "acquire":
            reader.acquire()
        elif op == "release":
            reader.release()
        elif op == "close_idle":
            spill_reader.close_idle()
        elif op == "read":
            out = bytearray(int(args[1]))
            reader.read_into(int(args[0]), 0, memoryview(out))
            emit(event="read", sha256=hashlib.sha256(out).hexdigest(), mapped=mapped(path))
            continue
        emit(event=op, mapped=mapped(path), same=spill_reader.reader_for(path, map_size) is reader)
    return 0


def cmd_open_store(path: str) -> int:
    import pathlib

    from tfem.broker.spill import SpillStore
    from tfem.errors import NoSpace
    from tfem.spill_format import Codec

    try:
        store = SpillStore(pathlib.Path(path), 1 << 20, Codec.NONE, set)
    except NoSpace as exc:
        emit(event="no-space", errno=exc.errno, message=str(exc))
        return 3
    store.close()
    emit(event="opened")
    return 0


def cmd_raw_lmdb(path: str) -> int:
    import lmdb

    from tfem.broker.spill import MAX_READERS

    os.makedirs(path, exist_ok=True)
    lmdb.open(path, map_size=1 << 20, sync=False, max_dbs=0, max_readers=MAX_READERS).close()
    emit(event="opened")
    return 0


def cmd_produce(prefix: str, count: int, size: int, ahead: int) -> int:
    import tfem

    with tfem.connect() as client:
        emit(event="ready")
        for i in range(count):
            if i >= ahead:  # wait for file i - AHEAD to be consumed
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    try:
                        client.stat(f"{prefix}/{i - ahead}")
                    except tfem.NotFound:
                        break
                    time.sleep(0.001)
                else:
                    emit(event="stuck", i=i)
                    return 1
            name = f"{prefix}/{i}"
            with client.open(name, "w") as f:
                f.write(data(name, size))
            emit(event="published", i=i, t=time.monotonic())
    emit(event="done", t=time.monotonic())
    return 0


def cmd_consume(prefix: str, count: int, size: int) -> int:
    """Read each file in pieces of odd sizes, slowly enough that the
    producer goes on meanwhile; report which were spilled when taken."""
    import tfem

    bad: list[str] = []
    spilled: list[tuple[int, float, float]] = []  # (i, when taken, when done)
    with tfem.connect() as client:
        emit(event="ready")
        for i in range(count):
            name = f"{prefix}/{i}"
            with client.open(name, "r", timeout=30) as f:
                taken = time.monotonic()
                was_spilled = bool(f.fstat().spilled)
                got = bytearray()
                while True:
                    piece = f.read(37 * KIB + i)
                    if not piece:
                        break
                    got += piece
                    time.sleep(0.0005)
            if was_spilled:
                spilled.append((i, taken, time.monotonic()))
            if got != data(name, size):
                where = next((k for k, (a, b) in enumerate(zip(got, data(name, size))) if a != b), min(len(got), size))
                bad.append(f"{name}: {len(got)} bytes, first wrong at {where}")
    emit(event="done", bad=bad, spilled=spilled, t=time.monotonic())
    return 1 if bad else 0


def main() -> int:
    command, *args = sys.argv[1:]
    if command == "reader":
        return cmd_reader(args[0], int(args[1]))
    if command == "open-store":
        return cmd_open_store(args[0])
    if command == "raw-lmdb":
        return cmd_raw_lmdb(args[0])
    if command == "produce":
        return cmd_produce(args[0], int(args[1]), int(args[2]), int(args[3]))
    if command == "consume":
        return cmd_consume(args[0], int(args[1]), int(args[2]))
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main())
