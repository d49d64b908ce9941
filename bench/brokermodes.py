"""Broker modes: where the broker does its disk work, measured three ways.

The broker runs disk work (spilling to make room, spill writes, tidying)
in its request loop ("sync"), on its worker thread ("async"), or switches
between the two by load ("adaptive", the default): `tfem up
--broker-mode`. Each part below runs one tfem instance per mode, the
modes interleaved within a run (the order rotates from run to run), and
reports the median over the runs.

- during a spill: one process writes a large file (plan.broker_big_file,
  in 16 MiB writes) through a small arena (plan.broker_arena), so nearly
  all of it goes to the spill store through the broker. Meanwhile a
  second process asks, over and over with a 1 ms pause: STATS, HELLO, and
  a write of a 256 KiB file, keeping its last 300 files, so that once the
  arena is full each of its writes needs room from the broker (an ALLOC
  that evicts its oldest file). Each request's answer time is taken in
  the second process around the request itself (the client's call); only
  requests that started while the large file was being written count.
- light load: one process, nothing else: round trips of a small file
  larger than a tiny arena, so each one spills (ALLOC, SPILL_WRITE: every
  request one small disk job; the consumer reads from the store itself);
  round trips per second.
- burst: more busy processes than CPUs (plan.broker_burst_writers), each
  writing plan.broker_burst_files files of plan.broker_burst_file_size
  through a small arena, all from one start time: seconds until the last
  one is done.

Times are time.perf_counter(), CLOCK_MONOTONIC, one clock for every process.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .plan import M
from .procs import Worker, WorkerError, first_order, sleep_until
from .services import TfemInstance
from .stats import quantile, summary
from .workloads import Context, make_payload, rotated

MODES = ("adaptive", "sync", "async")
OPS = ("stats", "hello", "alloc")
WRITE_CHUNK = 16 * M
PROBE_FILE = 256 << 10
PROBE_KEEP = 300  # files the prober keeps: more than the arena holds, so its writes need ALLOC
PROBE_PAUSE_S = 0.001
LIGHT_FILE = 512 << 10  # past the light instance's arena: spilled at once
LIGHT_ARENA = ("--memory", "256K", "--block-size", "4K", "--buf-size", "1K")


def _client(keyfile: str) -> Any:
    import tfem

    return tfem.connect(keyfile)


# ---- during a spill ----


def _big_writer(conn: Any, keyfile: str, size: int) -> None:
    """("go", name): write `name` (`size` bytes), close it, answer (t0, t1);
    then remove it."""
    client = _client(keyfile)
    chunk = memoryview(make_payload(WRITE_CHUNK))
    conn.send("ready")
    while (msg := first_order(conn)) is not None:
        name = msg[1]
        t0 = time.perf_counter()
        with client.open(name, "w") as f:
            for offset in range(0, size, WRITE_CHUNK):
                f.write(chunk[: min(WRITE_CHUNK, size - offset)])
        t1 = time.perf_counter()
        client.unlink(name)
        conn.send((t0, t1))
    client.close()


def _prober(conn: Any, keyfile: str, prefix: str) -> None:
    """("go",): ask STATS, HELLO, and write a file that needs room, over
    and over, until the next message; answer {op: [(started, seconds)]}
    (ALLOC only when the write asked for one)."""
    from tfem.protocol import Op

    client = _client(keyfile)
    samples: dict[str, list[tuple[float, float]]] = {op: [] for op in OPS}
    call = client.call

    def timed(op: Op, args: dict[str, Any], data: Any = None) -> Any:
        t = time.perf_counter()
        reply = call(op, args, data)
        if op.value in samples:
            samples[op.value].append((t, time.perf_counter() - t))
        return reply

    client.call = timed  # every request the client makes (its files' ALLOCs too), timed
    data = memoryview(make_payload(PROBE_FILE))
    kept: list[str] = []
    serial = 0
    conn.send("ready")
    while first_order(conn) is not None:
        for op in OPS:
            samples[op].clear()
        while not conn.poll(0):
            client.stats()
            client.call(Op.HELLO, {"pid": os.getpid()})
            name = f"{prefix}{serial}"
            serial += 1
            with client.open(name, "w") as f:
                f.write(data)
            kept.append(name)
            if len(kept) > PROBE_KEEP:
                client.unlink(kept.pop(0))
            time.sleep(PROBE_PAUSE_S)
        conn.recv()  # ("done",)
        conn.send({op: list(v) for op, v in samples.items()})
    client.close()


def _during_spill_run(inst: TfemInstance, run: int, size: int) -> dict[str, Any]:
    writer = Worker("broker-mode big writer", _big_writer, inst.keyfile, size)
    prober = Worker("broker-mode prober", _prober, inst.keyfile, f"probe-{run}-")
    try:
        writer.recv(120)
        prober.recv(120)
        prober.send("go")
        time.sleep(0.05)  # the prober under way before the spill starts
        t0, t1 = writer.call("go", f"big-{run}", timeout=600)
        prober.send("done")
        samples = prober.recv(120)
    finally:
        writer.stop()
        prober.stop()
    out: dict[str, Any] = {"spill_s": t1 - t0}
    for op in OPS:
        lat = [dt for started, dt in samples[op] if t0 <= started <= t1]
        out[op] = {"n": len(lat), "p50_ms": quantile(lat, 0.5) * 1e3 if lat else None,
                   "p99_ms": quantile(lat, 0.99) * 1e3 if lat else None,
                   "max_ms": max(lat) * 1e3 if lat else None}
    return out


# ---- light load ----


def _light(conn: Any, keyfile: str, rounds: int) -> None:
    """("go", prefix): `rounds` spilled round trips; answer the seconds."""
    client = _client(keyfile)
    data = memoryview(make_payload(LIGHT_FILE))
    out = bytearray(LIGHT_FILE)
    conn.send("ready")
    while (msg := first_order(conn)) is not None:
        prefix = msg[1]
        t0 = time.perf_counter()
        for i in range(rounds):
            name = f"{prefix}{i}"
            with client.open(name, "w") as f:
                f.write(data)
            with client.open(name, "r") as f:
                n = f.readinto(out)
            if n != LIGHT_FILE or out[:64] != data[:64]:
                raise RuntimeError(f"{name}: read back {n} bytes, or the wrong ones")
        conn.send(time.perf_counter() - t0)
    client.close()


# ---- burst ----


def _burst_writer(conn: Any, keyfile: str, files: int, size: int) -> None:
    """("go", prefix, start): at `start`, write `files` files of `size`
    bytes; answer the time the last was closed; then remove them."""
    client = _client(keyfile)
    data = memoryview(make_payload(min(size, WRITE_CHUNK)))
    conn.send("ready")
    while (msg := first_order(conn)) is not None:
        _, prefix, start = msg
        sleep_until(start)
        for i in range(files):
            with client.open(f"{prefix}{i}", "w") as f:
                for offset in range(0, size, len(data)):
                    f.write(data[: min(len(data), size - offset)])
        conn.send(time.perf_counter())
        for i in range(files):
            client.unlink(f"{prefix}{i}")
    client.close()


def _burst_run(inst: TfemInstance, run: int, writers: int, files: int, size: int) -> float:
    workers = [Worker(f"broker-mode burst writer {k}", _burst_writer, inst.keyfile, files, size)
               for k in range(writers)]
    try:
        for w in workers:
            w.recv(120)
        start = time.perf_counter() + 0.2
        for k, w in enumerate(workers):
            w.send("go", f"burst-{run}-{k}-", start)
        return max(w.recv(600) for w in workers) - start
    finally:
        for w in workers:
            w.stop()


# ---- the workload ----


def _instances(ctx: Context, part: str, *options: str) -> dict[str, TfemInstance]:
    return {mode: ctx.services.tfem(f"broker-{part}-{mode}", *options, "--broker-mode", mode) for mode in MODES}


def _release(ctx: Context, instances: dict[str, TfemInstance]) -> dict[str, Any]:
    """Stop them; what each said of its mode at the end."""
    said = {}
    for mode, inst in instances.items():
        try:
            said[mode] = inst.status()["broker_mode"]
        except Exception as exc:  # its figures stand without it
            said[mode] = {"error": str(exc)}
        ctx.services.release(inst)
    return said


def broker(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    modes = list(MODES)
    results: dict[str, Any] = {mode: {} for mode in MODES}
    ends: dict[str, Any] = {}

    # (a) answers during a spill
    spill: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    instances = _instances(ctx, "spill", "--memory", str(plan.broker_arena))
    try:
        for run in range(plan.repeats):
            for mode in rotated(modes, run):
                ctx.log(f"broker run {run + 1}/{plan.repeats}: {mode}, answers while "
                        f"{plan.broker_big_file >> 20} MiB spill")
                got = _during_spill_run(instances[mode], run, plan.broker_big_file)
                spill[mode].setdefault("spill_s", []).append(got["spill_s"])
                for op in OPS:
                    for key in ("p50_ms", "p99_ms", "max_ms", "n"):
                        if got[op][key] is not None:
                            spill[mode].setdefault(f"{op}_{key}", []).append(got[op][key])
    finally:
        ends["spill"] = _release(ctx, instances)

    # (b) light load
    light: dict[str, list[float]] = {m: [] for m in MODES}
    instances = _instances(ctx, "light", *LIGHT_ARENA)
    workers: dict[str, Worker] = {}
    try:
        for mode, inst in instances.items():
            workers[mode] = Worker(f"broker-mode light {mode}", _light, inst.keyfile, plan.broker_light_rounds)
            workers[mode].recv(120)
        for run in range(plan.repeats):
            for mode in rotated(modes, run):
                ctx.log(f"broker run {run + 1}/{plan.repeats}: {mode}, light load")
                seconds = workers[mode].call("go", f"light-{run}-", timeout=600)
                light[mode].append(plan.broker_light_rounds / seconds)
    finally:
        for w in workers.values():
            w.stop()
        ends["light"] = _release(ctx, instances)

    # (c) a burst of spills, more writers than CPUs
    burst: dict[str, list[float]] = {m: [] for m in MODES}
    instances = _instances(ctx, "burst", "--memory", str(plan.broker_burst_arena))
    try:
        for run in range(plan.repeats):
            for mode in rotated(modes, run):
                ctx.log(f"broker run {run + 1}/{plan.repeats}: {mode}, burst of {plan.broker_burst_writers} writers")
                burst[mode].append(_burst_run(instances[mode], run, plan.broker_burst_writers,
                                              plan.broker_burst_files, plan.broker_burst_file_size))
    finally:
        ends["burst"] = _release(ctx, instances)

    for mode in MODES:
        results[mode] = {
            "during_spill": {key: summary(v) for key, v in spill[mode].items()},
            "light_round_trips_per_s": summary(light[mode]),
            "burst_s": summary(burst[mode]),
        }
        if not burst[mode] or not light[mode]:
            raise WorkerError(f"broker: no figures for {mode}")
    return {
        "modes": list(MODES),
        "arena": plan.broker_arena,
        "big_file": plan.broker_big_file,
        "probe_file": PROBE_FILE,
        "light_file": LIGHT_FILE,
        "light_rounds": plan.broker_light_rounds,
        "burst": {"writers": plan.broker_burst_writers, "files": plan.broker_burst_files,
                  "file_size": plan.broker_burst_file_size, "arena": plan.broker_burst_arena,
                  "cpus": os.cpu_count()},
        "results": results,
        "mode_at_end": ends,
    }
