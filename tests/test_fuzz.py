"""Hostile input on every channel, generated from a seed: the broker's ZeroMQ
socket, the registry's SysV queue, and the segment a broker adopts.

Each channel runs TFEM_FUZZ_CASES cases (default 10,000, small enough for
CI; bench/fuzz.py runs each at 10^6) from TFEM_FUZZ_SEED (default fixed, so a run
is reproducible; a failure names its seed and case). What must hold:
- the broker and the registry survive (same pid), answer every message
  that carries a request id with a clean error (never an internal "broker
  error"), log no traceback, and serve real clients correctly afterwards,
  files stored before the storm included;
- a corrupted segment is either refused by Segment.attach (SegmentCorrupt)
  or adopted into a consistent table that works: every name indexed is found,
  free slots plus live slots make the table, the block bitmap is exactly
  the live files' extents, no dead or impossible process holds a file, and
  new files can be claimed, published and consumed in every free slot.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import time
import uuid
from typing import Any

import msgpack
import pytest
import sysv_ipc
import zmq

import tfem
from tfem import discovery, protocol
from tfem._native import ffi, lib
from tfem.broker.recovery import adopt
from tfem.discovery import queue_key
from tfem.errors import SegmentCorrupt, TfemError
from tfem.protocol import VERSION, Action, Op
from tfem.keyfile import registry_pid
from tfem.segment import Layout, Segment
from tfem.states import State, unpack_word
from tfem.table import SlotTable, name_hash

from tests._instances import SMALL
from tests._tfem_worker import KIB, MIB, content, sha256

CASES = int(os.environ.get("TFEM_FUZZ_CASES", "10000"))
SEED = int(os.environ.get("TFEM_FUZZ_SEED", "20261122"))
SYNC_EVERY = 250  # cases between checks that the server is still there and answering


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# Pids differ from run to run: nothing may draw a number of random values that
# depends on them (the length of a message holding one, say), so that a seed
# replays the same cases. Positions in such messages are fractions.


def random_value(r: random.Random, depth: int = 0):
    """Any msgpack value, with a taste for the awkward."""
    kind = r.randrange(12 if depth < 2 else 9)
    if kind == 0:
        return r.choice([0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -2**63])
    if kind == 1:
        return r.getrandbits(r.randrange(1, 65)) * r.choice([1, -1])
    if kind == 2:
        return r.choice([0.0, -1.5, 1e308, float("inf"), float("nan"), 1.0])
    if kind == 3:
        return r.choice(["", "hello", "alloc", "spill_read", "x" * 2000, "\u00e9\u4e2d\U0001f600", "\0"])
    if kind == 4:
        return r.randbytes(r.choice([0, 1, 8, 300]))
    if kind == 5:
        return r.choice([True, False, None])
    if kind == 6:
        return "".join(chr(r.randrange(32, 0x3000)) for _ in range(r.randrange(0, 20)))
    if kind == 7:
        return r.choice([op.value for op in Op] + [a.value for a in Action])
    if kind == 8:
        return msgpack.ExtType(r.randrange(0, 128), r.randbytes(r.randrange(0, 16)))
    if kind == 9:
        return [random_value(r, depth + 1) for _ in range(r.randrange(0, 6))]
    if kind == 10:
        keys = ["pid", "slot", "x", b"pid", 1, -2**63, 2**64 - 1, 1.5, None, True]  # not all are strings
        return {r.choice(keys): random_value(r, depth + 1) for _ in range(r.randrange(0, 4))}
    return {"slot": random_value(r, depth + 1), "generation": 0}


def pack(value) -> bytes:
    try:
        return msgpack.packb(value, strict_types=False)
    except (TypeError, ValueError, OverflowError):  # ints past 64 bits, dict keys msgpack refuses
        return msgpack.packb(repr(value))


def mutated_args(r: random.Random, spec: dict, pids: list[int], slots: int) -> dict:
    """Args for an op: right keys with wrong or extreme values, a key
    missing, a key too many."""
    args = {}
    for key in spec:
        roll = r.random()
        if roll < 0.55:
            args[key] = r.choice([0, 1, 2, 7, slots - 1, slots, slots + 1, 2**31, 2**32 + 1, 2**63 - 1, 2**62,
                                  r.randrange(0, 2 * slots), r.getrandbits(63)]) if key != "pid" else r.choice(pids)
        elif roll < 0.9:
            args[key] = r.randrange(0, 1 << r.choice([8, 16, 24, 40]))
        else:
            args[key] = random_value(r)
    if spec and r.random() < 0.1:
        del args[r.choice(list(args))]
    if r.random() < 0.05:
        args[r.choice(["extra", "pid", "slot", "data"])] = random_value(r)
    return args


# ---- (a) ZeroMQ frames to the broker ----


def broker_case(r: random.Random, rid: int, pids: list[int], slots: int) -> list[bytes]:
    kind = r.randrange(10)
    if kind == 0:  # random frames
        return [r.randbytes(r.choice([0, 1, 5, 16, 64, 700, 70_000])) for _ in range(r.randrange(1, 6))]
    if kind == 1:  # a random msgpack value, or an array of them
        value = random_value(r) if r.random() < 0.3 else [random_value(r) for _ in range(r.randrange(0, 7))]
        return [pack(value)] + [r.randbytes(r.randrange(0, 100)) for _ in range(r.randrange(0, 3))]
    if kind == 2:  # request-shaped, wrong types
        header = [r.choice([VERSION, VERSION, 0, 2, True, 1.0, "1"]), r.choice([rid, rid, -1, True, 2**64 - 1, "id"]),
                  random_value(r), random_value(r)]
        return [pack(header)] + [r.randbytes(r.randrange(0, 64)) for _ in range(r.randrange(0, 2))]
    if kind == 3:  # a valid request, truncated or with bytes flipped
        op = r.choice(list(Op))
        raw = bytearray(pack([VERSION, rid, op.value, mutated_args(r, protocol._ARGS[op], pids, slots)]))
        if r.random() < 0.5:
            raw = raw[: int(r.random() * len(raw))]
        else:
            for _ in range(r.randrange(1, 4)):
                raw[int(r.random() * len(raw))] = r.randrange(256)
        return [bytes(raw)]
    if kind == 4:  # huge lengths claimed in msgpack headers
        return [r.choice([b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\x7f\xff\xff\xff",
                          b"\xdf\xff\xff\xff\xff", b"\x94\x01\xdd\xff\xff\xff\xff"]) + r.randbytes(r.randrange(0, 20))]
    if kind == 5:  # hello, with pids a broker must not trust
        return [msgpack.packb([VERSION, rid, "hello", {"pid": r.choice(pids)}])]
    if kind == 6:  # bye: the next ops come from a stranger again
        return [msgpack.packb([VERSION, rid, "bye", {}])]
    # well-formed ops with wrong slots, generations, offsets, lengths, capacities
    op = r.choice([Op.ALLOC, Op.ALLOC, Op.SPILL_WRITE, Op.SPILL_WRITE, Op.ROOM, Op.STATS])
    args = mutated_args(r, protocol._ARGS[op], pids, slots)
    frames = [pack([VERSION, rid, op.value, args])]
    if op is Op.SPILL_WRITE and r.random() < 0.9:
        frames.append(r.randbytes(r.choice([0, 10, 4096, 70_000, 1 << 20]) if r.random() < 0.95 else 4 << 20))
    return frames


def expects_reply(frames: list[bytes]) -> bool:
    """Whether the broker owes an answer: it decodes, or names its request."""
    try:
        protocol.decode_request(frames)
        return True
    except TfemError:
        return protocol.request_id_of(frames[0]) is not None


def test_fuzz_broker_frames(up_factory):
    inst = up_factory(*SMALL)
    survivors = {"keep/inline": 500, "keep/blocks": 30_000, "keep/spilled": MIB + 77 * KIB}
    with inst.connect() as c:
        for name, size in survivors.items():
            with c.open(name, "w") as f:
                f.write(content(name, size))
        stats = c.stats()
        broker, slots = stats["broker_pid"], stats["slots_total"]
    pids = [os.getpid(), 0, 1, 2, 2**31 - 1, 2**31, 2**32 + 5, 2**40, 2**63 - 1, dead_pid(), broker]

    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(inst.names.endpoint)
    owed = answered = 0
    bad: list[str] = []

    def collect(until_rid: int | None, timeout: float = 30.0) -> None:
        nonlocal answered
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if until_rid is None and not sock.poll(0):
                return
            if left <= 0 or not sock.poll(int(left * 1000)):
                pytest.fail(f"the broker stopped answering (seed {SEED}); log: {inst.log()[-3000:]}")
            reply = protocol.decode_reply(sock.recv_multipart())  # every reply is well-formed
            answered += 1
            if reply.errno and "broker error" in str(reply.result):
                bad.append(str(reply.result))
            if reply.request_id == until_rid:
                return

    try:
        r = random.Random(SEED)
        next_rid = 1_000_000
        for case in range(CASES):
            next_rid += 1
            frames = broker_case(r, next_rid, pids, slots)
            owed += expects_reply(frames)
            sock.send_multipart(frames)
            if case % SYNC_EVERY == SYNC_EVERY - 1 or case == CASES - 1:
                next_rid += 1
                sock.send_multipart([msgpack.packb([VERSION, next_rid, "stats", {}])])
                owed += 1
                collect(next_rid)
                assert not bad, f"internal errors (seed {SEED}, before case {case}): {bad[:5]}"
        collect(None)
        assert answered == owed, f"{owed} requests named themselves, {answered} answers (seed {SEED})"
    finally:
        sock.close()
        context.term()

    log = inst.log()
    assert "Traceback" not in log and "error serving" not in log, log[-5000:]
    with inst.connect() as c:
        stats = c.stats()
        assert stats["broker_pid"] == broker
        assert stats["request_errors"] >= CASES // 2
        assert sorted(c.list()) == sorted(survivors)  # what was stored before is all there...
        for name, size in survivors.items():  # ...and intact
            with c.open(name, "r", wait=False) as f:
                assert sha256(f.read()) == sha256(content(name, size)), name
        for name, size in (("after/inline", 100), ("after/blocks", 300_000), ("after/spilled", 2 * MIB)):
            with c.open(name, "w") as f:
                f.write(content(name, size))
            with c.open(name, "r", wait=False) as f:
                assert sha256(f.read()) == sha256(content(name, size)), name
        stats = c.stats()
        assert (stats["slots_used"], stats["arena_bytes_used"], stats["spilled_bytes"]) == (0, 0, 0)
    print(f"\nbroker frames: {CASES} cases (seed {SEED}), {owed} answered with a request id")


# ---- (b) SysV messages to the registry ----


def msgmax() -> int:
    with open("/proc/sys/kernel/msgmax") as f:
        return int(f.read())


def test_fuzz_registry_messages(up_factory):
    inst = up_factory(*SMALL)
    keyfile = inst.keyfile
    registry = registry_pid(keyfile)
    me, gone = os.getpid(), dead_pid()
    largest = msgmax()
    queue = sysv_ipc.MessageQueue(queue_key(keyfile), max_message_size=largest)
    endpoint = inst.names.endpoint
    before = discovery.ask_registry(keyfile, Action.LIST, timeout=10)
    assert [b["endpoint"] for b in before["brokers"]] == [endpoint]
    broker = before["brokers"][0]["pid"]
    reply_types: set[int] = set()  # pids the registry may answer: drained at each sync
    answered: set[int] = set()  # ... over the whole run, for the last check
    announced: set[str] = set()  # endpoints announced in this process's name: withdrawn at the end

    def drain() -> None:
        for t in list(reply_types):
            while True:
                try:
                    queue.receive(block=False, type=t)
                except sysv_ipc.BusyError:
                    break

    def send(body: bytes, mtype: int) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                queue.send(body, block=False, type=mtype)
                return
            except sysv_ipc.BusyError:  # the queue is full: let the registry catch up
                assert lib.tfem_pid_alive(registry), f"the registry died (seed {SEED}); log: {inst.log()[-3000:]}"
                assert time.monotonic() < deadline, f"the registry queue stayed full (seed {SEED})"
                drain()
                time.sleep(0.001)

    def ask(action: Action, args: dict | None = None):
        """A request of ours, once the replies our garbage provoked are
        drained (till then the queue may be full)."""
        deadline = time.monotonic() + 10
        while True:
            drain()
            try:
                return discovery.ask_registry(keyfile, action, args, timeout=10)
            except tfem.BrokerUnavailable as exc:
                if "is full" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.001)

    def case_body(r: random.Random) -> tuple[bytes, int]:
        kind = r.randrange(9)
        if kind == 0:  # a random type, random bytes: nobody reads it but us
            return r.randbytes(r.choice([0, 1, 100, 4096])), r.randrange(2, 2**31)
        if kind == 1:  # garbage of every size up to the kernel's limit
            return r.randbytes(r.choice([0, 1, 7, 100, 4096, 4097, largest])), 1
        if kind == 2:
            return pack(random_value(r) if r.random() < 0.3 else [random_value(r) for _ in range(r.randrange(7))]), 1
        if kind == 3:  # a valid request, truncated or flipped
            raw = bytearray(msgpack.packb([VERSION, r.getrandbits(32), "list", me, {}]))
            if r.random() < 0.5:
                raw = raw[: int(r.random() * len(raw))]
            else:
                raw[int(r.random() * len(raw))] = r.randrange(256)
            return bytes(raw), 1
        pid = r.choice([me, gone, 0, 1, -1, 2**31, 2**31 - 1, 2**40, r.randrange(2, 2**22)])
        action = r.choice([a.value for a in Action] + ["nonsense", 3])
        if kind == 4:  # request-shaped, with wrong fields
            args = random_value(r) if r.random() < 0.3 else {
                "endpoint": r.choice([endpoint, "", "e" * 1025, 5, "ipc:///nowhere"]), "load": r.choice([0, -1, 2**63, "x"])}
            if r.random() < 0.5 and isinstance(args, dict) and args:
                del args[r.choice(list(args))]
            return pack([r.choice([VERSION, VERSION, 2, True]), r.getrandbits(32), action, pid, args]), 1
        if kind == 5:  # the real broker's endpoint, announced or withdrawn by someone else
            other = r.choice([gone, me, 1])
            act = r.choice(["announce", "withdraw"])
            args = {"endpoint": endpoint, "load": r.randrange(100)} if act == "announce" else {"endpoint": endpoint}
            return msgpack.packb([VERSION, r.getrandbits(32), act, other, args]), 1
        if kind == 6:  # brokers that are not there, some in our name, with long endpoints
            who = r.choice([me, gone, r.randrange(2, 2**22)])
            name = f"ipc:///fuzz/{uuid.UUID(int=r.getrandbits(128))}" + "x" * r.choice([0, 200, 900])
            return msgpack.packb([VERSION, r.getrandbits(32), "announce", who, {"endpoint": name, "load": r.randrange(5)}]), 1
        if kind == 7:  # lists and registers in other processes' names
            return msgpack.packb([VERSION, r.getrandbits(32), r.choice(["list", "register", "unregister"]),
                                  pid if isinstance(pid, int) and 2 <= pid < 2**31 else me, {}]), 1
        return msgpack.packb([VERSION, r.getrandbits(32), "list", me, {}]), 1

    r = random.Random(SEED + 1)
    reply_types.add(me)
    for case in range(CASES):
        body, mtype = case_body(r)
        if mtype == 1:
            try:  # the registry answers what decodes, to the pid it names
                request = protocol.decode_registry_request(body)
                reply_types.add(request.pid)
                answered.add(request.pid)
                if request.action is Action.ANNOUNCE and request.pid == me:
                    announced.add(request.args["endpoint"])
            except TfemError:
                pass
        send(body, mtype)
        if mtype != 1:
            queue.receive(block=False, type=mtype)  # ours, back at once
        if case % SYNC_EVERY == SYNC_EVERY - 1 or case == CASES - 1:
            try:
                for name in announced:  # so that a listing still fits in a message
                    ask(Action.WITHDRAW, {"endpoint": name})
                announced.clear()
                listing = ask(Action.LIST)
            except TfemError as exc:
                pytest.fail(f"the registry stopped answering before case {case} (seed {SEED}): {exc}; "
                            f"log: {inst.log()[-3000:]}")
            drain()
            # LIST was answered, so was everything sent before it, and drained:
            # forget those pids (the set would grow with the run, and every
            # drain with it).
            reply_types.intersection_update({me})
            real = [b for b in listing["brokers"] if b["endpoint"] == endpoint]
            assert real and real[0]["pid"] == broker, f"the broker's entry was taken over (seed {SEED}): {real}"
    drain()

    assert registry_pid(keyfile) == registry and lib.tfem_pid_alive(registry)
    log = inst.log()
    assert "Traceback" not in log, log[-5000:]
    listing = discovery.ask_registry(keyfile, Action.LIST, timeout=10)
    assert listing["dropped"] >= CASES // 4
    brokers = [(b["endpoint"], b["pid"]) for b in listing["brokers"]]
    assert (endpoint, broker) in brokers
    # Announces in the name of a random pid stay while that process lives (a
    # message's pid is its sender's word): a million cases hit a few.
    strangers = [pid for name, pid in brokers if name != endpoint]
    assert all(pid not in (me, gone, broker) and lib.tfem_pid_alive(pid) for pid in strangers), brokers
    with tfem.connect(keyfile) as c:  # found through the registry, and served
        with c.open("after", "w") as f:
            f.write(content("after", 50_000))
        with c.open("after", "r", wait=False) as f:
            assert sha256(f.read()) == sha256(content("after", 50_000))
    for t in answered | {me}:  # nothing of ours left in the queue
        with pytest.raises(sysv_ipc.BusyError):
            queue.receive(block=False, type=t)
    print(f"\nregistry messages: {CASES} cases (seed {SEED + 1}), {listing['dropped']} dropped as malformed")


# ---- (c) the segment a broker adopts ----

F_SLOTS, F_BUF, F_BLOCK, F_BLOCKS = 24, 256, 4096, 32


OFFSETS: dict[str, int] = {}  # of the derived structures, in the populated segment


def core_file(seg: Segment, raw: bytes, pid: int, mode: str) -> Any:
    """A file opened through the native core as process `pid`, live or dead."""
    f = ffi.new("struct tfem_file *")
    if mode == "w":
        rc = lib.tfem_f_create(seg.header, raw, len(raw), pid, 0, f)
    else:
        rc = lib.tfem_f_open(seg.header, raw, len(raw), pid, lib.TFEM_OPEN_READ, 0, 0, f, ffi.new("int32_t *"))
    if rc == errno.ENOSPC:
        raise tfem.NoSpace("the slot table is full")
    assert rc == 0, os.strerror(rc)
    return f


class Populated:
    """A segment with real files in every state, made through the native
    core as a live process (this one) and as a dead one."""

    def __init__(self) -> None:
        self.name = f"/tfem-fuzz-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.seg = Segment.create(self.name, Layout(F_SLOTS, F_BUF, F_BLOCK, F_BLOCKS * F_BLOCK))
        self.alive, self.dead = os.getpid(), dead_pid()
        self.spilled: dict[int, int] = {}  # file id -> where its spill records would end
        mine = SlotTable(self.seg, self.alive)
        r = random.Random(7)
        for i in range(16):
            pid = self.alive if i % 3 else self.dead
            raw = f"fz/{i}/{'n' * (i * 13 % 90)}".encode()
            f = core_file(self.seg, raw, pid, "w")
            size = r.choice([0, 100, F_BUF, F_BUF + 1, 3 * F_BLOCK, 5 * F_BLOCK + 7])
            assert lib.tfem_f_write(f, content(raw.decode(), size), size) == size
            if i in (4, 9, 12, 14):  # left being written (9 and 12 by the dead process)
                continue
            assert lib.tfem_f_close(f) == 0
            if i in (5, 6, 10, 15):  # being read (6 and 15 by the dead process)
                core_file(self.seg, raw, pid, "r")
            if i in (10, 15):  # and unlinked meanwhile
                mine.unlink(raw)
            if i == 7:  # moved to the spill store
                mine.set_flag(f.index, lib.TFEM_SLOT_SPILLED)
                mine.release_extents(f.index)
                self.spilled[f.file_id] = max(0, size - F_BUF)
        self.spilled[10**6] = F_BLOCK  # records of a file that is gone
        self.pristine = bytes(self.seg.view)
        OFFSETS.update({region: getattr(self.seg.header, f"{region}_offset")
                        for region in ("index", "free_stack", "bitmap")})

    def restore(self) -> None:
        self.seg.view[:] = self.pristine

    def close(self) -> None:
        self.seg.close()
        Segment.unlink(self.name)


def alive(pid: int) -> bool:
    """What the broker asks of a holder (broker/server.py)."""
    return bool(lib.tfem_pid_alive(pid))


# Fields worth aiming at, with their sizes.
_HEADER = dict(ffi.typeof("struct tfem_header").fields)
_SLOT = dict(ffi.typeof("struct tfem_slot").fields)
HEADER_FIELDS = [(f, ffi.sizeof(_HEADER[f].type)) for f in _HEADER if f not in ("wake_seq", "wake_waiters", "stripes")]
SLOT_FIELDS = ["state", "size", "file_id", "name_hash", "name_len", "flags", "checksum", "extent_count"]
INTERESTING = [0, 1, 2, 3, 0xFF, 0x100, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 2**63, 2**64 - 1]


def corrupt(r: random.Random, seg: Segment) -> str:
    """Damage the segment; what was done, for the failure message."""
    hdr_size = ffi.sizeof("struct tfem_header")
    kind = r.randrange(8)
    if kind == 0:  # random bytes anywhere in the header
        at = r.randrange(hdr_size)
        seg.view[at: at + 1] = bytes([r.randrange(256)])
        return f"header byte {at}"
    if kind == 1:  # a header field set to an awkward value
        field, size = r.choice(HEADER_FIELDS)
        offset = ffi.offsetof("struct tfem_header", field)
        value = r.choice(INTERESTING + [r.getrandbits(8 * size)]) & ((1 << (8 * size)) - 1)
        seg.view[offset: offset + size] = value.to_bytes(size, "little")
        return f"header {field} = {value}"
    s = r.randrange(seg.slot_count)
    base = seg.slot_offset(s)
    if kind == 2:  # random bytes in a slot's fixed part
        spots = []
        for _ in range(r.randrange(1, 5)):
            at = base + r.randrange(seg.inline_offset)
            seg.view[at] = r.randrange(256)
            spots.append(at - base)
        return f"slot {s} bytes {spots}"
    if kind == 3:  # a slot field set to an awkward value
        field = r.choice(SLOT_FIELDS)
        size = ffi.sizeof(_SLOT[field].type)
        value = r.choice(INTERESTING + [r.getrandbits(8 * size)]) & ((1 << (8 * size)) - 1)
        offset = base + ffi.offsetof("struct tfem_slot", field)
        seg.view[offset: offset + size] = value.to_bytes(size, "little")
        return f"slot {s} {field} = {value}"
    if kind == 4:  # a state word naming another state, generation or holder
        state = r.choice([0, 1, 2, 3, 4, 0xFF])
        holder = r.choice([0, os.getpid(), 1, 2**31, 2**32 - 1, r.randrange(2, 2**22)])
        word = (holder << 32) | (r.randrange(1 << 24) << 8) | state
        seg.slot(s).state = word
        return f"slot {s} state word {word:#x}"
    if kind == 5:  # an extent pointing elsewhere
        slot = seg.slot(s)
        i = r.randrange(lib.TFEM_MAX_EXTENTS)
        slot.extents[i].start = r.choice([0, 1, seg.block_count - 1, seg.block_count, 2**32 - 1, r.randrange(64)])
        slot.extents[i].count = r.choice([0, 1, 2, seg.block_count, 2**32 - 1, r.randrange(8)])
        if r.random() < 0.5:
            slot.extent_count = max(slot.extent_count, i + 1)
        return f"slot {s} extent {i} = ({slot.extents[i].start}, {slot.extents[i].count})"
    if kind == 6:  # one slot copied over another: two files of one name, shared blocks
        t = r.randrange(seg.slot_count)
        seg.view[base: base + seg.slot_size] = seg.view[seg.slot_offset(t): seg.slot_offset(t) + seg.slot_size]
        return f"slot {t} copied over slot {s}"
    # the derived structures and the name bytes
    region = r.choice(["index", "free_stack", "bitmap", "name"])
    if region == "name":
        at = base + ffi.offsetof("struct tfem_slot", "name") + r.randrange(8)
    else:
        start = OFFSETS[region]  # as made: an earlier damage in this case may have changed the header
        at = start + r.randrange(64)
    seg.view[at] = r.randrange(256)
    return f"{region} byte at {at}"


def check_adopted(seg: Segment, table: SlotTable, what: str) -> None:
    """The rebuilt table is consistent, and works."""
    h = seg.header
    live = [s for s in range(seg.slot_count) if unpack_word(seg.slot(s).state)[0] is not State.INVALID]
    assert h.free_top + len(live) == seg.slot_count, what
    free, top = [], h.free_head & 0xFFFFFFFF  # the linked free-slot stack, from its head
    while top and len(free) <= seg.slot_count:
        free.append(top - 1)
        top = seg.free_stack[top - 1]
    assert sorted(free) == sorted(set(range(seg.slot_count)) - set(live)), what
    blocks: set[int] = set()
    extent_total = 0
    names = set()
    for s in live:
        slot = seg.slot(s)
        state, _, holder = unpack_word(slot.state)
        assert 0 < holder < 2**31 and alive(holder) if state in (State.WRITE, State.READ) else holder == 0, \
            f"{what}: slot {s} {state.name} held by {holder}"
        assert slot.extent_count <= lib.TFEM_MAX_EXTENTS, what
        for i in range(slot.extent_count):
            e = slot.extents[i]
            assert e.count and e.start + e.count <= seg.block_count, what
            span = set(range(e.start, e.start + e.count))
            assert not span & blocks, f"{what}: slot {s} shares blocks"
            blocks |= span
            extent_total += e.count
        raw = ffi.buffer(slot.name, slot.name_len)[:]
        raw.decode("utf-8")
        assert slot.name_hash == name_hash(raw), what
        if not slot.flags & lib.TFEM_SLOT_DOOMED:
            assert raw not in names, f"{what}: two files named {raw!r}"
            names.add(raw)
            assert table.stat(raw).slot == s, what
    assert seg.blocks_in_use() == extent_total, f"{what}: bitmap {seg.blocks_in_use()} != extents {extent_total}"
    indexed = [seg.index[i] - 1 for i in range(seg.index_mask + 1) if seg.index[i]]
    assert sorted(indexed) == sorted(s for s in live if not seg.slot(s).flags & lib.TFEM_SLOT_DOOMED), what
    for pid in table.holders():  # the broker's sweep asks about every holder
        lib.tfem_pid_alive(pid)
    # It works: every free slot can be claimed, published and consumed.
    me, size = os.getpid(), F_BUF + F_BLOCK
    for i in range(len(free)):
        f = core_file(seg, f"new/{i}".encode(), me, "w")
        # 0: the arena is full; EFBIG: the limit in the header was damaged to
        # a smaller one (any size is a setting someone could have chosen).
        assert lib.tfem_f_write(f, bytes(size), size) in (0, size, -errno.EFBIG), what
        assert lib.tfem_f_close(f) == 0, what
    with pytest.raises(tfem.NoSpace):
        core_file(seg, b"one too many", me, "w")
    for i in range(len(free)):
        assert lib.tfem_f_close(core_file(seg, f"new/{i}".encode(), me, "r")) == 0, what
    assert h.free_top == len(free), what


def test_fuzz_adopting_a_corrupted_segment():
    populated = Populated()
    counts = {"refused": 0, "adopted": 0, "lock held by a live process": 0, "other TfemError": 0}
    try:
        # The pristine copy adopts cleanly: the dead process's files are settled.
        populated.restore()
        seg = Segment.attach(populated.name)
        try:
            report = adopt(SlotTable(seg, os.getpid()), alive, populated.spilled)
            check_adopted(seg, SlotTable(seg, os.getpid()), "pristine")
        finally:
            seg.close()
        assert (report.dropped_corrupt, report.dropped_writing, report.returned_to_wait) == (0, 2, 1), report
        assert report.discard_file_ids == [10**6]

        r = random.Random(SEED + 2)
        for case in range(CASES):
            populated.restore()
            what = "; ".join(corrupt(r, populated.seg) for _ in range(r.choice([1, 1, 1, 2, 3])))
            what = f"seed {SEED + 2} case {case}: {what}"
            lock = lib.tfem_t_lock_holder(populated.seg.header)
            if 0 < lock < 2**31 and alive(lock):
                # A lock held by a live process is respected (10 s, then Busy): not worth the wait.
                counts["lock held by a live process"] += 1
                continue
            try:
                seg = Segment.attach(populated.name)
            except SegmentCorrupt:
                counts["refused"] += 1
                continue
            try:
                table = SlotTable(seg, os.getpid())
                try:
                    adopt(table, alive, populated.spilled)
                except TfemError:
                    counts["other TfemError"] += 1
                    continue
                except Exception as exc:
                    raise AssertionError(f"{what}: adopt raised {exc!r}") from exc
                check_adopted(seg, table, what)
                counts["adopted"] += 1
            finally:
                seg.close()
    finally:
        populated.close()
    assert not os.path.exists(f"/dev/shm{populated.name}")
    assert counts["adopted"] >= CASES // 2 and counts["refused"] >= CASES // 20, counts
    print(f"\nsegment corruption: {CASES} cases (seed {SEED + 2}): {counts}")
