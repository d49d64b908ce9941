"""The broker's clients, and the files of those that die.

Theory of operation: the broker settles the files of clients that die. It
watches each client's process through a pidfd (the kernel says when it
exits, no polling), and sweeps the table every few seconds for holders
nobody introduced and for arena blocks a writer claimed but died before
recording. A file being written by a dead holder is dropped, one being read
goes back to WAIT, a shared read is given back (SlotTable.settle_holder).

Watching is the request loop's (the pidfds are in its poller); settling
changes the table and the spill store, so the server runs it as disk work
(settle, sweep), after the disk jobs already under way.
"""

from __future__ import annotations

import logging
import os
from typing import Container

import zmq

from tfem._native import lib
from tfem.errors import InvalidArgument
from tfem.states import holder_of

from .holdings import Holdings, state_words

log = logging.getLogger("tfem.broker")


class Clients:
    def __init__(self, holdings: Holdings) -> None:
        self.holdings = holdings
        self.pids: dict[bytes, int] = {}  # socket identity -> pid of each client that said hello
        self.settled = 0  # dead clients whose files were settled
        self.poller: zmq.Poller | None = None  # where pidfds are watched, once serving
        self._pidfds: dict[int, int] = {}  # pid -> pidfd of each client process
        self.dead: list[int] = []  # pids found dead, whose files are still to settle

    def hello(self, identity: bytes, pid: int) -> None:
        if not 0 < pid < 2**31:  # a pid_t; pidfd_open would raise OverflowError
            raise InvalidArgument(f"{pid} is not a process id")
        self.pids[identity] = pid
        self._watch(pid)

    def bye(self, identity: bytes) -> None:
        self.pids.pop(identity, None)

    def _watch(self, pid: int) -> None:
        """Be told by the kernel when client process `pid` exits."""
        if pid in self._pidfds or pid == os.getpid():
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.dead.append(pid)
            return
        except OSError:  # no pidfds here (old kernel): the sweep covers it
            return
        self._pidfds[pid] = fd
        if self.poller is not None:
            self.poller.register(fd, zmq.POLLIN)

    def exited(self, ready: Container[object]) -> None:
        """Forget the clients whose pidfds the poller found `ready`; their
        pids go to `dead`, to settle."""
        for pid, fd in list(self._pidfds.items()):
            if fd in ready:
                self._client_exited(pid)

    def _client_exited(self, pid: int) -> None:
        fd = self._pidfds.pop(pid)
        if self.poller is not None:
            self.poller.unregister(fd)
        os.close(fd)
        for identity in [i for i, p in self.pids.items() if p == pid]:
            del self.pids[identity]
        self.dead.append(pid)

    def take_dead(self) -> list[int]:
        """The pids to settle, handed over once."""
        dead, self.dead = self.dead, []
        return dead

    def settle(self, pids: list[int]) -> None:
        """Settle the files of clients that died."""
        for pid in pids:
            self._settle(pid)

    def _settle(self, pid: int) -> None:
        if not any(holder_of(word) == pid for table in self.holdings.tables() for word in state_words(table.seg)) \
                and not any(pid in table.shared_readers() for table in self.holdings.tables()):
            return  # held nothing (a client that closed its files): no lock, no pass over the slots
        for table in self.holdings.tables():
            settled = table.settle_holder(pid)
            if settled.dropped or settled.returned:  # counted as the table changes, before the records go
                self.settled += 1
                log.info("client %d died: dropped %d file(s) it was writing, returned %d it was reading",
                         pid, settled.dropped, settled.returned)
            self.holdings.discard(settled.discard_file_ids)

    def sweep(self) -> None:
        """Settle holders that died unwatched (clients of an earlier broker,
        or of a kernel without pidfds); free blocks claimed by writers that
        died before recording them; discard spill records no file owns any
        more."""
        holders = {holder_of(word) for table in self.holdings.tables() for word in state_words(table.seg)} - {0}
        holders.update(*(table.shared_readers() for table in self.holdings.tables()))
        for pid in holders:
            if pid not in self._pidfds and pid != os.getpid() and not lib.tfem_pid_alive(pid):
                self._settle(pid)
        freed = self.holdings.table.reclaim_blocks()
        if freed > 0:
            log.info("freed %d arena block(s) a writer claimed and died before recording", freed)

    def close(self) -> None:
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds.clear()
