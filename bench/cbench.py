"""The C part: what a call into libtfem costs, and a large handoff from C.

The programs in bench/c/ are compiled with gcc and the flags of
`tfem config --cflags --libs` into a temporary directory, and run against
the benchmark's instance:

- callcost: ns per pair of calls, tfem_lseek + a 1-byte tfem_read on an
  open reader, against lseek + read(2) on a /dev/shm file, in the same
  program.
- handoff: a C producer writes SIZE bytes with one tfem_write and a C
  consumer, already waiting in tfem_open, reads them with one tfem_read;
  against write(2)/read(2) of a /dev/shm file whose name goes down a pipe.
  Timed from the producer's open to the consumer's close (and unlink), as
  the Python handoff workload.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any

from .procs import die_with_parent
from .services import TFEM
from .stats import median, summary
from .workloads import Context, memcpy_gbps, rotated

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAMS = ("callcost", "handoff")


def _die_with_parent() -> None:
    die_with_parent(signal.SIGKILL)


def build(where: str) -> dict[str, str]:
    flags = subprocess.run([*TFEM, "config", "--cflags", "--libs"], capture_output=True, text=True,
                           check=True).stdout
    built = {}
    for name in PROGRAMS:
        target = os.path.join(where, name)
        subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", target, os.path.join(HERE, "c", f"{name}.c"),
                        *shlex.split(flags)], check=True, capture_output=True, text=True)
        built[name] = target
    return built


class _Program:
    """A C program answering on stdout, one line per command on stdin."""

    def __init__(self, argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> None:
        self.process = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, bufsize=1, pass_fds=pass_fds,
                                        preexec_fn=_die_with_parent)

    def line(self) -> str:
        out = self.process.stdout
        assert out is not None
        text = out.readline()
        if not text:
            self.process.wait(10)
            raise RuntimeError(f"{self.process.args[0]} exited ({self.process.returncode})")
        return text.strip()

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        p = self.process
        if p.stdin:
            try:
                p.stdin.close()
            except OSError:
                pass
        try:
            p.wait(5)  # a consumer still waiting in tfem_open never sees the end of stdin
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stdout:
            p.stdout.close()


def _c_handoffs(programs: dict[str, str], backend: str, size: int, count: int, env: dict[str, str],
                directory: str) -> list[float]:
    fds: tuple[int, ...] = ()
    read_fd = write_fd = -1
    if backend == "file":
        read_fd, write_fd = os.pipe()
        fds = (read_fd, write_fd)
    try:
        argv = [programs["handoff"], "consume", backend, str(size)]
        consumer = _Program(argv + ([directory, str(read_fd)] if fds else []), env, fds)
        try:
            producer = _Program([programs["handoff"], "produce", backend, str(size)]
                                + ([directory, str(write_fd)] if fds else []), env, fds)
        except BaseException:
            consumer.stop()
            raise
    finally:
        if fds:
            os.close(read_fd)
            os.close(write_fd)
    samples = []
    try:
        for p in (consumer, producer):
            if p.line() != "started":
                raise RuntimeError("the C handoff program did not start")
        for i in range(count):
            name = f"c-{os.getpid()}-{backend}-{time.monotonic_ns()}-{i}"
            consumer.send(name)
            if consumer.line() != "waiting":
                raise RuntimeError("the C consumer is out of step")
            time.sleep(0.001)
            producer.send(name)
            t1, verdict = consumer.line().split()
            t0 = producer.line()
            if verdict != "ok":
                raise RuntimeError(f"the C consumer got wrong bytes through {backend}")
            samples.append(float(t1) - float(t0))
    finally:
        producer.stop()
        consumer.stop()
    return samples


def c_workload(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    assert ctx.tfem is not None
    where = ctx.services.subdir("c")
    programs = build(where)
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/"), "TFEM_KEYFILE": ctx.tfem.keyfile}

    calls: dict[str, list[float]] = {"tfem": [], "file": []}
    for run in range(plan.repeats):
        ctx.log(f"C call cost run {run + 1}/{plan.repeats}")
        path = os.path.join(ctx.tmpfs_dir, f"callcost-{run}")
        done = subprocess.run([programs["callcost"], str(plan.call_iterations), "3", f"callcost-{os.getpid()}-{run}",
                               path], env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"callcost failed ({done.returncode}): {done.stderr}")
        rounds = [line.split() for line in done.stdout.splitlines()]
        calls["tfem"].append(median(float(r[1]) for r in rounds))
        calls["file"].append(median(float(r[3]) for r in rounds))

    size = plan.c_size
    lat: dict[str, list[float]] = {"tfem": [], "file": []}
    memcpy: list[float] = []
    for run in range(plan.repeats):
        memcpy.append(memcpy_gbps(size, samples=3))
        for backend in rotated(["tfem", "file"], run):
            ctx.log(f"C handoff run {run + 1}/{plan.repeats}: {backend}, {size >> 20} MiB")
            lat[backend].append(median(_c_handoffs(programs, backend, size, plan.c_count, env, ctx.tmpfs_dir)))
    return {
        "pair_ns": {k: summary(v) for k, v in calls.items()},
        "call_iterations": plan.call_iterations,
        "handoff_size": size,
        "handoff": {k: {"seconds": summary(v), "gbps": summary(size / t / 1e9 for t in v)} for k, v in lat.items()},
        "memcpy_gbps": summary(memcpy),
        "peers": {"tfem": "tfem from C", "file": "/dev/shm file from C (write/read)"},
        "compiler": subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
        "python": sys.version.split()[0],
    }
