"""Wire format between brokers: pure code, bytes in, typed messages out.

One ZeroMQ message carries a batch of peer messages, in order: frame 0 is
msgpack ``[VERSION, sender, [[kind, args], ...]]`` (`sender` is the sending
broker's endpoint, its node name; `args` a map whose keys and value types
are fixed per kind), then one raw data frame for each CHUNK or WHOLE of the
batch, in turn, never inside msgpack, so it can be sent straight from the segment.
Batching is why: a broker sends what one turn of its loop produced for a
peer as one message, so a burst of small files costs one send, one
receive and one decode, not six of each per file. The decoder validates
the whole batch and raises ProtocolError; a receiver drops it and goes
on.

Each broker sends on a DEALER connected to each peer's ROUTER and receives
on its own ROUTER: a request goes one way, its answer the other way, and
`ticket` (chosen by the asker) ties them together.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import msgpack

from .errors import ProtocolError

VERSION = 2
MAX_BATCH = 65536  # messages in one batch


class Kind(str, enum.Enum):
    PING = "ping"  # heartbeat
    ANNOUNCE = "announce"  # to a home: these names are published here
    WITHDRAW = "withdraw"  # to a home: these names are no longer here
    LOOKUP = "lookup"  # to a home: who holds name? with wait, answer once someone does
    FOUND = "found"  # a home's answer: owner holds name ("" with no owner: not anywhere)
    FIND = "find"  # to every peer: your oldest published names under prefix
    FOUND_NEXT = "found_next"  # [[name, created_ns], ...]
    TAKE = "take"  # to an owner: hold name for me and send it
    FILE = "file"  # an owner's answer: size and lifetime; errno != 0: refused
    WHOLE = "whole"  # an owner's answer for a file of one chunk or less: size, lifetime and its bytes (data frame)
    CHUNK = "chunk"  # bytes at offset (data frame)
    ACK = "ack"  # a chunk written: send the next
    DONE = "done"  # the pulled copy was consumed: free yours
    RETURN = "return"  # the pull was given up: give yours back
    # A file for N readers: a node's copy holds reads lent from the owner's count.
    MORE = "more"  # to an owner: lend one more read to the copy of ticket (a reader here wants one)
    GRANT = "grant"  # an owner's answer: reads lent (0: none left)
    SETTLE = "settle"  # the copy of ticket is gone, `used` of its reads read: give the rest back


_LIST = list  # a list of strings; names of 1 to 255 bytes
_ARGS: dict[Kind, dict[str, type]] = {
    Kind.PING: {},
    Kind.ANNOUNCE: {"names": _LIST},
    Kind.WITHDRAW: {"names": _LIST},
    Kind.LOOKUP: {"ticket": int, "name": str, "wait": bool},
    Kind.FOUND: {"ticket": int, "name": str, "owner": str},
    Kind.FIND: {"ticket": int, "prefix": str},
    Kind.FOUND_NEXT: {"ticket": int, "names": _LIST},
    Kind.TAKE: {"ticket": int, "name": str},
    Kind.FILE: {"ticket": int, "errno": int, "size": int, "readers": int, "expires_ns": int},
    Kind.WHOLE: {"ticket": int, "size": int, "readers": int, "expires_ns": int},
    Kind.CHUNK: {"ticket": int, "offset": int},
    Kind.ACK: {"ticket": int},
    Kind.DONE: {"ticket": int},
    Kind.RETURN: {"ticket": int},
    Kind.MORE: {"ticket": int},
    Kind.GRANT: {"ticket": int, "reads": int},
    Kind.SETTLE: {"ticket": int, "used": int},
}
_CAN_BE_EMPTY = {"owner", "prefix"}  # "": nobody, everything
WITH_DATA = {Kind.CHUNK, Kind.WHOLE}  # followed by a data frame


@dataclasses.dataclass(frozen=True)
class Message:
    kind: Kind
    sender: str
    args: dict[str, Any]
    data: Any = None  # CHUNK's or WHOLE's bytes (bytes, memoryview or a zmq frame's buffer)


def _check(kind: Kind, args: Any) -> dict[str, Any]:
    spec = _ARGS[kind]
    if not isinstance(args, dict) or set(args) != set(spec):
        raise ProtocolError(f"{kind.value} takes arguments {sorted(spec)}")
    for key, want in spec.items():
        value = args[key]
        if want is int:
            if type(value) is not int or not 0 <= value < 2**63:
                raise ProtocolError(f"{kind.value}: {key} must be a non-negative integer")
        elif want is bool:
            if type(value) is not bool:
                raise ProtocolError(f"{kind.value}: {key} must be true or false")
        elif want is str:
            if type(value) is not str or len(value) > 1024 or not value and key not in _CAN_BE_EMPTY:
                raise ProtocolError(f"{kind.value}: {key} must be a short string")
        elif not isinstance(value, list) or not all(_item_ok(kind, item) for item in value):
            raise ProtocolError(f"{kind.value}: {key} must be a list of names")
    return args


def _item_ok(kind: Kind, item: Any) -> bool:
    if kind is Kind.FOUND_NEXT:  # [name, created_ns]
        return (isinstance(item, list) and len(item) == 2 and _name_ok(item[0])
                and type(item[1]) is int and item[1] >= 0)
    return _name_ok(item)


def _name_ok(name: Any) -> bool:
    return type(name) is str and 0 < len(name.encode(errors="replace")) <= 255


def encode(sender: str, messages: list[Message]) -> list[Any]:
    """The frames of one batch from `sender`: the header, then each CHUNK's or WHOLE's data."""
    if not 0 < len(messages) <= MAX_BATCH:
        raise ProtocolError(f"a batch holds 1 to {MAX_BATCH} messages")
    entries, data = [], []
    for message in messages:
        entries.append([message.kind.value, _check(message.kind, message.args)])
        if message.kind in WITH_DATA:
            data.append(message.data if message.data is not None else b"")
    return [msgpack.packb([VERSION, sender, entries]), *data]


def decode(frames: list[Any]) -> list[Message]:
    """A batch's messages from its frames (bytes or buffers), checked whole."""
    if not frames:
        raise ProtocolError("empty peer message")
    try:
        value = msgpack.unpackb(frames[0], raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"peer message is not msgpack: {exc}") from None
    if not isinstance(value, list) or len(value) != 3 or type(value[0]) is not int or value[0] != VERSION:
        raise ProtocolError(f"a peer message is [{VERSION}, sender, [[kind, args], ...]]")
    _, sender, entries = value
    if type(sender) is not str or not sender or len(sender) > 1024:
        raise ProtocolError("a peer message names its sender")
    if not isinstance(entries, list) or not 0 < len(entries) <= MAX_BATCH:
        raise ProtocolError(f"a peer message holds 1 to {MAX_BATCH} messages")
    messages, data = [], iter(frames[1:])
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 2:
            raise ProtocolError("each message of a batch is [kind, args]")
        kind_name, args = entry
        try:
            kind = Kind(kind_name)
        except (ValueError, TypeError):
            raise ProtocolError(f"unknown peer message {kind_name!r}") from None
        args, chunk = _check(kind, args), None
        if kind in WITH_DATA:
            chunk = next(data, None)
            if chunk is None:
                raise ProtocolError(f"{kind.value} without its data frame")
            if kind is Kind.WHOLE and len(memoryview(chunk)) != args["size"]:
                raise ProtocolError(f"whole: {len(memoryview(chunk))} bytes for a file of {args['size']}")
        messages.append(Message(kind, sender, args, chunk))
    if next(data, None) is not None:
        raise ProtocolError("more data frames than messages with data")
    return messages
