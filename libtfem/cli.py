"""The `tfem` command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import mmap
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

from . import launch, metrics
from .client import connect
from .config import ENV_KEYFILE, Instance, format_size, parse_size, resolve_keyfile
from .errors import BrokerUnavailable, InvalidArgument, NotFound, TfemError, Timeout, WouldBlock
from .spill_format import CODECS

READY_TIMEOUT_S = 60.0
# The broker's modes.SETTINGS, written out: importing any of the broker
# costs every command its start-up (tests/test_broker_modes.py checks both agree).
BROKER_MODES = ("adaptive", "sync", "async")
# A server crashing more than MAX_RESTARTS times in RESTART_WINDOW_S: `tfem up`
# gives up on a broker (keeping its data), and starts a registry again after
# a pause that doubles up to MAX_RESTART_PAUSE_S.
MAX_RESTARTS, RESTART_WINDOW_S, MAX_RESTART_PAUSE_S = 5, 60.0, 30.0
# Exit statuses, for scripts: the first of these an error is an instance of
# (errors.py), else 1. `tfem up -- CMD` exits with CMD's status instead.
EXIT_BY_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidArgument, 2), (NotFound, 3), (Timeout, 4), (WouldBlock, 4), (BrokerUnavailable, 5))
EXIT_CODES = (
    (0, "done"),
    (1, "an error: tfem's, or a local file's (the message says which)"),
    (2, "the command line is wrong (usage)"),
    (3, "no file of that name"),
    (4, "a file was not ready in time (--timeout, --no-wait)"),
    (5, "no instance answers for the key file (start one with `tfem up`)"),
    (130, "interrupted (Ctrl-C)"),
)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_keyfile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keyfile", metavar="PATH",
                   help=f"the instance's key file (default: ${ENV_KEYFILE}, else a per-user file "
                        "in the runtime directory, per Slurm job when SLURM_JOB_ID is set)")


def _add_broker_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker")
    options = [
        g.add_argument("--slots", type=int, default=4096, help="files held at once (default 4096)"),
        g.add_argument("--buf-size", type=_size, default="8K", metavar="SIZE",
                       help="inline bytes per slot; smaller files need no arena block (default 8K)"),
        g.add_argument("--block-size", type=_size, default="64K", metavar="SIZE",
                       help="arena block size, a power of two (default 64K)"),
        g.add_argument("--memory", type=_size, default="512M", metavar="SIZE",
                       help="arena size for files past their inline buffer (default 512M)"),
        g.add_argument("--spill-dir", type=pathlib.Path, metavar="DIR",
                       help="LMDB spill store for what does not fit in memory "
                            "(default: beside the instance's socket in the runtime directory)"),
        g.add_argument("--spill-size", type=_size, metavar="SIZE",
                       help="largest size of the spill store (default: half of what its disk has free "
                            "when the broker starts; `tfem status` shows it)"),
        g.add_argument("--spill-compress", choices=sorted(CODECS), default="none",
                       help="compress spilled bytes per 1 MiB record; a record that would shrink by "
                            "less than 10%% is stored as it is (default none: see README, Spill)"),
        g.add_argument("--no-spill", action="store_true",
                       help="never spill: a full arena is an error (ENOSPC)"),
        g.add_argument("--max-file-size", type=_size, metavar="SIZE",
                       help="largest file: a write past it is EFBIG at once "
                            "(default: all the instance holds, inline buffer + memory + spill size)"),
        g.add_argument("--keep", action="store_true",
                       help="on stop, leave the segment and spill store in place"),
        g.add_argument("--broker-mode", choices=BROKER_MODES, default="adaptive",
                       help="where the broker does its disk work (spilling to make room, spill writes, "
                            "discards): adaptive (default) does it in its request loop while the load is "
                            "light and on a worker thread while requests would wait behind it; sync always "
                            "in the loop (lowest latency alone, but a large spill holds up every client); "
                            "async always on the worker (other clients are answered during a spill). "
                            "`tfem status` shows the mode and its switches"),
        g.add_argument("--cluster", type=pathlib.Path, metavar="DIR",
                       help="across nodes: a directory every node of the job sees; each broker writes its "
                            "TCP endpoint and public key there and finds its peers there"),
        g.add_argument("--peers", metavar="LIST",
                       help="across nodes, instead of --cluster: the peers, comma-separated "
                            "tcp://HOST:PORT=PUBLIC-KEY-FILE (just tcp://HOST:PORT with --insecure)"),
        g.add_argument("--listen", metavar="ENDPOINT",
                       help="TCP endpoint for peers (default: tcp://PRIMARY-ADDRESS:*, a port the kernel "
                            "chooses); with --peers, give the endpoint the others name"),
        g.add_argument("--curve-key", type=pathlib.Path, metavar="FILE",
                       help="this broker's CURVE secret key file, made by `tfem keys` (PATH.key_secret)"),
        g.add_argument("--trusted", type=pathlib.Path, metavar="DIR",
                       help="the directory of the public keys (*.key) of trusted peers "
                            "(default: the directory of --curve-key)"),
        g.add_argument("--insecure", action="store_true",
                       help="let brokers speak to each other without CURVE on a non-loopback address"),
    ]
    p.set_defaults(broker_options=options)  # for `tfem up` to hand on to its broker (_broker_argv)


def _add_ready_fd(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ready-fd", type=int, metavar="FD",
                   help="write 'ready' to this descriptor once serving (for supervisors)")
    # `tfem up` passes its pid: a server must not outlive it. SIGKILL, not
    # SIGTERM, so the data stays for the next start to adopt.
    p.add_argument("--die-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)


def _die_with_parent(args: argparse.Namespace) -> None:
    if args.die_with_parent is not None:
        from tfem._native import lib

        if lib.tfem_die_with_parent(signal.SIGKILL, args.die_with_parent) != 0:
            raise TfemError("the parent that started this server has already exited")


def _command(sub: Any, name: str, run: Callable[[argparse.Namespace], int], help: str,
             description: str | None = None, keyfile: bool = True) -> argparse.ArgumentParser:
    """A subcommand running `run`, with --keyfile unless it acts on no instance."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    if keyfile:
        _add_keyfile(p)
    p.set_defaults(run=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfem", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hand temporary files from process to process through memory.\n"
                    "Start an instance with `tfem up`; put, get and inspect files with the\n"
                    "other commands. Sizes take K, M, G, T suffixes (binary).",
        epilog="exit status:\n" + "\n".join(f"  {code:<3} {meaning}" for code, meaning in EXIT_CODES))
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "up", cmd_up, help="run a registry and a broker in the foreground",
                 description="Run a registry and a broker for the key file until SIGINT "
                             "or SIGTERM, then remove the queue, segment and spill files "
                             "(unless --keep). With a command after --, run it with "
                             f"{ENV_KEYFILE} set, stop when it ends, and exit with its status.")
    _add_broker_options(p)
    _add_ready_fd(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="a command to run against the instance")

    p = _command(sub, "registry", cmd_registry, help="run only the registry (SysV queue)",
                 description="Run the registry for the key file: brokers announce "
                             "themselves to it and clients ask it for a broker.")
    _add_ready_fd(p)

    p = _command(sub, "broker", cmd_broker, help="run only a broker",
                 description="Run a broker: create the shared segment, serve allocation "
                             "and spill requests, announce itself to the registry.")
    _add_broker_options(p)
    p.add_argument("--endpoint", help="ZeroMQ endpoint to serve (default: an ipc:// socket "
                                      "in the runtime directory)")
    _add_ready_fd(p)

    p = _command(sub, "put", cmd_put, help="copy local files into tfem",
                 description="Copy LOCAL (or - for standard input) to NAME. With several "
                             "LOCAL files, NAME is a prefix ending in / and each file keeps "
                             "its base name.")
    p.add_argument("paths", nargs="+", metavar="LOCAL... NAME")
    life = p.add_mutually_exclusive_group()
    life.add_argument("--readers", type=int, default=1, metavar="N",
                      help="freed after N readers (default 1: the first reader consumes it)")
    life.add_argument("--keep", action="store_true", help="kept for any number of readers until `tfem rm`")
    p.add_argument("--ttl", type=float, metavar="SECONDS", help="unlinked that long after it is written")

    p = _command(sub, "get", cmd_get, help="take files out of tfem (consumes them)",
                 description="Read NAME into LOCAL (or - for standard output) and free it. "
                             "With several names, LOCAL is a directory. Waits for a name "
                             "that is not ready yet.")
    p.add_argument("paths", nargs="+", metavar="NAME... LOCAL")
    p.add_argument("--timeout", type=float, help="seconds to wait for each name (default: no limit)")
    p.add_argument("--no-wait", action="store_true", help="fail at once if a name is not ready")

    p = _command(sub, "ls", cmd_ls, help="list the names held")
    p.add_argument("prefix", nargs="?", default="", help="only names starting with this")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("-l", "--long", action="store_true",
                       help="a table: state, size in bytes, lifetime, age, name")
    shown.add_argument("--json", action="store_true", help="one JSON array of objects, a file each")

    p = _command(sub, "save", cmd_save, help="copy the published files to a directory (stage-out)",
                 description="Copy every published file (WAIT, or SHARED: a kept or many-reader file "
                             "that others read), or those whose names start with "
                             "PREFIX, into DIR as plain files; a / in a name makes a subdirectory. "
                             "The files stay in tfem unless --consume. Files being written or read "
                             "are skipped and listed; a name that would land outside DIR is refused.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX", help="only names starting with this")
    p.add_argument("--consume", action="store_true", help="consume the files saved (free them in tfem)")

    p = _command(sub, "stat", cmd_stat, help="show a file's size and state")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")

    p = _command(sub, "rm", cmd_rm, help="remove names")
    p.add_argument("names", nargs="+")

    p = _command(sub, "status", cmd_status, help="show the broker's slots, memory, spill and requests")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="the broker's whole STATS reply")
    shown.add_argument("--prometheus", action="store_true",
                       help="counters and gauges in Prometheus' text format, for node_exporter's "
                            "textfile collector (README: Monitoring)")
    shown.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                       help="show it again every SECONDS (default 2) until Ctrl-C")

    p = _command(sub, "config", cmd_config, help="compiler flags for C programs using libtfem",
                 description="Print what a C compiler needs to use tfem.h and libtfem.so: "
                             "gcc prog.c $(tfem config --cflags --libs). The library runs "
                             "Python inside the C program, the interpreter tfem was installed "
                             "with (override with TFEM_PYTHON).", keyfile=False)
    p.add_argument("--cflags", action="store_true", help="include flags")
    p.add_argument("--libs", action="store_true", help="link flags, with an rpath to the library")
    p.add_argument("--pkg-config-path", action="store_true", help="the directory holding tfem.pc")

    p = _command(sub, "keys", cmd_keys, help="make a CURVE key pair for a broker across nodes",
                 description="Write PATH.key (the public key, for the trusted directory of every "
                             "peer) and PATH.key_secret (owner-only, for this broker's --curve-key).",
                 keyfile=False)
    p.add_argument("path", type=pathlib.Path, metavar="PATH")

    p = _command(sub, "clean", cmd_clean, help="remove what a killed instance left behind",
                 description="Remove the queue, segment, socket and spill store of the "
                             "key file, data included. Refuses while its registry runs.")

    return parser


# ---- servers ----


class _StopFlag:
    """Set by SIGINT/SIGTERM; servers poll it between requests."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopped.set())

    def __call__(self) -> bool:
        return self.stopped.is_set()


def _signal_ready(fd: int | None) -> None:
    if fd is not None:
        os.write(fd, b"ready\n")
        os.close(fd)


def _broker_config(args: argparse.Namespace) -> Any:
    from tfem.broker.server import BrokerConfig

    return BrokerConfig(keyfile=args.keyfile, slots=args.slots, buf_size=args.buf_size,
                        block_size=args.block_size, memory=args.memory, spill_dir=args.spill_dir,
                        spill=not args.no_spill, spill_size=args.spill_size, spill_codec=CODECS[args.spill_compress],
                        max_file_size=args.max_file_size, endpoint=getattr(args, "endpoint", None), keep=args.keep,
                        mode=args.broker_mode, cluster_dir=args.cluster,
                        peers=[p for p in (args.peers or "").split(",") if p], listen=args.listen,
                        curve_key=args.curve_key, trusted=args.trusted, insecure=args.insecure)


def cmd_registry(args: argparse.Namespace) -> int:
    from tfem.registry.server import Registry

    _die_with_parent(args)
    stop = _StopFlag()
    registry = Registry(args.keyfile)
    try:
        registry.start()
        _signal_ready(args.ready_fd)
        registry.serve(stop)
    finally:
        registry.close()
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from tfem.broker.server import Broker

    _die_with_parent(args)
    stop = _StopFlag()
    broker = Broker(_broker_config(args))
    try:
        broker.start()
        _signal_ready(args.ready_fd)
        broker.serve(stop)
    except BaseException:
        broker.close()  # the data stays for the next broker to adopt
        raise
    broker.close(destroy=True)  # a stop asked for by signal
    return 0


class _Server:
    """A server `tfem up` runs, and how often it crashed lately."""

    def __init__(self, what: str, argv: list[str], give_up: str | None) -> None:
        self.what, self.argv = what, argv
        self.give_up = give_up  # what to say when it crashes too often; None: keep trying, slower
        self.child: subprocess.Popen[bytes] | None = None
        self.crashes: list[float] = []
        self.next_start = 0.0

    def start(self) -> None:
        # Its own session: Ctrl-C reaches `tfem up` alone, which stops it in order.
        self.child = launch.start([*self.argv, "--die-with-parent", str(os.getpid())], f"the {self.what}",
                                  READY_TIMEOUT_S, start_new_session=True)

    def supervise(self) -> None:
        """Start it again if it is down and its pause is over."""
        if self.child is not None and self.child.poll() is not None:
            self._crashed(f"exited (status {self.child.returncode})")
        if self.child is None and time.monotonic() >= self.next_start:
            try:
                self.start()
            except TfemError as exc:
                self._crashed(str(exc))

    def _crashed(self, why: str) -> None:
        self.child = None
        now = time.monotonic()
        self.crashes = [t for t in self.crashes if t > now - RESTART_WINDOW_S] + [now]
        over = len(self.crashes) - MAX_RESTARTS
        if over > 0 and self.give_up is not None:
            raise TfemError(f"the {self.what} keeps exiting (it {why}); giving up. {self.give_up}")
        pause = min(MAX_RESTART_PAUSE_S, 2.0 ** (over - 1)) if over > 0 else 0.0
        self.next_start = now + pause
        print(f"tfem up: the {self.what} {why}; starting it again" + (f" in {pause:g} s" if pause else ""),
              file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.child is not None:
            launch.stop(self.child)


def _broker_argv(args: argparse.Namespace) -> list[str]:
    """The broker options `tfem up` was given, as its broker's arguments."""
    argv = []
    for action in args.broker_options:
        value, option = getattr(args, action.dest), action.option_strings[0]
        if action.nargs == 0:  # a flag
            argv += [option] if value else []
        elif value is not None:
            argv += [option, str(value)]
    return argv


def cmd_up(args: argparse.Namespace) -> int:
    keyfile = str(resolve_keyfile(args.keyfile))
    base = [sys.executable, "-m", "tfem"] + (["-v"] if args.verbose else [])
    broker_argv = [*base, "broker", "--keyfile", keyfile, *_broker_argv(args)]
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    names = Instance.for_keyfile(keyfile)
    # Without a registry the broker and its clients carry on (only new
    # clients cannot find it), so a failing registry is retried, ever more
    # slowly; a broker that cannot run is given up on, its data kept.
    servers = [
        _Server("registry", [*base, "registry", "--keyfile", keyfile], None),
        _Server("broker", broker_argv,
                f"Its data is kept: segment {names.segment} and spill store "
                f"{args.spill_dir or names.spill_dir}; the next `tfem up --keyfile {keyfile}` adopts it, "
                f"`tfem clean --keyfile {keyfile}` removes it."),
    ]
    stop = _StopFlag()
    worker = None
    try:
        for server in servers:
            server.start()
        print(f"tfem up: key file {keyfile}; stop with Ctrl-C", file=sys.stderr, flush=True)
        _signal_ready(args.ready_fd)
        if cmd:
            env = dict(os.environ, **{ENV_KEYFILE: keyfile})
            try:
                worker = subprocess.Popen(cmd, env=env)
            except OSError as exc:
                raise TfemError(f"cannot run {cmd[0]}: {exc.strerror}") from None
        while not stop() and (worker is None or worker.poll() is None):
            for server in servers:
                server.supervise()
            stop.stopped.wait(0.1)
        if worker is not None:
            if worker.poll() is None:
                worker.terminate()
            return worker.wait()
        return 0
    finally:
        if worker is not None and worker.poll() is None:  # `tfem up` gave up under it
            worker.terminate()
            worker.wait()
        for server in reversed(servers):  # broker first: it withdraws from the registry
            server.stop()


# ---- clients ----

# A transfer this large shows a progress bar, when stderr is a terminal.
PROGRESS_MIN_BYTES = 16 << 20
CHUNK = 16 << 20


def _progress(label: str, total: int | None) -> Any:
    """A progress bar on stderr for a large transfer (of unknown size: one
    that lasts over a second), when stderr is a terminal; else nothing, and
    tqdm is not even imported."""
    if not sys.stderr.isatty() or (total is not None and total < PROGRESS_MIN_BYTES):
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                delay=0 if total is not None else 1.0, dynamic_ncols=True)


def cmd_put(args: argparse.Namespace) -> int:
    *locals_, name = args.paths
    if not locals_:
        raise InvalidArgument("put takes LOCAL... NAME")
    if len(locals_) > 1 and not name.endswith("/"):
        raise InvalidArgument("with several files, NAME must be a prefix ending in /")
    with connect(args.keyfile) as client:
        for local in locals_:
            target = name + os.path.basename(local) if name.endswith("/") else name
            with client.open(target, "w", readers=args.readers, keep=args.keep, ttl=args.ttl) as out:
                _copy_local_into(local, out, target)
    return 0


def _copy_local_into(local: str, out: Any, name: str) -> None:
    if local == "-":
        src = sys.stdin.buffer
        with _progress(name, None) as bar:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        return
    with open(local, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        if size == 0:
            return
        with mmap.mmap(src.fileno(), size, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
            with _progress(name, size) as bar:
                for start in range(0, size, CHUNK):
                    out.write(view[start:start + CHUNK])
                    if bar is not None:
                        bar.update(min(CHUNK, size - start))


def cmd_get(args: argparse.Namespace) -> int:
    *names, local = args.paths
    if not names:
        raise InvalidArgument("get takes NAME... LOCAL")
    into_dir = len(names) > 1 or os.path.isdir(local)
    if len(names) > 1 and not os.path.isdir(local):
        raise InvalidArgument(f"with several names, {local} must be a directory")
    with connect(args.keyfile) as client:
        for name in names:
            target = _local_target(local, name) if into_dir else local
            src = client.open(name, "r", timeout=args.timeout, wait=not args.no_wait)
            try:
                if target == "-":
                    _copy_out(src, sys.stdout.buffer, name)
                    sys.stdout.buffer.flush()
                else:
                    with open(target, "wb") as out:
                        _copy_out(src, out, name)
            except BaseException:
                src.abort()  # not delivered, so not consumed: it stays for another try
                raise
            src.close()
    return 0


def _copy_out(src: Any, out: Any, name: str) -> int:
    """The rest of a file open for read, into `out`; how many bytes."""
    done = 0
    with _progress(name, src.fstat().size) as bar:
        for chunk in src.chunks(CHUNK):
            out.write(chunk)
            done += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return done


def _local_target(directory: str, name: str) -> str:
    """Where file `name` goes under `directory` (made as needed): refused if
    it would land outside it, through `..` or a symbolic link."""
    parts = [p for p in name.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise InvalidArgument(f"cannot store {name!r} under a directory: it is not a plain relative name")
    path = os.path.join(directory, *parts)
    top = os.path.realpath(directory)
    if os.path.commonpath([top, os.path.realpath(path)]) != top:
        raise InvalidArgument(f"cannot store {name!r} under {directory}: a symbolic link leads outside it")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit}"
    return f"{max(0, int(seconds))}s"


def cmd_ls(args: argparse.Namespace) -> int:
    with connect(args.keyfile) as client:
        stats = sorted((st for st in client.list_stats() if st.name.startswith(args.prefix)), key=lambda s: s.name)
    if args.json:
        print(json.dumps([{**dataclasses.asdict(st), "lifetime": st.lifetime} for st in stats]))
    elif args.long:
        now = time.time()
        rows = [("STATE", "SIZE", "LIFETIME", "AGE", "NAME")]
        rows += [(st.state, str(st.size), st.lifetime, _age(now - st.created), st.name) for st in stats]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for state, size, lifetime, age, name in rows:
            print(f"{state:<{widths[0]}}  {size:>{widths[1]}}  {lifetime:<{widths[2]}}  {age:>{widths[3]}}  {name}")
    else:
        for st in stats:
            print(st.name)
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.dir):
        raise InvalidArgument(f"{args.dir} is not a directory")
    saved = saved_bytes = 0
    busy: list[str] = []
    failed = 0
    with connect(args.keyfile) as client:
        for st in sorted(client.list_stats(), key=lambda s: s.name):
            if not st.name.startswith(args.prefix):
                continue
            try:
                if st.state not in ("WAIT", "SHARED"):  # published (SHARED: a kept or many-reader file being read)
                    raise WouldBlock(st.state)
                saved_bytes += _save_one(client, st.name, args.dir, args.consume)
                saved += 1
            except (WouldBlock, NotFound):  # held by its writer or a reader (now), or gone
                busy.append(st.name)
            except OSError as exc:  # a refused name, a damaged file, a local file's error
                _error(f"{st.name}: not saved: {_describe(exc)}")
                failed += 1
    what = "consumed" if args.consume else "kept in tfem"
    print(f"saved {saved} file{'s' if saved != 1 else ''}, {saved_bytes} bytes ({_mib(saved_bytes)}), "
          f"to {args.dir} ({what})")
    if busy:
        print(f"skipped {len(busy)} being written or read: {' '.join(busy)}")
    return 1 if failed else 0


def _save_one(client: Any, name: str, directory: str, consume: bool) -> int:
    """Copy one file into `directory`; its size. Consumed, or given back."""
    target = _local_target(directory, name)
    src = client.open(name, "r", wait=False)
    try:
        with open(target, "wb") as out:
            size = _copy_out(src, out, name)
    except BaseException:
        src.abort()
        if os.path.exists(target):
            os.unlink(target)  # half a file is no copy
        raise
    if consume:
        src.close()
    else:
        src.abort()  # the read given back: the file stays for its consumer
    return size


def cmd_stat(args: argparse.Namespace) -> int:
    with connect(args.keyfile) as client:
        st = client.stat(args.name)
    if args.json:
        print(json.dumps({**dataclasses.asdict(st), "lifetime": st.lifetime}))
    else:
        left = "" if st.readers_left is None or st.readers == 1 else f", {st.readers_left} to come"
        expires = "" if st.expires is None else \
            f"\nexpires: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st.expires))}"
        print(f"name:    {st.name}\nsize:    {st.size}\nstate:   {st.state}\n"
              f"spilled: {'yes' if st.spilled else 'no'}\n"
              f"created: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st.created))}\n"
              f"life:    {st.lifetime}{left}, {st.holders} reading now{expires}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    status = 0
    with connect(args.keyfile) as client:
        for name in args.names:
            try:
                client.unlink(name)
            except TfemError as exc:
                _error(str(exc))
                status = exit_status(exc)
    return status


def cmd_status(args: argparse.Namespace) -> int:
    if args.prometheus:
        return _status_prometheus(args)
    if args.watch is not None:
        return _status_watch(args)
    with connect(args.keyfile) as client:
        stats = client.stats()
    print(json.dumps(stats, indent=2) if args.json else _status_text(stats))
    return 0


def _status_prometheus(args: argparse.Namespace) -> int:
    try:
        with connect(args.keyfile) as client:
            stats = client.stats()
    except BrokerUnavailable:
        # Said in the metrics too: the collector's file must not go on
        # showing the last figures of an instance that has stopped.
        sys.stdout.write(metrics.render_down(Instance.for_keyfile(args.keyfile).segment))
        raise
    sys.stdout.write(metrics.render(stats))
    return 0


def _status_watch(args: argparse.Namespace) -> int:
    """The status, drawn again in place every `args.watch` seconds: the
    screen is cleared once, then each frame overwrites the last (no blank
    moment, so no flicker)."""
    if args.watch <= 0:
        raise InvalidArgument("--watch takes a number of seconds above 0")
    out = sys.stdout
    with connect(args.keyfile) as client:
        out.write("\033[H\033[2J")
        try:
            while True:
                text = _status_text(client.stats())
                head = f"tfem status, every {args.watch:g} s (Ctrl-C to stop)   {time.strftime('%H:%M:%S')}"
                lines = [head, "", *text.splitlines()]
                out.write("\033[H" + "".join(line + "\033[K\n" for line in lines) + "\033[J")
                out.flush()
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def _status_text(stats: dict[str, Any]) -> str:
    files = ", ".join(f"{k} {v}" for k, v in stats["files_by_state"].items())
    text = (f"broker      pid {stats['broker_pid']} at {stats['endpoint']}, up {stats['uptime_s']} s\n"
            f"slots       {stats['slots_used']} used, {stats['slots_free']} free of {stats['slots_total']}"
            f" (inline {format_size(stats['buf_size'])} each)\n"
            f"files       {files}\n"
            f"arena       {_mib(stats['arena_bytes_used'])} used, {_mib(stats['arena_bytes_free'])} free"
            f" of {_mib(stats['arena_bytes_total'])}\n"
            f"{_spill_lines(stats)}"
            f"files up to {_mib(stats['max_file_size'])} each\n"
            f"recovered   {stats['dead_clients_settled']} dead clients settled,"
            f" {stats['segments_replaced']} removed segments made again\n"
            f"handoffs    {stats['published']} published, {stats['consumed']} consumed,"
            f" {stats['expired']} expired (ttl)\n"
            f"waits       {stats['read_waits']} for a file, {stats['room_waits']} for a slot,"
            f" {stats['timeouts']} timed out\n"
            f"refused     {stats['refused_full']} slot table full, {stats['refused_large']} too large,"
            f" {stats['checksum_errors']} damaged reads\n"
            f"requests    {sum(stats['requests_served'].values())} served, {stats['request_errors']} errors,"
            f" {stats['clients']} clients")
    mode = stats.get("broker_mode")
    if mode:  # a broker of before the modes has none
        text += "\n" + _mode_line(mode)
    cluster = stats.get("cluster")
    if cluster:
        peers = ", ".join(f"{p['endpoint']} ({'alive' if p['alive'] else 'silent'})" for p in cluster["peers"])
        text += (f"\npeers       {cluster['node']}{' with CURVE' if cluster['curve'] else ''}; {peers or 'none'}\n"
                 f"across      {cluster['pulled']} pulled here ({_mib(cluster['pulled_bytes'])}),"
                 f" {cluster['lent']} lent ({_mib(cluster['lent_bytes'])}), {cluster['homed_names']} names homed here")
    return text


def _spill_lines(stats: dict[str, Any]) -> str:
    store = stats["spill_store"]
    if store is None:
        return "spill       off\n"
    return (f"spill       {_mib(stats['spilled_bytes'])} stored in {stats['spilled_files']} files"
            f" ({_mib(store['raw_bytes'])} before compression: {store['codec']}),"
            f" limit {_mib(store['limit'])} ({store['limit_from']})\n"
            f"spill disk  data file {_mib(store['file_bytes'])} in {stats['spill']},"
            f" made afresh {store['renewals']} times once empty\n"
            f"restored    {store['restores']} spilled files brought back into memory"
            f" (of {store['spills']} spilled):"
            f" {store['restore_hits']} read from there, {store['restores_spilled_again']} spilled again first\n")


def _mode_line(mode: dict[str, Any]) -> str:
    """How the broker runs its disk work: its setting, its mode now, and
    how often it switched."""
    setting = "adaptive, now" if mode["setting"] == "adaptive" else "forced"
    switches = mode["switches"]
    last = mode.get("last_switch")
    why = f"; last to {last['to']} {last['seconds_ago']:g} s ago ({last['why']})" if last else ""
    return (f"disk work   {setting} {mode['mode']}, {switches} switch{'es' if switches != 1 else ''}{why}; "
            f"{mode['disk_jobs_inline']} jobs in the loop, {mode['disk_jobs_on_worker']} on the worker")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def cmd_keys(args: argparse.Namespace) -> int:
    import zmq

    public, secret = zmq.curve_keypair()
    base = str(args.path)
    for path, lines in ((base + ".key_secret", [f'    public-key = "{public.decode()}"',
                                                f'    secret-key = "{secret.decode()}"']),
                        (base + ".key", [f'    public-key = "{public.decode()}"'])):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never over another pair
        with os.fdopen(fd, "w") as out:
            out.write("#   tfem CURVE key (ZeroMQ certificate format)\nmetadata\ncurve\n" + "\n".join(lines) + "\n")
    print(f"{base}.key (public), {base}.key_secret (secret, 0600)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    package = pathlib.Path(__file__).resolve().parent
    include, lib = package / "include", package / "lib"
    if not (lib / "libtfem.so").exists():
        raise TfemError(f"libtfem.so is not built in {lib}: reinstall tfem with pip")
    words = []
    if args.cflags:
        words.append(f"-I{include}")
    if args.libs:
        words += [f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltfem"]
    if args.pkg_config_path:
        words.append(str(lib / "pkgconfig"))
    if not words:
        raise TfemError("say what to print: --cflags, --libs or --pkg-config-path")
    print(" ".join(words))
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from tfem._native import lib
    from tfem.broker.spill import remove_store
    from tfem.keyfile import read_record
    from tfem.registry.ownership import remove_left_queue
    from tfem.segment import Segment

    instance = Instance.for_keyfile(args.keyfile)  # the runtime directory the key file records
    record = read_record(instance.keyfile)
    if record and lib.tfem_pid_alive(record.pid):
        raise TfemError(f"the registry of {instance.keyfile} (pid {record.pid}) is running: stop it first")
    state = instance.read_state()
    broker = state.get("broker_pid")
    if isinstance(broker, int) and lib.tfem_pid_alive(broker):
        raise TfemError(f"the broker of {instance.keyfile} (pid {broker}) is running: stop it first")
    removed = []
    if record:
        # Only the very queue the key file records: another key file's may share the key.
        if remove_left_queue(instance.keyfile, record):
            removed.append("registry queue")
        instance.keyfile.unlink()
        removed.append(f"key file {instance.keyfile}")
    if Segment.unlink(instance.segment):
        removed.append(f"segment {instance.segment}")
    if instance.socket_path.exists():
        instance.socket_path.unlink()
        removed.append(f"socket {instance.socket_path}")
    spill_dir = pathlib.Path(str(state.get("spill_dir") or instance.spill_dir))
    if remove_store(spill_dir):
        removed.append(f"spill store {spill_dir}")
    if instance.state_path.exists():
        instance.remove_state()
    print("removed: " + ", ".join(removed) if removed else "nothing to clean")
    return 0


def _error(message: str) -> None:
    print(f"tfem: error: {message}", file=sys.stderr, flush=True)


def _describe(exc: BaseException) -> str:
    """One line for an error: tfem's own message, or a local file's."""
    if isinstance(exc, OSError) and not isinstance(exc, TfemError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def exit_status(exc: BaseException) -> int:
    return next((code for cls, code in EXIT_BY_ERROR if isinstance(exc, cls)), 1)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="tfem %(name)s: %(message)s")
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        return 130
    except BrokenPipeError:  # a reader of our output went away: nobody to tell
        return 1
    except Exception as exc:
        if args.debug:
            raise
        known = isinstance(exc, OSError)  # tfem's errors, and local files'
        _error(_describe(exc) if known else f"{type(exc).__name__}: {exc} (a bug in tfem: --debug shows where)")
        return exit_status(exc)


if __name__ == "__main__":
    sys.exit(main())
