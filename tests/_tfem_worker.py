"""Client processes for the multi-process tests, run as a script:

    python tests/_tfem_worker.py produce  INDEX COUNT TOTAL
    python tests/_tfem_worker.py consume  INDEX COUNT TOTAL
    python tests/_tfem_worker.py read     NAME [--mode r|a] [--timeout S] [--hold]
    python tests/_tfem_worker.py churn    NAME...
    python tests/_tfem_worker.py claim    NAME BLOCKS

The instance comes from the environment (TFEM_KEYFILE or TFEM_BROKER), as
for any client. Each worker reports on stdout, one JSON object per line,
flushed at once, so the test can follow it; failures show in the exit code.
This module is also imported by the tests for `content`, `catalogue` and
`stream_size`, and by _steps_worker.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

KIB = 1 << 10
MIB = 1 << 20


def content(name: str, size: int) -> bytes:
    """The deterministic pseudo-random bytes of file `name`."""
    return hashlib.shake_256(name.encode()).digest(size)


def sha256(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def size_of(i: int) -> int:
    """Mixed sizes for the small instance (1 KiB inline, 4 KiB blocks, 1 MiB arena):
    empty files, inline files, files of a few blocks, larger ones, and a
    few past the arena, which must spill."""
    if i % 125 == 7:
        return MIB + 256 * KIB + (i * 7919) % (768 * KIB)  # 1.25 to 2 MiB
    kind = i % 20
    if kind == 0:
        return 0
    if kind < 10:
        return 1 + (i * 37) % (KIB - 1)  # inline: 1 .. 1023 bytes
    if kind < 18:
        return KIB + 1 + (i * 2741) % (20 * KIB)  # a few blocks
    return 64 * KIB + (i * 7103) % (128 * KIB)  # dozens of blocks


def stream_size(i: int) -> int:
    """Sizes for a stream on the small instance (1 KiB inline, 4 KiB blocks,
    1 MiB arena): empty, inline, a few blocks, dozens of blocks, and every
    sixteenth past the arena, which must spill."""
    kind = i % 16
    if kind == 3:
        return MIB + 100 * KIB + (i * 7919) % (400 * KIB)
    if kind in (0, 8):
        return 0
    if kind in (1, 2, 9, 10, 11):
        return 1 + (i * 37) % (KIB - 1)
    if kind in (4, 5, 12, 13):
        return KIB + 1 + (i * 2741) % (20 * KIB)
    return 64 * KIB + (i * 7103) % (160 * KIB)


def catalogue(total: int) -> list[tuple[str, int]]:
    return [(f"proc/{i:04d}", size_of(i)) for i in range(total)]


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


# ---- the many-process exchange ----


def produced_by(i: int, count: int) -> int:
    """Which producer writes file i: blocks of 4 names rotate between
    producers, so every consumer needs files from every producer."""
    return (i // 4) % count


def consumed_by(i: int, count: int) -> int:
    return i % count


def cmd_produce(args: argparse.Namespace) -> int:
    import tfem

    mine = [(n, s) for i, (n, s) in enumerate(catalogue(args.total)) if produced_by(i, args.count) == args.index]
    with tfem.connect() as client:
        emit(event="ready", pid=os.getpid())
        for k, (name, size) in enumerate(mine):
            data = content(name, size)
            with client.open(name, "w") as f:
                if k % 3 == 0 or size < 4096:
                    f.write(data)
                else:  # several writes of odd sizes, so files grow in steps
                    step = 1 + size // 5
                    for pos in range(0, size, step):
                        f.write(data[pos: pos + step])
        emit(event="done", written=len(mine))
    return 0


def cmd_consume(args: argparse.Namespace) -> int:
    import tfem

    mine = [(n, s) for i, (n, s) in enumerate(catalogue(args.total)) if consumed_by(i, args.count) == args.index]
    bad: list[str] = []
    waited = 0
    with tfem.connect() as client:
        emit(event="ready", pid=os.getpid())
        for k, (name, size) in enumerate(mine):
            try:
                f = client.open(name, "r", wait=False)
            except (tfem.NotFound, tfem.WouldBlock):
                waited += 1  # not there yet, or still being written: wait for it
                f = client.open(name, "r", timeout=args.timeout)
            with f:
                if k % 2:
                    got = f.read()
                else:  # chunked, into a caller's buffer
                    buf = bytearray(size)
                    view, n = memoryview(buf), 0
                    while n < size:
                        r = f.readinto(view[n: n + 100_000])
                        if not r:
                            break
                        n += r
                    got = bytes(buf[:n])
                    if f.read(1) != b"":
                        bad.append(f"{name}: data past its size")
            expected = sha256(content(name, size))
            if len(got) != size or sha256(got) != expected:
                bad.append(f"{name}: got {len(got)} bytes, sha256 {sha256(got)[:16]}; "
                           f"expected {size} bytes, sha256 {expected[:16]}")
        emit(event="done", consumed=len(mine), waited=waited, bad=bad)
    return 1 if bad else 0


# ---- one reader, for the waiting tests ----


def cmd_read(args: argparse.Namespace) -> int:
    import tfem

    with tfem.connect() as client:
        emit(event="waiting", pid=os.getpid())
        start = time.monotonic()
        try:
            f = client.open(args.name, args.mode, timeout=args.timeout)
        except tfem.TfemError as exc:
            emit(event="error", type=type(exc).__name__, errno=exc.errno, message=str(exc),
                 elapsed=time.monotonic() - start)
            return 3
        with f:
            if f.writable():
                emit(event="created", elapsed=time.monotonic() - start)
                return 4
            data = f.read()
            emit(event="got", size=len(data), sha256=sha256(data), elapsed=time.monotonic() - start)
            if args.hold:  # keep the file in READ until told to close it
                sys.stdin.readline()
        emit(event="closed")
    return 0


# ---- publishes that are not for the reader ----


def cmd_churn(args: argparse.Namespace) -> int:
    """Publish and consume the given names over and over, until stdin closes."""
    import select

    import tfem

    rounds = 0
    with tfem.connect() as client:
        emit(event="ready", pid=os.getpid())
        while not select.select([sys.stdin], [], [], 0)[0]:
            for name in args.names:
                with client.open(name, "w") as f:
                    f.write(b"x")
                with client.open(name, "r", wait=False) as f:
                    f.read()
            rounds += 1
        emit(event="done", rounds=rounds)
    return 0


# ---- a writer stopped between claiming blocks and recording them ----


def cmd_claim(args: argparse.Namespace) -> int:
    """Open NAME for writing and take the first half of growing it, as
    tfem_t_grow does (tfem_t_claim_blocks: the claim marked under way, the
    bits set), then stop short of recording the blocks: report, and wait
    on stdin, to be killed there."""
    import tfem
    from tfem._native import ffi, lib

    with tfem.connect() as client:
        f = client.open(args.name, "w")
        start = ffi.new("uint32_t *")
        got = lib.tfem_t_claim_blocks(f._f.h, f._f.index, args.blocks, start)
        emit(event="claimed", pid=os.getpid(), start=start[0], count=got)
        sys.stdin.readline()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("produce", "consume"):
        p = sub.add_parser(command)
        p.add_argument("index", type=int)
        p.add_argument("count", type=int)
        p.add_argument("total", type=int)
        p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("read")
    p.add_argument("name")
    p.add_argument("--mode", default="r")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--hold", action="store_true")
    p = sub.add_parser("churn")
    p.add_argument("names", nargs="+")
    p = sub.add_parser("claim")
    p.add_argument("name")
    p.add_argument("blocks", type=int)
    args = parser.parse_args()
    return {"produce": cmd_produce, "consume": cmd_consume, "read": cmd_read, "churn": cmd_churn,
            "claim": cmd_claim}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
