"""File semantics against io.BytesIO as the model.

Hypothesis generates a producer's writes, seeks and tells, applied both to a
tfem file opened "w" and to a BytesIO; after close, a consumer's reads,
readintos, seeks and tells, applied both to the tfem file opened "r" and to
a BytesIO holding the final bytes. Every result must agree.

The small instance (1 KiB inline buffer, 4 KiB blocks, 1 MiB arena, spill
on) makes ordinary sizes cross the inline buffer and block boundaries; one
test writes past the arena so the file spills and its bytes past the inline
buffer go through the broker's spill store.
"""

from __future__ import annotations

import io
import itertools
import os
import random
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tfem

BUF = 1 << 10  # the small instance's inline buffer
BLOCK = 4 << 10
ARENA = 1 << 20
WHENCES = [os.SEEK_SET, os.SEEK_CUR, os.SEEK_END]

_names = itertools.count()


def unique_name(kind: str) -> str:
    return f"semantics/{kind}/{os.getpid()}/{next(_names)}"


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# ---- operations ----
# ("write", size, seed)      write `size` pseudo-random bytes
# ("seek", whence, delta)    seek to max(0, base + delta), as an offset from whence's base
# ("tell",)
# ("read", n)                n may be -1 or None: read to the end
# ("readinto", n)


def boundaries(limit: int) -> st.SearchStrategy[int]:
    """Offsets on and around the inline buffer, block and arena edges."""
    edges = {BUF, BUF + BLOCK, BUF + 2 * BLOCK, BUF + 8 * BLOCK, ARENA, ARENA + BUF}
    near = sorted(e + d for e in edges for d in (-1, 0, 1) if 0 <= e + d <= limit)
    return st.sampled_from(near)


def seeks(spread: int) -> st.SearchStrategy[tuple]:
    delta = st.integers(-spread, spread) | boundaries(spread) | st.integers(-16, 16)
    return st.tuples(st.just("seek"), st.sampled_from(WHENCES), delta)


def writes(largest: int) -> st.SearchStrategy[tuple]:
    size = st.integers(1, 64) | st.integers(1, largest) | boundaries(largest) | st.just(0)
    return st.tuples(st.just("write"), size, st.integers(0, 2**32))


def producer_ops(largest: int, spread: int, most: int) -> st.SearchStrategy[list[tuple]]:
    op = writes(largest) | writes(largest) | seeks(spread) | st.just(("tell",))
    return st.lists(op, min_size=1, max_size=most)


def consumer_ops(largest: int, spread: int, most: int) -> st.SearchStrategy[list[tuple]]:
    n = st.integers(0, 64) | st.integers(0, largest) | boundaries(largest)
    op = (st.tuples(st.just("read"), n | st.sampled_from([-1, None]))
          | st.tuples(st.just("readinto"), n)
          | seeks(spread)
          | st.just(("tell",)))
    return st.lists(op, max_size=most)


def seek_args(model: io.BytesIO, whence: int, delta: int) -> tuple[int, int]:
    """(offset, whence) for a seek to a non-negative target, past the end allowed."""
    base = {os.SEEK_SET: 0, os.SEEK_CUR: model.tell(), os.SEEK_END: len(model.getbuffer())}[whence]
    target = max(0, base + delta)
    return target - base, whence


def run_producer(f: tfem.TfemFile, model: io.BytesIO, ops: list[tuple]) -> None:
    for step, op in enumerate(ops):
        where = f"producer step {step} {op!r}"
        if op[0] == "write":
            data = payload(op[1], op[2])
            assert f.write(data) == model.write(data), where
        elif op[0] == "seek":
            offset, whence = seek_args(model, op[1], op[2])
            assert f.seek(offset, whence) == model.seek(offset, whence), where
        else:
            assert f.tell() == model.tell(), where
        assert f.tell() == model.tell(), where


def run_consumer(f: tfem.TfemFile, model: io.BytesIO, ops: list[tuple]) -> None:
    for step, op in enumerate(ops):
        where = f"consumer step {step} {op!r}"
        if op[0] == "read":
            assert f.read(op[1]) == model.read(op[1]), where
        elif op[0] == "readinto":
            got, want = bytearray(op[1]), bytearray(op[1])
            assert f.readinto(got) == model.readinto(want), where
            assert got == want, where
        elif op[0] == "seek":
            offset, whence = seek_args(model, op[1], op[2])
            assert f.seek(offset, whence) == model.seek(offset, whence), where
        else:
            assert f.tell() == model.tell(), where
        assert f.tell() == model.tell(), where


def round_trip(client: tfem.Client, name: str, produce: list[tuple], consume: list[tuple],
               expect_spilled: bool | None = None) -> None:
    model = io.BytesIO()
    with client.open(name, "w") as f:
        assert (f.writable(), f.readable(), f.seekable()) == (True, False, True)
        run_producer(f, model, produce)
        # stat of a file being written shows its size so far
        assert client.stat(name).size == len(model.getbuffer())
        assert client.stat(name).state == "WRITE"
    final = model.getvalue()
    event("size " + ("0" if not final else "< inline buffer" if len(final) < BUF
                     else "< 2 blocks" if len(final) < BUF + 2 * BLOCK else ">= 2 blocks"))
    stat = client.stat(name)
    assert (stat.name, stat.size, stat.state) == (name, len(final), "WAIT")
    if expect_spilled is not None:
        assert stat.spilled is expect_spilled, f"{len(final)} bytes, spilled={stat.spilled}"
    reader_model = io.BytesIO(final)
    with client.open(name, "r", wait=False) as f:
        assert (f.writable(), f.readable(), f.seekable()) == (False, True, True)
        assert f.tell() == 0
        run_consumer(f, reader_model, consume)
        # Whatever the consumer did, the whole file reads back from the start.
        f.seek(0)
        assert f.read() == final
        assert f.read() == b"" and f.read(10) == b""
    # Consumed: the name is gone and its slot free again.
    assert name not in client.list()


SETTINGS: dict[str, Any] = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@settings(max_examples=60, **SETTINGS)
@given(produce=producer_ops(largest=20_000, spread=30_000, most=25),
       consume=consumer_ops(largest=20_000, spread=30_000, most=25))
def test_in_memory_files_behave_like_bytesio(client: tfem.Client, produce: list[tuple],
                                             consume: list[tuple]) -> None:
    round_trip(client, unique_name("memory"), produce, consume)
    # Nothing leaks from one example to the next: no file, no arena block.
    assert client.list() == []
    assert client.stats()["arena_bytes_used"] == 0


@settings(max_examples=25, **SETTINGS)
@given(first=st.integers(200_000, 900_000), extra=st.integers(ARENA + BUF + 1, ARENA + 300_000),
       seed=st.integers(0, 2**32),
       produce=producer_ops(largest=20_000, spread=ARENA + 400_000, most=15),
       consume=consumer_ops(largest=300_000, spread=ARENA + 400_000, most=20))
def test_spilled_files_behave_like_bytesio(client: tfem.Client, first: int, extra: int, seed: int,
                                           produce: list[tuple], consume: list[tuple]) -> None:
    # The first write takes arena blocks; the second goes past the arena, so
    # the broker moves the file to the spill store while it is being written.
    second = extra - first
    prefix = [("write", first, seed), ("write", second, seed + 1)]
    round_trip(client, unique_name("spill"), prefix + produce, consume, expect_spilled=True)
    assert client.list() == []
    stats = client.stats()
    assert stats["arena_bytes_used"] == 0
    assert stats["spilled_files"] == 0 and stats["spilled_bytes"] == 0


def test_gaps_read_back_as_zeros(client: tfem.Client) -> None:
    name = unique_name("gaps")
    with client.open(name, "w") as f:
        f.write(b"head")
        f.seek(BUF + BLOCK + 10)
        f.write(b"tail")
        f.seek(50)
        f.write(b"mid")
        f.seek(ARENA // 2)  # a seek past the end alone does not grow the file
    expected = bytearray(BUF + BLOCK + 14)
    expected[0:4], expected[50:53], expected[-4:] = b"head", b"mid", b"tail"
    assert client.stat(name).size == len(expected)
    with client.open(name, "r", wait=False) as f:
        assert f.read() == bytes(expected)


def test_a_file_that_fits_the_inline_buffer_exactly(client: tfem.Client) -> None:
    for size in (0, 1, BUF - 1, BUF, BUF + 1, BUF + BLOCK, ARENA):
        name = unique_name("edge")
        data = payload(size, size)
        with client.open(name, "w") as f:
            assert f.write(data) == size
        assert client.stat(name).size == size and not client.stat(name).spilled
        with client.open(name, "r", wait=False) as f:
            assert f.read() == data
    assert client.list() == []
    assert client.stats()["arena_bytes_used"] == 0
