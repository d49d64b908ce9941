"""Wire formats: round trips for every op and action, and malformed input.

Whatever arrives on a socket or a queue, a decoder either returns a message
of the documented shape or raises ProtocolError; nothing else escapes.
"""

from __future__ import annotations

import errno

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfem import protocol
from tfem.errors import ProtocolError
from tfem.protocol import (
    MAX_REGISTRY_MESSAGE, VERSION, Action, KeyIdentity, Op, RegistryRequest, Reply, Request, decode_identity,
    decode_registry_reply, decode_registry_request, decode_reply, decode_request, encode_registry_reply,
    encode_registry_request, encode_reply, encode_request,
)

# One valid set of arguments per op and per action.
OP_ARGS = {
    Op.HELLO: {"pid": 4242},
    Op.ALLOC: {"slot": 3, "generation": 17, "capacity": 1 << 20},
    Op.SPILL_WRITE: {"slot": 0, "generation": 1, "offset": 8192},
    Op.ROOM: {"blocks": 16384},
    Op.STATS: {},
    Op.BYE: {},
    Op.WANT: {"name": "run1/part0", "wait": 1},
    Op.UNWANT: {"name": "run1/part0"},
    Op.NEXT: {"prefix": "run1/"},
}
ACTION_ARGS = {
    Action.REGISTER: {},
    Action.UNREGISTER: {},
    Action.ANNOUNCE: {"endpoint": "ipc:///tmp/tfem-1.sock", "load": 7},
    Action.WITHDRAW: {"endpoint": "tcp://127.0.0.1:5555"},
    Action.LIST: {},
    Action.IDENTIFY: {},
}
DATA_OPS = {Op.SPILL_WRITE}


def test_every_op_and_action_has_a_case() -> None:
    assert set(OP_ARGS) == set(Op)
    assert set(ACTION_ARGS) == set(Action)


def header(*fields: object) -> bytes:
    return msgpack.packb(list(fields))


def request_header(op: str = "hello", args: object = None, rid: object = 1, version: object = VERSION) -> bytes:
    return header(version, rid, op, {"pid": 10} if args is None else args)


def registry_body(action: str = "register", args: object = None, pid: object = 1000, rid: object = 1,
                  version: object = VERSION) -> bytes:
    return header(version, rid, action, pid, {} if args is None else args)


def refused(frames: list) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_request(frames)
    assert info.value.errno == errno.EPROTO
    return info.value


def refused_registry(body: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_registry_request(body)
    assert info.value.errno == errno.EPROTO
    return info.value


# ---- round trips ----


@pytest.mark.parametrize("op", list(Op), ids=lambda o: o.value)
@pytest.mark.parametrize("request_id", [0, 1, 2**63 - 1])
def test_request_round_trip(op: Op, request_id: int) -> None:
    data = b"\x00payload\xff" * 100 if op in DATA_OPS else None
    frames = encode_request(Request(request_id, op, OP_ARGS[op], data))
    assert len(frames) == (2 if op in DATA_OPS else 1)
    back = decode_request([bytes(f) for f in frames])
    assert back.request_id == request_id
    assert back.op is op
    assert back.args == OP_ARGS[op]
    assert (bytes(back.data) if back.data is not None else None) == data


def test_data_frame_of_a_data_op_defaults_to_empty() -> None:
    frames = encode_request(Request(5, Op.SPILL_WRITE, OP_ARGS[Op.SPILL_WRITE]))
    assert [bytes(f) for f in frames][1] == b""
    assert bytes(decode_request(frames).data) == b""


def test_request_accepts_memoryviews() -> None:
    frames = encode_request(Request(9, Op.SPILL_WRITE, OP_ARGS[Op.SPILL_WRITE], memoryview(b"abc")))
    back = decode_request([memoryview(bytes(f)) for f in frames])
    assert back.op is Op.SPILL_WRITE and bytes(back.data) == b"abc"


@pytest.mark.parametrize("reply", [
    Reply(1, 0, {"segment": "/tfem-x", "broker_pid": 12}),
    Reply(2, 0, {}),
    Reply(3, 0, {}, b"spilled bytes"),
    Reply(2**63 - 1, errno.ENOSPC, "the arena is full"),
    Reply(4, errno.EPROTO, "say hello first"),
], ids=["hello", "empty", "data", "error", "protocol-error"])
def test_reply_round_trip(reply: Reply) -> None:
    frames = encode_reply(reply)
    back = decode_reply([bytes(f) for f in frames])
    assert (back.request_id, back.errno, back.result) == (reply.request_id, reply.errno, reply.result)
    assert (bytes(back.data) if back.data is not None else None) == reply.data


@pytest.mark.parametrize("action", list(Action), ids=lambda a: a.value)
@pytest.mark.parametrize("pid", [2, 4_194_304, 2**31 - 1])
def test_registry_request_round_trip(action: Action, pid: int) -> None:
    body = encode_registry_request(RegistryRequest(77, action, pid, ACTION_ARGS[action]))
    assert isinstance(body, bytes) and len(body) <= MAX_REGISTRY_MESSAGE
    back = decode_registry_request(body)
    assert back == RegistryRequest(77, action, pid, ACTION_ARGS[action])
    assert back.action is action


@pytest.mark.parametrize("reply", [
    Reply(1, 0, {"endpoint": "ipc:///tmp/x.sock"}),
    Reply(2, 0, {"brokers": [{"endpoint": "e", "pid": 3, "load": 0}], "clients": 1, "dropped": 0}),
    Reply(3, errno.ECONNREFUSED, "no broker has announced itself"),
])
def test_registry_reply_round_trip(reply: Reply) -> None:
    back = decode_registry_reply(encode_registry_reply(reply))
    assert (back.request_id, back.errno, back.result, back.data) == (reply.request_id, reply.errno,
                                                                      reply.result, None)


def test_request_id_of_malformed_requests() -> None:
    assert protocol.request_id_of(header(VERSION, 42, "nonsense", {})) == 42
    assert protocol.request_id_of(header(VERSION, -1, "hello", {})) is None
    assert protocol.request_id_of(header(VERSION, "x", "hello", {})) is None
    assert protocol.request_id_of(header(VERSION, True, "hello", {})) is None
    assert protocol.request_id_of(header(VERSION, 2**63, "hello", {})) is None
    assert protocol.request_id_of(b"\xc1garbage") is None
    assert protocol.request_id_of(b"") is None


# ---- malformed broker requests ----


def test_no_frames() -> None:
    refused([])


@pytest.mark.parametrize("op", list(Op), ids=lambda o: o.value)
def test_wrong_frame_counts(op: Op) -> None:
    head = request_header(op.value, OP_ARGS[op])
    wanted = 2 if op in DATA_OPS else 1
    for count in (1, 2, 3, 5):
        if count != wanted:
            refused([head] + [b"x"] * (count - 1))
    decode_request([head] + [b"x"] * (wanted - 1))


@pytest.mark.parametrize("frame", [None, 12, 1.5, "text", ["list"], object()],
                         ids=["none", "int", "float", "str", "list", "object"])
def test_header_frame_of_the_wrong_type(frame: object) -> None:
    refused([frame])


@pytest.mark.parametrize("body", [
    msgpack.packb({"version": 1}), msgpack.packb(1), msgpack.packb("hello"), msgpack.packb(None),
    msgpack.packb([]), msgpack.packb(b"\x01"), msgpack.packb((1, 2)),
], ids=["map", "int", "str", "nil", "empty-array", "bin", "short-array"])
def test_header_that_is_not_a_request_array(body: bytes) -> None:
    refused([body])


@pytest.mark.parametrize("version", [0, 2, -1, 255, True, 1.0, "1", b"\x01", None, [1]],
                         ids=["0", "2", "-1", "255", "true", "float", "str", "bin", "nil", "list"])
def test_wrong_version(version: object) -> None:
    refused([request_header(version=version)])
    refused_registry(registry_body(version=version))
    with pytest.raises(ProtocolError):
        decode_reply([header(version, 1, 0, {})])


@pytest.mark.parametrize("fields", [
    (VERSION, 1, "hello"),
    (VERSION, 1, "hello", {"pid": 1}, None),
    (VERSION,),
], ids=["three", "five", "one"])
def test_header_of_the_wrong_length(fields: tuple) -> None:
    refused([header(*fields)])


@pytest.mark.parametrize("op", ["nonsense", "", "HELLO", "hello ", 3, None, True, ["hello"], {"op": "hello"},
                                b"hello"],
                         ids=["unknown", "empty", "upper", "space", "int", "nil", "bool", "list", "map", "bin"])
def test_unknown_op(op: object) -> None:
    error = refused([header(VERSION, 1, op, {})])
    assert "op" in str(error)


BAD_UINTS = [-1, -(2**63), 2**63, 2**64 - 1, True, False, 1.0, "1", None, b"1", [1], {"n": 1}]
BAD_UINT_IDS = ["-1", "min", "2^63", "2^64-1", "true", "false", "float", "str", "nil", "bin", "list", "map"]


@pytest.mark.parametrize("rid", BAD_UINTS, ids=BAD_UINT_IDS)
def test_bad_request_id(rid: object) -> None:
    refused([request_header(rid=rid)])
    refused_registry(registry_body(rid=rid))
    with pytest.raises(ProtocolError):
        decode_reply([header(VERSION, rid, 0, {})])


@pytest.mark.parametrize("op", [op for op in Op if OP_ARGS[op]], ids=lambda o: o.value)
def test_missing_and_extra_args(op: Op) -> None:
    frames_after = [b""] if op in DATA_OPS else []
    good = OP_ARGS[op]
    for key in good:
        missing = {k: v for k, v in good.items() if k != key}
        refused([request_header(op.value, missing)] + frames_after)
    refused([request_header(op.value, {**good, "extra": 1})] + frames_after)
    refused([request_header(op.value, {})] + frames_after)
    first = next(iter(good))
    renamed = {("x" + k if k == first else k): v for k, v in good.items()}
    refused([request_header(op.value, renamed)] + frames_after)
    as_bytes_keys = {k.encode(): v for k, v in good.items()}
    refused([request_header(op.value, as_bytes_keys)] + frames_after)


@pytest.mark.parametrize("op", [Op.STATS, Op.BYE], ids=lambda o: o.value)
def test_ops_without_args_refuse_any(op: Op) -> None:
    refused([request_header(op.value, {"pid": 1})])


@pytest.mark.parametrize("args", [None, [], ["pid", 1], "pid=1", 1, b"pid"],
                         ids=["nil", "empty-list", "list", "str", "int", "bin"])
def test_args_that_are_not_a_map(args: object) -> None:
    refused([header(VERSION, 1, "hello", args)])
    refused([header(VERSION, 1, "stats", args)])
    refused_registry(header(VERSION, 1, "register", 1000, args))


@pytest.mark.parametrize("op", [op for op in Op if OP_ARGS[op]], ids=lambda o: o.value)
@pytest.mark.parametrize("value", BAD_UINTS, ids=BAD_UINT_IDS)
def test_bad_integer_args(op: Op, value: object) -> None:
    frames_after = [b""] if op in DATA_OPS else []
    for key in OP_ARGS[op]:
        if type(OP_ARGS[op][key]) is int:  # a text argument takes the string among them
            refused([request_header(op.value, {**OP_ARGS[op], key: value})] + frames_after)


@pytest.mark.parametrize("op", [Op.WANT, Op.UNWANT], ids=lambda o: o.value)
@pytest.mark.parametrize("value", ["", 7, None, b"name", "x" * 1025], ids=["empty", "int", "nil", "bin", "long"])
def test_bad_text_args(op: Op, value: object) -> None:
    refused([request_header(op.value, {**OP_ARGS[op], "name": value})])


def test_an_empty_prefix_means_every_name() -> None:
    assert decode_request([request_header("next", {"prefix": ""})]).args == {"prefix": ""}


def test_map_with_non_string_keys() -> None:
    refused([header(VERSION, 1, "hello", {1: 10})])
    refused([header(VERSION, 1, "hello", {None: 10})])


def test_truncated_msgpack() -> None:
    for op in Op:
        head = request_header(op.value, OP_ARGS[op])
        tail = [b""] if op in DATA_OPS else []
        for cut in range(len(head)):
            refused([head[:cut]] + tail)
    body = registry_body("announce", ACTION_ARGS[Action.ANNOUNCE])
    for cut in range(len(body)):
        refused_registry(body[:cut])


@pytest.mark.parametrize("junk", [
    b"\xc1", b"\xff" * 64, b"GET / HTTP/1.1\r\n\r\n", b"\x00", b"\x91" * 100_000, b"\xdd\xff\xff\xff\xff",
    b"\xdb\xff\xff\xff\xff", b"\xc6\x7f\xff\xff\xff", b"\xd4\x00", b"\xc7\x01\xff\x00",
], ids=["never-used", "ff", "http", "nul", "deep", "huge-array", "huge-str", "huge-bin", "ext", "ext8"])
def test_non_msgpack_garbage(junk: bytes) -> None:
    refused([junk])
    refused_registry(junk)
    with pytest.raises(ProtocolError):
        decode_reply([junk])


def test_trailing_bytes_after_a_valid_header() -> None:
    refused([request_header() + b"\x00"])
    refused_registry(registry_body() + b"\xc0")


# ---- malformed registry requests ----


IDENTITY = {"path": "/run/user/1000/tfem/registry.key", "dev": 2049, "ino": 1234567, "pid": 4242}


def test_identity_round_trip() -> None:
    body = encode_registry_reply(Reply(9, 0, IDENTITY))
    assert decode_identity(decode_registry_reply(body).result) == KeyIdentity(**IDENTITY)


@pytest.mark.parametrize("result", [
    None, [], "x", {}, {**IDENTITY, "extra": 1}, {k: v for k, v in IDENTITY.items() if k != "ino"},
    {**IDENTITY, "path": ""}, {**IDENTITY, "path": 5}, {**IDENTITY, "dev": -1}, {**IDENTITY, "ino": "1"},
    {**IDENTITY, "pid": True},
])
def test_bad_identity(result: object) -> None:
    """An answer to IDENTIFY that is not a registry's: an error, never a wrong identity."""
    with pytest.raises(ProtocolError):
        decode_identity(result)


@pytest.mark.parametrize("pid", [0, 1, 2**31, 2**32, *BAD_UINTS], ids=["0", "1", "2^31", "2^32", *BAD_UINT_IDS])
def test_bad_registry_pid(pid: object) -> None:
    # 1 is the request message type: a reply to it would be read as a request.
    refused_registry(registry_body(pid=pid))


@pytest.mark.parametrize("action", ["nonsense", "", "REGISTER", 0, None, False, ["list"], b"register"])
def test_unknown_registry_action(action: object) -> None:
    error = refused_registry(header(VERSION, 1, action, 1000, {}))
    assert "action" in str(error)


@pytest.mark.parametrize("fields", [
    (VERSION, 1, "register", 1000),
    (VERSION, 1, "register", 1000, {}, None),
    (VERSION, 1, "register", {}),
])
def test_registry_request_of_the_wrong_length(fields: tuple) -> None:
    refused_registry(header(*fields))


@pytest.mark.parametrize("args", [
    {},
    {"endpoint": "ipc:///x"},
    {"load": 1},
    {"endpoint": "ipc:///x", "load": 1, "extra": 0},
    {"endpoint": "", "load": 1},
    {"endpoint": "x" * 1025, "load": 1},
    {"endpoint": b"ipc:///x", "load": 1},
    {"endpoint": 5, "load": 1},
    {"endpoint": None, "load": 1},
    {"endpoint": ["ipc:///x"], "load": 1},
    {"endpoint": "ipc:///x", "load": -1},
    {"endpoint": "ipc:///x", "load": True},
    {"endpoint": "ipc:///x", "load": 0.5},
    {"endpoint": "ipc:///x", "load": 2**64 - 1},
    {"endpoint": "ipc:///x", "load": "1"},
])
def test_bad_announce_args(args: dict) -> None:
    refused_registry(registry_body("announce", args))


def test_registry_args_for_actions_without_any() -> None:
    for action in (Action.REGISTER, Action.UNREGISTER, Action.LIST):
        refused_registry(registry_body(action.value, {"endpoint": "x"}))
    refused_registry(registry_body("withdraw", {}))
    refused_registry(registry_body("withdraw", {"endpoint": "x", "load": 1}))


def test_oversize_registry_messages() -> None:
    # A well-formed message that is too large is refused before decoding...
    body = registry_body("register", {})
    padded = header(VERSION, 1, "announce", 1000, {"endpoint": "x" * 1000, "load": 1})
    assert len(padded) <= MAX_REGISTRY_MESSAGE
    decode_registry_request(padded)
    too_big = header(VERSION, 1, "announce", 1000, {"endpoint": "x" * MAX_REGISTRY_MESSAGE, "load": 1})
    assert len(too_big) > MAX_REGISTRY_MESSAGE
    error = refused_registry(too_big)
    assert "large" in str(error)
    refused_registry(body + b"\x00" * MAX_REGISTRY_MESSAGE)
    refused_registry(b"\xc1" * (MAX_REGISTRY_MESSAGE + 1))
    # ...and the encoder will not produce one.
    with pytest.raises(ProtocolError):
        encode_registry_request(RegistryRequest(1, Action.ANNOUNCE, 1000,
                                                {"endpoint": "y" * MAX_REGISTRY_MESSAGE, "load": 0}))


# ---- malformed replies ----


def test_bad_replies() -> None:
    with pytest.raises(ProtocolError):
        decode_reply([])
    good = header(VERSION, 1, 0, {})
    decode_reply([good])
    decode_reply([good, b"data"])
    with pytest.raises(ProtocolError):
        decode_reply([good, b"data", b"more"])
    for code in (-1, True, 2**64 - 1, "0", None, 0.0):
        with pytest.raises(ProtocolError):
            decode_reply([header(VERSION, 1, code, {})])
    with pytest.raises(ProtocolError):
        decode_reply([header(VERSION, 1, 0)])
    with pytest.raises(ProtocolError):
        decode_registry_reply(header(VERSION, 1, 0, {}, None))


# ---- property: only ProtocolError comes out ----

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
          | st.text(max_size=20) | st.binary(max_size=20))
objects = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=25,
)
# Near misses reach the deeper checks: right shape, random fields.
op_names = st.sampled_from([op.value for op in Op]) | leaves
arg_keys = st.sampled_from(["pid", "slot", "generation", "capacity", "offset", "length", "file_id",
                            "endpoint", "load", "x"])
arg_maps = st.dictionaries(arg_keys, leaves | st.integers(0, 2**63), max_size=5)
near_requests = st.tuples(st.just(VERSION) | leaves, st.integers(0, 2**63) | leaves, op_names,
                          arg_maps | objects).map(list)
action_names = st.sampled_from([a.value for a in Action]) | leaves
near_registry = st.tuples(st.just(VERSION) | leaves, st.integers(0, 2**63) | leaves, action_names,
                          st.integers(0, 2**31) | leaves, arg_maps | objects).map(list)


def packed(strategy: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    return strategy.map(msgpack.packb)


def _check_request(frames: list) -> None:
    try:
        request = decode_request(frames)
    except ProtocolError as exc:
        assert exc.errno == errno.EPROTO
        return
    assert isinstance(request.op, Op)
    assert isinstance(request.request_id, int) and 0 <= request.request_id < 2**63
    assert set(request.args) == set(OP_ARGS[request.op])
    for value in request.args.values():
        assert type(value) is int and 0 <= value < 2**63
    assert (request.data is not None) == (request.op in DATA_OPS)


def _check_registry(body: bytes) -> None:
    try:
        request = decode_registry_request(body)
    except ProtocolError as exc:
        assert exc.errno == errno.EPROTO
        return
    assert isinstance(request.action, Action)
    assert type(request.pid) is int and 2 <= request.pid < 2**31
    assert set(request.args) == set(ACTION_ARGS[request.action])
    assert len(body) <= MAX_REGISTRY_MESSAGE


@PROPERTY
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_random_bytes_to_decode_request(frames: list[bytes]) -> None:
    _check_request(frames)


@PROPERTY
@given(st.binary(max_size=256))
def test_random_bytes_to_decode_registry_request(body: bytes) -> None:
    _check_registry(body)


@PROPERTY
@given(packed(objects | near_requests), st.lists(st.binary(max_size=8), max_size=3))
def test_random_msgpack_to_decode_request(head: bytes, rest: list[bytes]) -> None:
    _check_request([head, *rest])


@PROPERTY
@given(packed(objects | near_registry))
def test_random_msgpack_to_decode_registry_request(body: bytes) -> None:
    _check_registry(body)


@PROPERTY
@given(packed(objects | near_requests), st.integers(0, 64))
def test_truncated_random_msgpack(body: bytes, cut: int) -> None:
    _check_request([body[:cut]])
    _check_registry(body[:cut])
