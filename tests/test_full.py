"""Full: the slot table, the arena with spilling off, the spill store.

The operation that cannot proceed fails with NoSpace (ENOSPC) and a message
saying what is full; nothing already stored is touched, every file held reads
back byte for byte, and service resumes as soon as room is freed. A producer
that opens with a timeout waits for room instead (back-pressure): asleep on
the space sequence until a consumer frees a slot or blocks, NoSpace if none
does in time.
"""

from __future__ import annotations

import errno
import time

import pytest

import tfem

from tests._proc_tools import in_futex_wait, wait_until
from tests._tfem_worker import KIB, MIB, content, sha256

GEOMETRY = ("--buf-size", "1K", "--block-size", "4K")
QUIET = 0.3  # how long a waiting producer must stay silent to count as still waiting


def put(client: tfem.Client, name: str, size: int) -> None:
    with client.open(name, "w") as f:
        f.write(content(name, size))


def check(client: tfem.Client, name: str, size: int) -> None:
    with client.open(name, "r", wait=False) as f:
        data = f.read()
    assert (len(data), sha256(data)) == (size, sha256(content(name, size))), name


def usage(client: tfem.Client) -> tuple[int, int, int, int]:
    s = client.stats()
    return s["slots_used"], s["arena_bytes_used"], s["spilled_bytes"], s["spilled_files"]


def no_space(exc_info) -> None:
    assert exc_info.value.errno == errno.ENOSPC and isinstance(exc_info.value, tfem.NoSpace)
    assert not isinstance(exc_info.value, tfem.FileTooLarge)


def too_large(exc_info) -> None:
    """Past the per-file limit (all the instance holds): EFBIG, a NoSpace."""
    assert exc_info.value.errno == errno.EFBIG and isinstance(exc_info.value, tfem.FileTooLarge)


def asleep_waiting(worker) -> None:
    """The worker is inside its blocking call, asleep, and stays there."""
    wait_until(lambda: in_futex_wait(worker.pid), 10, "the producer to sleep waiting for room")
    assert worker.quiet_for(QUIET), f"the producer did not wait: {worker.next_event(1)}"
    assert in_futex_wait(worker.pid)


# ---- the slot table ----


def test_a_full_slot_table(up_factory):
    inst = up_factory("--slots", "6", *GEOMETRY, "--memory", "256K")
    files = {"t/empty": 0, "t/inline": 500, "t/blocks": 30_000, "t/spilled": 400_000}
    with inst.connect() as c:
        for name, size in files.items():
            put(c, name, size)
        writing = c.open("t/writing", "w")
        writing.write(content("t/writing", 9000))
        put(c, "t/reading", 20_000)
        reading = c.open("t/reading", "r", wait=False)
        assert c.stats()["slots_free"] == 0
        before = usage(c)

        for mode in ("w", "a"):
            with pytest.raises(tfem.NoSpace) as caught:
                c.open("t/one-too-many", mode)
            no_space(caught)
            assert "slot table is full" in str(caught.value)
        with pytest.raises(tfem.NoSpace):  # a timeout of 0 does not wait either
            c.open("t/one-too-many", "w", timeout=0)
        assert usage(c) == before and "t/one-too-many" not in c.list()

        # What is held is intact, and its holders carry on.
        writing.write(content("t/writing", 40_000)[9000:])
        writing.close()
        assert sha256(reading.read()) == sha256(content("t/reading", 20_000))
        reading.close()  # frees a slot: service resumes
        put(c, "t/one-too-many", 70_000)
        with pytest.raises(tfem.NoSpace):
            c.open("t/two-too-many", "w")
        for name, size in dict(files, **{"t/writing": 40_000, "t/one-too-many": 70_000}).items():
            check(c, name, size)
        assert usage(c) == (0, 0, 0, 0)


def test_a_producer_waits_for_a_slot(up_factory, steps_workers):
    inst = up_factory("--slots", "4", *GEOMETRY, "--memory", "256K")
    with inst.connect() as c:
        for i in range(4):
            put(c, f"slot/{i}", 3000 * i)
        producer = steps_workers(inst.env)
        producer.start_open("slot/new", "w", timeout=30)
        asleep_waiting(producer)
        assert c.list_stats() and all(st.state == "WAIT" for st in c.list_stats())

        start = time.monotonic()
        check(c, "slot/2", 6000)  # a consumer frees a slot
        opened = producer.expect("opened", timeout=10)
        assert time.monotonic() - start < 2.0
        producer.do("write", name="slot/new", start=0, end=50_000)
        producer.do("close", name="slot/new")
        for name, size in (("slot/0", 0), ("slot/1", 3000), ("slot/3", 9000), ("slot/new", 50_000)):
            check(c, name, size)
        assert opened["writing"] and usage(c) == (0, 0, 0, 0)


def test_a_producer_gives_up_waiting_for_a_slot(up_factory, steps_workers):
    inst = up_factory("--slots", "2", *GEOMETRY, "--memory", "256K")
    with inst.connect() as c:
        put(c, "a", 100)
        put(c, "b", 100)
        producer = steps_workers(inst.env)
        start = time.monotonic()
        producer.start_open("c", "w", timeout=0.8)
        error = producer.expect("error", timeout=10)
        elapsed = time.monotonic() - start
        assert (error["type"], error["errno"]) == ("NoSpace", errno.ENOSPC)
        assert 0.8 <= elapsed < 5.0
        assert sorted(c.list()) == ["a", "b"]
        check(c, "a", 100)
        producer.do("open", name="c", mode="w", timeout=0.8)  # room now: at once
        producer.do("close", name="c")
        check(c, "b", 100)
        check(c, "c", 0)


# ---- the arena, spilling off ----

NO_SPILL = ("--slots", "16", *GEOMETRY, "--memory", "64K", "--no-spill")


def test_a_full_arena_without_spill(up_factory):
    inst = up_factory(*NO_SPILL)
    with inst.connect() as c:
        put(c, "a/waiting", 40_000)  # 10 blocks of 16
        held = c.open("a/held", "w")
        held.write(content("a/held", 10_000))  # 3 blocks
        before = usage(c)

        # The write that cannot get blocks fails; the file keeps what it had.
        # Past the 65 KiB the instance holds, it is refused before it asks.
        f = c.open("a/big", "w")
        f.write(content("a/big", 5000))
        with pytest.raises(tfem.NoSpace) as caught:
            f.write(content("a/big", 100_000)[5000:])
        too_large(caught)
        with pytest.raises(tfem.NoSpace) as caught:
            f.write(content("a/big", 60_000)[5000:])
        no_space(caught)
        assert "arena is full" in str(caught.value) and "spilling is off" in str(caught.value)
        assert f.tell() == 5000 and c.stat("a/big").size == 5000
        f.close()  # published with what it had
        check(c, "a/big", 5000)
        assert usage(c) == before

        held.write(content("a/held", 20_000)[10_000:])  # what is left still serves
        with pytest.raises(tfem.NoSpace) as caught:
            held.write(content("a/held", 60_000)[20_000:])
        no_space(caught)
        held.close()
        check(c, "a/waiting", 40_000)  # frees 10 blocks: service resumes
        put(c, "a/fits-now", 40_000)
        for name, size in (("a/held", 20_000), ("a/fits-now", 40_000)):
            check(c, name, size)
        stats = c.stats()
        assert stats["spill"] is None and usage(c) == (0, 0, 0, 0)


def test_a_writer_waits_for_arena_blocks(up_factory, steps_workers):
    inst = up_factory(*NO_SPILL)
    with inst.connect() as c:
        put(c, "b/first", 50_000)  # 13 blocks of 16
        producer = steps_workers(inst.env)
        producer.do("open", name="b/second", mode="w", timeout=30)
        producer.send('{"op": "write", "name": "b/second", "start": 0, "end": 40000}')  # needs 10 blocks
        asleep_waiting(producer)
        assert c.stat("b/second").size < 40_000

        start = time.monotonic()
        check(c, "b/first", 50_000)  # frees 13 blocks
        producer.expect("wrote", timeout=10)
        assert time.monotonic() - start < 2.0
        producer.do("close", name="b/second")
        check(c, "b/second", 40_000)
        assert usage(c) == (0, 0, 0, 0)


def test_a_writer_gives_up_waiting_for_arena_blocks(up_factory, steps_workers):
    inst = up_factory(*NO_SPILL)
    with inst.connect() as c:
        put(c, "g/first", 50_000)
        producer = steps_workers(inst.env)
        producer.do("open", name="g/second", mode="w", timeout=0.8)
        start = time.monotonic()
        error = producer.do("write", name="g/second", start=0, end=40_000, expect="error")
        elapsed = time.monotonic() - start
        assert (error["type"], error["errno"]) == ("NoSpace", errno.ENOSPC)
        assert 0.8 <= elapsed < 5.0
        producer.do("write", name="g/second", start=0, end=8000)  # what fits still does
        producer.do("close", name="g/second")
        check(c, "g/second", 8000)
        check(c, "g/first", 50_000)
        assert usage(c) == (0, 0, 0, 0)


# ---- the spill store ----


def test_a_full_spill_store(up_factory):
    """A 1 MiB spill store behind a 64 KiB arena. A producer holding the
    whole arena makes every other file spill, so the store can be filled
    to the page."""
    inst = up_factory("--slots", "64", *GEOMETRY, "--memory", "64K", "--spill-size", "1M")
    with inst.connect() as c:
        arena = c.open("s/arena", "w")
        arena.write(content("s/arena", KIB + 64 * KIB))  # inline + all 16 blocks
        stored: dict[str, int] = {}
        for prefix, size in (("s/a", 100_000), ("s/b", 20_000), ("s/c", 3000)):
            for i in range(64):
                name = f"{prefix}{i}"
                before = usage(c)
                f = c.open(name, "w")
                f.write(content(name, size))  # gathered in the client, stored at close
                try:
                    f.close()
                except tfem.NoSpace as exc:
                    assert exc.errno == errno.ENOSPC and "spill store" in str(exc) and "full" in str(exc)
                    assert name not in c.list()  # dropped, never half-published
                    assert usage(c) == before  # nothing of it left behind
                    break
                stored[name] = size
            else:
                pytest.fail(f"the store never filled up with {prefix}* files")
        assert sum(1 for n in stored if n.startswith("s/a")) >= 5
        assert any(n.startswith("s/b") for n in stored)
        full = usage(c)
        assert full[3] == len(stored) and full[2] == sum(s - KIB for s in stored.values())

        # A file larger than the whole store (1 MiB + 64 KiB + 1 KiB) is
        # refused at its write, before anything is sent.
        f = c.open("s/huge", "w")
        with pytest.raises(tfem.NoSpace) as caught:
            f.write(content("s/huge", 5 * MIB))
        too_large(caught)
        f.abort()
        assert usage(c) == full

        # Moving a file out of the arena into the full store fails as a
        # whole: the first piece fits, the second does not, and neither
        # stays in the store.
        arena.abort()
        check(c, "s/b0", 20_000)  # frees 20 KB of the store: the consumer's discard works on a full store
        del stored["s/b0"]
        full = usage(c)
        e = c.open("s/evictee", "w")
        e.write(content("s/evictee", 5000))  # inline + 1 block
        e.write(content("s/evictee", 62 * KIB)[5000:])  # a second extent: 15 blocks in all
        e.close()
        assert not c.stat("s/evictee").spilled
        g = c.open("s/needs-room", "w")
        with pytest.raises(tfem.NoSpace) as caught:  # the arena is full and the store cannot take s/evictee
            g.write(content("s/needs-room", 30_000))
        no_space(caught)
        st = c.stat("s/evictee")
        assert (st.state, st.spilled) == ("WAIT", False)
        assert usage(c)[2:] == full[2:], "a half-moved file left records in the spill store"
        check(c, "s/evictee", 62 * KIB)  # intact, from memory; frees the arena
        g.write(content("s/needs-room", 30_000))  # service resumes
        g.close()
        check(c, "s/needs-room", 30_000)

        # Consuming frees the store: the file that did not fit fits now.
        for name in [n for n in stored if n.startswith("s/a")][:3]:
            check(c, name, stored.pop(name))
        put(c, "s/later", 250_000)
        assert c.stat("s/later").spilled
        stored["s/later"] = 250_000
        for name, size in stored.items():
            check(c, name, size)
        assert usage(c) == (0, 0, 0, 0)
