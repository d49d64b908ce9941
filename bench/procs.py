"""Worker processes for the benchmarks: forked, driven over pipes, never left behind.

A worker is a forked child running one function with a control connection
to the parent. Messages are tuples whose first item says what to do; the
worker answers with plain values, or ("error", traceback) when it fails,
which the parent raises as WorkerError.

A worker ignores SIGINT (Ctrl-C reaches the whole process group; the parent
handles it and stops its workers), dies with the parent (PR_SET_PDEATHSIG),
and is registered so that stop_all() ends it on every exit path.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import time
import traceback
from typing import Any, Callable, Iterator

_CTX = multiprocessing.get_context("fork")
_LIVE: list[Worker] = []
PR_SET_PDEATHSIG = 1
REPLY_TIMEOUT_S = 600.0


class WorkerError(RuntimeError):
    """A worker failed, died, or did not answer in time."""


_stop_requested = False


def request_stop(signum: int, frame: Any) -> None:
    """Signal handler for SIGINT and SIGTERM in the parent. The exception
    it raises is lost if the signal lands in a __del__ (CPython prints
    "Exception ignored" and goes on), so the flag makes the parent's next
    wait for a worker raise it again."""
    global _stop_requested
    _stop_requested = True
    raise KeyboardInterrupt(f"signal {signum}")


def check_stop() -> None:
    if _stop_requested:
        raise KeyboardInterrupt("stop requested")


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Ask the kernel to send `sig` to this process when its parent exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)  # the parent went away before prctl took effect


def _child(target: Callable[..., None], conn: Any, parent: int, args: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(signal.SIGKILL, parent)
    try:
        target(conn, *args)
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
        os._exit(1)


class Worker:
    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        self.name = name
        parent_end, child_end = _CTX.Pipe()
        self.process = _CTX.Process(target=_child, args=(target, child_end, os.getpid(), args),
                                    name=name, daemon=True)
        _LIVE.append(self)
        self.process.start()
        child_end.close()
        self.conn = parent_end

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def send(self, *message: Any) -> None:
        self.conn.send(message)

    def recv(self, timeout: float = REPLY_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(min(0.5, max(0.0, deadline - time.monotonic()))):
            check_stop()
            if time.monotonic() >= deadline:
                raise WorkerError(f"{self.name} did not answer within {timeout:g} s")
        check_stop()
        try:
            reply = self.conn.recv()
        except EOFError:
            self.process.join(1)
            raise WorkerError(f"{self.name} exited (status {self.process.exitcode})") from None
        if isinstance(reply, tuple) and reply[:1] == ("error",):
            raise WorkerError(f"{self.name} failed:\n{reply[1]}")
        return reply

    def call(self, *message: Any, timeout: float = REPLY_TIMEOUT_S) -> Any:
        self.send(*message)
        return self.recv(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask it to finish ("stop"), then terminate, then kill. Idempotent."""
        if self.process.is_alive():
            try:
                self.conn.send(("stop",))
            except (OSError, ValueError):
                pass
            self.process.join(timeout)
        end(self.process)
        self.conn.close()
        if self in _LIVE:
            _LIVE.remove(self)


def end(process: Any, grace: float = 5.0) -> None:
    """Terminate a multiprocessing.Process, then kill it; reap it."""
    if process.is_alive():
        process.terminate()
        process.join(grace)
    if process.is_alive():
        process.kill()
        process.join(grace)


def stop_all() -> None:
    """End every worker still registered, without asking."""
    while _LIVE:
        worker = _LIVE.pop()
        end(worker.process, grace=2.0)
        worker.conn.close()


def sleep_until(when: float) -> None:
    """Sleep until time.perf_counter() reaches `when` (shared across processes)."""
    while True:
        left = when - time.perf_counter()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def orders(conn: Any) -> Iterator[tuple[Any, ...]]:
    """A worker's messages from the parent, up to its ("stop",)."""
    while (msg := conn.recv())[0] != "stop":
        yield msg


def first_order(conn: Any) -> tuple[Any, ...] | None:
    """The one message of a worker that does one run; None for ("stop",)."""
    return next(orders(conn), None)
