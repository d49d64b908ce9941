"""A decompose-compute-reduce pipeline whose stages hand data over in temporary files.

    splitter --in-0 .. in-N-1--> W workers --out-0 .. out-N-1--> reducer

The splitter cuts an input into N parts, a temporary file each; W worker
processes transform their share of the parts (worker w takes parts w, w+W,
...) into new temporary files; the reducer reads every result in order and
folds a checksum, which is checked against one computed without temporary
files. All stages start together: a worker or the reducer that asks for a
part its producer has not finished waits for it, and the splitter keeps at
most --in-flight parts ahead of the reducer (and, through tfem, a writer
that finds the instance full waits for room).

Through tfem (the default backend), inside an instance:

    tfem up -- python examples/pipeline.py --workers 4 --parts 256 --part-size 256K

Through plain files in a directory (for comparison; e.g. on /dev/shm):

    python examples/pipeline.py --backend /dev/shm/pipeline --workers 4

With a directory, a writer publishes a file by renaming it into place once
written, and a reader that does not find it yet polls for it. Every reader
consumes what it reads: tfem frees a file at its close, the directory
backend unlinks it.

Prints the time and the checksum (--json: one line of JSON); exits 1 if the
checksum is wrong or a stage fails.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import random
import signal
import socket
import sys
import threading
import time
import zlib
from typing import Any, Callable, Iterator

from tfem.config import parse_size

TABLE = bytes((b * 167 + 13) % 256 for b in range(256))  # a bijection: the "compute" step
READ_TIMEOUT_S = 120.0  # how long a reader waits for its part, and a writer for room
CHUNK = 1 << 20  # a multiple of 4: the chunks join into what one randbytes call would give


def input_chunks(seed: int, size: int) -> Iterator[bytes]:
    """The input, CHUNK bytes at a time: one randbytes call would overflow
    at 256 MiB, and the check below needs no copy of the whole input."""
    rng = random.Random(seed)
    for start in range(0, size, CHUNK):
        yield rng.randbytes(min(CHUNK, size - start))


def make_input(seed: int, size: int) -> bytes:
    return b"".join(input_chunks(seed, size))


def transform(data: bytes) -> bytes:
    return data.translate(TABLE)


# ---- the two backends: the same three calls ----


class TfemStore:
    def __init__(self) -> None:
        import tfem

        self.client = tfem.connect()  # the instance of $TFEM_KEYFILE, set by `tfem up -- ...`

    def write(self, name: str, data: Any) -> None:
        # Waits for room while the slot table (or memory) is full: the
        # splitter may run ahead of the workers by thousands of parts.
        with self.client.open(name, "w", timeout=READ_TIMEOUT_S) as f:
            f.write(data)

    def read(self, name: str) -> bytes:
        with self.client.open(name, "r", timeout=READ_TIMEOUT_S) as f:  # waits for the writer's close
            return f.read()

    def close(self) -> None:
        self.client.close()


class DirStore:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def write(self, name: str, data: Any) -> None:
        path = os.path.join(self.directory, name)
        partial = f"{path}.{os.getpid()}.partial"
        with open(partial, "wb") as f:
            f.write(data)
        os.rename(partial, path)  # published whole, never seen half-written

    def read(self, name: str) -> bytes:
        path = os.path.join(self.directory, name)
        deadline = time.monotonic() + READ_TIMEOUT_S
        pause = 50e-6
        while True:
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} did not appear within {READ_TIMEOUT_S} s") from None
                time.sleep(pause)
                pause = min(2 * pause, 2e-3)
                continue
            with f:
                data = f.read()
            os.unlink(path)  # consumed
            return data

    def close(self) -> None:
        pass


def open_store(backend: str) -> Any:
    return TfemStore() if backend == "tfem" else DirStore(backend)


# ---- the stages, one process each ----


def splitter(backend: str, prefix: str, parts: int, part_size: int, seed: int, start: Any, room: Any) -> None:
    store = open_store(backend)
    data = memoryview(make_input(seed, parts * part_size))
    start.wait()
    for i in range(parts):
        room.acquire()  # at most --in-flight parts between here and the reducer
        store.write(f"{prefix}in-{i}", data[i * part_size: (i + 1) * part_size])
    store.close()


def worker(backend: str, prefix: str, parts: int, index: int, workers: int, start: Any) -> None:
    store = open_store(backend)
    start.wait()
    for i in range(index, parts, workers):
        store.write(f"{prefix}out-{i}", transform(store.read(f"{prefix}in-{i}")))
    store.close()


def reducer(backend: str, prefix: str, parts: int, start: Any, room: Any, results: Any) -> None:
    store = open_store(backend)
    start.wait()
    checksum = total = 0
    for i in range(parts):
        data = store.read(f"{prefix}out-{i}")
        room.release()
        checksum = zlib.crc32(data, checksum)
        total += len(data)
    results.put((time.perf_counter(), checksum, total))
    store.close()


def stage(target: Callable[..., None], *args: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main's handler is for main: a stage stops at once
    target(*args)


def run(backend: str, workers: int, parts: int, part_size: int, seed: int, in_flight: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context()
    prefix = f"pipeline-{socket.gethostname()}-{os.getpid()}-"  # unique across the nodes of a cluster
    start = ctx.Barrier(workers + 3)  # every stage, and this process
    # Without a bound the splitter could fill the slot table with parts
    # while a worker waits for a slot to write its result: nobody could go on.
    room = ctx.Semaphore(in_flight)
    results = ctx.Queue()
    stages = [ctx.Process(target=stage, args=(splitter, backend, prefix, parts, part_size, seed, start, room))]
    stages += [ctx.Process(target=stage, args=(worker, backend, prefix, parts, w, workers, start))
               for w in range(workers)]
    stages.append(ctx.Process(target=stage, args=(reducer, backend, prefix, parts, start, room, results)))
    for p in stages:
        p.start()
    try:
        while start.n_waiting < len(stages):  # every stage ready, or one failed getting ready
            if any(p.exitcode not in (None, 0) for p in stages):
                start.abort()
                raise RuntimeError("a stage failed before the start")
            time.sleep(0.005)
        start.wait(timeout=READ_TIMEOUT_S)
        t0 = time.perf_counter()
        while True:
            try:
                t1, checksum, total = results.get(timeout=0.2)
                break
            except queue.Empty:
                failed = [p for p in stages if p.exitcode not in (None, 0)]
                if failed:
                    raise RuntimeError(f"a stage failed (exit status {failed[0].exitcode})") from None
        for p in stages:
            p.join(READ_TIMEOUT_S)
        if any(p.exitcode != 0 for p in stages):
            raise RuntimeError("a stage failed")
    finally:
        for p in stages:
            if p.is_alive():
                p.terminate()
                p.join()
    expected = 0
    for chunk in input_chunks(seed, parts * part_size):
        expected = zlib.crc32(transform(chunk), expected)
    return {"backend": backend, "workers": workers, "parts": parts, "part_size": part_size,
            "bytes": total, "seconds": t1 - t0, "checksum": checksum, "expected": expected,
            "ok": checksum == expected and total == parts * part_size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="tfem", help="tfem, or a directory for plain files (default tfem)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--parts", type=int, default=256)
    parser.add_argument("--part-size", type=parse_size, default="256K")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--in-flight", type=int, default=1024,
                        help="parts between splitter and reducer at most; through tfem, keep it "
                             "within half the instance's slots (default 1024)")
    parser.add_argument("--json", action="store_true", help="print one line of JSON")
    args = parser.parse_args()
    if min(args.workers, args.parts, args.part_size, args.in_flight) < 1:
        parser.error("--workers, --parts, --part-size and --in-flight must be positive")
    if args.backend != "tfem" and not os.path.isdir(args.backend):
        parser.error(f"--backend: {args.backend} is neither tfem nor a directory")
    # SIGTERM (a batch job's stop) ends this process through run()'s
    # finally, which stops the stages.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        result = run(args.backend, args.workers, args.parts, args.part_size, args.seed, args.in_flight)
    except (RuntimeError, OSError, threading.BrokenBarrierError) as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        mib = result["bytes"] / (1 << 20)
        print(f"pipeline: {mib:.1f} MiB in {args.parts} parts through {args.backend}, {args.workers} workers: "
              f"{result['seconds']:.3f} s, checksum {result['checksum']:08x} "
              f"({'ok' if result['ok'] else 'WRONG, expected %08x' % result['expected']})")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
