"""A client process that does what the test tells it, step by step, run as:

    python tests/_steps_worker.py steps             # commands on stdin, one JSON object a line
    python tests/_steps_worker.py produce-stream PREFIX [--pace S]
    python tests/_steps_worker.py consume-stream PREFIX
    python tests/_steps_worker.py die-many ENDPOINT --writers W --readers R   (see cmd_die_many)

`steps` commands ({"op": ...}):
    open   name, mode ("w", "r", "a"), timeout (optional), wait (optional)
    write  name, start, end: bytes [start, end) of content(name, end)
    read   name, n (-1: the rest)
    close  name          a reader's close reports the size and sha256 of all it read
    abort  name
    stats                the broker's statistics
    exit
Each command is answered by one event: {"event": "opened" | "wrote" | "read" |
"closed" | "aborted" | "stats" | ...}, or {"event": "error", "type", "errno",
"message"}. An "open" is announced first ({"event": "opening"}), so a test can
watch the process wait inside it.

The streams publish (or consume and check) PREFIX0, PREFIX1, ... of mixed sizes
(`stream_size` of _tfem_worker.py), one "produced"/"consumed" event each, across whatever happens
to the broker meanwhile, until told to stop on stdin: the producer on any line,
the consumer on a line holding the number of files to consume in all.

The instance comes from the environment (TFEM_KEYFILE or TFEM_BROKER).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import sys
import time

from _tfem_worker import content, emit, sha256, stream_size


def _error(exc: BaseException, **more: object) -> None:
    emit(event="error", type=type(exc).__name__, errno=getattr(exc, "errno", None), message=str(exc), **more)


def cmd_steps(args: argparse.Namespace) -> int:
    import tfem

    client = tfem.connect()
    files: dict[str, tfem.TfemFile] = {}
    hashes: dict[str, tuple[hashlib._Hash, int]] = {}  # type: ignore[name-defined]
    emit(event="ready", pid=os.getpid())
    for line in sys.stdin:
        if not line.strip():
            continue
        step = json.loads(line)
        op, name = step["op"], step.get("name", "")
        try:
            if op == "open":
                emit(event="opening", name=name)
                start = time.monotonic()
                f = client.open(name, step.get("mode", "r"), timeout=step.get("timeout"),
                                wait=step.get("wait", True))
                files[name] = f
                hashes[name] = (hashlib.sha256(), 0)
                emit(event="opened", name=name, slot=client.stat(name).slot if f.writable() else None,
                     writing=f.writable(), elapsed=time.monotonic() - start)
            elif op == "write":
                start = time.monotonic()
                data = content(name, step["end"])[step["start"]:]
                files[name].seek(step["start"])
                files[name].write(data)
                emit(event="wrote", name=name, pos=files[name].tell(), elapsed=time.monotonic() - start)
            elif op == "read":
                data = files[name].read(step.get("n", -1))
                h, n = hashes[name]
                h.update(data)
                hashes[name] = (h, n + len(data))
                emit(event="read", name=name, got=len(data))
            elif op == "close":
                f = files.pop(name)
                reading = f.readable()
                f.close()
                h, n = hashes.pop(name)
                emit(event="closed", name=name, **({"size": n, "sha256": h.hexdigest()} if reading else {}))
            elif op == "abort":
                files.pop(name).abort()
                emit(event="aborted", name=name)
            elif op == "stats":
                emit(event="stats", **client.stats())
            elif op == "exit":
                break
            else:
                emit(event="error", type="Unknown", errno=None, message=f"unknown op {op!r}")
        except Exception as exc:  # reported, and the worker goes on
            _error(exc, name=name)
    client.close()
    emit(event="exited")
    return 0


def _stdin_line() -> str | None:
    """A line from stdin if one is waiting; "" at end of file."""
    if select.select([sys.stdin], [], [], 0)[0]:
        return sys.stdin.readline()
    return None


def cmd_produce_stream(args: argparse.Namespace) -> int:
    import tfem

    i = 0
    with tfem.connect() as client:
        emit(event="ready", pid=os.getpid())
        while _stdin_line() is None:
            name, size = f"{args.prefix}{i}", stream_size(i)
            data = content(name, size)
            with client.open(name, "w", timeout=60) as f:  # a full table waits (back-pressure)
                step = 1 + size // (1 + i % 3)
                for pos in range(0, size, step):
                    f.write(data[pos: pos + step])
            emit(event="produced", i=i)
            i += 1
            time.sleep(args.pace)  # the pace of a stage that computes between files
        emit(event="done", count=i)
    return 0


def cmd_consume_stream(args: argparse.Namespace) -> int:
    import tfem

    i, target, bad = 0, None, []
    deadline = time.monotonic() + 120
    with tfem.connect() as client:
        emit(event="ready", pid=os.getpid())
        while target is None or i < target:
            line = _stdin_line()
            if line is not None:
                target = int(line) if line.strip() else i
                continue
            name, size = f"{args.prefix}{i}", stream_size(i)
            try:
                f = client.open(name, "r", timeout=0.2)  # short waits: look at stdin between them
            except tfem.Timeout:
                if time.monotonic() > deadline:
                    bad.append(f"{name}: never came")
                    break
                continue
            with f:
                if i % 2:
                    got = f.read()
                else:
                    got = b"".join(bytes(c) for c in f.chunks(100_000))
            if len(got) != size or sha256(got) != sha256(content(name, size)):
                bad.append(f"{name}: {len(got)} bytes, sha256 {sha256(got)[:16]}; expected {size}")
            emit(event="consumed", i=i)
            i += 1
        emit(event="done", count=i, bad=bad)
    return 1 if bad else 0


def cmd_die_many(args: argparse.Namespace) -> int:
    """Fork `writers` + `readers` clients, `batch` at a time. Each connects to
    the broker at ENDPOINT, opens one file (writer i: a new file
    PREFIXw{i} of WRITE_SIZES[i % 3] bytes; reader i: the published file
    keep/{i}, of which it reads some bytes), says so on a pipe, and
    waits to be SIGKILLed, which this process does once the whole batch
    is ready. Reports {"event": "done", "killed", "failed", "seconds"}."""
    import signal

    import tfem

    sizes = [int(s) for s in args.write_sizes.split(",")]
    jobs = [("w", i) for i in range(args.writers)] + [("r", i) for i in range(args.readers)]
    jobs = [jobs[k] for k in sorted(range(len(jobs)), key=lambda k: (k * 7919) % len(jobs))]  # mixed
    killed = failed = 0
    errors: list[str] = []
    start = time.monotonic()
    emit(event="ready", pid=os.getpid())
    for first in range(0, len(jobs), args.batch):
        batch = jobs[first: first + args.batch]
        read_end, write_end = os.pipe()
        pids = []
        for kind, i in batch:
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 0
                try:
                    os.close(read_end)
                    client = tfem.connect(broker=args.endpoint)
                    if kind == "w":
                        name, size = f"{args.prefix}w{i}", sizes[i % len(sizes)]
                        f = client.open(name, "w")
                        f.write(content(name, size))
                    else:
                        f = client.open(f"keep/{i}", "r", wait=False)
                        f.read(100)
                    os.write(write_end, b"+")
                    while True:
                        signal.pause()
                except BaseException as exc:
                    os.write(write_end, b"-" + repr(exc).encode()[:200].replace(b"\n", b" ") + b"\n")
                    code = 1
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(write_end)
        answers = b""
        deadline = time.monotonic() + 60
        while answers.count(b"+") + answers.count(b"\n") < len(batch):
            if not select.select([read_end], [], [], max(0, deadline - time.monotonic()))[0]:
                break  # a child that never said anything counts as failed
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            answers += chunk
        os.close(read_end)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for pid in pids:
            os.waitpid(pid, 0)
        killed += answers.count(b"+")
        failed += len(batch) - answers.count(b"+")
        errors += [e.decode(errors="replace") for e in answers.replace(b"+", b"").split(b"\n") if e][:3]
    emit(event="done", killed=killed, failed=failed, errors=errors[:10], seconds=time.monotonic() - start)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("steps")
    p = sub.add_parser("produce-stream")
    p.add_argument("prefix")
    p.add_argument("--pace", type=float, default=0.01)
    p = sub.add_parser("consume-stream")
    p.add_argument("prefix")
    p = sub.add_parser("die-many")
    p.add_argument("endpoint")
    p.add_argument("--writers", type=int, default=0)
    p.add_argument("--readers", type=int, default=0)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--prefix", default="dead/")
    p.add_argument("--write-sizes", default="500,3000,20000")
    args = parser.parse_args()
    return {"steps": cmd_steps, "produce-stream": cmd_produce_stream, "consume-stream": cmd_consume_stream,
            "die-many": cmd_die_many}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
