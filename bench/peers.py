"""The peers: the ways a user could hand a temporary file to another process.

A peer is described in the parent (where its files go, which server it
talks to) and used in two forked worker processes, a producer and a
consumer. Each side does what a user of that peer would write:

    producer.put(name, data)   write the file, close it, and tell the consumer
                               if the peer needs telling
    consumer.get(name, out)    wait for the file, open it, read it all (into
                               `out` where the peer allows), close and remove
                               it; a view of what was read, None at the end
    producer.put_end(name)     the end-of-stream marker

| peer | producer | consumer |
| --- | --- | --- |
| tfem | open "w", write, close (publishes) | already waiting in open "r"; readinto, close (frees) |
| tmpfs, disk | open, write, close a file in a /dev/shm or local-disk directory, then the name down a pipe | name from the pipe; open, fstat, readinto, close, unlink |
| shm | multiprocessing.shared_memory: create, copy in, close; the name down a pipe | name from the pipe; attach, copy out, close, unlink |
| redis-unix, redis-tcp | SET + RPUSH of the key, pipelined | BLPOP, then GETDEL (the value arrives as a new bytes object) |

A channel is what one producer/consumer pair shares besides the peer: a
pipe for names, or a Redis list. The parent makes it before forking the
pair and closes its copy once both sides are running.
"""

from __future__ import annotations

import os
from typing import Any

SHM_PREFIX = f"tfem-bench-{os.getpid()}-shm-"  # shared_memory names, swept at exit


class Producer:
    def put(self, name: str, data: Any) -> None:
        raise NotImplementedError

    def put_end(self, name: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Consumer:
    def get(self, name: str, out: bytearray) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Peer:
    key = ""  # short name in results
    label = ""  # what the report shows

    def channel(self, pair: str) -> Any:
        return None

    def close_channel(self, channel: Any) -> None:
        pass

    def producer(self, channel: Any) -> Producer:
        raise NotImplementedError

    def consumer(self, channel: Any) -> Consumer:
        raise NotImplementedError


# ---- tfem ----


class TfemPeer(Peer):
    key, label = "tfem", "tfem"

    def __init__(self, keyfile: str) -> None:
        self.keyfile = keyfile

    def producer(self, channel: Any) -> Producer:
        return _TfemProducer(self.keyfile)

    def consumer(self, channel: Any) -> Consumer:
        return _TfemConsumer(self.keyfile)


class _TfemSide:
    def __init__(self, keyfile: str) -> None:
        import tfem

        self.client = tfem.connect(keyfile)

    def close(self) -> None:
        self.client.close()


class _TfemProducer(_TfemSide, Producer):
    def put(self, name: str, data: Any) -> None:
        with self.client.open(name, "w") as f:
            f.write(data)

    def put_end(self, name: str) -> None:
        self.client.open(name, "w").close()  # an empty file


class _TfemConsumer(_TfemSide, Consumer):
    def get(self, name: str, out: bytearray) -> Any:
        with self.client.open(name, "r") as f:
            n = f.readinto(out)
        return memoryview(out)[:n] if n else None


# ---- names down a pipe (files, shared_memory) ----


class _PipeChannel:
    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()


class _NameReader:
    """Names, one a line, from a pipe; an empty line ends the stream."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines: list[bytes] = []
        self.rest = b""

    def next(self) -> str:
        while not self.lines:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError("the producer closed the name pipe")
            *lines, self.rest = (self.rest + chunk).split(b"\n")
            self.lines = lines[::-1]
        return self.lines.pop().decode()


class _PipePeer(Peer):
    def channel(self, pair: str) -> Any:
        return _PipeChannel()

    def close_channel(self, channel: Any) -> None:
        os.close(channel.read_fd)
        os.close(channel.write_fd)


class _PipeProducer(Producer):
    def __init__(self, channel: _PipeChannel) -> None:
        os.close(channel.read_fd)
        self.notify = channel.write_fd

    def tell(self, name: str) -> None:
        os.write(self.notify, name.encode() + b"\n")

    def put_end(self, name: str) -> None:
        os.write(self.notify, b"\n")


class _PipeConsumer(Consumer):
    def __init__(self, channel: _PipeChannel) -> None:
        os.close(channel.write_fd)
        self.names = _NameReader(channel.read_fd)


class FilePeer(_PipePeer):
    """Plain files in a directory: on /dev/shm (tmpfs) or on a local disk."""

    def __init__(self, key: str, label: str, directory: str) -> None:
        self.key, self.label, self.directory = key, label, directory

    def producer(self, channel: Any) -> Producer:
        return _FileProducer(channel, self.directory)

    def consumer(self, channel: Any) -> Consumer:
        return _FileConsumer(channel, self.directory)


class _FileProducer(_PipeProducer):
    def __init__(self, channel: _PipeChannel, directory: str) -> None:
        super().__init__(channel)
        self.directory = directory

    def put(self, name: str, data: Any) -> None:
        fd = os.open(os.path.join(self.directory, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self.tell(name)


class _FileConsumer(_PipeConsumer):
    def __init__(self, channel: _PipeChannel, directory: str) -> None:
        super().__init__(channel)
        self.directory = directory

    def get(self, name: str, out: bytearray) -> Any:
        name = self.names.next()
        if not name:
            return None
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            view, got = memoryview(out), 0
            while got < size:
                n = os.readv(fd, [view[got:size]])
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)
        os.unlink(path)
        return view[:got]


class ShmPeer(_PipePeer):
    """multiprocessing.shared_memory: a new POSIX segment per file."""

    key, label = "shm", "shared_memory"

    def producer(self, channel: Any) -> Producer:
        return _ShmProducer(channel)

    def consumer(self, channel: Any) -> Consumer:
        return _ShmConsumer(channel)


def _shared_memory() -> Any:
    """SharedMemory without the resource tracker. Before Python 3.13 it
    registers every segment, attached ones too, and unlinks them when the
    registering process exits (CPython gh-82300): a segment handed to
    another process must not be tracked. 3.13 has track=False for this.
    The benchmark removes leftovers itself (SHM_PREFIX)."""
    from multiprocessing import resource_tracker, shared_memory

    if not getattr(shared_memory, "_bench_untracked", False):
        register, unregister = resource_tracker.register, resource_tracker.unregister

        def skip_shm(fn: Any) -> Any:
            return lambda name, rtype: None if rtype == "shared_memory" else fn(name, rtype)

        resource_tracker.register = skip_shm(register)
        resource_tracker.unregister = skip_shm(unregister)
        shared_memory._bench_untracked = True  # type: ignore[attr-defined]
    return shared_memory.SharedMemory


class _ShmProducer(_PipeProducer):
    def __init__(self, channel: _PipeChannel) -> None:
        super().__init__(channel)
        self.SharedMemory = _shared_memory()

    def put(self, name: str, data: Any) -> None:
        n = len(data)
        shm = self.SharedMemory(SHM_PREFIX + name, create=True, size=n)
        view = shm.buf[:n]
        view[:] = data
        view.release()
        shm.close()
        self.tell(name)


class _ShmConsumer(_PipeConsumer):
    def __init__(self, channel: _PipeChannel) -> None:
        super().__init__(channel)
        self.SharedMemory = _shared_memory()

    def get(self, name: str, out: bytearray) -> Any:
        name = self.names.next()
        if not name:
            return None
        shm = self.SharedMemory(SHM_PREFIX + name)
        n = shm.size
        view = shm.buf[:n]
        out[:n] = view
        view.release()
        shm.close()
        shm.unlink()
        return memoryview(out)[:n]


# ---- Redis ----


class RedisPeer(Peer):
    """A redis-server the benchmark started, persistence off."""

    def __init__(self, key: str, label: str, **connection: Any) -> None:
        self.key, self.label, self.connection = key, label, connection

    def channel(self, pair: str) -> Any:
        return f"queue:{pair}"

    def _connect(self) -> Any:
        import redis

        return redis.Redis(**self.connection)

    def producer(self, channel: Any) -> Producer:
        return _RedisProducer(self._connect(), channel)

    def consumer(self, channel: Any) -> Consumer:
        return _RedisConsumer(self._connect(), channel)


class _RedisProducer(Producer):
    def __init__(self, r: Any, queue: str) -> None:
        self.r, self.queue = r, queue

    def put(self, name: str, data: Any) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(name, data)
        pipe.rpush(self.queue, name)
        pipe.execute()

    def put_end(self, name: str) -> None:
        self.r.rpush(self.queue, b"")

    def close(self) -> None:
        self.r.close()


class _RedisConsumer(Consumer):
    def __init__(self, r: Any, queue: str) -> None:
        self.r, self.queue = r, queue

    def get(self, name: str, out: bytearray) -> Any:
        _, key = self.r.blpop([self.queue])
        if not key:
            return None
        return self.r.getdel(key)

    def close(self) -> None:
        self.r.close()
