"""The broker's disk worker: one thread that runs disk jobs off the request loop.

Theory of operation:
- A job is a generator that does its disk work in steps (a step moves at
  most one spill-store chunk, one LMDB transaction) and returns its reply.
  The request loop and the worker run the same generators: the loop all
  at once (sync), the worker a step at a time.
- The worker takes turns between the jobs it has, a step each; a job new
  to it goes first for its first FIRST_STEPS steps. So a small job (an
  ALLOC that evicts a small file: two steps, a DISCARD: one) waits for
  the step under way, not for a turn of every large job, let alone for
  the whole of a 1 GiB spill; and a large job is never starved: each
  client has at most one request outstanding (it waits for the reply), so
  between two of its turns at most FIRST_STEPS steps per client go first.
  For the same reason a client's jobs run in its order however the turns
  go.
- The broker's housekeeping (evicting ahead, the store's tidy) is
  `background`: it gets a step only when no other job has one to run, so
  it never stands between a client and its answer.
- Some jobs change what the others rely on: settling a dead client's files,
  the sweep, moving files into a replaced segment. They are `exclusive`:
  they start once every job before them has finished, and run alone.
- One thread: LMDB has one write transaction at a time, and with one
  thread nothing else in the broker needs a lock but the arena's
  allocations (memory.py), which the loop also makes for requests that
  need no disk work.
- Only the loop's thread touches the ROUTER socket. The worker hands each
  finished job back on a deque and bumps an eventfd the loop's poller
  watches; the loop sends the replies (out of order: replies carry the
  request id, and a client waits only for its own).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
from typing import Generator

from tfem.errors import TfemError, errno_of
from tfem.protocol import Reply

log = logging.getLogger("tfem.broker")

FIRST_STEPS = 2  # steps a new job runs before joining the turns
Steps = Generator[None, None, Reply | None]  # a job's steps; it returns its reply (None: a job of the broker's own)


@dataclasses.dataclass(eq=False)
class Work:
    """A disk job: a request's handler (with the identity to answer and the
    request id for an error reply) or a job of the broker's own."""

    steps: Steps
    what: str  # the op, or what the broker's own job does: for the log
    identity: bytes | None = None  # None: nobody to answer
    request_id: int = 0
    size: int = 0  # bytes it is known to move (the policy's signal), 0 if unknown
    exclusive: bool = False
    background: bool = False  # stepped only while no other job has a step to run
    reply: Reply | None = None  # once finished
    stepped: int = 0  # steps run so far

    def step(self) -> bool:
        """Run one step; True once finished (its reply, if any, set). An
        error is the reply, as the handler's errors always were."""
        self.stepped += 1
        try:
            next(self.steps)
            return False
        except StopIteration as done:
            self.reply = done.value
        except TfemError as exc:
            self.reply = Reply(self.request_id, errno_of(exc), str(exc))
        except Exception as exc:  # a bug must not take the broker down
            log.exception("error in disk job %s", self.what)
            self.reply = Reply(self.request_id, 5, f"broker error: {exc}")
        return True

    def run(self) -> None:
        """All its steps, here and now."""
        while not self.step():
            pass


class DiskWorker:
    """The thread, its jobs, and the eventfd that says some are done.

    Counters are each written by one thread only (submitted by the loop,
    finished by the worker), so the loop reads `jobs` without a lock."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # the loop's poller watches it
        self._cond = threading.Condition()
        self._incoming: collections.deque[Work] = collections.deque()  # submitted, not yet taken
        self._finished: collections.deque[Work] = collections.deque()  # for the loop to answer
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.submitted = self.finished = 0
        self.exclusive_submitted = self.exclusive_finished = 0
        self.steps = 0  # steps run, all jobs

    @property
    def jobs(self) -> int:
        """Jobs submitted and not yet handed back (queued or running)."""
        return self.submitted - self.finished

    @property
    def exclusive_pending(self) -> bool:
        """An exclusive job is queued or running: the loop then makes no
        allocation of its own."""
        return self.exclusive_submitted != self.exclusive_finished

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def submit(self, work: Work) -> None:
        """Queue a job (the loop's thread only). The thread starts with the
        first job: a broker kept in sync mode never has one."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="tfem-disk-worker", daemon=True)
            self._thread.start()
        self.submitted += 1
        self.exclusive_submitted += work.exclusive
        with self._cond:
            self._incoming.append(work)
            self._cond.notify()

    def take_finished(self) -> list[Work]:
        """Jobs finished since the last call (the loop, when the eventfd is
        readable)."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        out = []
        while self._finished:
            out.append(self._finished.popleft())
        return out

    def _serve(self) -> None:
        active: collections.deque[Work] = collections.deque()  # taking turns, a step each
        while True:
            with self._cond:
                while not self._stopping and not self._incoming and not active:
                    self._cond.wait()
                if self._stopping:
                    self._incoming.extendleft(reversed(active))  # left for stop() to close
                    return
                # Jobs join the turns in order, up to an exclusive one, which
                # waits for those before it and runs alone.
                while self._incoming and not self._incoming[0].exclusive:
                    active.append(self._incoming.popleft())
                alone = self._incoming.popleft() if not active and self._incoming else None
            if alone is not None:
                alone.run()
                self.steps += 1
                self._hand_back(alone)
                continue
            work = self._next(active)
            self.steps += 1
            if work.step():
                self._hand_back(work)
            else:
                active.append(work)

    @staticmethod
    def _next(active: collections.deque[Work]) -> Work:
        """The job to step now: the first still in its first steps, else
        the one whose turn it is; a background job only when no other job
        is there."""
        for work in active:
            if work.stepped < FIRST_STEPS and not work.background:
                active.remove(work)
                return work
        for work in active:
            if not work.background:
                active.remove(work)
                return work
        return active.popleft()

    def _hand_back(self, work: Work) -> None:
        self._finished.append(work)
        self.finished += 1  # after the append: the loop, seeing jobs == 0, finds every reply
        self.exclusive_finished += work.exclusive
        os.eventfd_write(self.fd, 1)

    def stop(self) -> None:
        """Stop after the step under way; jobs not finished are closed (their
        generators' cleanup runs: holds released, partial records dropped)
        here, once the thread is gone, so only one thread ever touches
        them. Their requests get no reply: the client asks the next broker.
        Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        while self._incoming:
            work = self._incoming.popleft()
            try:
                work.steps.close()
            except Exception:
                log.exception("closing the unfinished disk job %s", work.what)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
