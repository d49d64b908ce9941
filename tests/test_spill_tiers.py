"""The spill store as a tier under memory: files brought back into memory
when it frees up, a store that gives its disk room back once empty, its
default bound, and what a writer gets when memory and store are both full.

Instances are real (`tfem up`'s broker on its own key file); sizes are
small so each test takes a second or two.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

import tfem
from tfem.broker.spill import RENEW_AT
from tfem.segment import Segment
from tfem.table import SlotTable

from tests._c_programs import expected, run
from tests._instances import SMALL
from tests._proc_tools import wait_until
from tests._tfem_worker import KIB, MIB, content


def put(client: tfem.Client, name: str, size: int) -> None:
    with client.open(name, "w") as f:
        f.write(content(name, size))


def take(client: tfem.Client, name: str, size: int) -> None:
    with client.open(name, "r", wait=False) as f:
        assert f.read() == content(name, size), name


def spill_store(client: tfem.Client) -> dict:
    return dict(client.stats()["spill_store"])


def test_spilled_files_come_back_into_memory_once_it_frees_up(instance_factory):
    # 1 MiB arena: of twelve 192 KiB files, the oldest go to the store.
    instance = instance_factory(*SMALL)
    names = [f"r/{i}" for i in range(12)]
    with tfem.connect(instance.keyfile) as c:
        for name in names:
            put(c, name, 192 * KIB)
        spilled = [n for n in names if c.stat(n).spilled]
        in_memory = [n for n in names if not c.stat(n).spilled]
        assert spilled and in_memory
        assert spilled == names[: len(spilled)]  # the least recently published went first
        for name in in_memory:  # memory frees up
            take(c, name, 192 * KIB)
        wait_until(lambda: spill_store(c)["restores"] > 0, what="a spilled file brought back")
        back = [n for n in spilled if not c.stat(n).spilled]
        assert back == spilled[: len(back)], "the oldest come back first"
        assert c.stats()["arena_bytes_used"] <= MIB // 2 + 192 * KIB, "half the arena stays free for writers"
        for name in spilled:
            take(c, name, 192 * KIB)
        store = wait_until(lambda: (s := spill_store(c))["restore_hits"] >= len(back) and s,
                           what="the restored files counted as read from memory")
        assert store["restores"] >= store["restore_hits"] + store["restores_spilled_again"]
        assert c.stats()["spilled_files"] == 0


def test_a_restored_file_read_by_c_is_the_same(instance_factory, programs):
    instance = instance_factory(*SMALL)
    size = 200 * KIB
    with tfem.connect(instance.keyfile) as c:
        for i in range(8):
            with c.open(f"c/{i}", "w") as f:
                f.write(expected(f"c/{i}", size))
        assert c.stat("c/0").spilled and not c.stat("c/7").spilled
        for i in range(4, 8):
            c.unlink(f"c/{i}")  # memory frees up
        wait_until(lambda: not c.stat("c/0").spilled, what="c/0 brought back")
    result = run(programs["consumer"], "4", str(size), "c", env=instance.env)
    assert result.returncode == 0, result.stderr
    assert "read 4 files, 0 with wrong bytes" in result.stdout


def test_an_emptied_store_gives_its_disk_room_back(instance_factory):
    instance = instance_factory(*SMALL)
    with tfem.connect(instance.keyfile) as c:
        for i in range(6):  # 24 MiB through a 1 MiB arena
            put(c, f"big/{i}", 4 * MIB)
        grown = spill_store(c)["file_bytes"]
        assert grown > RENEW_AT
        for i in range(6):
            take(c, f"big/{i}", 4 * MIB)
        store = wait_until(lambda: (s := spill_store(c))["renewals"] and s, what="the store made afresh")
        assert store["file_bytes"] < 1 * MIB, store
        put(c, "after", 3 * MIB)  # and it serves on
        take(c, "after", 3 * MIB)


def test_the_default_bound_is_half_the_free_disk(instance_factory):
    instance = instance_factory(*SMALL)
    with tfem.connect(instance.keyfile) as c:
        stats = c.stats()
    store = stats["spill_store"]
    vfs = os.statvfs(stats["spill"])
    half_free_now = vfs.f_bavail * vfs.f_frsize // 2
    assert abs(store["limit"] - half_free_now) < max(64 * MIB, half_free_now // 20), store
    assert store["limit_from"] == "half the disk's free room at start"


def test_memory_and_store_both_full_is_no_space_and_nothing_is_lost(instance_factory):
    instance = instance_factory(*SMALL, "--spill-size", "6M")
    stored = []
    with tfem.connect(instance.keyfile) as c:
        with pytest.raises(tfem.NoSpace) as caught:
            for i in range(20):  # 1 MiB of memory, 6 MiB of store: full well before 20 MiB
                put(c, f"f/{i}", MIB)
                stored.append(f"f/{i}")
        assert caught.value.errno == errno.ENOSPC
        assert "spill store" in str(caught.value) and "full" in str(caught.value)
        assert 4 <= len(stored) < 20
        assert sorted(c.list()) == sorted(stored), "the file that did not fit left nothing"
        for name in stored:
            take(c, name, MIB)
        put(c, "after", MIB)  # room again
        take(c, "after", MIB)


def test_after_making_room_the_broker_frees_an_eighth_of_the_arena_ahead(instance_factory):
    # 1 MiB arena of 4 KiB blocks: five 192 KiB files fill all but 64 KiB.
    # Without the eviction ahead, the sixth would leave 64 KiB free again;
    # with it, the broker goes on until 128 KiB (1/8) are free.
    instance = instance_factory(*SMALL)
    with tfem.connect(instance.keyfile) as c:
        for i in range(6):
            put(c, f"a/{i}", 192 * KIB)
        wait_until(lambda: c.stats()["arena_bytes_free"] >= MIB // 8, what="an eighth of the arena free")
        spilled = [i for i in range(6) if c.stat(f"a/{i}").spilled]
        assert spilled == list(range(len(spilled))) and len(spilled) >= 2, "the oldest, in order"
        for i in range(6):
            take(c, f"a/{i}", 192 * KIB)


def test_a_consumer_reads_on_while_the_broker_brings_files_back(instance_factory):
    # Newest first: the files in memory go first, memory frees up, and the
    # broker brings the oldest back while the consumer works its way down
    # to them. A file it is bringing back is held by the broker a moment:
    # the consumer's open waits for it, then reads it from memory.
    instance = instance_factory(*SMALL)
    names = [f"m/{i}" for i in range(16)]
    with tfem.connect(instance.keyfile) as c:
        for name in names:
            put(c, name, 160 * KIB)
        assert c.stat(names[0]).spilled
    reader = tfem.connect(instance.keyfile)
    try:
        for name in reversed(names):
            with reader.open(name, "r", timeout=10) as f:
                assert f.read() == content(name, 160 * KIB), name
            time.sleep(0.02)  # a pipeline stage's work: the broker tidies every 50 ms
        store = wait_until(lambda: (s := spill_store(reader))["restore_hits"] and s, what="restored files read")
        assert store["restores"] >= store["restore_hits"] > 0
        assert reader.list() == [] and reader.stats()["spilled_files"] == 0
    finally:
        reader.close()


def test_an_open_that_does_not_wait_waits_for_a_file_the_broker_holds_a_moment(instance_factory):
    # The broker holds a published file as its reader while it moves it to
    # or from the store. To a consumer the file is there: even wait=False
    # waits for it (the core, up to 5 s), instead of WouldBlock. Here this
    # test holds it under the broker's pid, as the broker would.
    instance = instance_factory(*SMALL)
    with tfem.connect(instance.keyfile) as c:
        put(c, "held", 50 * KIB)
        segment = Segment.attach(c.stats()["segment"])
        try:
            as_broker = SlotTable(segment, segment.header.broker_pid)
            handle = as_broker.hold_waiting(c.stat("held").slot)
            assert handle is not None
            released = threading.Timer(0.3, as_broker.release, (handle,))
            released.start()
            start = time.monotonic()
            take(c, "held", 50 * KIB)  # wait=False
            assert time.monotonic() - start >= 0.25, "it waited for the broker to let go"
            released.join()
            # Held by anyone else, a non-waiting open is WouldBlock at once.
            put(c, "other", 10)
            with c.open("other", "r", wait=False):
                start = time.monotonic()
                with pytest.raises(tfem.WouldBlock):
                    c.open("other", "r", wait=False)
                assert time.monotonic() - start < 0.25
        finally:
            segment.close()
