"""Broker crash recovery: `kill -9` of the broker in the middle of real work.

Clients on the node keep the segment mapped while no broker runs; a broker
started on a segment a crashed one left adopts it (broker/recovery.py): WAIT
files survive byte for byte, files of consumers that died go back to WAIT,
files of producers that died are dropped and their slots and blocks freed,
and live clients carry on without reconnecting by hand. A segment whose
header cannot be trusted is replaced, a slot that makes no sense is dropped,
and damaged bytes are caught by the checksum a consumer's open verifies.

Everything here runs real processes: `tfem up` (which restarts the broker it
lost), client processes (tests/_steps_worker.py), SIGKILL and SIGSTOP.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import signal
import struct
import subprocess
import sys

import pytest

import tfem
from tfem._native import ffi
from tfem.segment import Segment
from tfem.spill_format import RECORD_MAX, Codec, Record

from tests._instances import SMALL
from tests._proc_tools import pid_dead, tfem_cli, wait_until
from tests._tfem_worker import KIB, MIB, content, sha256, stream_size

BUF, BLOCK = KIB, 4 * KIB  # SMALL's inline buffer and block


def need(size: int) -> int:
    """Arena bytes a file of `size` written in one write holds."""
    return -(-max(0, size - BUF) // BLOCK) * BLOCK


def put(client: tfem.Client, name: str, size: int) -> None:
    with client.open(name, "w") as f:
        f.write(content(name, size))


def check(client: tfem.Client, name: str, size: int, **open_args) -> None:
    """Read `name` (consuming it) and compare with what was written."""
    with client.open(name, "r", wait=False, **open_args) as f:
        data = f.read()
    assert (len(data), sha256(data)) == (size, sha256(content(name, size))), name


@contextlib.contextmanager
def mapped(segment_name: str):
    """The segment, mapped by the test for a look inside (or for damage)."""
    seg = Segment.attach(segment_name)
    try:
        yield seg
    finally:
        seg.close()


def held_extent_bytes(seg: Segment) -> int:
    """Arena bytes recorded in the extents of live slots."""
    total = 0
    for s in range(seg.slot_count):
        slot = seg.slot(s)
        if slot.state & 0xFF:
            total += sum(slot.extents[i].count for i in range(slot.extent_count)) * seg.block_size
    return total


def holders(seg: Segment) -> set[int]:
    return {seg.slot(s).state >> 32 for s in range(seg.slot_count) if seg.slot(s).state & 0xFF} - {0}


@contextlib.contextmanager
def broker_restart_held(up) -> int:
    """Stop `tfem up` (SIGSTOP), so the broker it restarts cannot start
    before the test has done its damage; yields the broker's pid. SIGCONT
    on the way out, whatever happened."""
    with up.connect() as c:
        broker = c.stats()["broker_pid"]
    os.kill(up.process.pid, signal.SIGSTOP)
    try:
        yield broker
    finally:
        os.kill(up.process.pid, signal.SIGCONT)


def kill_broker(broker: int) -> None:
    os.kill(broker, signal.SIGKILL)
    wait_until(lambda: pid_dead(broker), 10, f"broker {broker} to die")


def connect_when_back(up, old_broker: int) -> tfem.Client:
    """A new client, once `tfem up` has a new broker serving (until then the
    registry rightly says that no broker is there)."""
    from tfem._native import lib

    def back() -> bool:
        pid = up.names.read_state().get("broker_pid")
        return isinstance(pid, int) and pid != old_broker and bool(lib.tfem_pid_alive(pid))

    wait_until(back, 30, "tfem up to start a new broker")
    return up.connect()


def last_index(worker, kind: str) -> int:
    """The highest index among the `kind` events a stream worker has
    reported so far (read without waiting)."""
    last = -1
    while True:
        try:
            event = worker.events.get_nowait()
        except queue.Empty:
            return last
        if event["event"] == "error" or event["event"] == "eof":
            pytest.fail(f"worker failed: {event}; stderr: {worker.stderr}")
        if event["event"] == kind:
            last = max(last, event["i"])


def events_until(worker, kind: str, predicate=lambda e: True, timeout: float = 60.0) -> dict:
    """Read a stream worker's events up to the first `kind` event that
    satisfies `predicate`."""
    while True:
        event = worker.next_event(timeout)
        if event["event"] == "error":
            pytest.fail(f"worker failed: {event}; stderr: {worker.stderr}")
        if event["event"] == kind and predicate(event):
            return event


# ---- the broker dies in the middle of a mixed workload ----

STATIC = {  # published before the crash, in WAIT through it
    "wait/empty": 0, "wait/inline": 700, "wait/full-inline": BUF, "wait/one-block": BUF + 1,
    "wait/blocks": 40_000, "wait/more": 150_000, "wait/spilled": MIB + 300 * KIB, "wait/big": 2 * MIB + 5,
}


def test_broker_killed_mid_workload_loses_nothing(up_factory, steps_workers):
    up = up_factory(*SMALL)
    c = up.connect()  # connected before the crash, used after it
    try:
        for name, size in STATIC.items():
            put(c, name, size)
        for name, size in (("live/read", 4 * MIB + 600 * KIB), ("kc/0", 60_000), ("kc/1", MIB + 200 * KIB)):
            put(c, name, size)
        assert c.stat("wait/spilled").spilled and c.stat("live/read").spilled

        # A stream across the crash: a producer and a consumer process.
        producer = steps_workers(up.env, "produce-stream", "stream/", "--pace", "0.01")
        consumer = steps_workers(up.env, "consume-stream", "stream/")
        events_until(consumer, "consumed", lambda e: e["i"] >= 3)

        # A consumer mid-read of a spilled file, past the first read-ahead.
        lc = steps_workers(up.env)
        lc.do("open", name="live/read", mode="r", timeout=10)
        lc.do("read", name="live/read", n=100_000)
        # A producer mid-write of two files, one that will have to spill.
        lp = steps_workers(up.env)
        lp.do("open", name="live/small", mode="w")
        lp.do("write", name="live/small", start=0, end=3000)
        lp.do("open", name="live/spill", mode="w")
        lp.do("write", name="live/spill", start=0, end=300_000)
        # A consumer and a producer that die with the broker.
        kc = steps_workers(up.env)
        for name in ("kc/0", "kc/1"):
            kc.do("open", name=name, mode="r", timeout=10)
            kc.do("read", name=name, n=5000)
        kp = steps_workers(up.env)
        for name, size in (("kp/0", 50_000), ("kp/1", 500)):
            kp.do("open", name=name, mode="w")
            kp.do("write", name=name, start=0, end=size)
        assert [c.stat(n).state for n in ("live/read", "kc/0", "kc/1", "live/small", "kp/0")] == \
            ["READ", "READ", "READ", "WRITE", "WRITE"]
        assert not c.stat("live/spill").spilled

        with broker_restart_held(up) as old_broker:
            crossed = last_index(consumer, "consumed")
            kill_broker(old_broker)
            kc.kill()
            kp.kill()

        # `tfem up` starts a broker again; the old client's next call reaches it.
        stats = c.stats()
        assert stats["broker_pid"] != old_broker
        assert "the broker exited" in up.log() and "adopted the segment" in up.log()
        recovery = stats["recovery"]
        assert recovery is not None, stats
        assert recovery["dropped_writing"] == 2, recovery  # kp/0, kp/1
        assert recovery["returned_to_wait"] >= 2, recovery  # kc/0, kc/1 (and any file the broker was moving)
        assert recovery["dropped_corrupt"] == 0, recovery
        assert [c.stat(n).state for n in ("kc/0", "kc/1")] == ["WAIT", "WAIT"]
        for name in ("kp/0", "kp/1"):
            with pytest.raises(tfem.NotFound):
                c.stat(name)
        with mapped(up.names.segment) as seg:
            assert seg.header.broker_pid == stats["broker_pid"]
            alive = {lc.pid, lp.pid, producer.pid, consumer.pid, stats["broker_pid"]}
            assert holders(seg) <= alive, "a dead process still holds a file"

        # The live consumer finishes its file: the rest comes from the new broker.
        lc.do("read", name="live/read", n=-1)
        done = lc.do("close", name="live/read")
        size = 4 * MIB + 600 * KIB
        assert (done["size"], done["sha256"]) == (size, sha256(content("live/read", size)))
        # The live producer finishes both files; the second needs the broker to spill it.
        lp.do("write", name="live/small", start=3000, end=203_000)
        lp.do("write", name="live/spill", start=300_000, end=1_500_000)
        lp.do("close", name="live/small")
        lp.do("close", name="live/spill")
        assert c.stat("live/spill").spilled

        # The stream goes on well past the crash (a spilled file at least), then stops.
        events_until(consumer, "consumed", lambda e: e["i"] >= crossed + 20)
        producer.send("stop")
        produced = events_until(producer, "done")["count"]
        consumer.send(str(produced))
        finished = events_until(consumer, "done")
        assert finished["bad"] == [] and finished["count"] == produced
        assert any(stream_size(i) > MIB for i in range(crossed, produced))
        assert producer.finish() == 0 and consumer.finish() == 0, (producer.stderr, consumer.stderr)

        # Quiet now: what is left is exactly what should be, and holds
        # exactly the slots, blocks and spilled bytes it needs.
        left = dict(STATIC, **{"kc/0": 60_000, "kc/1": MIB + 200 * KIB, "live/small": 203_000,
                               "live/spill": 1_500_000})
        assert sorted(c.list()) == sorted(left)
        files = {st.name: st for st in c.list_stats()}
        assert {n: (st.size, st.state) for n, st in files.items()} == {n: (s, "WAIT") for n, s in left.items()}
        stats = c.stats()
        assert stats["slots_used"] == len(left)
        with mapped(up.names.segment) as seg:
            assert stats["arena_bytes_used"] == held_extent_bytes(seg), "arena blocks that no file holds"
        for name, size in left.items():  # files written in one write hold exactly what they need
            if name in STATIC and not files[name].spilled:
                with mapped(up.names.segment) as seg:
                    slot = seg.slot(files[name].slot)
                    assert sum(slot.extents[i].count for i in range(slot.extent_count)) * BLOCK == need(size)
        spilled = [n for n, st in files.items() if st.spilled]
        assert stats["spilled_files"] == len(spilled)
        assert stats["spilled_bytes"] == sum(left[n] - BUF for n in spilled)

        # Every file reads back exactly, through the client connected before the crash.
        for name, size in left.items():
            check(c, name, size)
        with c.open("after/big", "w") as f:  # a file that needs the new broker
            f.write(content("after/big", 2 * MIB))
        check(c, "after/big", 2 * MIB)
        stats = c.stats()
        assert (stats["slots_used"], stats["arena_bytes_used"], stats["spilled_bytes"]) == (0, 0, 0)
        assert lc.do("exit", expect="exited") and lp.do("exit", expect="exited")
    finally:
        c.close()


# ---- brokers started by hand ----


def test_a_broker_started_by_hand_adopts_what_a_killed_one_left(tmp_path, servers):
    keyfile, spill = tmp_path / "hand.key", tmp_path / "spill"
    servers.track(keyfile)
    servers.start("registry", "--keyfile", str(keyfile))
    broker_args = ("broker", "--keyfile", str(keyfile), "--spill-dir", str(spill), *SMALL)
    first = servers.start(*broker_args)
    files = {"h/inline": 300, "h/blocks": 30_000, "h/spilled": MIB + 100 * KIB}
    with tfem.connect(keyfile) as c:
        for name, size in files.items():
            put(c, name, size)
        held = c.open("h/held", "w")  # held by a live client through the crash
        held.write(content("h/held", 20_000))
        assert c.stats()["broker_pid"] == first.pid

        first.kill()
        first.wait()
        second = servers.start(*broker_args)
        stats = c.stats()
        assert stats["broker_pid"] == second.pid
        assert stats["recovery"]["kept"] == len(files) + 1, stats["recovery"]

        # A third broker refuses while the second lives, and changes nothing.
        refused = tfem_cli(*broker_args)
        assert refused.returncode == 1
        assert f"a broker (pid {second.pid}) already serves" in refused.stderr.decode()
        assert "Traceback" not in refused.stderr.decode()
        assert second.poll() is None and c.stats()["broker_pid"] == second.pid

        held.write(content("h/held", 120_000)[20_000:])
        held.close()
        files["h/held"] = 120_000
        for name, size in files.items():
            check(c, name, size)
        stats = c.stats()
        assert (stats["slots_used"], stats["arena_bytes_used"], stats["spilled_bytes"]) == (0, 0, 0)


# ---- damage ----

HEADER_DAMAGE = {
    "magic": lambda seg: seg.view.__setitem__(slice(0, 16), os.urandom(16)),
    "arena_offset": lambda seg: struct.pack_into(
        "<Q", seg.view, ffi.offsetof("struct tfem_header", "arena_offset"), 12345),
    "free_top": lambda seg: struct.pack_into(
        "<I", seg.view, ffi.offsetof("struct tfem_header", "free_top"), seg.slot_count + 1),
}


@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGE))
def test_a_segment_with_a_damaged_header_is_replaced(up_factory, damage):
    up = up_factory(*SMALL)
    before = up.connect()
    try:
        for name, size in (("d/small", 100), ("d/blocks", 20_000), ("d/spilled", MIB + 10 * KIB)):
            put(before, name, size)
        assert before.stats()["spilled_files"] >= 1
        with broker_restart_held(up) as old_broker:
            kill_broker(old_broker)
            with mapped(up.names.segment) as seg:
                HEADER_DAMAGE[damage](seg)

        # The client that knew the old segment is told, not misled.
        with pytest.raises(tfem.BrokerUnavailable, match="new, empty segment"):
            before.stats()
    finally:
        before.close()
    log = up.log()
    assert "cannot be used" in log and "replacing it with a new, empty segment" in log, log
    with connect_when_back(up, old_broker) as c:
        stats = c.stats()
        assert stats["broker_pid"] != old_broker and stats["recovery"] is None
        assert c.list() == []
        assert (stats["slots_used"], stats["arena_bytes_used"], stats["spilled_bytes"],
                stats["spilled_files"]) == (0, 0, 0, 0)
        assert stats["slots_free"] == stats["slots_total"] == 256
        for name, size in (("n/small", 100), ("n/blocks", 300_000), ("n/spilled", 2 * MIB)):
            put(c, name, size)
        for name, size in (("n/small", 100), ("n/blocks", 300_000), ("n/spilled", 2 * MIB)):
            check(c, name, size)
        stats = c.stats()
        assert (stats["slots_used"], stats["arena_bytes_used"], stats["spilled_bytes"]) == (0, 0, 0)


def test_corrupted_slots_are_dropped_at_adoption_and_the_rest_kept(up_factory):
    up = up_factory(*SMALL)
    files = {"s/spilled": MIB + 50 * KIB,  # first: it would push files written before it to the spill store
             "s/a": 30_000, "s/bad-name": 20_000, "s/bad-extent": 25_000, "s/overlap-1": 9_000,
             "s/overlap-2": 9_000, "s/inline": 600, "s/last": 12_000}
    with up.connect() as c:
        for name, size in files.items():  # one after the other: slots 0, 1, 2, ...
            put(c, name, size)
        slots = {name: c.stat(name).slot for name in files}
        assert [c.stat(name).spilled for name in files] == [True] + [False] * (len(files) - 1)
    with broker_restart_held(up) as old_broker:
        kill_broker(old_broker)
        with mapped(up.names.segment) as seg:
            seg.slot(slots["s/bad-name"]).name[0] = b"\xff"  # not UTF-8, not its hash
            seg.slot(slots["s/bad-extent"]).extents[0].start = seg.block_count + 5
            a = seg.slot(slots["s/a"]).extents[0]
            for name in ("s/overlap-1", "s/overlap-2"):  # both point into s/a's blocks
                seg.slot(slots[name]).extents[0].start = a.start + 1
    dropped = ("s/bad-name", "s/bad-extent", "s/overlap-1", "s/overlap-2")
    kept = {n: s for n, s in files.items() if n not in dropped}
    with connect_when_back(up, old_broker) as c:
        stats = c.stats()
        assert stats["broker_pid"] != old_broker
        assert stats["recovery"]["dropped_corrupt"] == len(dropped), stats["recovery"]
        assert stats["recovery"]["kept"] == len(kept), stats["recovery"]
        assert sorted(c.list()) == sorted(kept)
        assert stats["slots_used"] == len(kept)
        # The dropped files' blocks are free again: the arena holds exactly the kept files.
        assert stats["arena_bytes_used"] == sum(need(s) for n, s in kept.items() if n != "s/spilled")
        for name, size in kept.items():
            check(c, name, size)
        stats = c.stats()
        assert (stats["slots_used"], stats["arena_bytes_used"], stats["spilled_bytes"]) == (0, 0, 0)


def test_a_spilled_size_is_bounded_at_adoption(up_factory):
    """A spilled file's size has no extents to be checked against: a
    garbage size is bounded by where the file's spill records end (then it
    is the file again, byte for byte) and by the segment's largest file
    (then the consumer's checksum says it is damaged, quickly: the bytes
    past the records are not read)."""
    up = up_factory(*SMALL)
    sizes = {"b/past-records": MIB + 50 * KIB, "b/garbage": MIB + 20 * KIB, "b/over-limit": 2 * MIB + 7,
             "b/right": MIB + 3 * KIB}
    limit = MIB + MIB // 2
    with up.connect() as c:
        for name, size in sizes.items():
            put(c, name, size)
        assert all(c.stat(name).spilled for name in sizes)
        slots = {name: c.stat(name).slot for name in sizes}
    with broker_restart_held(up) as old_broker:
        kill_broker(old_broker)
        with mapped(up.names.segment) as seg:
            seg.slot(slots["b/past-records"]).size = sizes["b/past-records"] + 10 * MIB
            seg.slot(slots["b/garbage"]).size = 2**62
            seg.header.max_file_size = limit  # as if made with --max-file-size 1.5M
    with connect_when_back(up, old_broker) as c:
        recovery = c.stats()["recovery"]
        assert (recovery["sizes_bounded"], recovery["kept"], recovery["dropped_corrupt"]) == (3, 4, 0), recovery
        assert [c.stat(name).size for name in sizes] == [*list(sizes.values())[:2], limit, sizes["b/right"]]
        for name in ("b/past-records", "b/garbage", "b/right"):
            check(c, name, sizes[name])
        with pytest.raises(tfem.ChecksumMismatch):  # checked as it is read, like any file
            with c.open("b/over-limit", "r", wait=False) as f:
                f.read()
        assert c.stat("b/over-limit").state == "WAIT"  # left for inspection
        c.unlink("b/over-limit")
        stats = c.stats()
        assert (stats["slots_used"], stats["spilled_bytes"]) == (0, 0)


# ---- checksums ----


def _damage_in_segment(inst, client, name: str, where: str) -> tuple[int, int]:
    """Flip a byte of `name` in the segment; (segment offset, old byte)."""
    with mapped(inst.names.segment) as seg:
        s = client.stat(name).slot
        if where == "inline":
            offset = seg.inline_data_offset(s) + 17
        else:
            offset = seg.block_data_offset(seg.slot(s).extents[0].start) + 3 * BLOCK // 2
        old = seg.view[offset]
        seg.view[offset] = old ^ 0x5A
    return offset, old


@pytest.mark.parametrize("where", ["inline", "extent"])
def test_damaged_bytes_in_the_segment_are_a_checksum_mismatch(instance, client, where):
    name, size = f"crc/{where}", 50_000
    put(client, name, size)
    put(client, "crc/bystander", 20_000)
    offset, old = _damage_in_segment(instance, client, name, where)
    # Checked as it is read, before the reader sees the end: reading in
    # order, jumping ahead, or asking for views. Refused every time, and
    # given back at close, never consumed.
    for how in ("in order", "in small reads", "jumping", "views"):
        f = client.open(name, "r", wait=False)
        with pytest.raises(tfem.ChecksumMismatch) as caught:
            if how == "in order":
                f.read()
            elif how == "in small reads":
                while f.read(1000):
                    pass
            elif how == "jumping":
                f.seek(size - 10)
                f.read(5)
            else:
                list(f.chunks())
        assert caught.value.errno == errno.EBADMSG
        assert name in str(caught.value) and "checksum" in str(caught.value)
        with pytest.raises(tfem.ChecksumMismatch):
            f.read(1)  # and stays refused
        f.close()
        st = client.stat(name)
        assert (st.state, st.size) == ("WAIT", size)
    with pytest.raises(tfem.ChecksumMismatch):  # a `with` block gives it back too
        with client.open(name, "r", wait=False) as f:
            f.read()
    assert client.stat(name).state == "WAIT"
    check(client, "crc/bystander", 20_000)  # other files are not affected
    with mapped(instance.names.segment) as seg:  # repaired, it reads back
        seg.view[offset] = old
    check(client, name, size)
    assert client.stats()["slots_used"] == 0


FLIP_A_BIT = """
import sys, lmdb
env = lmdb.open(sys.argv[1], max_dbs=0, subdir=True)
with env.begin(write=True) as txn:
    key = bytes.fromhex(sys.argv[2])
    value = bytearray(txn.get(key))
    value[1000] ^= 0x01
    txn.put(key, bytes(value))
env.close()
"""


def test_damaged_spilled_bytes_are_a_checksum_mismatch(instance, client):
    name, size = "crc/spilled", MIB + 300 * KIB
    put(client, name, size)
    st = client.stat(name)
    assert st.spilled
    with mapped(instance.names.segment) as seg:
        file_id, buf_size = seg.slot(st.slot).file_id, seg.buf_size
    # The second spilled record: raw bytes from 1 MiB past the inline buffer.
    key = Record(file_id, RECORD_MAX, size - buf_size - RECORD_MAX, Codec.NONE).key

    def flip() -> None:
        # In a process of its own: this one has the store open to read, and
        # py-lmdb opens an environment once per process. Nobody writes
        # meanwhile; LMDB takes a second process's write transaction safely
        # (its lock file serialises writers).
        subprocess.run([sys.executable, "-c", FLIP_A_BIT, str(instance.spill_dir), key.hex()], check=True,
                       timeout=60)

    flip()
    # Checked as it is read, in order: the read that would reach the end fails.
    with client.open(name, "r", wait=False) as f:
        with pytest.raises(tfem.ChecksumMismatch) as caught:
            f.read()
        assert caught.value.errno == errno.EBADMSG
    assert client.stat(name).state == "WAIT"  # given back at close
    # Read out of order: checked in one pass over the store at the first jump.
    with client.open(name, "r", wait=False) as f:
        f.seek(size - 10)
        with pytest.raises(tfem.ChecksumMismatch):
            f.read(5)
    assert client.stat(name).state == "WAIT"
    flip()  # back as it was
    check(client, name, size)
    stats = client.stats()
    assert (stats["slots_used"], stats["spilled_bytes"], stats["spilled_files"]) == (0, 0, 0)

