"""The workloads: what is measured, and how the processes take part.

Every workload runs each peer in the same run, peers interleaved (the order
rotates from run to run), in long-lived producer and consumer processes
driven over pipes. Times are time.perf_counter(), CLOCK_MONOTONIC on Linux,
one clock for every process on the machine, so a time taken by the
producer and one taken by the consumer can be subtracted (zerocopy takes
time.monotonic_ns(), the same clock in whole nanoseconds).

- handoff: one file at a time, producer and consumer in different
  processes, the consumer already waiting; latency from the producer's
  start of writing (its open) to the consumer's end of closing (and
  removing) the file. The same run measures memcpy into a touched buffer.
- putget: the cost of the calls themselves: one process writes a 4 KiB
  file and reads it back, over and over, through tfem and through
  /dev/shm (write, read back, unlink); nobody waits for anybody.
- zerocopy: a large file written in place through a writable view of
  its shared memory (Client.create, getbuffer) and read in place by a
  consumer already waiting: time from the producer's close to the
  consumer holding its read-only view, with and without the checksum
  passes; against a /dev/shm file mapped by both sides.
- pairs: N producer/consumer pairs, 4 KiB files, each file acknowledged
  (one byte down a pipe) before the next: aggregate handoffs per second.
- stream: one pair, 4 KiB files without per-file acknowledgement; the
  producer stays at most WINDOW files ahead (credits down a pipe every
  CREDIT files), so no peer holds an unbounded backlog.
- spill: 4x the arena of a small tfem instance in 1 MiB files, written by
  one process and then read back by another, against py-lmdb puts then
  gets (sync off, one transaction per value) in the same pattern. Then the
  same pattern through instances started with --spill-compress none, lz4
  and zstd, on compressible and on random data: GB/s and the store's
  ratio (stored / raw bytes after writing).
- pipeline: examples/pipeline.py through tfem and through a /dev/shm
  directory.
- memory: the broker's resident memory outside the segment, and the
  segment's metadata per held file.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import mmap
import os
import random
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

from .peers import FilePeer, Peer, RedisPeer, ShmPeer, TfemPeer
from .plan import K, M, Plan
from .procs import Worker, WorkerError, first_order, orders, sleep_until
from .services import RedisServer, Services, TfemInstance
from .stats import median, quantile, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATTERN = random.Random(20240917).randbytes(4096)
WINDOW, CREDIT = 1024, 64  # stream flow control: files ahead, files per credit
SMALL = 4 * K


@dataclasses.dataclass
class Context:
    plan: Plan
    services: Services
    tfem: TfemInstance | None
    redis: RedisServer | None
    tmpfs_dir: str
    disk_dir: str
    log: Callable[[str], None]
    no_redis: bool = False  # --no-redis: workloads that start a Redis of their own leave it out too
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def peers(self, keys: list[str]) -> list[str]:
        """The peers of `keys` this run has (Redis only when it was started)."""
        return [k for k in keys if self.redis is not None or not k.startswith("redis")]

    def peer(self, key: str) -> Peer:
        if key == "tfem":
            assert self.tfem is not None
            return TfemPeer(self.tfem.keyfile)
        if key == "tmpfs":
            return FilePeer("tmpfs", "tmpfs files (/dev/shm)", self.tmpfs_dir)
        if key == "disk":
            return FilePeer("disk", "local-disk files", self.disk_dir)
        if key == "shm":
            return ShmPeer()
        assert self.redis is not None
        if key == "redis-unix":
            return RedisPeer("redis-unix", "Redis, unix socket", **self.redis.unix)
        if key == "redis-tcp":
            return RedisPeer("redis-tcp", "Redis, loopback TCP", **self.redis.tcp)
        raise KeyError(key)


HANDOFF_PEERS = ["tfem", "tmpfs", "disk", "shm", "redis-unix", "redis-tcp"]
PAIRS_PEERS = ["tfem", "tmpfs", "redis-unix"]

_pair_ids = itertools.count()


def pair_id() -> str:
    return f"b{os.getpid()}-{next(_pair_ids)}"


def rotated(items: list[Any], run: int) -> list[Any]:
    k = run % len(items)
    return items[k:] + items[:k]


# ---- data ----


def make_payload(n: int) -> bytearray:
    """n bytes of a fixed random pattern, in touched memory."""
    data = bytearray(PATTERN) * (n // len(PATTERN))
    data += PATTERN[: n % len(PATTERN)]
    return data


def touched(n: int) -> bytearray:
    """A buffer whose pages are all mapped already (bytearray(n) is not)."""
    return bytearray(b"\x5a") * n


def stamp(data: bytearray, seq: int) -> None:
    data[:8] = seq.to_bytes(8, "little")


def intact(got: Any, size: int, seq: int) -> bool:
    """The bytes a consumer got are the producer's `seq`-th file: length,
    sequence number, and the pattern at both ends."""
    if got is None or len(got) != size:
        return False
    if size < 128:
        return True
    tail = bytes(PATTERN[i % len(PATTERN)] for i in range(size - 64, size))
    return bytes(got[:8]) == seq.to_bytes(8, "little") and bytes(got[8:64]) == PATTERN[8:64] \
        and bytes(got[-64:]) == tail


def memcpy_gbps(size: int, samples: int = 5) -> float:
    """Copy bandwidth into an already-touched buffer of `size` bytes (small
    sizes copy in a loop, so they run from cache)."""
    src, dst = memoryview(make_payload(size)), memoryview(touched(size))
    loops = max(1, (64 * M) // size)
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        for _ in range(loops):
            dst[:] = src
        times.append((time.perf_counter() - t) / loops)
    return size / median(times) / 1e9


# ---- one handoff at a time ----


def _handoff_producer(conn: Any, peer: Peer, channel: Any) -> None:
    side = peer.producer(channel)
    try:
        data: bytearray | None = None
        view: memoryview | None = None
        conn.send("ready")
        for msg in orders(conn):
            if msg[0] == "size":
                if view is not None:
                    view.release()
                view = data = None
                data = make_payload(msg[1])
                view = memoryview(data)
                conn.send("ok")
            elif msg[0] == "put":
                _, name, seq = msg
                assert data is not None
                stamp(data, seq)
                t0 = time.perf_counter()
                side.put(name, view)
                conn.send(t0)
    finally:
        side.close()


def _handoff_consumer(conn: Any, peer: Peer, channel: Any) -> None:
    side = peer.consumer(channel)
    try:
        out: bytearray | None = None
        size = 0
        conn.send("ready")
        for msg in orders(conn):
            if msg[0] == "size":
                out = None
                size = msg[1]
                out = touched(size)
                conn.send("ok")
            elif msg[0] == "get":
                _, name, seq = msg
                assert out is not None
                conn.send("waiting")
                got = side.get(name, out)
                t1 = time.perf_counter()
                ok = intact(got, size, seq)
                del got
                conn.send((t1, ok))
    finally:
        side.close()


class HandoffPair:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.id = pair_id()
        self.channel = peer.channel(self.id)
        self.workers: list[Worker] = []
        try:
            self.consumer = self._start("consumer", _handoff_consumer)
            self.producer = self._start("producer", _handoff_producer)
            self.consumer.recv()
            self.producer.recv()
        except BaseException:
            self.stop()
            raise
        finally:
            peer.close_channel(self.channel)
        self.seq = 0

    def _start(self, role: str, target: Callable[..., None]) -> Worker:
        worker = Worker(f"{self.peer.key} {role}", target, self.peer, self.channel)
        self.workers.append(worker)
        return worker

    def run(self, size: int, count: int, warmup: int) -> list[float]:
        """Seconds per handoff, `count` of them after `warmup`."""
        self.producer.call("size", size)
        self.consumer.call("size", size)
        samples = []
        for i in range(warmup + count):
            self.seq += 1
            name = f"{self.id}-{self.seq}"
            if self.consumer.call("get", name, self.seq) != "waiting":
                raise WorkerError("consumer out of step")
            time.sleep(0.001)  # let it settle into its wait
            self.producer.send("put", name, self.seq)
            t1, ok = self.consumer.recv()  # the producer's reply waits: reading it now would steal a CPU
            t0 = self.producer.recv()
            if not ok:
                raise WorkerError(f"{self.peer.key}: the consumer got wrong bytes ({size} B, #{self.seq})")
            if i >= warmup:
                samples.append(t1 - t0)
        return samples

    def stop(self) -> None:
        for w in self.workers:
            w.stop()


def handoff(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    sizes = plan.handoff_sizes
    keys = ctx.peers(HANDOFF_PEERS)
    per_run: dict[str, dict[int, list[float]]] = {k: {s: [] for s in sizes} for k in keys}
    pooled: dict[str, dict[int, list[float]]] = {k: {s: [] for s in sizes} for k in keys}
    memcpy: dict[int, list[float]] = {s: [] for s in sizes}
    for run in range(plan.repeats):
        for size in sizes:
            memcpy[size].append(memcpy_gbps(size))
        for key in rotated(keys, run):
            peer = ctx.peer(key)
            ctx.log(f"handoff run {run + 1}/{plan.repeats}: {peer.label}")
            pair = HandoffPair(peer)
            try:
                for size in sizes:
                    samples = pair.run(size, plan.handoff_counts[size], plan.warmup(size))
                    per_run[key][size].append(median(samples))
                    pooled[key][size] += samples
            finally:
                pair.stop()
    results: dict[str, Any] = {}
    for key in keys:
        results[key] = {}
        for size in sizes:
            lat = per_run[key][size]
            results[key][str(size)] = {
                "latency_us": summary(t * 1e6 for t in lat),
                "gbps": summary(size / t / 1e9 for t in lat),
                "handoffs_per_s": summary(1 / t for t in lat),
                "p90_us": quantile(pooled[key][size], 0.9) * 1e6,
                "p99_us": quantile(pooled[key][size], 0.99) * 1e6,
                "handoffs": len(pooled[key][size]),
            }
    return {
        "peers": {k: ctx.peer(k).label for k in keys},
        "sizes": sizes,
        "counts": {str(s): plan.handoff_counts[s] for s in sizes},
        "results": results,
        "memcpy_gbps": {str(s): summary(v) for s, v in memcpy.items()},
    }


# ---- put + get in one process ----


def _putget_side(conn: Any, kind: str, where: str, count: int) -> None:
    """Rounds of a 4 KiB put then get in this process, through tfem (`where`
    a key file) or files in the directory `where`; each ("run",) answers
    the seconds per round, after count // 10 rounds not counted."""
    client = None
    if kind == "tfem":
        import tfem

        client = tfem.connect(where)
    data = memoryview(make_payload(SMALL))
    out = memoryview(touched(SMALL))
    prefix = os.path.join(where, "pg-") if client is None else f"pg-{os.getpid()}-"
    rounds = itertools.count()
    conn.send("ready")
    while conn.recv()[0] == "run":
        warmup = count // 10
        t0 = 0.0
        bad = 0
        for i in range(warmup + count):
            if i == warmup:
                t0 = time.perf_counter()
            name = f"{prefix}{next(rounds)}"
            if client is not None:
                with client.open(name, "w") as f:
                    f.write(data)
                with client.open(name, "r") as f:
                    n = f.readinto(out)
            else:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.write(fd, data)
                os.close(fd)
                fd = os.open(name, os.O_RDONLY)
                n = os.readv(fd, [out])
                os.close(fd)
                os.unlink(name)
            bad += n != SMALL
        seconds = (time.perf_counter() - t0) / count
        if bad or out != data:
            raise RuntimeError(f"{kind}: {bad} of {warmup + count} rounds read back the wrong bytes")
        conn.send(seconds)
    if client is not None:
        client.close()


def putget(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    assert ctx.tfem is not None
    where = {"tfem": ctx.tfem.keyfile, "file": ctx.tmpfs_dir}
    per_round: dict[str, list[float]] = {k: [] for k in where}
    workers = {}
    try:
        for kind, w in where.items():
            workers[kind] = Worker(f"{kind} put + get", _putget_side, kind, w, plan.putget_count)
            workers[kind].recv(120)
        for run in range(plan.repeats):
            for kind in rotated(list(where), run):
                ctx.log(f"putget run {run + 1}/{plan.repeats}: {kind}")
                per_round[kind].append(workers[kind].call("run"))
    finally:
        for w in workers.values():
            w.stop()
    return {
        "peers": {"tfem": "tfem", "file": "/dev/shm file (write, read back, unlink)"},
        "file_size": SMALL,
        "rounds": plan.putget_count,
        "results": {k: {"us_per_putget": summary(t * 1e6 for t in v)} for k, v in per_round.items()},
    }


# ---- zero copy: the producer's close to the consumer's view ----

ZEROCOPY_PEERS = {
    "tfem-checked": "tfem, checked",
    "tfem-unchecked": "tfem, unchecked (checksum=False)",
    "mmap": "/dev/shm file, mmap on both sides",
}
FILL_CHUNK = 16 * M


def _fill(view: memoryview, seq: int) -> None:
    """The bytes make_payload(len(view)) would hold, stamped with `seq`,
    copied in FILL_CHUNK at a time (no second buffer of the whole size)."""
    chunk = memoryview(make_payload(min(len(view), FILL_CHUNK)))
    for offset in range(0, len(view), len(chunk)):
        n = min(len(chunk), len(view) - offset)
        view[offset:offset + n] = chunk[:n]
    view[:8] = seq.to_bytes(8, "little")


def _zerocopy_client(variant: str, where: str) -> Any:
    """A tfem client for the tfem variants (`where` is the key file), None
    for the mmap peer (`where` is its directory)."""
    if variant == "mmap":
        return None
    import tfem

    return tfem.connect(where)


def _zerocopy_producer(conn: Any, variant: str, where: str, published: tuple[int, int], size: int) -> None:
    """("fill", name, seq): make the file and fill it in place (not timed);
    then ("publish",): the time just before close, which publishes it."""
    os.close(published[0])
    client = _zerocopy_client(variant, where)
    conn.send("ready")
    for _, name, seq in orders(conn):
        if client is not None:
            f = client.create(name, size, checksum=variant == "tfem-checked")
            view = f.getbuffer()
            _fill(view, seq)
            view.release()
        else:
            fd = os.open(os.path.join(where, name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size) as mm:
                with memoryview(mm) as view:
                    _fill(view, seq)
        conn.send("filled")
        conn.recv()  # ("publish",)
        t0 = time.monotonic_ns()
        if client is not None:
            f.close()
        else:
            os.close(fd)
            os.write(published[1], b"p")
        conn.send(t0)
    if client is not None:
        client.close()


def _zerocopy_consumer(conn: Any, variant: str, where: str, published: tuple[int, int], size: int) -> None:
    """("get", name, seq): answers "waiting", waits for the file, takes a
    view of it, then answers the time it held the view and whether the
    bytes are the producer's."""
    os.close(published[1])
    client = _zerocopy_client(variant, where)
    conn.send("ready")
    for _, name, seq in orders(conn):
        conn.send("waiting")
        if client is not None:
            g = client.open(name, "r")
            view = g.getbuffer()
            t1 = time.monotonic_ns()
        else:
            if os.read(published[0], 1) != b"p":
                raise RuntimeError("the producer closed its end of the pipe")
            path = os.path.join(where, name)
            fd = os.open(path, os.O_RDONLY)
            mm = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
            view = memoryview(mm)
            t1 = time.monotonic_ns()
        ok = intact(view, size, seq)
        view.release()
        if client is not None:
            g.close()
        else:
            mm.close()
            os.close(fd)
            os.unlink(path)
        conn.send((t1, ok))
    if client is not None:
        client.close()


def _zerocopy_run(ctx: Context, variant: str, size: int, count: int) -> list[float]:
    """Milliseconds from the producer's close to the consumer's view, `count` times."""
    assert ctx.tfem is not None
    where = ctx.tmpfs_dir if variant == "mmap" else ctx.tfem.keyfile
    published = os.pipe()
    workers: list[Worker] = []
    samples = []
    try:
        try:
            for role, target in (("consumer", _zerocopy_consumer), ("producer", _zerocopy_producer)):
                workers.append(Worker(f"{variant} zero-copy {role}", target, variant, where, published, size))
        finally:
            os.close(published[0])
            os.close(published[1])
        consumer, producer = workers
        for w in workers:
            w.recv(120)
        for _ in range(count):
            name = f"zc-{pair_id()}"
            seq = len(samples) + 1
            if producer.call("fill", name, seq) != "filled" or consumer.call("get", name, seq) != "waiting":
                raise WorkerError(f"{variant}: zero-copy pair out of step")
            time.sleep(0.001)  # let the consumer settle into its wait
            producer.send("publish")
            t1, ok = consumer.recv()
            t0 = producer.recv()
            if not ok:
                raise WorkerError(f"{variant}: the consumer's view holds the wrong bytes (#{seq})")
            samples.append((t1 - t0) / 1e6)
    finally:
        for w in workers:
            w.stop()
    return samples


def zerocopy(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    size = plan.zerocopy_size
    ms: dict[str, list[float]] = {k: [] for k in ZEROCOPY_PEERS}
    for run in range(plan.repeats):
        for variant in rotated(list(ZEROCOPY_PEERS), run):
            ctx.log(f"zerocopy run {run + 1}/{plan.repeats}: {variant}, {size >> 20} MiB")
            ms[variant].append(median(_zerocopy_run(ctx, variant, size, plan.zerocopy_count)))
    return {
        "peers": ZEROCOPY_PEERS,
        "size": size,
        "count": plan.zerocopy_count,
        "results": {k: {"ms": summary(v)} for k, v in ms.items()},
    }


# ---- many small files: acknowledged pairs, and a stream ----


def _flow_producer(conn: Any, peer: Peer, channel: Any, credit_fds: tuple[int, int], prefix: str,
                   window: int, batch: int) -> None:
    os.close(credit_fds[1])
    credits = credit_fds[0]
    side = peer.producer(channel)
    try:
        data = memoryview(make_payload(SMALL))
        conn.send("ready")
        msg = first_order(conn)
        if msg is None:
            return
        _, start, end = msg
        sleep_until(start)
        sent = credited = 0
        while time.perf_counter() < end:
            while sent - credited >= window:
                credited += batch * len(os.read(credits, 4096))
            side.put(f"{prefix}{sent}", data)
            sent += 1
        side.put_end(f"{prefix}{sent}")
        conn.send(sent)
        conn.recv()  # stop
    finally:
        side.close()


def _flow_consumer(conn: Any, peer: Peer, channel: Any, credit_fds: tuple[int, int], prefix: str,
                   window: int, batch: int) -> None:
    os.close(credit_fds[0])
    credits = credit_fds[1]
    side = peer.consumer(channel)
    try:
        out = touched(SMALL)
        conn.send("ready")
        got_files = 0
        while True:
            got = side.get(f"{prefix}{got_files}", out)
            if got is None:
                break
            if len(got) != SMALL:
                raise RuntimeError(f"file {got_files} has {len(got)} bytes, not {SMALL}")
            got_files += 1
            if got_files % batch == 0:
                os.write(credits, b"c")
        conn.send((got_files, time.perf_counter()))
        conn.recv()  # stop
    finally:
        side.close()


def flow(peer: Peer, pairs: int, seconds: float, window: int, batch: int) -> float:
    """Files per second through `pairs` producer/consumer pairs, all of them
    running from one start time for `seconds`."""
    workers: list[Worker] = []
    try:
        for _ in range(pairs):
            pid = pair_id()
            channel = peer.channel(pid)
            credit_fds = os.pipe()
            try:
                for role, target in (("consumer", _flow_consumer), ("producer", _flow_producer)):
                    workers.append(Worker(f"{peer.key} {role}", target, peer, channel, credit_fds,
                                          f"{pid}-", window, batch))
            finally:
                peer.close_channel(channel)
                os.close(credit_fds[0])
                os.close(credit_fds[1])
        for w in workers:
            w.recv(120)
        start = time.perf_counter() + 0.1 + 0.01 * len(workers)
        producers = workers[1::2]
        for w in producers:
            w.send("go", start, start + seconds)
        sent = sum(w.recv(seconds + 300) for w in producers)
        ends = [w.recv(300) for w in workers[0::2]]
        done = sum(n for n, _ in ends)
        if done != sent:
            raise WorkerError(f"{peer.key}: {sent} files sent, {done} received")
        return done / (max(t for _, t in ends) - start)
    finally:
        for w in workers:
            w.stop()


def pairs(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    keys = ctx.peers(PAIRS_PEERS)
    rates: dict[str, dict[int, list[float]]] = {k: {n: [] for n in plan.pairs} for k in keys}
    for run in range(plan.repeats):
        for n in plan.pairs:
            for key in rotated(keys, run):
                ctx.log(f"pairs run {run + 1}/{plan.repeats}: {n} x {key}")
                rates[key][n].append(flow(ctx.peer(key), n, plan.seconds, window=1, batch=1))
    return {
        "peers": {k: ctx.peer(k).label for k in keys},
        "pairs": plan.pairs,
        "file_size": SMALL,
        "seconds": plan.seconds,
        "results": {k: {str(n): {"files_per_s": summary(v)} for n, v in r.items()} for k, r in rates.items()},
    }


def stream(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    keys = ctx.peers(PAIRS_PEERS)
    rates: dict[str, list[float]] = {k: [] for k in keys}
    for run in range(plan.repeats):
        for key in rotated(keys, run):
            ctx.log(f"stream run {run + 1}/{plan.repeats}: {key}")
            rates[key].append(flow(ctx.peer(key), 1, plan.seconds, window=WINDOW, batch=CREDIT))
    return {
        "peers": {k: ctx.peer(k).label for k in keys},
        "file_size": SMALL,
        "window": WINDOW,
        "credit": CREDIT,
        "seconds": plan.seconds,
        "results": {k: {"files_per_s": summary(v)} for k, v in rates.items()},
    }


# ---- spill: more than the arena, against raw LMDB ----


def _lmdb_open(path: str, map_size: int) -> Any:
    import lmdb

    return lmdb.open(path, map_size=map_size, sync=False, metasync=False, max_dbs=0)


SPILL_CODECS = ["none", "lz4", "zstd"]  # --spill-compress
SPILL_DATA = {"compressible": "CSV-like text rows of numbers and a few names", "random": "random bytes"}


def spill_payload(data: str, size: int) -> bytearray:
    """What a spill writer writes: "pattern", the fixed pattern of the
    other workloads; for the compression runs, "compressible" (CSV-like
    rows, which lz4 shrinks to about 0.6 and zstd to about 0.35) or
    "random" (which neither can shrink: stored raw)."""
    if data == "pattern":
        return make_payload(size)
    rng = random.Random(f"spill {data}")
    if data == "random":
        return bytearray(rng.randbytes(size))
    names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rows, n = [], 0
    while n < size:
        row = f"{len(rows)},{rng.choice(names)},{rng.randint(0, 10**6)},{rng.gauss(0, 1):.6f},{rng.random() < 0.5}\n"
        rows.append(row)
        n += len(row)
    return bytearray("".join(rows).encode()[:size])


def _spill_intact(got: Any, payload: bytearray, seq: int) -> bool:
    """As intact(), for a payload of spill_payload()."""
    size = len(payload)
    if len(got) != size:
        return False
    if size < 128:
        return True
    return bytes(got[:8]) == seq.to_bytes(8, "little") and bytes(got[8:64]) == payload[8:64] \
        and bytes(got[-64:]) == payload[-64:]


def _spill_side(conn: Any, role: str, kind: str, where: str, count: int, size: int, data: str = "pattern") -> None:
    """Write (role "w") or read back ("r") `count` files of `size` bytes
    (of spill_payload(data)) through tfem (`where` a key file) or LMDB
    (`where` a directory)."""
    client = None
    if kind == "tfem":
        import tfem

        client = tfem.connect(where)
    payload = None if data == "pattern" else spill_payload(data, size)
    if role == "w":
        buf = make_payload(size) if payload is None else bytearray(payload)
    else:
        buf = touched(size)
    view = memoryview(buf)
    conn.send("ready")
    if conn.recv()[0] == "stop":
        return
    env = _lmdb_open(where, 4 * count * size + (64 << 20)) if kind == "lmdb" else None
    bad = 0
    t0 = time.perf_counter()
    for i in range(count):
        name = f"spill-{i}"
        if role == "w":
            stamp(buf, i)
            if client is not None:
                with client.open(name, "w") as f:
                    f.write(view)
            else:
                with env.begin(write=True) as txn:
                    txn.put(name.encode(), view)
        else:
            if client is not None:
                with client.open(name, "r", timeout=60) as f:
                    n = f.readinto(view)
            else:
                with env.begin(buffers=True) as txn:
                    value = txn.get(name.encode())
                    n = len(value)
                    view[:n] = value
                    del value
            bad += not (intact(view[:n], size, i) if payload is None else _spill_intact(view[:n], payload, i))
    t1 = time.perf_counter()
    if env is not None:
        env.close()
    if client is not None:
        client.close()
    conn.send((t0, t1, bad))
    conn.recv()


def _spill_round(what: str, kind: str, where: str, count: int, size: int, data: str,
                 after_write: Callable[[], None]) -> tuple[float, float]:
    """Write `count` files of `size` bytes, then read them back, each in a
    process of its own (`_spill_side`); `after_write` runs between. The
    seconds each took."""
    writer = Worker(f"{what} spill writer", _spill_side, "w", kind, where, count, size, data)
    reader = Worker(f"{what} spill reader", _spill_side, "r", kind, where, count, size, data)
    try:
        writer.recv(120)
        reader.recv(120)
        w0, w1, _ = writer.call("go", timeout=600)
        after_write()
        r0, r1, bad = reader.call("go", timeout=600)
        if bad:
            raise WorkerError(f"{what}: {bad} files read back with wrong bytes")
    finally:
        writer.stop()
        reader.stop()
    return w1 - w0, r1 - r0


def _record(phases: dict[str, list[float]], write_s: float, read_s: float) -> None:
    phases["write"].append(write_s)
    phases["read"].append(read_s)
    phases["total"].append(write_s + read_s)


def spill(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    arena, size = plan.spill_arena, plan.spill_file
    count = 4 * arena // size
    instance = ctx.services.tfem("spill", "--memory", str(arena), "--slots", str(max(1024, 2 * count)))
    times: dict[str, dict[str, list[float]]] = {k: {"write": [], "read": [], "total": []} for k in ("tfem", "lmdb")}
    spilled: list[int] = []
    try:
        for run in range(plan.repeats):
            for kind in rotated(["tfem", "lmdb"], run):
                ctx.log(f"spill run {run + 1}/{plan.repeats}: {kind}")
                where = instance.keyfile if kind == "tfem" else ctx.services.subdir(f"lmdb-{run}")
                after_write = (lambda: spilled.append(int(instance.status()["spilled_bytes"]))) if kind == "tfem" \
                    else (lambda: None)
                try:
                    _record(times[kind], *_spill_round(kind, kind, where, count, size, "pattern", after_write))
                finally:
                    if kind == "lmdb":
                        import shutil

                        shutil.rmtree(where, ignore_errors=True)
        left = instance.status()
    finally:
        ctx.services.release(instance)
    total = count * size
    try:
        compression = _spill_compression(ctx, count, size)
    except Exception:  # the rows above stand without it
        compression = {"error": traceback.format_exc()}
        ctx.log(f"spill compression FAILED:\n{compression['error']}")
    return {
        "arena": arena,
        "file_size": size,
        "files": count,
        "bytes": total,
        "tfem_spilled_bytes_after_write": summary(spilled),
        "tfem_files_left": left["slots_used"],
        "results": {k: {f"{phase}_gbps": summary(total / t / 1e9 for t in v) for phase, v in ph.items()}
                    | {"total_s": summary(ph["total"])} for k, ph in times.items()},
        "compression": compression,
    }


def _spill_tidied(instance: TfemInstance, timeout: float = 60.0) -> None:
    """Wait until the store holds nothing: the last run's consumed files'
    records deleted (the broker tidies every few tens of ms), so that its
    raw bytes after writing are this run's alone."""
    deadline = time.monotonic() + timeout
    while True:
        status = instance.status()
        if status["slots_used"] == 0 and status["spill_store"]["raw_bytes"] == 0:
            return
        if time.monotonic() > deadline:
            raise WorkerError(f"the spill store still holds {status['spill_store']['raw_bytes']} bytes")
        time.sleep(0.1)


def _spill_compression(ctx: Context, count: int, size: int) -> dict[str, Any]:
    """The spill pattern through an instance per --spill-compress codec,
    on compressible and on random data; codecs and data interleaved."""
    plan = ctx.plan
    instances: dict[str, TfemInstance] = {}
    times: dict[str, dict[str, dict[str, list[float]]]] = {
        d: {c: {"write": [], "read": [], "total": []} for c in SPILL_CODECS} for d in SPILL_DATA}
    ratios: dict[str, dict[str, list[float]]] = {d: {c: [] for c in SPILL_CODECS} for d in SPILL_DATA}
    try:
        for codec in SPILL_CODECS:
            instances[codec] = ctx.services.tfem(f"spill-{codec}", "--memory", str(plan.spill_arena), "--slots",
                                                 str(max(1024, 2 * count)), "--spill-compress", codec)
        for run in range(plan.repeats):
            for codec in rotated(SPILL_CODECS, run):
                for data in rotated(list(SPILL_DATA), run):
                    ctx.log(f"spill compression run {run + 1}/{plan.repeats}: {codec}, {data}")
                    instance = instances[codec]
                    _spill_tidied(instance)

                    def after_write(data: str = data, codec: str = codec, instance: TfemInstance = instance) -> None:
                        status = instance.status()
                        raw = status["spill_store"]["raw_bytes"]
                        if raw:
                            ratios[data][codec].append(status["spilled_bytes"] / raw)

                    _record(times[data][codec], *_spill_round(f"{codec}, {data}", "tfem", instance.keyfile, count, size,
                                                             data, after_write))
    finally:
        for instance in instances.values():
            ctx.services.release(instance)
    total = count * size
    return {
        "codecs": SPILL_CODECS,
        "data": SPILL_DATA,
        "results": {d: {c: {f"{phase}_gbps": summary(total / t / 1e9 for t in v) for phase, v in ph.items()}
                        | {"stored_to_raw": summary(ratios[d][c])} for c, ph in by_codec.items()}
                    for d, by_codec in times.items()},
    }


# ---- the pipeline example ----


def pipeline(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    assert ctx.tfem is not None
    script = os.path.join(ROOT, "examples", "pipeline.py")
    args = ["--workers", str(plan.pipeline_workers), "--parts", str(plan.pipeline_parts),
            "--part-size", str(plan.pipeline_part_size), "--json"]
    seconds: dict[str, list[float]] = {"tfem": [], "tmpfs": []}
    for run in range(plan.repeats):
        for key in rotated(["tfem", "tmpfs"], run):
            ctx.log(f"pipeline run {run + 1}/{plan.repeats}: {key}")
            backend = "tfem" if key == "tfem" else ctx.services.tempdir("/dev/shm", "pipeline")
            done = subprocess.run([sys.executable, script, "--backend", backend, *args], env=ctx.tfem.env,
                                  capture_output=True, text=True, timeout=600)
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"examples/pipeline.py --backend {backend} failed "
                                   f"({done.returncode}):\n{done.stdout}\n{done.stderr}")
            result = json.loads(lines[-1])
            if not result["ok"]:
                raise RuntimeError(f"examples/pipeline.py --backend {backend}: wrong checksum")
            seconds[key].append(result["seconds"])
    total = plan.pipeline_parts * plan.pipeline_part_size
    return {
        "workers": plan.pipeline_workers,
        "parts": plan.pipeline_parts,
        "part_size": plan.pipeline_part_size,
        "bytes": total,
        "peers": {"tfem": "tfem", "tmpfs": "tmpfs files (/dev/shm)"},
        "results": {k: {"seconds": summary(v), "gbps": summary(total / s / 1e9 for s in v)}
                    for k, v in seconds.items()},
    }


# ---- memory ----


def broker_memory(instance: TfemInstance) -> dict[str, Any]:
    """The broker's resident memory, and the part of it that is the segment."""
    status = instance.status()
    pid = int(status["broker_pid"])
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return {"pid": pid, **fields, "rss_without_shmem": fields["VmRSS"] - fields["RssShmem"],
            "status": status}


def segment_metadata(status: dict[str, Any]) -> dict[str, Any]:
    """Segment bytes per slot that are not the slot's inline buffer, from
    `tfem status --json` and the layout code that sized the segment."""
    from tfem._native import ffi
    from tfem.segment import Layout

    slots, buf = int(status["slots_total"]), int(status["buf_size"])
    layout = Layout(slots, buf, int(status["block_size"]), int(status["arena_bytes_total"]))
    actual = os.stat(f"/dev/shm{status['segment']}").st_size
    record = layout.slot_size - buf  # the slot record plus its padding to a cache line
    index = 4 * layout.index_size / slots  # name-index entries per slot
    free_stack = 4
    life = int(ffi.sizeof("struct tfem_life"))  # its lifetime counts, beside the slot
    # Everything before the arena that is not an inline buffer, per slot:
    # header, slot records, index, free stack, block bitmap, page rounding.
    amortised = (layout.arena_offset - slots * buf) / slots
    return {
        "slots": slots,
        "buf_size": buf,
        "segment_bytes": actual,
        "layout_bytes": layout.size,
        "slot_struct_bytes": int(ffi.sizeof("struct tfem_slot")),
        "slot_record_bytes": record,
        "index_bytes_per_slot": index,
        "free_stack_bytes_per_slot": free_stack,
        "life_bytes_per_slot": life,
        "per_held_file": record + index + free_stack + life,
        "per_slot_amortised": amortised,
    }


def memory(ctx: Context) -> dict[str, Any]:
    assert ctx.tfem is not None
    now = broker_memory(ctx.tfem)
    status = now.pop("status")
    return {
        "broker_at_start": ctx.notes.get("broker_at_start"),
        "broker_now": now,
        "metadata": segment_metadata(status),
    }
