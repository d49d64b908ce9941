"""What the benchmark starts and must take down: tfem instances, a
redis-server, temporary directories, worker processes.

Everything is registered in a Services object the moment it exists, and
Services.close() removes all of it in reverse order, whatever happened:
an exception, Ctrl-C, SIGTERM (turned into KeyboardInterrupt by
__main__). Servers are started in sessions of their own, so Ctrl-C in the
terminal reaches only the benchmark, which then stops them in order; they
also get SIGTERM from the kernel if the benchmark itself is killed
(PR_SET_PDEATHSIG), so even `kill -9` of the benchmark stops them cleanly.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from tfem import launch
from tfem.errors import TfemError

from . import procs
from .peers import SHM_PREFIX

READY_TIMEOUT_S = 120.0
TFEM = [sys.executable, "-m", "tfem"]


def _pdeathsig_term() -> None:
    procs.die_with_parent(signal.SIGTERM)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class TfemInstance:
    """`tfem up` with its own key file and spill directory under `where`."""

    def __init__(self, where: str, *options: str) -> None:
        self.where = where
        self.keyfile = os.path.join(where, "tfem.key")
        self.spill_dir = os.path.join(where, "spill")
        self.log_path = os.path.join(where, "tfem-up.log")
        self.options = options
        with open(self.log_path, "wb") as log:
            try:
                self.process = launch.start(
                    [*TFEM, "up", "--keyfile", self.keyfile, "--spill-dir", self.spill_dir, *options],
                    f"tfem up {' '.join(options)}", READY_TIMEOUT_S, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=log, start_new_session=True, preexec_fn=_pdeathsig_term)
            except TfemError as exc:  # stopped, and its servers with it: what they left remains
                self.clean()
                raise RuntimeError(f"{exc}:\n{self.log()}") from None
        self.servers = _children(self.process.pid)  # registry and broker

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, TFEM_KEYFILE=self.keyfile)
        env.pop("TFEM_BROKER", None)
        return env

    def status(self) -> dict[str, Any]:
        """`tfem status --json`."""
        out = subprocess.run([*TFEM, "status", "--json", "--keyfile", self.keyfile],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return dict(json.loads(out))

    def stop(self) -> None:
        """SIGTERM, as a user stops it; kill what will not stop; then
        `tfem clean` removes whatever is left for the key file."""
        launch.stop(self.process, grace=60)
        for pid in self.servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # only if `tfem up` could not stop them
        self.clean()

    def clean(self) -> None:
        """`tfem clean` for the key file; says so if it found anything."""
        clean = subprocess.run([*TFEM, "clean", "--keyfile", self.keyfile],
                               capture_output=True, text=True, timeout=60)
        said = (clean.stdout + clean.stderr).strip()
        if clean.returncode != 0 or "nothing to clean" not in said:
            print(f"bench: tfem clean after stopping the instance: {said}", file=sys.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """redis-server with persistence off, a unix socket in `where` and a
    loopback TCP port, limits raised so a 1 GiB value fits."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.unix_socket = os.path.join(where, "redis.sock")
        self.log_path = os.path.join(where, "redis.log")
        for _attempt in range(5):  # the free port may be taken before redis binds it
            self.port = free_port()
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--unixsocket", self.unix_socket, "--unixsocketperm", "700",
                 "--save", "", "--appendonly", "no", "--dir", where, "--logfile", self.log_path,
                 "--daemonize", "no", "--databases", "1",
                 "--proto-max-bulk-len", "2gb", "--client-query-buffer-limit", "3gb"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_pdeathsig_term)
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"redis-server did not start; its log:\n{self._log()}")

    def _log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def _wait_ready(self) -> bool:
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                for kwargs in (self.unix, self.tcp):
                    with redis.Redis(**kwargs) as r:
                        r.ping()
                return True
            except redis.ConnectionError:
                time.sleep(0.05)
        return False

    @property
    def unix(self) -> dict[str, Any]:
        return {"unix_socket_path": self.unix_socket}

    @property
    def tcp(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port}

    def stop(self) -> None:
        launch.stop(self.process, grace=30)


def redis_version() -> str:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), out.strip())
    except OSError:
        return "not installed"


TEMP_PARENTS = ("/tmp", "/var/tmp", "/dev/shm")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def sweep_stale() -> None:
    """Remove what runs killed with SIGKILL left behind: their temporary
    directories and shared_memory segments carry their pid."""
    for parent in TEMP_PARENTS:
        for path in glob.glob(os.path.join(parent, "tfem-bench-*")):
            pid = os.path.basename(path).split("-")[2]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)


class Services:
    """Owns everything the run starts; close() removes all of it."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        sweep_stale()
        self.root = self.tempdir("/tmp", "run")  # key files, spill stores, builds, logs

    def tempdir(self, parent: str, prefix: str) -> str:
        """A directory tfem-bench-PID-PREFIX... under `parent`, removed at close."""
        path = tempfile.mkdtemp(prefix=f"tfem-bench-{os.getpid()}-{prefix}-", dir=parent)
        self._undo.append(lambda: shutil.rmtree(path, ignore_errors=True))
        return path

    def subdir(self, name: str) -> str:
        path = os.path.join(self.root, name)
        os.makedirs(path, exist_ok=False)
        return path

    def tfem(self, name: str, *options: str) -> TfemInstance:
        instance = TfemInstance(self.subdir(name), *options)
        self._undo.append(instance.stop)
        return instance

    def redis(self) -> RedisServer:
        server = RedisServer(self.subdir("redis"))
        self._undo.append(server.stop)
        return server

    def nodes(self, n: int) -> Any:
        """n simulated nodes (tests/_nodes.py: namespaces, else loopback);
        at close they are removed, and anything they left is said."""
        import pathlib

        from tests._nodes import Nodes

        made = Nodes(pathlib.Path(self.subdir("nodes")), n)

        def close() -> None:
            left = made.close()
            if left:
                print(f"bench: the simulated nodes left behind: {left}", file=sys.stderr)

        self._undo.append(close)
        return made

    def register(self, undo: Callable[[], None]) -> None:
        """Call `undo` at close (something started outside these methods)."""
        self._undo.append(undo)

    def release(self, what: Any) -> None:
        """Stop a service early (a workload's own instance)."""
        what.stop()
        self._undo = [u for u in self._undo if getattr(u, "__self__", None) is not what]

    def close(self) -> None:
        # A second Ctrl-C must not cut the cleanup short.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _close(self) -> None:
        procs.stop_all()  # workers first: they hold files in the servers
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # keep cleaning
                print(f"bench: cleanup step failed: {exc!r}", file=sys.stderr)
        for path in glob.glob(f"/dev/shm/{SHM_PREFIX}*"):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
