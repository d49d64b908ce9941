"""The spill store: files past the arena, eviction of the least recently
published files, transparent reads, and a full arena without spilling.

The small instance has a 1 MiB arena of 4 KiB blocks and 1 KiB inline
buffers: a 128 KiB file takes 32 of the 256 blocks.
"""

from __future__ import annotations

import errno
import os
import random

import pytest

import tfem

from tests._instances import SMALL
from tests._tfem_worker import KIB, MIB, content

INLINE = KIB
MEDIUM = 128 * KIB  # 32 blocks


def write(client, name, size, step=None):
    data = content(name, size)
    with client.open(name, "w") as f:
        if step is None:
            f.write(data)
        else:
            for pos in range(0, size, step):
                f.write(data[pos: pos + step])
    return data


def assert_all_free(client):
    assert client.list() == []
    stats = client.stats()
    assert stats["slots_used"] == 0
    assert stats["arena_bytes_used"] == 0
    assert stats["spilled_bytes"] == 0
    assert stats["spilled_files"] == 0


@pytest.mark.parametrize("size, step", [(4 * MIB, None), (8 * MIB, None), (4 * MIB + 12_345, 333_333)])
def test_files_larger_than_the_arena_round_trip(client, size, step):
    name = f"big/{size}/{step}"
    data = write(client, name, size, step)
    st = client.stat(name)
    assert (st.size, st.state, st.spilled) == (size, "WAIT", True)
    stats = client.stats()
    assert stats["arena_bytes_used"] == 0  # it all went to the spill store
    assert stats["spilled_bytes"] >= size - INLINE
    assert stats["spilled_files"] == 1
    with client.open(name) as f:
        got = f.read()
        assert f.read() == b""
    assert len(got) == size
    assert got == data
    assert_all_free(client)


def test_chunked_and_random_reads_of_a_spilled_file(client):
    size = 3 * MIB + 777
    data = write(client, "big/random", size)
    assert client.stat("big/random").spilled
    rng = random.Random(7)
    with client.open("big/random") as f:
        # Across the inline buffer's end, and across spill chunks.
        for pos, n in [(INLINE - 10, 100), (0, INLINE + 1), (MIB - 5, 10), (size - 10, 100), (size, 5),
                       *((rng.randrange(size), rng.randrange(1, 300_000)) for _ in range(20))]:
            f.seek(pos)
            assert f.read(n) == data[pos: pos + n], (pos, n)
        f.seek(0)
        pieces = [bytes(c) for c in f.chunks(1 << 20)]
        assert b"".join(pieces) == data
        f.seek(100)
        buf = bytearray(2 * MIB)
        assert f.readinto(buf) == len(buf)
        assert buf == data[100: 100 + len(buf)]
        assert f.seek(-3, os.SEEK_END) == size - 3
        assert f.read() == data[-3:]
    assert_all_free(client)


def test_the_least_recently_published_files_are_evicted_first(client):
    # Six files written at once, published in the reverse of their creation
    # order: f5 is the least recently published, f0 the oldest created.
    data = {}
    held = []
    for i in range(6):
        name = f"f{i}"
        data[name] = content(name, MEDIUM)
        f = client.open(name, "w")
        f.write(data[name])
        held.append(f)
    publish_order = []
    for f in reversed(held):
        f.close()
        publish_order.append(f.name)
    assert client.stats()["arena_bytes_used"] >= 6 * (MEDIUM - INLINE)
    assert not any(s.spilled for s in client.list_stats())
    # Six more, one after the other: the arena (8 such files) overflows.
    for i in range(6):
        name = f"g{i}"
        data[name] = write(client, name, MEDIUM)
        publish_order.append(name)

    spilled = {s.name for s in client.list_stats() if s.spilled}
    assert spilled, "nothing was evicted although the files exceed the arena"
    # What was evicted is exactly the oldest part of the publish order.
    flags = [name in spilled for name in publish_order]
    assert flags == sorted(flags, reverse=True), f"evicted out of order: {publish_order} {flags}"
    assert "f5" in spilled
    assert "f0" not in spilled  # created first, but published after f5..f1
    assert not any(name.startswith("g") for name in spilled)
    stats = client.stats()
    assert stats["spilled_files"] == len(spilled)
    assert stats["arena_bytes_used"] <= stats["arena_bytes_total"]

    # Reads are transparent, in any order.
    names = list(data)
    random.Random(3).shuffle(names)
    for name in names:
        with client.open(name, wait=False) as f:
            assert f.read() == data[name], name
    assert_all_free(client)


def test_a_writer_spills_itself_when_the_arena_is_held_by_writers(client):
    held = []
    for i in range(8):  # 8 x 32 blocks: the whole arena, none of it evictable
        f = client.open(f"w{i}", "w")
        f.write(content(f"w{i}", MEDIUM))
        held.append(f)
    assert client.stats()["arena_bytes_free"] < MEDIUM
    late = client.open("late", "w")
    late.write(content("late", MEDIUM))
    assert client.stat("late").spilled
    assert client.stat("late").state == "WRITE"
    assert not any(client.stat(f"w{i}").spilled for i in range(8))
    late.write(content("late/tail", 5000))
    late.close()
    for f in held:
        f.close()
    with client.open("late") as f:
        assert f.read() == content("late", MEDIUM) + content("late/tail", 5000)
    for i in range(8):
        with client.open(f"w{i}") as f:
            assert f.read() == content(f"w{i}", MEDIUM)
    assert_all_free(client)


def test_a_file_growing_in_small_writes_past_the_arena(client):
    data = write(client, "grow", 2 * MIB + 3, step=10_000)
    assert client.stat("grow").spilled
    with client.open("grow") as f:
        assert f.read() == data
    assert_all_free(client)


def test_evicted_file_is_read_while_others_are_written(client):
    first = write(client, "first", 600 * KIB)
    second = write(client, "second", 600 * KIB)  # evicts "first"
    assert client.stat("first").spilled and not client.stat("second").spilled
    with client.open("first") as f:
        head = f.read(INLINE + 10)
        third = write(client, "third", 600 * KIB)  # evicts "second", not the file being read
        assert client.stat("first").state == "READ"
        assert client.stat("second").spilled
        assert head + f.read() == first
    for name, expected in (("second", second), ("third", third)):
        with client.open(name) as f:
            assert f.read() == expected
    assert_all_free(client)


def test_unlink_discards_spilled_bytes(client):
    write(client, "spilled/waiting", 2 * MIB)
    assert client.stats()["spilled_bytes"] > 0
    client.unlink("spilled/waiting")
    assert_all_free(client)

    f = client.open("spilled/writing", "w")
    f.write(content("x", 3 * MIB))
    assert client.stat("spilled/writing").spilled
    client.unlink("spilled/writing")
    f.write(b"more")
    f.close()  # freed, not published: its spill records go too
    assert_all_free(client)

    write(client, "spilled/reading", 2 * MIB)
    with client.open("spilled/reading") as f:
        client.unlink("spilled/reading")
        assert f.read() == content("spilled/reading", 2 * MIB)
    assert_all_free(client)

    write(client, "spilled/given-back", 2 * MIB)
    f = client.open("spilled/given-back")
    client.unlink("spilled/given-back")
    f.abort()  # not back to WAIT: the name is gone, so the file and its records go
    assert_all_free(client)


def test_aborted_spilled_write_leaves_nothing(client):
    with pytest.raises(KeyError):
        with client.open("abandoned", "w") as f:
            f.write(content("abandoned", 6 * MIB))  # past one spill request: sent at once
            assert client.stats()["spilled_bytes"] > 0
            raise KeyError("no")
    with pytest.raises(tfem.NotFound):
        client.stat("abandoned")
    assert_all_free(client)


# ---- without a spill store ----


def test_no_spill_a_full_arena_is_no_space_and_nothing_is_lost(instance_factory):
    inst = instance_factory(*SMALL, "--no-spill")
    with inst.connect() as client:
        assert client.stats()["spill"] is None
        kept = {"tiny": write(client, "tiny", 100), "a": write(client, "a", 200 * KIB),
                "b": write(client, "b", 300 * KIB)}
        used = client.stats()["arena_bytes_used"]
        assert used >= 500 * KIB - 2 * INLINE

        # Past all the instance holds (no spill: the 1 MiB arena and the
        # inline buffer): refused at once, a FileTooLarge (still a NoSpace).
        with pytest.raises(tfem.NoSpace) as caught:
            with client.open("too-big", "w") as f:
                f.write(content("too-big", 2 * MIB))
        assert caught.value.errno == errno.EFBIG and isinstance(caught.value, tfem.FileTooLarge)
        assert "limit" in str(caught.value)
        with pytest.raises(tfem.NotFound):
            client.stat("too-big")
        assert client.stats()["arena_bytes_used"] == used  # the failed file's blocks are back

        # Fill what is left with files that do fit; the one that does not
        # fit fails, and every earlier file stays readable.
        n = 0
        with pytest.raises(tfem.NoSpace):
            while True:
                kept[f"fill{n}"] = write(client, f"fill{n}", 100 * KIB)
                n += 1
        assert n >= 3
        kept.pop(f"fill{n}", None)
        assert sorted(client.list()) == sorted(kept)
        assert not any(s.spilled for s in client.list_stats())
        # Inline-only files need no arena: they still go in.
        kept["inline"] = write(client, "inline", INLINE)

        for name, expected in kept.items():
            with client.open(name, wait=False) as f:
                assert f.read() == expected, name
        assert client.list() == []
        stats = client.stats()
        assert stats["arena_bytes_used"] == 0
        assert stats["slots_used"] == 0
        # Memory is usable again.
        write(client, "after", 700 * KIB)
        with client.open("after") as f:
            assert f.read() == content("after", 700 * KIB)
