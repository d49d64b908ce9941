"""python -m bench: run the benchmarks and write the report."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

from . import procs, report, workloads
from .brokermodes import broker
from .cbench import c_workload
from .cluster import cluster
from .plan import WORKLOADS, make_plan
from .services import Services, redis_version
from .waits import waits
from .workloads import Context, broker_memory

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNERS = {
    "handoff": workloads.handoff,
    "putget": workloads.putget,
    "zerocopy": workloads.zerocopy,
    "pairs": workloads.pairs,
    "stream": workloads.stream,
    "waits": waits,
    "pipeline": workloads.pipeline,
    "c": c_workload,
    "memory": workloads.memory,
    "spill": workloads.spill,
    "broker": broker,
    "cluster": cluster,
}
NEEDS_TFEM = {"handoff", "putget", "zerocopy", "pairs", "stream", "waits", "pipeline", "c", "memory"}
NEEDS_REDIS = {"handoff", "pairs", "stream"}  # the host's redis-server
NEEDS_REDIS_SERVER = NEEDS_REDIS | {"cluster"}  # cluster starts its own, in a node


def _size(text: str) -> int:
    from tfem.config import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark tfem against its peers: "
                                "tmpfs and local-disk files, multiprocessing.shared_memory, Redis, LMDB; across two "
                                "simulated nodes, raw pyzmq and Redis over TCP.")
    p.add_argument("--quick", action="store_true", help="a small smoke run (small sizes, few repeats; < 1 min)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), metavar="DIR",
                   help="where to write latest.json, latest.md and the plots (default bench/results)")
    p.add_argument("--repeats", type=int, metavar="N", help="runs per figure (default 3; 2 with --quick)")
    p.add_argument("--only", nargs="+", choices=WORKLOADS, metavar="WORKLOAD",
                   help=f"run only these workloads: {', '.join(WORKLOADS)}")
    p.add_argument("--sizes", nargs="+", type=_size, metavar="SIZE",
                   help="handoff sizes instead of the plan's (e.g. 4K 1G), for a look at one size")
    p.add_argument("--no-redis", action="store_true",
                   help="leave the Redis peers out (where redis-server is not installed; the report says so)")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def _git() -> str:
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{' + local changes' if dirty else ''}" if head else "unknown"
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def missing(selected: list[str], redis: bool) -> list[str]:
    """What the selected workloads need and this machine lacks."""
    lacks = []
    if redis and NEEDS_REDIS_SERVER & set(selected):
        if shutil.which("redis-server") is None:
            lacks.append("redis-server on PATH (Debian: apt-get install redis-server)")
        if importlib.util.find_spec("redis") is None:
            lacks.append("the redis package (pip install '.[bench]')")
    if "c" in selected and shutil.which("gcc") is None:
        lacks.append("gcc")
    if "cluster" in selected and importlib.util.find_spec("pytest") is None:
        lacks.append("pytest, for the simulated nodes of tests/_nodes.py (pip install '.[test]')")
    if importlib.util.find_spec("matplotlib") is None:
        lacks.append("matplotlib (pip install '.[bench]')")
    return lacks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args.quick, args.repeats, args.sizes)
    selected = [w for w in WORKLOADS if not args.only or w in args.only]
    lacks = missing(selected, not args.no_redis)
    if lacks:
        print("bench: missing " + "; ".join(lacks), file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, procs.request_stop)
    began = time.perf_counter()

    def log(text: str) -> None:
        procs.check_stop()
        print(f"[{time.perf_counter() - began:6.1f} s] {text}", file=sys.stderr, flush=True)

    import tfem

    meta: dict[str, Any] = {
        "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": plan.quick,
        "repeats": plan.repeats,
        "workloads": selected,
        "plan": dataclasses.asdict(plan),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tfem": tfem.__version__,
        "git": _git(),
        "redis": "left out (--no-redis)" if args.no_redis else redis_version(),
        "load_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    results: dict[str, Any] = {}
    failed = False
    try:
        with Services() as services:
            tmpfs_dir = services.tempdir("/dev/shm", "files")
            disk_dir = services.tempdir("/var/tmp", "files")
            instance = redis = None
            if NEEDS_TFEM & set(selected):
                log(f"starting tfem up (--memory {plan.tfem_memory >> 20}M)")
                instance = services.tfem("main", "--memory", str(plan.tfem_memory), "--no-spill")
            if NEEDS_REDIS & set(selected) and not args.no_redis:
                log("starting redis-server")
                redis = services.redis()
            ctx = Context(plan, services, instance, redis, tmpfs_dir, disk_dir, log, no_redis=args.no_redis)
            if instance is not None:
                at_start = broker_memory(instance)
                at_start.pop("status")
                ctx.notes["broker_at_start"] = at_start
            for name in selected:
                started = time.perf_counter()
                log(f"{name} ...")
                try:
                    results[name] = RUNNERS[name](ctx)
                except Exception:
                    failed = True
                    results[name] = {"error": traceback.format_exc()}
                    log(f"{name} FAILED:\n{results[name]['error']}")
                results[name]["elapsed_s"] = round(time.perf_counter() - started, 1)
            log("stopping the services")
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started has been stopped and removed", file=sys.stderr)
        return 130
    meta["elapsed_s"] = time.perf_counter() - began
    written = report.write(args.out, meta, results)
    print(written["markdown"])
    print(f"\nwrote {', '.join(['latest.json', 'latest.md', *written['plots']])} in {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
