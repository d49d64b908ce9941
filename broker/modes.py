"""Where the broker runs its disk work: in the request loop, or on its worker.

Pure code, no I/O and no clock of its own, in the manner of h11's state
machine: the serving loop reports what it observed (with the time, from
its clock), and asks where the next disk job goes. The unit tests drive it
directly, with made-up times.

Disk work is what touches the spill store: evictions that answer an ALLOC
or a ROOM, SPILL_WRITE, DISCARD, the sweep's spill work. Run in the loop
("sync"), a job costs no thread handoff, but every request that arrives
meanwhile waits for it. Run on the worker thread ("async"), the loop goes
on answering, replies go out in any order, and each job pays a handoff.

The rules (adaptive, the default setting):

1. Never beside the worker: while the worker has jobs, new ones queue
   behind them there (they change the table and the store, which only one
   thread does at a time; and a client's jobs stay in its order).
2. A job known to move at least `big_job_bytes` goes to the worker and the
   mode becomes async: run inline it would alone hold every other request
   past the latency budget.
3. Inline jobs that made other requests wait: the seconds of inline disk
   work done while requests were waiting on the socket are summed; once
   the sum reaches `slow_s`, the mode becomes async. A job after which
   nothing was waiting starts the sum again, so a lone client's slow jobs
   (nobody waits for them) stay inline.
4. Back to sync (hysteresis): once the worker has been idle, and its work
   delayed nobody (no request arrived while it was busy, no job queued
   behind another) for `calm_s`. Switching to async takes one slow moment;
   switching back a calm second: the mode changes at most about once a
   second, and a load that pauses briefly keeps its mode.

The settings "sync" and "async" force a mode: no rule applies and it never
switches.
"""

from __future__ import annotations

import dataclasses
import enum

SETTINGS = ("adaptive", "sync", "async")


class Mode(str, enum.Enum):
    SYNC = "sync"  # disk work in the request loop
    ASYNC = "async"  # disk work on the worker thread


class Route(enum.Enum):
    INLINE = "inline"
    WORKER = "worker"


@dataclasses.dataclass(frozen=True)
class Thresholds:
    # A request should be answered within 10 ms (p99) even while a large
    # file spills. Half of that spent waiting behind inline disk work is
    # the most the loop lets others wait before handing disk work off.
    slow_s: float = 0.005
    # The spill store writes about 1 GB/s here (4 MiB in 4-5 ms, 1 MiB
    # transactions): 8 MiB is 8-10 ms, a whole budget for whoever arrives
    # meanwhile. A client's own SPILL_WRITE (4 MiB) stays under it.
    big_job_bytes: int = 8 << 20
    # Longer than the pauses of a client that keeps coming back (a poller,
    # a writer's next file), so a load that pauses keeps its mode; short
    # enough that a broker gone quiet serves inline again within a second.
    calm_s: float = 1.0


@dataclasses.dataclass(frozen=True)
class Switch:
    """One change of mode, and the rule that made it."""

    at: float
    to: Mode
    why: str


class ModePolicy:
    """Observations in, decisions out. `setting` is one of SETTINGS;
    `now` is the caller's clock at creation (seconds, any origin)."""

    def __init__(self, setting: str = "adaptive", thresholds: Thresholds = Thresholds(), now: float = 0.0) -> None:
        if setting not in SETTINGS:
            raise ValueError(f"broker mode must be one of {', '.join(SETTINGS)}, not {setting!r}")
        self.setting = setting
        self.thresholds = thresholds
        self.mode = Mode.ASYNC if setting == "async" else Mode.SYNC
        self.switches = 0
        self.last_switch: Switch | None = None
        self._waited_s = 0.0  # inline disk seconds during which requests waited, since one after which none did
        self._calm_since = now  # async: since when the worker's work has delayed nobody

    @property
    def adaptive(self) -> bool:
        return self.setting == "adaptive"

    def route(self, now: float, size: int, worker_jobs: int) -> Route:
        """Where the next disk job goes: `size` is the bytes it is known to
        move (0 if unknown), `worker_jobs` the jobs the worker has now
        (queued or running)."""
        if self.setting == "sync":
            return Route.INLINE
        if self.setting == "async" or worker_jobs or self.mode is Mode.ASYNC:
            return Route.WORKER
        if size >= self.thresholds.big_job_bytes:
            self._switch(now, Mode.ASYNC, f"a job moving {size} bytes")
            return Route.WORKER
        return Route.INLINE

    def inline_done(self, now: float, seconds: float, others_waiting: bool) -> None:
        """An inline disk job took `seconds`; `others_waiting`: requests
        were waiting on the socket when it ended."""
        if not self.adaptive or self.mode is Mode.ASYNC:
            return
        if not others_waiting:
            self._waited_s = 0.0
            return
        self._waited_s += seconds
        if self._waited_s >= self.thresholds.slow_s:
            self._switch(now, Mode.ASYNC, f"requests waited behind {self._waited_s * 1e3:.1f} ms of inline disk work")

    def delayed(self, now: float) -> None:
        """The worker's work delayed someone: a request arrived while it
        was busy, or a job queued behind another."""
        if self.mode is Mode.ASYNC:
            self._calm_since = now

    def tick(self, now: float, worker_jobs: int) -> None:
        """Called from the loop now and then: maybe back to sync."""
        if not self.adaptive or self.mode is Mode.SYNC:
            return
        if worker_jobs:
            return  # rule 1: not while the worker has jobs (and it is not idle)
        if now - self._calm_since >= self.thresholds.calm_s:
            self._switch(now, Mode.SYNC, f"the worker delayed nobody for {self.thresholds.calm_s:g} s")

    def _switch(self, now: float, to: Mode, why: str) -> None:
        self.mode = to
        self.switches += 1
        self.last_switch = Switch(now, to, why)
        self._waited_s = 0.0
        self._calm_since = now
