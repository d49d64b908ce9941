"""Soak test: a mixed load for a long time, then a check that nothing leaked.

    python bench/soak.py --duration SECONDS [--keyfile PATH] [--out FILE.json]

Starts its own instance (`tfem up` with a small arena, so large files spill),
or uses the one running for --keyfile. Producer and consumer processes move
files of 0 bytes to several MiB; every consumer checks every byte it reads.
Now and then one of them is SIGKILLed in the middle of its work and a new
one started: its file is dropped (a producer) or given back (a consumer) by
the broker. Every --interval seconds the broker is sampled: resident memory
without the segment (VmRSS - RssShmem, and its anonymous part), open
descriptors, slots and arena blocks in use, spilled bytes.

When the load stops, the consumers drain what is left and the broker must
come back to idle: no slot, no arena block and no spilled byte in use,
descriptors back to where they started (within --fd-slack), and resident
memory within --rss-bound of where it started. Prints a table, writes JSON,
and exits 1 if a check failed or a consumer read a wrong byte.

Run in a worker role by the driver: --role producer|consumer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from tfem import launch

MIB = 1 << 20
SPILL_FILE_IDLE = 10 << 20  # the store once empty: made afresh (issue 10 asks for < 10 MB)
INSTANCE_OPTIONS = ("--slots", "1024", "--buf-size", "8K", "--block-size", "64K", "--memory", "8M",
                    "--spill-size", "4G")


def size_of(r: random.Random, largest: int) -> int:
    """0 bytes to `largest`: mostly small files, some large enough to spill."""
    roll = r.random()
    if roll < 0.05:
        return 0
    if roll < 0.45:
        return r.randrange(1, 8 << 10)  # inline
    if roll < 0.75:
        return r.randrange(8 << 10, 256 << 10)  # a few blocks
    if roll < 0.93:
        return r.randrange(256 << 10, 2 * MIB)
    return r.randrange(2 * MIB, largest + 1)  # large: these push others to the spill store


def content(name: str, size: int) -> bytes:
    return hashlib.shake_256(name.encode()).digest(size)


# ---- worker roles ----


def run_producer(args: argparse.Namespace) -> int:
    import tfem

    r = random.Random(f"{args.index}/{os.getpid()}")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    n = 0
    with tfem.connect() as client:
        while not stop:
            size = size_of(r, args.largest)
            name = f"soak/{os.getpid()}/{n}/{size}"  # the consumer derives the bytes from the name
            data = content(name, size)
            try:
                with client.open(name, "w", timeout=30) as f:  # a full table waits for room
                    step = max(1, size // r.choice([1, 1, 3, 7]))
                    for pos in range(0, size, step):
                        f.write(data[pos: pos + step])
            except tfem.NoSpace:
                time.sleep(0.05)  # nothing freed room within the timeout: try again later
                continue
            n += 1
    print(json.dumps({"role": "producer", "files": n}), flush=True)
    return 0


def run_consumer(args: argparse.Namespace) -> int:
    import tfem

    r = random.Random(f"c{args.index}/{os.getpid()}")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    files = nbytes = bad = 0
    with tfem.connect() as client:
        while not stop:
            waiting = [st.name for st in client.list_stats() if st.state == "WAIT" and st.name.startswith("soak/")]
            if not waiting:
                if args.drain:
                    break
                time.sleep(0.01)
                continue
            r.shuffle(waiting)  # consumers spread over the backlog; one scan (under the table lock) serves many
            for name in waiting:
                try:
                    f = client.open(name, "r", wait=False)
                except (tfem.NotFound, tfem.WouldBlock):
                    continue  # taken by another consumer
                with f:
                    data = f.read()
                size = int(name.rsplit("/", 1)[1])
                if data != content(name, size):
                    bad += 1
                    print(json.dumps({"role": "consumer", "bad": name}), file=sys.stderr, flush=True)
                files += 1
                nbytes += len(data)
                if stop:
                    break
    print(json.dumps({"role": "consumer", "files": files, "bytes": nbytes, "bad": bad}), flush=True)
    return 0


# ---- the driver ----


def fd_targets(pid: int) -> list[str]:
    """What the broker's descriptors are (for the report when they leak)."""
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return out


def broker_sample(client: Any) -> dict[str, Any]:
    stats = client.stats()
    pid = stats["broker_pid"]
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    store = stats["spill_store"] or {}
    return {
        "broker_pid": pid,
        "rss": fields["VmRSS"] - fields["RssShmem"],
        "rss_anon": fields["RssAnon"],
        "rss_file": fields["RssFile"],
        "spill_file": store.get("file_bytes", 0),  # on disk
        "spill_written": store.get("written_bytes", 0),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "slots_used": stats["slots_used"],
        "arena_blocks": stats["arena_bytes_used"] // stats["block_size"],
        "spilled_bytes": stats["spilled_bytes"],
        "clients": stats["clients"],
        "published": stats["published"],
        "consumed": stats["consumed"],
        "dead_clients_settled": stats["dead_clients_settled"],
    }


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="tfem-soak-"))
        self.keyfile = pathlib.Path(args.keyfile) if args.keyfile else self.tmp / "soak.key"
        self.up: subprocess.Popen[bytes] | None = None
        self.workers: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}
        self.finished: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.kills = {"producer": 0, "consumer": 0}
        self.env = dict(os.environ, TFEM_KEYFILE=str(self.keyfile))
        self.env.pop("TFEM_BROKER", None)

    # -- the instance --

    def start_instance(self) -> None:
        import tfem

        try:
            tfem.connect(self.keyfile, timeout=2).close()
            print(f"using the instance running for {self.keyfile}", file=sys.stderr)
            return
        except tfem.TfemError:
            pass
        with open(self.tmp / "up.log", "ab") as log:
            try:
                self.up = launch.start(
                    [sys.executable, "-m", "tfem", "up", "--keyfile", str(self.keyfile), "--spill-dir",
                     str(self.tmp / "spill"), *INSTANCE_OPTIONS], "tfem up", 60, stderr=log, stdin=subprocess.DEVNULL)
            except tfem.TfemError as exc:
                raise SystemExit(f"{exc}: {(self.tmp / 'up.log').read_text()}") from None

    def stop_instance(self) -> None:
        if self.up is not None:
            launch.stop(self.up, grace=60)
            subprocess.run([sys.executable, "-m", "tfem", "clean", "--keyfile", str(self.keyfile)],
                           capture_output=True, env=self.env)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- workers --

    def spawn(self, role: str, index: int, drain: bool = False) -> None:
        argv = [sys.executable, os.path.abspath(__file__), "--role", role, "--index", str(index),
                "--largest", str(self.args.largest)] + (["--drain"] if drain else [])
        proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.workers[proc.pid] = (role, proc)

    def reap(self, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        for line in out.decode(errors="replace").splitlines():
            try:
                self.finished.append(json.loads(line))
            except ValueError:
                pass

    def kill_one(self, r: random.Random) -> None:
        """SIGKILL a producer and a consumer in turn, whatever it is doing."""
        role = "producer" if sum(self.kills.values()) % 2 == 0 else "consumer"
        pids = sorted(p for p, (kind, _) in self.workers.items() if kind == role) or sorted(self.workers)
        role, proc = self.workers.pop(r.choice(pids))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        self.kills[role] += 1
        self.spawn(role, r.randrange(1000))

    def stop_workers(self) -> None:
        for _, proc in self.workers.values():
            proc.send_signal(signal.SIGTERM)
        for _, proc in self.workers.values():
            self.reap(proc)
        self.workers.clear()

    def kill_workers(self) -> None:
        for _, proc in self.workers.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        self.workers.clear()

    # -- the run --

    def sample(self, client: Any, phase: str, start: float) -> dict[str, Any]:
        s = {"t": round(time.monotonic() - start, 1), "phase": phase, **broker_sample(client)}
        self.samples.append(s)
        print(f"{s['t']:>7} {phase:<8} {s['rss'] / MIB:>8.1f} {s['rss_anon'] / MIB:>8.1f} {s['fds']:>5} "
              f"{s['slots_used']:>6} {s['arena_blocks']:>7} {s['spilled_bytes'] / MIB:>9.1f} "
              f"{s['clients']:>7} {s['published']:>9} {s['consumed']:>9}", flush=True)
        return s

    def run(self) -> int:
        import tfem

        args = self.args
        r = random.Random(args.seed)
        self.start_instance()
        try:
            with tfem.connect(self.keyfile) as client:
                print(f"{'t (s)':>7} {'phase':<8} {'rss MiB':>8} {'anon':>8} {'fds':>5} {'slots':>6} "
                      f"{'blocks':>7} {'spill MiB':>9} {'clients':>7} {'published':>9} {'consumed':>9}")
                start = time.monotonic()
                self.warm_up(client)
                baseline = self.sample(client, "baseline", start)
                self.fds_at_start = fd_targets(baseline["broker_pid"])
                for i in range(args.producers):
                    self.spawn("producer", i)
                for i in range(args.consumers):
                    self.spawn("consumer", i)
                end = start + args.duration
                next_sample, next_kill = start + args.interval, start + (args.kill_every or float("inf"))
                while time.monotonic() < end:
                    time.sleep(max(0.0, min(next_sample, next_kill, end) - time.monotonic()))
                    now = time.monotonic()
                    if now >= next_kill:
                        self.kill_one(r)
                        next_kill = now + args.kill_every
                    if now >= next_sample:
                        self.sample(client, "load", start)
                        next_sample = now + args.interval
                peak = self.samples[-1]
                # Stop: producers first, then consumers drain what is left.
                for pid, (role, proc) in list(self.workers.items()):
                    if role == "producer":
                        proc.send_signal(signal.SIGTERM)
                        self.reap(proc)
                        del self.workers[pid]
                self.stop_workers()
                for i in range(max(1, args.consumers)):
                    self.spawn("consumer", i, drain=True)
                self.stop_after_drain()
                idle = self.wait_idle(client, baseline, start)
        finally:
            self.kill_workers()
            self.stop_instance()
        return self.report(baseline, peak, idle)

    def warm_up(self, client: Any) -> None:
        """One large file in and out, so that what the broker allocates once
        and keeps (pyzmq's thread for zero-copy frames, LMDB's reader slot)
        is in the baseline rather than counted as growth."""
        size = client.stats()["arena_bytes_total"] + MIB  # past the arena: spilled, read back through the broker
        data = b"warm-up " * (size // 8)
        with client.open("soak-warm-up", "w") as f:
            f.write(data)
        with client.open("soak-warm-up", "r") as f:
            assert f.read() == data

    def stop_after_drain(self) -> None:
        for _, proc in self.workers.values():
            self.reap(proc, timeout=300)
        self.workers.clear()

    def wait_idle(self, client: Any, baseline: dict[str, Any], start: float) -> dict[str, Any]:
        deadline = time.monotonic() + self.args.idle_timeout
        while True:
            s = broker_sample(client)
            idle = (s["slots_used"], s["arena_blocks"], s["spilled_bytes"]) == (0, 0, 0) \
                and s["fds"] <= baseline["fds"] + self.args.fd_slack and s["spill_file"] < SPILL_FILE_IDLE
            if idle or time.monotonic() > deadline:
                self.fds_at_idle = fd_targets(s["broker_pid"])
                return self.sample(client, "idle", start)
            time.sleep(0.5)

    def report(self, baseline: dict[str, Any], peak: dict[str, Any], idle: dict[str, Any]) -> int:
        args = self.args
        consumers = [f for f in self.finished if f.get("role") == "consumer"]
        producers = [f for f in self.finished if f.get("role") == "producer"]
        load = [s for s in self.samples if s["phase"] == "load"]
        half = load[len(load) // 2:] or load
        checks = {
            "no slot in use": idle["slots_used"] == 0,
            "no arena block in use": idle["arena_blocks"] == 0,
            "no spilled byte": idle["spilled_bytes"] == 0,
            f"the spill store's file below {SPILL_FILE_IDLE >> 20} MB once empty": idle["spill_file"] < SPILL_FILE_IDLE,
            f"descriptors back to baseline (+{args.fd_slack})": idle["fds"] <= baseline["fds"] + args.fd_slack,
            f"anonymous memory within {args.rss_bound >> 20} MiB of baseline":
                idle["rss_anon"] <= baseline["rss_anon"] + args.rss_bound,
            # LMDB maps the store: its pages read count as resident (file-backed,
            # reclaimable) up to the file's size, which LMDB never shrinks.
            f"resident memory within {args.rss_bound >> 20} MiB of baseline plus the spill store file":
                idle["rss"] <= baseline["rss"] + args.rss_bound + idle["spill_file"],
            "every byte read was right": sum(f.get("bad", 0) for f in consumers) == 0,
            "the broker never restarted": len({s["broker_pid"] for s in self.samples}) == 1,
        }
        summary = {
            "duration_s": args.duration,
            "producers": args.producers, "consumers": args.consumers,
            "kills": self.kills,
            "files_published": idle["published"] - baseline["published"],
            "files_consumed": idle["consumed"] - baseline["consumed"],
            "bytes_checked_by_consumers": sum(f.get("bytes", 0) for f in consumers),
            "files_written_by_producers_that_finished": sum(f.get("files", 0) for f in producers),
            "dead_clients_settled": idle["dead_clients_settled"] - baseline["dead_clients_settled"],
            "rss_baseline": baseline["rss"], "rss_peak": max(s["rss"] for s in self.samples),
            "rss_idle": idle["rss"], "rss_anon_baseline": baseline["rss_anon"],
            "rss_anon_peak": max(s["rss_anon"] for s in self.samples), "rss_anon_idle": idle["rss_anon"],
            "rss_file_idle": idle["rss_file"], "spill_file_idle": idle["spill_file"],
            "spill_file_peak": max(s["spill_file"] for s in self.samples),
            "spilled_during_run": idle["spill_written"] - baseline["spill_written"],
            "rss_growth_second_half": (half[-1]["rss"] - half[0]["rss"]) if half else 0,
            "fds_baseline": baseline["fds"], "fds_peak": max(s["fds"] for s in self.samples),
            "fds_idle": idle["fds"],
            "slots_peak": max(s["slots_used"] for s in self.samples),
            "arena_blocks_peak": max(s["arena_blocks"] for s in self.samples),
            "spilled_bytes_peak": max(s["spilled_bytes"] for s in self.samples),
        }
        ok = all(checks.values())
        print()
        for name, value in summary.items():
            print(f"  {name:<42} {value}")
        print()
        for name, passed in checks.items():
            print(f"  {'ok  ' if passed else 'FAIL'} {name}")
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"ok": ok, "checks": checks, "summary": summary, "samples": self.samples,
                                   "broker_fds": {"start": self.fds_at_start, "idle": self.fds_at_idle},
                                   "options": {k: v for k, v in vars(args).items() if k != "role"},
                                   "instance": list(INSTANCE_OPTIONS) if self.up else "existing"}, indent=2))
        print(f"\n{'passed' if ok else 'FAILED'}; written to {out}")
        return 0 if ok else 1


def _size(text: str) -> int:
    from tfem.config import parse_size

    return parse_size(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60, help="seconds of load (default 60)")
    p.add_argument("--keyfile", help="use the instance of this key file, or start one on it")
    p.add_argument("--producers", type=int, default=3, help="(default 3)")
    p.add_argument("--consumers", type=int, default=4, help="(default 4: checking every byte costs more than writing)")
    p.add_argument("--interval", type=float, default=5, help="seconds between samples (default 5)")
    p.add_argument("--kill-every", type=float, default=7,
                   help="SIGKILL a random worker this often, in seconds (0: never; default 7)")
    p.add_argument("--largest", type=_size, default="6M", help="largest file (default 6M)")
    p.add_argument("--rss-bound", type=_size, default="64M",
                   help="how far resident memory may end above where it started (default 64M)")
    p.add_argument("--fd-slack", type=int, default=2, help="descriptors the broker may end with past its start")
    p.add_argument("--idle-timeout", type=float, default=60, help="seconds to wait for idle after the load")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "soak.json"))
    p.add_argument("--role", choices=["producer", "consumer"], help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--drain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "producer":
        return run_producer(args)
    if args.role == "consumer":
        return run_consumer(args)
    driver = Driver(args)
    try:
        return driver.run()
    except BaseException:
        driver.kill_workers()
        driver.stop_instance()
        raise


if __name__ == "__main__":
    sys.exit(main())
