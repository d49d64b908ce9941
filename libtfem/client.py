"""The client: finds a broker, maps its segment, opens files.

On the broker's node a client makes every state transition itself in the
shared segment (see table.py) and copies data straight into and out of it;
the broker is asked only for what needs one owner: arena extents beyond a
file's inline buffer, and the spill store. Requests travel on a ZeroMQ
DEALER socket with request ids, so replies may come back in any order.

A client notices when it finds itself in a forked child: the child gets a
connection of its own and never touches the parent's socket.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from typing import Any

import zmq

from . import discovery, protocol
from .config import ENV_BROKER, Instance
from .errors import BrokerUnavailable, InvalidArgument, ProtocolError, from_errno
from .files import TfemFile
from .protocol import Op, Reply, Request
from .segment import Segment
from .table import FileStat, SlotTable, encode_name

REPLY_TIMEOUT_S = 120.0  # a spill of a large file can take a while
CONNECT_TIMEOUT_S = 5.0  # for the broker's first answer: nobody may be listening at all
BYE_TIMEOUT_S = 1.0  # for its answer to goodbye: it may have stopped meanwhile


class Client:
    """A connection to one broker. Use as a context manager, or close()."""

    _socket: Any = None
    _context: Any = None
    segment: Segment | None = None

    def __init__(self, endpoint: str, *, registry: Instance | None = None,
                 reply_timeout: float = REPLY_TIMEOUT_S, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.endpoint = endpoint
        self._registry = registry
        self._reply_timeout_ms = int(reply_timeout * 1000)
        self._connect_timeout_ms = int(connect_timeout * 1000)
        self._ids = itertools.count(1)
        self._socket_lock = threading.Lock()  # a ZeroMQ socket serves one thread at a time
        self._open_files: weakref.WeakSet[TfemFile] = weakref.WeakSet()
        self._connect()

    def _open_socket(self) -> Reply:
        """A socket of this process's own, and the broker's HELLO reply."""
        self._pid = os.getpid()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.endpoint)
        try:
            # ZeroMQ connects lazily and retries quietly: only a reply
            # shows that a broker listens at the endpoint.
            return self._call(Op.HELLO, {"pid": self._pid}, timeout_ms=self._connect_timeout_ms)
        except BaseException:
            self._socket.close()
            self._context.term()
            self._socket = self._context = None
            raise

    def _connect(self) -> None:
        hello = self._open_socket()
        try:
            self.segment = Segment.attach(hello.result["segment"])
        except BaseException:
            self.close()
            raise
        self.table = SlotTable(self.segment, self._pid)

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            # In a forked child: abandon the parent's socket (closing it here
            # could disturb the parent) and keep the inherited mapping.
            self._socket = self._context = None
            self._socket_lock = threading.Lock()  # another thread may have held it at fork
            self._open_files = weakref.WeakSet()
            self._open_socket()
            assert self.segment is not None
            self.table = SlotTable(self.segment, self._pid)

    # ---- requests ----

    def call(self, op: Op, args: dict[str, Any], data: Any = None) -> Reply:
        """One request to the broker; raises the reply's error."""
        self._check_fork()
        return self._call(op, args, data)

    def _call(self, op: Op, args: dict[str, Any], data: Any = None, timeout_ms: int | None = None) -> Reply:
        wait_ms = self._reply_timeout_ms if timeout_ms is None else timeout_ms
        with self._socket_lock:
            if self._socket is None:
                raise ValueError("the tfem client is closed")
            request_id = next(self._ids)
            self._socket.send_multipart(protocol.encode_request(Request(request_id, op, args, data)),
                                        copy=False)
            while True:
                if not self._socket.poll(wait_ms):
                    raise BrokerUnavailable(f"the broker at {self.endpoint} did not answer within "
                                            f"{wait_ms / 1000:g} s")
                frames = self._socket.recv_multipart(copy=False)
                try:
                    reply = protocol.decode_reply([f.buffer for f in frames])
                except ProtocolError:
                    continue
                if reply.request_id == request_id:
                    break
        if reply.errno:
            raise from_errno(reply.errno, str(reply.result))
        return reply

    # ---- files ----

    def open(self, name: str | bytes, mode: str = "r", timeout: float | None = None,
             wait: bool = True) -> TfemFile:
        """Open `name` for writing ("w") or reading ("r"), binary.

        "w" creates the name (AlreadyExists if it is held). "r" takes the
        file once its producer has closed it: it waits for a name that does
        not exist yet or is still being written, up to `timeout` seconds
        (None: no limit), or fails at once with `wait=False`. "a" (auto) is
        the paper's open: read the name if it exists, else create it.
        """
        self._check_fork()
        raw = encode_name(name)
        text = raw.decode()
        kind = mode.replace("b", "") if isinstance(mode, str) else None
        if kind == "w":
            writing, handle = True, self.table.create(raw)
        elif kind in ("r", "a"):
            if timeout is not None and not timeout >= 0:  # NaN too
                raise InvalidArgument(f"timeout must be None or at least 0 s, not {timeout!r}")
            handle, writing = self.table.open_existing(raw, kind == "a", wait, timeout)
        else:
            raise InvalidArgument(f"mode must be 'r', 'w' or 'a' (binary), not {mode!r}")
        f = TfemFile(self, text, handle, writing)
        self._open_files.add(f)
        return f

    def _forget(self, f: TfemFile) -> None:
        self._open_files.discard(f)

    def stat(self, name: str | bytes) -> FileStat:
        self._check_fork()
        return self.table.stat(encode_name(name))

    def unlink(self, name: str | bytes) -> None:
        """Remove a name. A file being written or read is freed when its
        holder closes it; its name is free at once."""
        self._check_fork()
        discard = self.table.unlink(encode_name(name))
        if discard is not None:
            self.call(Op.DISCARD, {"file_id": discard})

    def list(self) -> list[str]:
        """The names held, in any state."""
        self._check_fork()
        return [f.name for f in self.table.list()]

    def list_stats(self) -> list[FileStat]:
        self._check_fork()
        return self.table.list()

    def stats(self) -> dict[str, Any]:
        """The broker's statistics (what `tfem status` shows)."""
        return dict(self.call(Op.STATS, {}).result)

    # ---- life cycle ----

    def close(self) -> None:
        """Close open files (producers' files are dropped), then disconnect.
        Idempotent; the segment stays for other processes."""
        if self._socket is None:
            return
        if os.getpid() == self._pid:
            for f in list(self._open_files):
                f.abort() if f.writable() else f.close()
            try:
                self._call(Op.BYE, {}, timeout_ms=int(BYE_TIMEOUT_S * 1000))
            except Exception:
                pass  # the broker may be gone; nothing is lost by not saying goodbye
            self._socket.close()
            self._context.term()
        self._socket = self._context = None
        if self.segment is not None:
            self.segment.close()
        if self._registry is not None and os.getpid() == self._pid:
            try:
                discovery.ask_registry(self._registry.keyfile, protocol.Action.UNREGISTER, timeout=1.0)
            except Exception:
                pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._socket is not None and os.getpid() == self._pid:
                self.close()
        except Exception:
            pass


def connect(keyfile: str | os.PathLike[str] | None = None, *, broker: str | None = None,
            timeout: float = 5.0) -> Client:
    """A client for the broker of `keyfile` (else $TFEM_KEYFILE, else the
    per-user default), found through the registry; or for the broker at
    endpoint `broker` (else $TFEM_BROKER), without a registry. `timeout`
    bounds the wait for the registry's answer and for the broker's first
    reply: BrokerUnavailable when nobody answers."""
    endpoint = broker or (os.environ.get(ENV_BROKER) if keyfile is None else None)
    if endpoint:
        return Client(endpoint, connect_timeout=timeout)
    instance = Instance.for_keyfile(keyfile)
    result = discovery.ask_registry(instance.keyfile, protocol.Action.REGISTER, timeout=timeout)
    return Client(result["endpoint"], registry=instance, connect_timeout=timeout)
