"""tfem for asyncio: coroutines over the blocking client, never a copy of it.

    import tfem.aio
    async with await tfem.aio.connect() as client:
        async with await client.open("run1/part0", "r", timeout=30) as f:
            data = await f.read()

As pyzmq's zmq.asyncio over its socket: every operation is the blocking
client's (client.py, files.py, the native core), tried so that it cannot
block; only the waiting is done here, and only what must block goes to a
thread.

Theory of operation:
- Opening. Each attempt is the blocking Client.open with wait=False and,
  for readers, timeout=0: it takes the file or fails at once, even for a
  file the broker holds a moment (it then says WouldBlock). Before it the
  open reads the wake sequence of the name's bucket (a writer: the space
  sequence); on NotFound/WouldBlock (a writer: NoSpace, given a timeout) it
  parks a future until that word moves, then tries again. A segment the
  broker replaced is followed by the attempt itself (EIDRM); the open then
  tries again in the new one at once. Names, modes and lifetimes keywords
  go to Client.open unchanged: its checks, its errors, its options.
- Parked futures are woken by one watcher thread per client, asleep on all
  the words in use at once: futex_waitv (Linux 5.16; before it, the thread
  looks every millisecond). A thread per word would cost 65 threads for
  names spread over every bucket; polling from the loop, a wake-up late by
  its period. Publishers FUTEX_WAKE only when a word's waiter count says
  someone sleeps, so the loop counts the watcher in (as tfem_wait_published
  does) before its last look, from the first future parked on a word until
  the last leaves. The thread hands the words that moved to the loop with
  call_soon_threadsafe; the loop wakes the futures whose sequence moved.
- Cancelling a waiting open drops its future: nothing was taken, nothing
  is held. A non-waiting open of a file held by someone (perhaps the broker
  for a moment, which the blocking open waits for, up to 5 s) runs the
  blocking open on a thread; if the caller is cancelled meanwhile, the file
  it took is given back.
- Data. A read or write of a file in memory is one call into the core,
  made on the loop: a copy of up to BIG_TRANSFER bytes takes about as long
  as handing it to a thread would. What asks the broker (room in a full
  arena, spill writes), reads the spill store, or copies more, goes to the
  loop's default executor: a thread per call rather than a second ZeroMQ
  socket, since those calls are rare and slow (a spill, a disk), and on a
  thread they reuse the blocking client's retries and reconnection as they
  are. A call cancelled on a thread runs to its end there (a thread cannot
  be stopped); the file's next call, close and abort wait for it first.
- stat, unlink and list change or read the table in the segment: on the
  loop. connect, close and stats ask the registry or the broker: a thread.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import threading
import time
from typing import Any, Callable, TypeVar

from . import client as _client
from ._native import ffi, lib
from .cdata import Pointer
from .errors import InvalidArgument, NoSpace, NotFound, WouldBlock
from .files import TfemFile
from .table import WAKE_BUCKETS, FileStat, encode_name, name_hash

BIG_TRANSFER = 1 << 20  # bytes a read or write copies on the loop (63 us here; a thread hop 49 us); more: a thread

T = TypeVar("T")


async def _off_loop(fn: Callable[[], T], undo: Callable[[T], object] | None = None) -> T:
    """fn() on a thread of the loop's default executor. Cancelled meanwhile,
    fn still runs to its end: `undo` then gets what it returned."""
    future = asyncio.get_running_loop().run_in_executor(None, fn)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if undo is not None:
            def settle(done: asyncio.Future[T]) -> None:
                if not done.cancelled() and done.exception() is None:
                    undo(done.result())
            future.add_done_callback(settle)
        raise


class _Word:
    """A sequence word futures are parked on, and its waiter count."""

    __slots__ = ("seq", "waiters", "parked")

    def __init__(self, seq: Pointer[int], waiters: Pointer[int]) -> None:
        self.seq = seq
        self.waiters = waiters
        self.parked: dict[asyncio.Future[bool], int] = {}  # each future, and the value it saw


class _Watcher:
    """The thread that sleeps for a client's parked opens, and the loop's
    side of it. Only the loop touches `_words`; `_armed` (what the thread
    sleeps on: address -> word, value) is shared under `_lock`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._words: dict[int, _Word] = {}
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[Pointer[int], int]] = {}
        self._control = ffi.new("uint32_t[]", 1)  # bumped to wake the thread: words added, closing
        self._closing = False
        self._thread: threading.Thread | None = None

    def park(self, seq: Pointer[int], waiters: Pointer[int], seen: int, timeout: float | None) -> asyncio.Future[bool]:
        """A future that becomes True once *seq is no longer `seen`, False
        after `timeout` seconds (None: no limit)."""
        key = int(ffi.cast("uintptr_t", seq))
        future: asyncio.Future[bool] = self.loop.create_future()
        word = self._words.get(key)
        if word is None:
            word = self._words[key] = _Word(seq, waiters)
            lib.tfem_add32(waiters, 1)  # before the look below: a publish after it wakes the thread
        word.parked[future] = seen
        future.add_done_callback(functools.partial(self._unpark, key))
        if lib.tfem_load32(seq) != seen:
            future.set_result(True)
            return future
        if key not in self._armed:
            with self._lock:
                self._armed[key] = (seq, seen)
            self._wake_thread()
        if timeout is not None:
            timer = self.loop.call_later(timeout, _settle, future, False)
            future.add_done_callback(lambda _: timer.cancel())
        return future

    def _unpark(self, key: int, future: asyncio.Future[bool]) -> None:
        word = self._words.get(key)
        if word is None or word.parked.pop(future, None) is None or word.parked:
            return
        del self._words[key]
        with self._lock:
            self._armed.pop(key, None)
        lib.tfem_add32(word.waiters, -1)

    def _moved(self, keys: list[int]) -> None:
        """On the loop: the thread saw these words move."""
        for key in keys:
            word = self._words.get(key)
            if word is None:
                continue
            now = lib.tfem_load32(word.seq)
            for future, seen in list(word.parked.items()):
                if seen != now:
                    _settle(future, True)

    def _wake_thread(self) -> None:
        lib.tfem_add32(self._control, 1)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tfem.aio watcher", daemon=True)
            self._thread.start()
        else:
            lib.tfem_futex_wake(self._control, 1)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closing:
                    return
                armed = list(self._armed.items())
                control_seen = lib.tfem_load32(self._control)
            words, expected = ffi.new("uint32_t *[]", len(armed)), ffi.new("uint32_t[]", len(armed))
            for i, (_, (seq, value)) in enumerate(armed):
                words[i], expected[i] = seq, value
            rc = lib.tfem_wait_any(words, expected, len(armed), self._control, control_seen)
            if rc not in (0, errno.EINTR):
                time.sleep(0.001)  # not expected; never spin on it
            moved = []
            with self._lock:
                for key, (seq, _) in armed:
                    now = lib.tfem_load32(seq)
                    if key in self._armed and self._armed[key][1] != now:
                        self._armed[key] = (seq, now)  # sleep on the new value: the loop wakes who saw the old
                        moved.append(key)
            if moved:
                try:
                    self.loop.call_soon_threadsafe(self._moved, moved)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    return

    def close(self) -> None:
        """Stop the thread; opens still parked fail."""
        with self._lock:
            self._closing = True
            self._armed.clear()
        if self._thread is not None:
            lib.tfem_add32(self._control, 1)
            lib.tfem_futex_wake(self._control, 1)
            self._thread.join()
        for word in self._words.values():
            lib.tfem_add32(word.waiters, -1)
            for future in word.parked:
                if not future.done() and not self.loop.is_closed():
                    future.set_exception(ValueError("the tfem client was closed while this open waited"))
        self._words.clear()


def _settle(future: asyncio.Future[bool], result: bool) -> None:
    if not future.done():
        future.set_result(result)


class File:
    """A file open through tfem.aio: coroutines over the blocking TfemFile
    (`blocking`), which stays usable, for getbuffer() and the like."""

    def __init__(self, blocking: TfemFile) -> None:
        self.blocking = blocking
        self._busy: asyncio.Future[Any] | None = None  # a call of this file running on a thread

    @property
    def name(self) -> str:
        return self.blocking.name

    @property
    def mode(self) -> str:
        return self.blocking.mode

    @property
    def closed(self) -> bool:
        return self.blocking.closed

    def tell(self) -> int:
        return self.blocking.tell()

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        await self._idle()
        return self.blocking.seek(offset, whence)

    async def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes (-1 or None: the rest), b"" at the end."""
        await self._idle()
        data = self.blocking.read_nowait(size, BIG_TRANSFER)
        return data if data is not None else await self._in_thread(functools.partial(self.blocking.read, size))

    async def write(self, data: Any) -> int:
        """Write all of `data` (any bytes-like object); its length."""
        await self._idle()
        if memoryview(data).nbytes > BIG_TRANSFER:
            return await self._in_thread(functools.partial(self.blocking.write, data))
        done = self.blocking.write_nowait(data)
        return done if isinstance(done, int) else await self._in_thread(done)

    async def close(self) -> None:
        """Producer: publish. Consumer: free it (see TfemFile.close)."""
        await self._idle(then=self.blocking.close)
        if not self.blocking.close_nowait():
            await self._in_thread(self.blocking.close)

    async def abort(self) -> None:
        """Producer: drop it. Consumer: give it back (see TfemFile.abort)."""
        await self._idle(then=self.blocking.abort)
        self.blocking.abort()

    async def __aenter__(self) -> File:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            await self.abort()  # a producer's file is dropped, a consumer's given back
        else:
            await self.close()

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        future = asyncio.get_running_loop().run_in_executor(None, fn)
        self._busy = future
        return await asyncio.shield(future)  # cancelled: the call ends on its thread; _idle waits for it

    async def _idle(self, then: Callable[[], None] | None = None) -> None:
        """Wait until no call of this file runs on a thread. Cancelled
        meanwhile, `then` (close or abort) is called once it ends, so that
        the file is let go of all the same."""
        busy = self._busy
        if busy is not None and not busy.done():
            try:
                await asyncio.wait([busy])
            except asyncio.CancelledError:
                if then is not None:
                    busy.add_done_callback(lambda _: then())
                raise
        self._busy = None


class Client:
    """A connection to one broker for asyncio: coroutines over the blocking
    Client (`blocking`). Its opens wait in one event loop at a time: the
    loop of its first waiting open, until that loop is closed."""

    def __init__(self, blocking: _client.Client) -> None:
        self.blocking = blocking
        self._watcher: _Watcher | None = None
        self._closed = False
        self._segment: Any = None  # the segment whose words below are cached
        self._words: tuple[Pointer[int], Pointer[int], Pointer[int], Pointer[int]] | None = None

    async def open(self, name: str | bytes, mode: str = "r", timeout: float | None = None, wait: bool = True,
                   **options: Any) -> File:
        """Client.open without blocking the loop, with the same arguments,
        meaning and errors; `options` (file lifetimes) go to it unchanged.
        A reader waits for the name without a thread; cancelling the wait
        leaves nothing held."""
        core = self._core()
        kind = _client._MODES.get(mode) if isinstance(mode, str) else None
        if kind is None or (timeout is not None and not timeout >= 0):
            return File(core.open(name, mode, timeout, wait, **options))  # raises Client.open's error
        bucket = name_hash(encode_name(name)) % WAKE_BUCKETS  # a bad name: encode_name's error, as Client.open's
        if core.cluster and kind == "r":
            # Across nodes a name may come from another node: the blocking
            # open asks the broker to pull it, on a thread (cancelled, it
            # runs to its end and gives back what it took).
            return File(await _off_loop(lambda: core.open(name, mode, timeout, wait, **options),
                                        undo=TfemFile.abort))
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            segment = core.segment
            name_seq, name_waiters, space_seq, space_waiters = self._words_of(segment)
            seq, waiters = (space_seq, space_waiters) if kind == "w" else (name_seq + bucket, name_waiters + bucket)
            seen = lib.tfem_load32(seq)
            try:
                f = core.open(name, mode, timeout if kind == "w" else 0, False, **options)
            except (NotFound, WouldBlock) as exc:
                if not wait:
                    if isinstance(exc, NotFound) or timeout == 0:
                        raise
                    # Held: by the broker a moment, maybe, which the blocking open waits for (up to 5 s).
                    return File(await _off_loop(lambda: core.open(name, mode, timeout, False, **options),
                                                undo=TfemFile.abort))
            except NoSpace:
                if kind != "w" or not wait or not timeout:
                    raise
            else:
                if kind == "a" and f.writable() and timeout:
                    f._room_timeout = timeout  # what Client.open gives a file it creates: the attempt's was 0
                return File(f)
            if core.segment is not segment:
                continue  # the broker replaced the segment: look in the new one
            left = None if deadline is None else deadline - loop.time()
            if (left is not None and left <= 0) or not await self._watching(loop).park(seq, waiters, seen, left):
                # Client.open's error for a wait that ran out: a reader's Timeout, a writer's NoSpace
                raise core._open_error(errno.ENOSPC if kind == "w" else errno.ETIMEDOUT, encode_name(name), kind,
                                       timeout)

    async def stat(self, name: str | bytes) -> FileStat:
        return self._core().stat(name)

    async def unlink(self, name: str | bytes) -> None:
        self._core().unlink(name)

    async def list(self) -> list[str]:
        return self._core().list()

    async def stats(self) -> dict[str, Any]:
        """The broker's statistics (a round trip, on a thread)."""
        return await _off_loop(self._core().stats)

    async def close(self) -> None:
        """Close files still open (producers' are dropped) and disconnect;
        opens still waiting fail. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.close()
        await _off_loop(self.blocking.close)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _core(self) -> _client.Client:
        if self._closed:
            raise ValueError("the tfem client is closed")
        return self.blocking

    def _watching(self, loop: asyncio.AbstractEventLoop) -> _Watcher:
        if self._watcher is not None and self._watcher.loop is not loop:
            if not self._watcher.loop.is_closed():
                raise InvalidArgument("a tfem.aio client waits in one event loop at a time: connect again "
                                      "for another")
            self._watcher.close()  # its loop is gone, and every open that waited there with it
            self._watcher = None
        if self._watcher is None:
            self._watcher = _Watcher(loop)
        return self._watcher

    def _words_of(self, segment: Any) -> tuple[Pointer[int], Pointer[int], Pointer[int], Pointer[int]]:
        """The wake sequences and waiter counts of `segment`'s name buckets
        (arrays), and its space sequence and waiter count."""
        if segment is not self._segment or self._words is None:
            h = segment.header
            self._words = (ffi.cast("uint32_t *", ffi.addressof(h, "wake_seq")),
                           ffi.cast("uint32_t *", ffi.addressof(h, "wake_waiters")),
                           ffi.addressof(h, "space_seq"), ffi.addressof(h, "space_waiters"))
            self._segment = segment
        return self._words


async def connect(keyfile: str | os.PathLike[str] | None = None, *, broker: str | None = None,
                  timeout: float = 5.0) -> Client:
    """tfem.connect, on a thread: the registry's and the broker's answers
    are waited for there."""
    blocking = await _off_loop(functools.partial(_client.connect, keyfile, broker=broker, timeout=timeout),
                               undo=_client.Client.close)
    return Client(blocking)
