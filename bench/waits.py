"""Wait modes: what a waiting consumer costs, in latency and in CPU.

A tfem consumer waits for a name in one of three ways, chosen per process
with tfem.set_wait_mode() (or TFEM_WAIT at import): "adaptive" spins
while CPUs are idle and recent waits were short, and sleeps on the futex
at once otherwise; "spin" always spins (yielding) for the spin window
first; "sleep" sleeps on the futex at once. A spin saves the kernel's
wake-up, and burns CPU that a loaded machine needs elsewhere: the figures
are taken with nothing else running and under load, 2 x CPUs + 1 busy
processes, in the same run, with tmpfs files (the name down a pipe, the
consumer asleep in read(2)) as the peer.

Each measurement is one producer and one consumer process handing 4 KiB
files over on their own, the consumer acknowledging each file (one byte
down a pipe) before the producer writes the next. Latency is from the
producer's open to the consumer's close, time.monotonic_ns() on both
sides (CLOCK_MONOTONIC, one clock for every process); CPU is user + sys
of both processes (getrusage in each) over the counted handoffs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

from .peers import Peer
from .procs import Worker, WorkerError, die_with_parent, first_order
from .stats import median, summary
from .workloads import SMALL, Context, make_payload, pair_id, rotated, touched

MODES = ("adaptive", "spin", "sleep")
KEYS = [*MODES, "tmpfs"]
WARMUP = 50  # handoffs not counted, so that adaptive's average of recent waits has settled
SETTLE_S = 0.5  # for the busy processes to start before anything is measured


def busy_processes() -> int:
    return 2 * (os.cpu_count() or 1) + 1


@contextlib.contextmanager
def busy(n: int) -> Iterator[None]:
    """`n` processes spinning in Python while the block runs; killed at
    its end whatever happens, and by the kernel if the benchmark dies."""
    spinners: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(n):
            spinners.append(subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                                             preexec_fn=functools.partial(die_with_parent, signal.SIGKILL,
                                                                          os.getpid())))
        if spinners:
            time.sleep(SETTLE_S)
        yield
    finally:
        for p in spinners:
            p.kill()
        for p in spinners:
            p.wait()


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _spun_slept() -> tuple[int, int]:
    """This process's tfem waits so far: how many ended in the spin, how many slept."""
    from tfem._native import ffi, lib

    spun, slept = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    lib.tfem_wait_counters(spun, slept)
    return int(spun[0]), int(slept[0])


def _set_mode(mode: str | None) -> None:
    if mode is not None:
        import tfem

        tfem.set_wait_mode(mode)


def _producer(conn: Any, peer: Peer, channel: Any, acks: tuple[int, int], prefix: str, mode: str | None) -> None:
    """("go", count, seconds): WARMUP handoffs, then `count` more or as many
    as fit in `seconds`; answers the start time of each and its CPU seconds."""
    os.close(acks[1])
    _set_mode(mode)
    side = peer.producer(channel)
    try:
        data = memoryview(make_payload(SMALL))
        conn.send("ready")
        msg = first_order(conn)
        if msg is None:
            return
        _, count, seconds = msg
        starts: list[int] = []
        cpu0 = deadline = 0.0
        for i in range(WARMUP + count):
            if i == WARMUP:
                cpu0, deadline = _cpu_s(), time.monotonic() + seconds
            elif i > WARMUP and time.monotonic() >= deadline:
                break
            starts.append(time.monotonic_ns())
            side.put(f"{prefix}{i}", data)
            if os.read(acks[0], 1) != b"a":
                raise RuntimeError("the consumer closed the acknowledgement pipe")
        cpu = _cpu_s() - cpu0
        side.put_end(f"{prefix}{len(starts)}")
        conn.send((starts[WARMUP:], cpu))
        conn.recv()  # stop
    finally:
        side.close()


def _consumer(conn: Any, peer: Peer, channel: Any, acks: tuple[int, int], prefix: str, mode: str | None) -> None:
    """Takes files until the empty one; answers the end time of each, its
    CPU seconds, and (tfem) how many of its waits ended in the spin and
    how many slept, all over the counted handoffs."""
    os.close(acks[0])
    _set_mode(mode)
    side = peer.consumer(channel)
    try:
        out = touched(SMALL)
        conn.send("ready")
        if first_order(conn) is None:
            return
        ends: list[int] = []
        cpu0 = 0.0
        waits0 = (0, 0)
        i = 0
        while True:
            if i == WARMUP:
                cpu0 = _cpu_s()
                waits0 = _spun_slept() if mode else (0, 0)
            got = side.get(f"{prefix}{i}", out)
            if got is None:
                break
            ends.append(time.monotonic_ns())
            if len(got) != SMALL:
                raise RuntimeError(f"file {i} has {len(got)} bytes, not {SMALL}")
            del got
            os.write(acks[1], b"a")
            i += 1
        cpu = _cpu_s() - cpu0
        waits = _spun_slept() if mode else (0, 0)
        conn.send((ends[WARMUP:], cpu, waits[0] - waits0[0], waits[1] - waits0[1]))
        conn.recv()  # stop
    finally:
        side.close()


def acked_handoffs(peer: Peer, mode: str | None, count: int, seconds: float) -> dict[str, Any]:
    """One producer/consumer pair handing 4 KiB files over, each acknowledged:
    the median latency, the CPU per handoff and (tfem) the share of the
    consumer's waits that ended in the spin."""
    prefix = f"{pair_id()}-"
    channel = peer.channel(prefix)
    acks = os.pipe()
    workers: list[Worker] = []
    try:
        try:
            for role, target in (("consumer", _consumer), ("producer", _producer)):
                workers.append(Worker(f"{mode or peer.key} {role}", target, peer, channel, acks, prefix, mode))
        finally:
            peer.close_channel(channel)
            os.close(acks[0])
            os.close(acks[1])
        consumer, producer = workers
        for w in workers:
            w.recv(120)
        consumer.send("go")
        producer.send("go", count, seconds)
        starts, cpu_p = producer.recv(seconds + 300)
        ends, cpu_c, spun, slept = consumer.recv(60)
    finally:
        for w in workers:
            w.stop()
    if len(starts) != len(ends) or not starts:
        raise WorkerError(f"{peer.key}: {len(starts)} files counted by the producer, {len(ends)} by the consumer")
    return {
        "latency_us": median((b - a) / 1e3 for a, b in zip(starts, ends)),
        "cpu_us": (cpu_p + cpu_c) * 1e6 / len(starts),
        "spun": spun / (spun + slept) if spun + slept else None,
        "handoffs": len(starts),
    }


def waits(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    n = busy_processes()
    loads = {"light": 0, "loaded": n}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {load: {k: [] for k in KEYS} for load in loads}
    for run in range(plan.repeats):
        for load, spinners in loads.items():
            with busy(spinners):
                for key in rotated(KEYS, run):
                    ctx.log(f"waits run {run + 1}/{plan.repeats}: {key}, {'under' if spinners else 'light'} load")
                    peer = ctx.peer("tmpfs" if key == "tmpfs" else "tfem")
                    mode = None if key == "tmpfs" else key
                    runs[load][key].append(acked_handoffs(peer, mode, plan.waits_count, plan.waits_seconds))
    return {
        "peers": {**{m: f"tfem, {m}" for m in MODES}, "tmpfs": "tmpfs files (/dev/shm), name down a pipe"},
        "loads": {"light": "nothing else running", "loaded": f"{n} busy processes on {os.cpu_count()} CPUs"},
        "busy_processes": n,
        "file_size": SMALL,
        "count": plan.waits_count,
        "seconds": plan.waits_seconds,
        "warmup": WARMUP,
        "results": {load: {k: {"latency_us": summary(r["latency_us"] for r in v),
                               "cpu_us": summary(r["cpu_us"] for r in v),
                               "spun": summary(r["spun"] for r in v if r["spun"] is not None),
                               "handoffs": summary(r["handoffs"] for r in v)}
                           for k, v in by_key.items()}
                    for load, by_key in runs.items()},
    }
