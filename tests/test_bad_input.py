"""Bad input on every channel: a clear error of the right class and errno,
and the broker and the registry keep serving afterwards.

Each test ends (and some check in between) with `assert_serves`: a fresh
client found through the registry writes a file past its inline buffer (an
ALLOC request to the broker) and reads it back.
"""

from __future__ import annotations

import errno
import io
import itertools
import math
import os
import pathlib

import msgpack
import pytest
import sysv_ipc
import zmq

import tfem
import tfem.posix
from tfem import discovery, protocol
from tfem.discovery import queue_key
from tfem.errors import (
    AlreadyExists, BadDescriptor, FileTooLarge, InvalidArgument, NameTooLong, NoSpace, NotFound, TfemError,
    WrongMode,
)
from tfem.protocol import VERSION, Action, decode_reply
from tfem.keyfile import registry_pid

BUF, BLOCK = 1 << 10, 4 << 10  # the small instance's inline buffer and block
_names = itertools.count()


def fresh(prefix: str = "f") -> str:
    return f"{prefix}/{next(_names)}"


def assert_serves(inst) -> None:
    """The instance still serves a normal client end to end."""
    assert inst.process.poll() is None, "tfem up exited"
    with inst.connect() as c:
        name = fresh("serves")
        data = os.urandom(3 * BLOCK + 123)  # past the inline buffer: the broker allocates
        with c.open(name, "w") as f:
            assert f.write(data) == len(data)
        with c.open(name, "r", wait=False) as f:
            assert f.read() == data
        assert name not in c.list()


def expect(cls: type[TfemError], code: int, call, *args, **kwargs) -> TfemError:
    with pytest.raises(cls) as info:
        call(*args, **kwargs)
    assert isinstance(info.value, OSError)
    assert info.value.errno == code, f"{info.value!r}: errno {info.value.errno}, wanted {code}"
    assert str(info.value), "an error without a message"
    return info.value


# ---- names ----

BAD_NAMES = [
    ("", InvalidArgument, errno.EINVAL),
    (b"", InvalidArgument, errno.EINVAL),
    ("x" * 256, NameTooLong, errno.ENAMETOOLONG),
    (b"x" * 256, NameTooLong, errno.ENAMETOOLONG),
    ("\u00e9" * 128, NameTooLong, errno.ENAMETOOLONG),  # 128 characters, 256 bytes
    ("n" * 10_000, NameTooLong, errno.ENAMETOOLONG),
    (b"\xff\xfe", InvalidArgument, errno.EINVAL),
    (b"ok\x80", InvalidArgument, errno.EINVAL),
    (bytearray(b"\xc3"), InvalidArgument, errno.EINVAL),
    ("\ud800", InvalidArgument, errno.EINVAL),  # a lone surrogate has no UTF-8
    ("a\0b", InvalidArgument, errno.EINVAL),
    (b"\0", InvalidArgument, errno.EINVAL),
    (None, InvalidArgument, errno.EINVAL),
    (42, InvalidArgument, errno.EINVAL),
    (4.2, InvalidArgument, errno.EINVAL),
    (["name"], InvalidArgument, errno.EINVAL),
    (pathlib.Path("name"), InvalidArgument, errno.EINVAL),
]


def test_bad_names(instance, client: tfem.Client) -> None:
    for name, cls, code in BAD_NAMES:
        for mode in ("w", "r", "a"):
            error = expect(cls, code, client.open, name, mode, wait=False)
            assert isinstance(error, ValueError), repr(name)
        expect(cls, code, client.stat, name)
        expect(cls, code, client.unlink, name)
    assert client.list() == []
    # The limits themselves are fine: 255 bytes, and multi-byte text.
    for name in ("y" * 255, "\u00e9" * 127 + "z", "/a/../b//", " ", "\u6587\u4ef6"):
        with client.open(name, "w") as f:
            f.write(b"ok")
        assert client.stat(name).name == name
        with client.open(name.encode(), "r", wait=False) as f:
            assert f.read() == b"ok"
    assert_serves(instance)


# ---- handles used the wrong way ----


def test_read_on_a_write_handle_and_write_on_a_read_handle(instance, client: tfem.Client) -> None:
    name = fresh()
    with client.open(name, "w") as f:
        f.write(b"hello")
        for call in (f.read, lambda: f.read(1), lambda: f.readinto(bytearray(4)), f.readall,
                     lambda: list(f.chunks()), f.readline):
            error = expect(WrongMode, errno.EBADF, call)
            assert isinstance(error, io.UnsupportedOperation)
        assert f.tell() == 5
        f.write(b" world")  # the handle still works
    with client.open(name, "r", wait=False) as f:
        for call in (lambda: f.write(b"x"), lambda: f.write(b""), lambda: f.writelines([b"x"])):
            error = expect(WrongMode, errno.EBADF, call)
            assert isinstance(error, io.UnsupportedOperation)
        assert f.tell() == 0
        assert f.read() == b"hello world"
    assert_serves(instance)


def test_bad_seeks(instance, client: tfem.Client) -> None:
    name = fresh()
    with client.open(name, "w") as f:
        f.write(b"0123456789")
        f.seek(4)
        for offset, whence in ((-1, os.SEEK_SET), (-5, os.SEEK_CUR), (-11, os.SEEK_END), (-(2**70), os.SEEK_SET)):
            error = expect(InvalidArgument, errno.EINVAL, f.seek, offset, whence)
            assert isinstance(error, ValueError)
            assert f.tell() == 4
        for whence in (3, -1, 99, None, "0"):
            expect(InvalidArgument, errno.EINVAL, f.seek, 0, whence)
            assert f.tell() == 4
        for offset in (1.5, "1", None, b"\x01"):  # as io.BytesIO: not an integer
            with pytest.raises(TypeError):
                f.seek(offset)
            assert f.tell() == 4
        with pytest.raises(TypeError):
            f.write("text is not bytes")
        assert f.tell() == 4
        assert f.seek(-4, os.SEEK_CUR) == 0 and f.seek(-1, os.SEEK_END) == 9
        f.write(b"X")
    with client.open(name, "r", wait=False) as f:
        expect(InvalidArgument, errno.EINVAL, f.seek, -1)
        expect(InvalidArgument, errno.EINVAL, f.seek, 0, 7)
        with pytest.raises(TypeError):
            f.seek(2.0)
        assert f.tell() == 0
        assert f.read() == b"012345678X"
    assert_serves(instance)


def test_operations_on_closed_files(instance, client: tfem.Client) -> None:
    name = fresh()
    writer = client.open(name, "w")
    writer.write(b"data")
    writer.close()
    reader = client.open(name, "r", wait=False)
    assert reader.read() == b"data"
    reader.close()
    for f in (writer, reader):
        assert f.closed
        for call in (f.read, lambda: f.read(1), lambda: f.readinto(bytearray(1)), lambda: f.write(b"x"),
                     lambda: f.seek(0), f.tell, f.readable, f.writable, f.seekable, f.flush,
                     lambda: list(f.chunks()), f.__enter__):
            with pytest.raises(ValueError):
                call()
        f.close()  # idempotent
        f.abort()
    assert client.list() == []
    assert_serves(instance)


# ---- open: modes, timeouts, names already held ----


def test_bad_modes(instance, client: tfem.Client) -> None:
    for mode in ("", "x", "rw", "wr", "r+", "w+", "a+", "rt", "wt", "R", "W", " r", "bb", "rwa", "ww",
                 None, 1, b"r", ["r"]):
        expect(InvalidArgument, errno.EINVAL, client.open, fresh("mode"), mode, wait=False)
    assert client.list() == []
    for mode in ("rb", "br"):  # binary is the only kind there is
        expect(NotFound, errno.ENOENT, client.open, fresh("mode"), mode, wait=False)
    assert_serves(instance)


def test_bad_timeouts(instance, client: tfem.Client) -> None:
    for timeout in (-1, -1e-9, -math.inf, math.nan):
        for mode in ("r", "a"):
            error = expect(InvalidArgument, errno.EINVAL, client.open, fresh("timeout"), mode, timeout=timeout)
            assert isinstance(error, ValueError)
    assert client.list() == []  # "a" did not create anything either
    assert_serves(instance)


def test_opening_an_existing_name_for_writing(instance, client: tfem.Client) -> None:
    name = fresh("dup")
    with instance.connect() as other:
        with client.open(name, "w") as f:
            f.write(b"first ")
            for who in (client, other):  # WRITE
                error = expect(AlreadyExists, errno.EEXIST, who.open, name, "w")
                assert isinstance(error, FileExistsError)
            f.write(b"writer")
        expect(AlreadyExists, errno.EEXIST, other.open, name, "w")  # WAIT
        with other.open(name, "r", wait=False) as r:  # READ
            expect(AlreadyExists, errno.EEXIST, client.open, name, "w")
            assert r.read() == b"first writer"
    # Consumed: the name can be written again.
    with client.open(name, "w") as f:
        f.write(b"second")
    with client.open(name, "r", wait=False) as f:
        assert f.read() == b"second"
    assert_serves(instance)


# ---- the posix-style calls ----


@pytest.fixture
def posix(instance, monkeypatch: pytest.MonkeyPatch):
    """tfem.posix with its default client pointed at `instance`, and reset after."""
    monkeypatch.setenv("TFEM_KEYFILE", str(instance.keyfile))
    monkeypatch.delenv("TFEM_BROKER", raising=False)
    saved_client = tfem.posix._client
    tfem.posix._client = None
    before = set(tfem.posix._files)
    try:
        yield tfem.posix
    finally:
        for fd in set(tfem.posix._files) - before:
            f = tfem.posix._files.pop(fd)
            if not f.closed:
                f.abort()
        if tfem.posix._client is not None:
            tfem.posix._client.close()
        tfem.posix._client = saved_client


def test_posix_unknown_descriptors(instance, posix) -> None:
    name = fresh("posix")
    fd = posix.tfem_open(name, posix.TFEM_WRONLY)  # connects the default client
    assert posix.tfem_write(fd, b"abc") == 3
    for bad in (999_999, -1, 0, 1, 2, fd + 1000, None, str(fd), float(fd), [fd]):
        expect(BadDescriptor, errno.EBADF, posix.tfem_read, bad, 1)
        expect(BadDescriptor, errno.EBADF, posix.tfem_write, bad, b"x")
        expect(BadDescriptor, errno.EBADF, posix.tfem_lseek, bad, 0)
        expect(BadDescriptor, errno.EBADF, posix.tfem_fstat, bad)
        expect(BadDescriptor, errno.EBADF, posix.tfem_close, bad)
    posix.tfem_close(fd)
    # A closed descriptor is unknown too, and closing it twice is an error.
    expect(BadDescriptor, errno.EBADF, posix.tfem_close, fd)
    expect(BadDescriptor, errno.EBADF, posix.tfem_write, fd, b"x")
    expect(BadDescriptor, errno.EBADF, posix.tfem_lseek, fd, 0)
    fd = posix.tfem_open(name, posix.TFEM_RDONLY | posix.TFEM_NONBLOCK)
    assert posix.tfem_read(fd, 100) == b"abc"
    posix.tfem_close(fd)
    expect(BadDescriptor, errno.EBADF, posix.tfem_read, fd, 1)
    assert_serves(instance)


def test_posix_bad_arguments(instance, posix) -> None:
    name = fresh("posix")
    for flags in (3, 0o10, -1, 1 << 40, posix.TFEM_NONBLOCK | 3, "r", None, 1.0):
        expect(InvalidArgument, errno.EINVAL, posix.tfem_open, name, flags)
    expect(NotFound, errno.ENOENT, posix.tfem_stat, name)  # nothing was created
    expect(InvalidArgument, errno.EINVAL, posix.tfem_open, name, posix.TFEM_RDONLY, timeout=-1)
    expect(NameTooLong, errno.ENAMETOOLONG, posix.tfem_open, "z" * 256, posix.TFEM_WRONLY)
    expect(InvalidArgument, errno.EINVAL, posix.tfem_open, "", posix.TFEM_WRONLY)
    expect(NotFound, errno.ENOENT, posix.tfem_open, name, posix.TFEM_RDONLY | posix.TFEM_NONBLOCK)

    wfd = posix.tfem_open(name, posix.TFEM_WRONLY)
    expect(AlreadyExists, errno.EEXIST, posix.tfem_open, name, posix.TFEM_WRONLY)
    expect(WrongMode, errno.EBADF, posix.tfem_read, wfd, 1)
    expect(InvalidArgument, errno.EINVAL, posix.tfem_lseek, wfd, -1)
    expect(InvalidArgument, errno.EINVAL, posix.tfem_lseek, wfd, 0, 42)
    assert posix.tfem_write(wfd, b"0123456789") == 10
    assert posix.tfem_lseek(wfd, 0, os.SEEK_CUR) == 10
    posix.tfem_close(wfd)

    rfd = posix.tfem_open(name, posix.TFEM_RDONLY, timeout=1)
    expect(WrongMode, errno.EBADF, posix.tfem_write, rfd, b"x")
    for n in (-1, 1.5, None, "3"):
        expect(InvalidArgument, errno.EINVAL, posix.tfem_read, rfd, n)
    assert posix.tfem_fstat(rfd).state == "READ"
    assert posix.tfem_lseek(rfd, 3) == 3
    assert posix.tfem_read(rfd, 4) == b"3456"
    posix.tfem_close(rfd)
    expect(NotFound, errno.ENOENT, posix.tfem_stat, name)
    assert_serves(instance)


# ---- a full table, a full arena ----


def test_a_full_slot_table(instance_factory) -> None:
    inst = instance_factory("--slots", "4", "--buf-size", "1K", "--block-size", "4K", "--memory", "256K")
    with inst.connect() as c:
        writing = c.open("held/0", "w")  # WRITE
        writing.write(b"w" * 5000)
        for i in (1, 2):  # WAIT
            with c.open(f"held/{i}", "w") as f:
                f.write(bytes([i]) * (i * 3000))
        with c.open("held/3", "w") as f:
            f.write(b"r")
        reading = c.open("held/3", "r", wait=False)  # READ
        assert c.stats()["slots_free"] == 0

        for mode in ("w", "a"):
            error = expect(NoSpace, errno.ENOSPC, c.open, "one too many", mode)
            assert "slot" in str(error)
        with inst.connect() as other:  # the same for any client
            expect(NoSpace, errno.ENOSPC, other.open, "one too many", "w")
        assert sorted(c.list()) == ["held/0", "held/1", "held/2", "held/3"]
        assert c.stats()["slots_free"] == 0

        # A full table still serves what it holds.
        writing.write(b"w" * 5000)
        writing.close()
        with c.open("held/1", "r", wait=False) as f:  # frees a slot
            assert f.read() == b"\x01" * 3000
        with c.open("one too many", "w") as f:
            f.write(b"n" * (3 * BLOCK))
        expect(NoSpace, errno.ENOSPC, c.open, "two too many", "w")

        assert reading.read() == b"r"
        reading.close()
        for name, data in (("held/0", b"w" * 10_000), ("held/2", b"\x02" * 6000),
                           ("one too many", b"n" * (3 * BLOCK))):
            with c.open(name, "r", wait=False) as f:
                assert f.read() == data
        assert c.list() == [] and c.stats()["slots_free"] == 4
    assert_serves(inst)


def test_a_full_arena_without_spill(instance_factory) -> None:
    inst = instance_factory("--slots", "16", "--buf-size", "1K", "--block-size", "4K", "--memory", "64K",
                            "--no-spill")
    a, b, d = os.urandom(30_000), os.urandom(20_000), os.urandom(6_000)
    with inst.connect() as c:
        with c.open("a", "w") as f:  # published, waiting
            f.write(a)
        held = c.open("b", "w")  # being written
        held.write(b)
        partial = c.open("d", "w")
        partial.write(d)
        used = c.stats()["arena_bytes_used"]

        # A file that cannot fit: the error reaches the writer, and leaving
        # the `with` through it drops the file.
        with pytest.raises(NoSpace) as info:
            with c.open("c", "w") as f:
                f.write(os.urandom(60_000))
        assert info.value.errno == errno.ENOSPC and "arena" in str(info.value)
        assert "c" not in c.list()
        assert c.stats()["arena_bytes_used"] == used

        # A write that fails leaves what the file had; the writer may go on.
        # This one would take the file past all the instance holds: EFBIG.
        pos = partial.tell()
        expect(FileTooLarge, errno.EFBIG, partial.write, os.urandom(100_000))
        assert partial.tell() == pos == len(d) and c.stat("d").size == len(d)
        partial.close()

        # What was stored is intact and readable.
        with c.open("a", "r", wait=False) as f:
            assert f.read() == a
        held.write(b[:5000])  # the freed blocks serve the writer that waited
        held.close()
        with c.open("b", "r", wait=False) as f:
            assert f.read() == b + b[:5000]
        with c.open("d", "r", wait=False) as f:
            assert f.read() == d
        # After freeing, service resumes: the file that did not fit fits now.
        big = os.urandom(60_000)
        with c.open("c", "w") as f:
            f.write(big)
        with c.open("c", "r", wait=False) as f:
            assert f.read() == big
        stats = c.stats()
        assert c.list() == [] and stats["arena_bytes_used"] == 0 and stats["spill"] is None
    assert_serves(inst)


# ---- garbage on the broker's socket ----


class RawBroker:
    """A DEALER socket speaking (or not) the broker's protocol."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def request(self, rid: int, op: str, args: object, *more: bytes) -> None:
        self.send([msgpack.packb([VERSION, rid, op, args]), *more])

    def reply(self, timeout: float = 10.0) -> protocol.Reply:
        assert self.socket.poll(int(timeout * 1000)), "the broker did not answer"
        return decode_reply(self.socket.recv_multipart())

    def close(self) -> None:
        self.socket.close()
        self.context.term()


def test_garbage_frames_to_the_broker(instance, client: tfem.Client) -> None:
    raw = RawBroker(instance.names.endpoint)
    try:
        errors_before, broker_pid = client.stats()["request_errors"], client.stats()["broker_pid"]

        # Dropped: nothing says which request they were, so no reply. The
        # next reply on this socket is the one for the STATS that follows.
        dropped = [[b""], [b"\xc1"], [b"\x00" * 100], [msgpack.packb({"id": 1})], [msgpack.packb([VERSION])],
                   [msgpack.packb([VERSION, -3, "stats", {}])], [msgpack.packb([VERSION, "x", "stats", {}])],
                   [b"x"] * 50, [os.urandom(4 << 20)], [b"\x91" * 100_000]]
        for frames in dropped:
            raw.send(frames)
        raw.request(1000, "stats", {})
        reply = raw.reply()
        assert (reply.request_id, reply.errno) == (1000, 0)
        assert reply.result["request_errors"] == errors_before + len(dropped)

        # Answered with an error: they carry a request id.
        answered = [
            (7, [msgpack.packb([VERSION, 7, "nonsense", {}])], errno.EPROTO),
            (8, [msgpack.packb([VERSION + 1, 8, "stats", {}])], errno.EPROTO),
            (9, [msgpack.packb([VERSION, 9, "hello", {"pid": os.getpid()}]), b"extra"], errno.EPROTO),
            (10, [msgpack.packb([VERSION, 10, "hello", {"pid": -1}])], errno.EPROTO),
            (11, [msgpack.packb([VERSION, 11, "hello", {"pid": True}])], errno.EPROTO),
            (12, [msgpack.packb([VERSION, 12, "alloc", {"slot": 0, "generation": 1, "capacity": 1}])],
             errno.ENOTCONN),  # before HELLO: the client must introduce itself
            (13, [msgpack.packb([VERSION, 13, "spill_write", {"slot": 0, "generation": 1, "offset": 2000}])],
             errno.EPROTO),  # a data op without its data frame
            (14, [msgpack.packb([VERSION, 14, "stats", {}, "extra"])], errno.EPROTO),
        ]
        for rid, frames, code in answered:
            raw.send(frames)
            reply = raw.reply()
            assert (reply.request_id, reply.errno) == (rid, code), reply
            assert isinstance(reply.result, str) and reply.result

        # A message whose id is not a request id gets no reply with that id:
        # either none, or one a client can decode (checked by raw.reply()).
        raw.request(True, "nonsense", {})  # type: ignore[arg-type]
        raw.request(1001, "stats", {})
        reply = raw.reply()
        assert reply.request_id == 1001, reply

        # Well-formed but mistaken requests after HELLO: errors, not crashes.
        raw.request(20, "hello", {"pid": os.getpid()})
        hello = raw.reply()
        assert hello.errno == 0 and hello.result["segment"] == instance.names.segment
        mistaken = [
            ("alloc", {"slot": 10**6, "generation": 0, "capacity": 1}, []),
            ("alloc", {"slot": 2**63 - 1, "generation": 0, "capacity": 2**63 - 1}, []),
            ("alloc", {"slot": 0, "generation": 12345, "capacity": 10**6}, []),
            ("spill_write", {"slot": 0, "generation": 0, "offset": 4096}, [b"data"]),
            ("spill_write", {"slot": 10**9, "generation": 0, "offset": 8192}, [b"data"]),
        ]
        for i, (op, args, more) in enumerate(mistaken):
            raw.request(30 + i, op, args, *more)
            reply = raw.reply()
            assert (reply.request_id, reply.errno) == (30 + i, errno.EINVAL), (op, args, reply)

        # A file held by a real client cannot be touched through another
        # connection's mistaken requests either.
        name = fresh("held")
        with client.open(name, "w") as f:
            f.write(b"k" * 5000)
            slot = client.stat(name).slot
            raw.request(42, "spill_write", {"slot": slot, "generation": 0, "offset": 9000}, b"x")
            assert raw.reply().errno == errno.EINVAL
            f.write(b"k" * 5000)
        with client.open(name, "r", wait=False) as f:
            assert f.read() == b"k" * 10_000

        raw.request(50, "bye", {})
        assert raw.reply().errno == 0
        stats = client.stats()
        assert stats["request_errors"] >= errors_before + len(dropped) + len(answered) + len(mistaken) + 1
        assert stats["broker_pid"] == broker_pid
        os.kill(broker_pid, 0)  # the same broker, alive
    finally:
        raw.close()
    # The client that was connected all along, and a new one, are served.
    with client.open("after", "w") as f:
        f.write(b"still here" * 1000)
    with client.open("after", "r", wait=False) as f:
        assert f.read() == b"still here" * 1000
    assert_serves(instance)


# ---- garbage on the registry's queue ----


def _msgmax() -> int:
    """The largest message this machine's queues take (msgmax, within msgmnb)."""
    try:
        return min(int(pathlib.Path(f"/proc/sys/kernel/{n}").read_text()) for n in ("msgmax", "msgmnb"))
    except (OSError, ValueError):
        return 8192


def _registry_list(inst) -> dict:
    return discovery.ask_registry(inst.keyfile, Action.LIST, timeout=10)


def test_garbage_messages_to_the_registry(instance) -> None:
    pid = registry_pid(instance.keyfile)
    assert pid
    queue = sysv_ipc.MessageQueue(queue_key(instance.keyfile), max_message_size=_msgmax())
    me = os.getpid()

    def body(*fields: object) -> bytes:
        return msgpack.packb(list(fields))

    garbage = [
        b"", b"\xc1", b"\x00", b"\xff" * 300, b"\x91" * 2000, b"GET / HTTP/1.0\r\n\r\n",
        body(VERSION, 1, "register", 1, {}),  # pid 1 is the request type itself
        body(VERSION, 1, "register", 0, {}),
        body(VERSION, 1, "register", -5, {}),
        body(VERSION, 1, "register", 2**31, {}),
        body(VERSION, 1, "register", True, {}),
        body(VERSION, 1, "register", "me", {}),
        body(VERSION + 1, 1, "register", me, {}),
        body(True, 1, "register", me, {}),
        body(VERSION, -1, "register", me, {}),
        body(VERSION, 1, "nonsense", me, {}),
        body(VERSION, 1, "register", me, {"extra": 1}),
        body(VERSION, 1, "announce", me, {"endpoint": 5, "load": 1}),
        body(VERSION, 1, "announce", me, {"endpoint": "", "load": 1}),
        body(VERSION, 1, "announce", me, {"endpoint": "ipc:///x", "load": -1}),
        body(VERSION, 1, "withdraw", me),
        msgpack.packb({"action": "register"}),
        body(VERSION, 1, "register", me, {})[:-1],  # truncated
        body(VERSION, 1, "announce", me, {"endpoint": "e" * 5000, "load": 0}),  # over 4096 bytes
        b"\xc1" * 3000,  # oversize, though under the queue's limits
        b"\x00" * _msgmax(),  # the largest message the kernel takes
    ]
    before = _registry_list(instance)["dropped"]
    for i, message in enumerate(garbage):
        queue.send(message, block=False, type=protocol.REGISTRY_REQUEST_TYPE)
        # The registry answers the next request only after dropping this one.
        listing = _registry_list(instance)
        assert listing["dropped"] == before + i + 1, f"message {i} ({message[:40]!r}) not dropped"
        assert len(listing["brokers"]) == 1

    # Garbage addressed to a client (message type = its pid), and a stale
    # reply to a request it never made: the client skips both.
    queue.send(b"\xc1 not a reply", block=False, type=me)
    queue.send(msgpack.packb([VERSION, 1]), block=False, type=me)
    queue.send(body(VERSION, 12345, "register", me, {}), block=False, type=protocol.REGISTRY_REQUEST_TYPE)
    # Messages of types nobody reads stay in the queue, harming no one.
    queue.send(b"stray", block=False, type=2)
    queue.send(b"stray", block=False, type=2**31 - 1)

    with tfem.connect(instance.keyfile) as c:
        assert c.endpoint == instance.names.endpoint
    with pytest.raises(sysv_ipc.BusyError):  # read and skipped, not left behind
        queue.receive(block=False, type=me)
    assert registry_pid(instance.keyfile) == pid
    os.kill(pid, 0)  # the same registry, alive
    assert _registry_list(instance)["dropped"] == before + len(garbage)
    assert_serves(instance)


def test_posix_lifetime_flags(instance, posix) -> None:
    name = fresh("posix-readers")
    fd = posix.tfem_open(name, posix.TFEM_WRONLY | posix.TFEM_READERS(2))
    posix.tfem_write(fd, b"two")
    posix.tfem_close(fd)
    assert (posix.tfem_stat(name).readers, posix.tfem_stat(name).lifetime) == (2, "2 readers")
    readers = [posix.tfem_open(name, posix.TFEM_RDONLY | posix.TFEM_NONBLOCK) for _ in range(2)]
    assert [posix.tfem_read(fd, 10) for fd in readers] == [b"two", b"two"]
    for fd in readers:
        posix.tfem_close(fd)
    with pytest.raises(tfem.NotFound):
        posix.tfem_stat(name)
    kept = fresh("posix-kept")
    posix.tfem_close(posix.tfem_open(kept, posix.TFEM_WRONLY | posix.TFEM_KEEP))
    assert posix.tfem_stat(kept).lifetime == "keep"
    posix.tfem_unlink(kept)
    for flags in (posix.TFEM_RDONLY | posix.TFEM_KEEP, posix.TFEM_WRONLY | posix.TFEM_KEEP | posix.TFEM_READERS(2),
                  posix.TFEM_WRONLY | 1 << 31):
        with pytest.raises(InvalidArgument):
            posix.tfem_open(fresh("posix-bad"), flags)
