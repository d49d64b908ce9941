"""Wire formats: broker requests over ZeroMQ, registry messages over SysV.

Pure code, no sockets: bytes in, typed messages out, in the manner of h11.
The broker, the blocking client, and any later asynchronous client share
these functions. Every decoder validates the whole shape and raises
ProtocolError; a receiver drops or answers such a message and goes on.

Broker request: frame 0 is msgpack ``[VERSION, request_id, op, args]`` with
``args`` a map whose keys and value types are fixed per op; file data
follows as one more frame, never inside msgpack, so it can be sent and
received without copies. Reply: ``[VERSION, request_id, errno, result]``
with ``result`` a map (errno 0) or a message (errno != 0), plus a data frame
for reads. Request ids let replies come back in any order; nothing here
assumes the client is on the broker's node.

Registry message (SysV queue): the message body is msgpack
``[VERSION, request_id, action, pid, args]`` sent with type 1; the reply is
``[VERSION, request_id, errno, result]`` sent with the requester's pid as
its type, as in the paper. IDENTIFY asks whoever reads a queue which key
file it serves: ftok keys of two key files can collide, (st_dev, st_ino)
of the files cannot.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import msgpack

from .errors import ProtocolError

VERSION = 1
REGISTRY_REQUEST_TYPE = 1
MAX_REGISTRY_MESSAGE = 4096


class Op(str, enum.Enum):
    HELLO = "hello"  # a client introduces itself: pid
    ALLOC = "alloc"  # grow a file held for write past its capacity
    SPILL_WRITE = "spill_write"  # data frame at offset of a spilled file
    ROOM = "room"  # spill until the arena has a run of free blocks this long (zero copy)
    STATS = "stats"
    BYE = "bye"
    WANT = "want"  # across nodes: pull name here; `wait` is a Wanting
    UNWANT = "unwant"  # the client stopped waiting for name
    NEXT = "next"  # across nodes: pull the oldest file under prefix published on another node


class Wanting(enum.IntEnum):
    """WANT's `wait`: when the broker answers."""

    WHEN_PULLED = 0  # not waiting: once the copy is here, or nowhere
    NOW = 1  # waiting: at once, with the want's error if it failed (a renewal)
    NEVER = 2  # waiting, first ask: no answer; an error is told at the renewal


# The args each op takes: name -> type. Extra or missing keys are errors.
_ARGS: dict[Op, dict[str, type]] = {
    Op.HELLO: {"pid": int},
    Op.ALLOC: {"slot": int, "generation": int, "capacity": int},
    Op.SPILL_WRITE: {"slot": int, "generation": int, "offset": int},
    Op.ROOM: {"blocks": int},
    Op.STATS: {},
    Op.BYE: {},
    Op.WANT: {"name": str, "wait": int},
    Op.UNWANT: {"name": str},
    Op.NEXT: {"prefix": str},
}
_CAN_BE_EMPTY = {"prefix"}  # open_next(""): every name
_TAKES_DATA = {Op.SPILL_WRITE}


@dataclasses.dataclass(frozen=True)
class Request:
    request_id: int
    op: Op
    args: dict[str, Any]
    data: bytes | memoryview | None = None


@dataclasses.dataclass(frozen=True)
class Reply:
    request_id: int
    errno: int
    result: Any
    data: bytes | memoryview | None = None

    def payload(self) -> bytes | memoryview:
        """The data frame, for an op whose reply carries one."""
        if self.data is None:
            raise ProtocolError("the reply has no data frame")
        return self.data


def _pack(value: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(value)  # msgpack's functions carry no types
    return packed


def _unpack(frame: bytes | memoryview, what: str) -> list[Any]:
    try:
        value = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"{what} is not msgpack: {exc}") from None
    # type() is int: a bool or a float equal to VERSION is not a version.
    if not isinstance(value, list) or not value or type(value[0]) is not int or value[0] != VERSION:
        raise ProtocolError(f"{what} is not a version-{VERSION} message array")
    return value


def _check_uint(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >= 2**63:
        raise ProtocolError(f"{name} must be a non-negative integer")
    return value


def _check_args(what: str, spec: dict[str, type], args: Any) -> dict[str, Any]:
    """`args` if it is a map with exactly the keys of `spec`, typed as it says."""
    if not isinstance(args, dict) or set(args) != set(spec):
        raise ProtocolError(f"{what} takes arguments {sorted(spec)}")
    for key, kind in spec.items():
        if kind is int:
            _check_uint(args[key], key)
        elif not isinstance(args[key], str) or not args[key] and key not in _CAN_BE_EMPTY or len(args[key]) > 1024:
            raise ProtocolError(f"{what}: {key} must be a short non-empty string")
    return args


# ---- broker requests and replies ----


def encode_request(request: Request) -> list[bytes | memoryview]:
    """The frames of a request: header, then data if the op takes it."""
    header = _pack([VERSION, request.request_id, request.op.value, request.args])
    if request.op in _TAKES_DATA:
        return [header, request.data if request.data is not None else b""]
    return [header]


def _unpack_header(frame: Any, what: str, fields: str) -> tuple[int, Any, Any]:
    """The request id and the two fields after it of a broker request's or
    reply's header, [version, id, a, b]; `fields` names a and b for errors."""
    value = _unpack(frame, f"{what} header")
    if len(value) != 4:
        raise ProtocolError(f"{what} header must be [version, id, {fields}]")
    _, request_id, first, second = value
    return _check_uint(request_id, "request id"), first, second


def decode_request(frames: list[Any]) -> Request:
    """A request from its frames (bytes or zmq.Frame buffers)."""
    if not frames:
        raise ProtocolError("empty request")
    request_id, op_name, args = _unpack_header(frames[0], "request", "op, args")
    try:
        op = Op(op_name)
    except ValueError:
        raise ProtocolError(f"unknown op {op_name!r}") from None
    args = _check_args(op.value, _ARGS[op], args)
    expected = 2 if op in _TAKES_DATA else 1
    if len(frames) != expected:
        raise ProtocolError(f"{op.value} takes {expected} frame(s), got {len(frames)}")
    return Request(request_id, op, args, frames[1] if expected == 2 else None)


def request_id_of(frame: Any) -> int | None:
    """Best-effort request id of a malformed request, to address the error."""
    try:
        value = msgpack.unpackb(frame, raw=False)
        rid = value[1]
        return rid if type(rid) is int and 0 <= rid < 2**63 else None  # not a bool: replies carry ints
    except Exception:
        return None


def encode_reply(reply: Reply) -> list[bytes | memoryview]:
    header = _pack([VERSION, reply.request_id, reply.errno, reply.result])
    return [header] if reply.data is None else [header, reply.data]


def decode_reply(frames: list[Any]) -> Reply:
    if not frames or len(frames) > 2:
        raise ProtocolError("a reply has one or two frames")
    request_id, code, result = _unpack_header(frames[0], "reply", "errno, result")
    _check_uint(code, "errno")
    return Reply(request_id, code, result, frames[1] if len(frames) == 2 else None)


# ---- registry messages ----


class Action(str, enum.Enum):
    REGISTER = "register"  # a client asks for a broker: reply {endpoint}
    UNREGISTER = "unregister"
    ANNOUNCE = "announce"  # a broker offers itself: {endpoint, load}
    WITHDRAW = "withdraw"  # a broker leaves: {endpoint}
    LIST = "list"  # the brokers known: reply {brokers: [...]}
    IDENTIFY = "identify"  # which key file the registry serves: reply a KeyIdentity


_ACTION_ARGS: dict[Action, dict[str, type]] = {
    Action.REGISTER: {},
    Action.UNREGISTER: {},
    Action.ANNOUNCE: {"endpoint": str, "load": int},
    Action.WITHDRAW: {"endpoint": str},
    Action.LIST: {},
    Action.IDENTIFY: {},
}


@dataclasses.dataclass(frozen=True)
class RegistryRequest:
    request_id: int
    action: Action
    pid: int
    args: dict[str, Any]


def encode_registry_request(request: RegistryRequest) -> bytes:
    body = _pack(
        [VERSION, request.request_id, request.action.value, request.pid, request.args]
    )
    if len(body) > MAX_REGISTRY_MESSAGE:
        raise ProtocolError("registry request too large")
    return body


def decode_registry_request(body: bytes) -> RegistryRequest:
    if len(body) > MAX_REGISTRY_MESSAGE:
        raise ProtocolError("registry request too large")
    value = _unpack(body, "registry request")
    if len(value) != 5:
        raise ProtocolError("registry request must be [version, id, action, pid, args]")
    _, request_id, action_name, pid, args = value
    _check_uint(request_id, "request id")
    pid = _check_uint(pid, "pid")
    if pid < 2 or pid >= 2**31:
        raise ProtocolError("pid out of range")  # 1 is the request type
    try:
        action = Action(action_name)
    except ValueError:
        raise ProtocolError(f"unknown action {action_name!r}") from None
    args = _check_args(action.value, _ACTION_ARGS[action], args)
    return RegistryRequest(request_id, action, pid, args)


def encode_registry_reply(reply: Reply) -> bytes:
    return _pack([VERSION, reply.request_id, reply.errno, reply.result])


def decode_registry_reply(body: bytes) -> Reply:
    return decode_reply([body])


@dataclasses.dataclass(frozen=True)
class KeyIdentity:
    """The key file a registry serves (its real path, st_dev, st_ino) and
    the registry's pid: IDENTIFY's result, as a map of these fields."""

    path: str
    dev: int
    ino: int
    pid: int


_IDENTITY = {"path": str, "dev": int, "ino": int, "pid": int}


def decode_identity(result: Any) -> KeyIdentity:
    return KeyIdentity(**_check_args("identify's result", _IDENTITY, result))
