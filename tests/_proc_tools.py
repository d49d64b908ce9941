"""Helpers for tests that run real client processes.

- `Worker`: a child process whose stdout is a stream of JSON events
  (see _tfem_worker.py), read by a thread so the test can wait for the next
  event with a deadline, or check that none comes.
- `workers`: a fixture that starts workers and kills every one still alive
  at teardown, whatever the test did.
- `wait_until`: poll a condition with a deadline instead of sleeping.
- `in_futex_wait`: whether a process is asleep in futex(2), i.e. a reader
  really is waiting inside tfem rather than still starting up.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import pytest

import tfem
from tests._instances import leftovers
from tfem import launch
from tfem.broker.spill import STORE_FILES
from tfem.config import Instance
from tfem.errors import TfemError
from tfem.keyfile import registry_pid
from tfem.segment import Segment

WORKER = str(pathlib.Path(__file__).with_name("_tfem_worker.py"))

# futex(2) syscall numbers, for /proc/PID/syscall.
_FUTEX_NR = {"x86_64": 202, "aarch64": 98, "ppc64le": 221, "s390x": 238, "riscv64": 98}.get(platform.machine())


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.005) -> Any:
    """Poll `condition` until it returns something true; that value.
    Fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def in_futex_wait(pid: int) -> bool:
    """True if the main thread of `pid` is asleep in futex(2)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state not in ("S", "D"):
            return False
        if _FUTEX_NR is not None:
            try:
                with open(f"/proc/{pid}/syscall") as f:
                    return f.read().split()[0] == str(_FUTEX_NR)
            except (PermissionError, IndexError):
                pass
        with open(f"/proc/{pid}/wchan") as f:
            return "futex" in f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False


def pid_gone(pid: int) -> bool:
    """True once `pid` no longer exists (a zombie still exists)."""
    return not os.path.exists(f"/proc/{pid}")


def pid_dead(pid: int) -> bool:
    """True once `pid` has exited (gone, or a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


class Worker:
    """A child process that reports JSON events, one per line."""

    def __init__(self, argv: list[str], env: dict[str, str], stdin: bool = True) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stderr_lines: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.decode(errors="replace").strip()
            if not text:
                continue
            try:
                self.events.put(json.loads(text))
            except ValueError:
                self.events.put({"event": "noise", "text": text})
        self.events.put({"event": "eof"})

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.decode(errors="replace"))

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def next_event(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next event; fails the test if none comes within `timeout`."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"{self.argv[2:]} reported nothing within {timeout} s; stderr: {self.stderr}")
        if event["event"] == "eof":
            self.events.put(event)  # stays at the end
            self.proc.wait(10)
            for t in self._readers:
                t.join(5)
            pytest.fail(f"{self.argv[2:]} ended (status {self.proc.returncode}) without reporting; "
                        f"stderr: {self.stderr}")
        return event

    def expect(self, kind: str, timeout: float = 30.0) -> dict[str, Any]:
        event = self.next_event(timeout)
        assert event["event"] == kind, f"expected a {kind!r} event, got {event}; stderr: {self.stderr}"
        return event

    def quiet_for(self, seconds: float) -> bool:
        """True if the worker reports nothing and stays alive for `seconds`
        (a check that something does NOT happen needs a window)."""
        try:
            event = self.events.get(timeout=seconds)
        except queue.Empty:
            return self.proc.poll() is None
        self.events.put(event)
        return False

    def send(self, line: str = "") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the exit status."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.argv[2:]} did not exit within {timeout} s; stderr: {self.stderr}")
        for t in self._readers:
            t.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.close_stdin()
        for t in self._readers:
            t.join(1)


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    """start(env, command, *args, script=WORKER) -> Worker of `script`;
    all are killed at teardown."""
    started: list[Worker] = []

    def start(env: dict[str, str], *args: str, script: str = WORKER) -> Worker:
        w = Worker([sys.executable, script, *args], env)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


# ---- servers started by hand (not through _instances.py's fixtures) ----


def start_server(args: list[str], env: dict[str, str] | None = None, timeout: float = 60.0) -> subprocess.Popen[bytes]:
    """`python -m tfem ARGS --ready-fd N`; returns once it has said ready.
    Raises AssertionError (with its stderr) if it exits or stays silent."""
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: nobody must read it for the server to go on
        try:
            return launch.start([sys.executable, "-m", "tfem", *args], f"tfem {' '.join(args)}", timeout,
                                env=env, stderr=log)
        except TfemError as exc:
            log.seek(0)
            raise AssertionError(f"{exc}: {log.read().decode(errors='replace')}") from None


def stop_server(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Signal a server and wait for it; SIGKILL if it will not stop."""
    return launch.stop(proc, sig, timeout)


def tfem_cli(*args: str, env: dict[str, str] | None = None, input: bytes | None = None,
             timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "tfem", *args], env=env, input=input,
                          capture_output=True, timeout=timeout)


def kill_pid(pid: int | None) -> None:
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def instance_server_pids(keyfile: str) -> list[int]:
    """The live registry and broker of a key file (from the key file and
    the segment header), checked by command line so a reused pid is safe."""
    candidates = [registry_pid(pathlib.Path(keyfile))]
    try:
        seg = Segment.attach(Instance.for_keyfile(keyfile).segment)
    except (TfemError, OSError):
        pass
    else:
        candidates.append(seg.header.broker_pid)
        seg.close()
    pids = []
    for pid in candidates:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, TypeError):
            continue
        if b"tfem" in argv and keyfile.encode() in argv and not pid_dead(pid):
            pids.append(pid)
    return pids


@pytest.fixture
def servers() -> Iterator[Any]:
    """Servers and key files a test manages itself. At teardown every server
    still running is killed, and `tfem clean` removes what they left, so a
    failing test leaves nothing behind either."""

    class Servers:
        def __init__(self) -> None:
            self.procs: list[subprocess.Popen[bytes]] = []
            self.keyfiles: list[tuple[str, dict[str, str] | None]] = []

        def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
            proc = start_server(list(args), env)
            self.procs.append(proc)
            return proc

        def track(self, keyfile: Any, env: dict[str, str] | None = None) -> None:
            """Clean up after the instance of `keyfile`, however it was started."""
            self.keyfiles.append((str(keyfile), env))

    s = Servers()
    yield s
    # Servers of a `tfem up` that did not stop run in sessions of their own.
    orphans = [pid for keyfile, _ in s.keyfiles for pid in instance_server_pids(keyfile)]
    for pid in orphans:
        kill_pid(pid)
    for proc in s.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    for pid in orphans:  # reaped (by their parent, or init): `tfem clean` checks liveness
        wait_until(lambda: pid_gone(pid), 30, f"pid {pid} to be gone")
    for keyfile, env in s.keyfiles:
        tfem_cli("clean", "--keyfile", keyfile, env=env)


# ---- step-by-step client processes (tests/_steps_worker.py) ----

STEPS_WORKER = str(pathlib.Path(__file__).with_name("_steps_worker.py"))


class StepsWorker(Worker):
    """A client process that runs one command at a time (see _steps_worker.py)."""

    def do(self, op: str, expect: str | None = None, event_timeout: float = 30.0, **step: Any) -> dict[str, Any]:
        """Send one command (`step` holds its fields: name, timeout, ...)
        and return its event; fails the test if the event is not `expect`
        (default: what the command reports on success) within
        `event_timeout` seconds."""
        self.send(json.dumps({"op": op, **step}))
        event = self.next_event(event_timeout)
        if op == "open" and event["event"] == "opening":
            event = self.next_event(event_timeout)
        wanted = expect or {"open": "opened", "write": "wrote", "read": "read", "close": "closed",
                            "abort": "aborted", "stats": "stats"}.get(op)
        assert wanted is None or event["event"] == wanted, f"{op} {step}: {event}; stderr: {self.stderr}"
        return event

    def start_open(self, name: str, mode: str, **step: Any) -> None:
        """Send an open without waiting for its outcome (it may block)."""
        self.send(json.dumps({"op": "open", "name": name, "mode": mode, **step}))
        self.expect("opening")


@pytest.fixture
def steps_workers() -> Iterator[Callable[..., StepsWorker]]:
    """start(env, command, *args) -> StepsWorker (`steps` by default); all
    are killed at teardown."""
    started: list[StepsWorker] = []

    def start(env: dict[str, str], *args: str) -> StepsWorker:
        w = StepsWorker([sys.executable, STEPS_WORKER, *(args or ("steps",))], env)
        started.append(w)
        if not args or args[0] in ("steps", "produce-stream", "consume-stream"):
            w.expect("ready", timeout=60)
        return w

    yield start
    for w in started:
        w.kill()


# ---- `tfem up` with its log in a file ----


class UpInstance:
    """A `tfem up` whose servers' log goes to a file the test can read."""

    def __init__(self, where: pathlib.Path, options: tuple[str, ...], keyfile: pathlib.Path | None = None,
                 spill_dir: pathlib.Path | None = None) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.keyfile = keyfile or where / "tfem.key"
        self.spill_dir = spill_dir or where / "spill"
        self.names = Instance.for_keyfile(self.keyfile)
        self.log_path = where / "up.log"
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, TFEM_KEYFILE=str(self.keyfile))
        env.pop("TFEM_BROKER", None)
        return env

    def start(self, timeout: float = 60.0) -> UpInstance:
        with open(self.log_path, "ab") as log:
            try:
                self.process = launch.start(
                    [sys.executable, "-m", "tfem", "up", "--keyfile", str(self.keyfile), "--spill-dir",
                     str(self.spill_dir), *self.options], "tfem up", timeout, stderr=log, stdin=subprocess.DEVNULL)
            except TfemError as exc:
                self.stop()  # its servers, should any outlive it
                raise AssertionError(f"{exc}: {self.log()}") from None
        return self

    def connect(self) -> Any:
        return tfem.connect(self.keyfile)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def server_pids(self) -> list[int]:
        return instance_server_pids(str(self.keyfile))

    def stop(self) -> None:
        """SIGTERM (after SIGCONT, in case a test stopped it); SIGKILL if it
        will not go, then its servers, then `tfem clean`."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGCONT)
            launch.stop(self.process)
        left = self.server_pids()
        for pid in left:
            kill_pid(pid)
        for pid in left:
            wait_until(lambda: pid_gone(pid), 30, f"server {pid} to be gone")

    def leftovers(self) -> list[str]:
        store = any((self.spill_dir / name).exists() for name in STORE_FILES)
        return leftovers(self.names) + (["spill store"] if store else [])

    def clean(self) -> None:
        tfem_cli("clean", "--keyfile", str(self.keyfile), env=self.env)
        shutil.rmtree(self.spill_dir, ignore_errors=True)


@pytest.fixture
def up_factory(tmp_path: pathlib.Path) -> Iterator[Callable[..., UpInstance]]:
    """start(*options, subdir="", spill_dir=None, keyfile=None) -> a running
    UpInstance (its key file and spill store in its directory unless given).
    At teardown each is stopped as a user would, must leave nothing behind,
    and whatever it left is removed anyway."""
    started: list[UpInstance] = []

    def start(*options: str, subdir: str = "", spill_dir: pathlib.Path | None = None,
              keyfile: pathlib.Path | None = None) -> UpInstance:
        inst = UpInstance(tmp_path / subdir if subdir else tmp_path, options, spill_dir=spill_dir, keyfile=keyfile)
        started.append(inst)
        return inst.start()

    yield start
    left = []
    for inst in started:
        inst.stop()
        found = inst.leftovers()
        if found:
            left.append((str(inst.keyfile), found, inst.log()[-2000:]))
            inst.clean()
    assert not left, f"left behind: {left}"


# ---- a small disk of its own ----


@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 20 MiB tmpfs mounted under tmp_path (a real file system that fills
    up), for a spill store: pass `small_disk / "spill"` as its directory.
    Request it before `up_factory` so the instance is stopped before the
    unmount; unmounted at teardown even when the test failed."""
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m,mode=0700", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(where)], capture_output=True)  # a process still in it
            pytest.fail(f"{where} was still in use at teardown")
