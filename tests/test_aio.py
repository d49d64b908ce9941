"""tfem.aio: waiting opens in one event loop, on a real instance.

Producers are real: another process (tests/_tfem_worker.py produce) or a
thread with a blocking client of its own. A waiting open is known to wait
when its task is pending and the watcher is counted in the waiters of its
name's bucket in the segment (what makes publishers wake it).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time

import pytest

import tfem
import tfem.aio
from tfem.table import WAKE_BUCKETS, name_hash

from tests._tfem_worker import catalogue, content, sha256

MANY = ("--slots", "2048", "--buf-size", "1K", "--block-size", "4K", "--memory", "4M")


def bucket_of(name: str) -> int:
    return name_hash(name.encode()) % WAKE_BUCKETS


def waiters(client: tfem.aio.Client) -> list[int]:
    """The waiter count of each name bucket of the client's segment."""
    assert client.blocking.segment is not None
    header = client.blocking.segment.header
    return [header.wake_waiters[b] for b in range(WAKE_BUCKETS)]


async def until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Wait in the loop, letting it run, until `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


async def all_parked(client: tfem.aio.Client, tasks: list[asyncio.Task], names: list[str]) -> None:
    buckets = {bucket_of(n) for n in names}
    await until(lambda: all(waiters(client)[b] >= 1 for b in buckets), what="the watcher to count itself in")
    assert not any(t.done() for t in tasks), [t for t in tasks if t.done()][:1]


def publish(instance, names: list[str], data: bytes = b"x") -> None:
    with instance.connect() as producer:
        for name in names:
            with producer.open(name, "w") as f:
                f.write(data)


def test_a_thousand_waiting_opens_are_served_by_another_process(instance_factory, workers):
    inst = instance_factory(*MANY)
    files = catalogue(1000)  # mixed sizes: inline, a few blocks, dozens, and some past the arena (spilled)

    async def consume(client: tfem.aio.Client, name: str) -> str:
        async with await client.open(name, "r", timeout=60) as f:
            return sha256(await f.read())

    async def main() -> None:
        async with await tfem.aio.connect(inst.keyfile) as client:
            tasks = [asyncio.create_task(consume(client, name)) for name, _ in files]
            await all_parked(client, tasks, [name for name, _ in files])
            producer = workers(inst.env, "produce", "0", "1", str(len(files)))
            got = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            producer.expect("ready")
            assert producer.expect("done")["written"] == len(files)
            assert got == [sha256(content(name, size)) for name, size in files]
            assert await client.list() == []
            assert waiters(client) == [0] * WAKE_BUCKETS

    asyncio.run(main())


def test_a_waiting_open_leaves_the_loop_running(instance):
    async def main() -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        async with await tfem.aio.connect(instance.keyfile) as client:
            ticking = asyncio.create_task(ticker())
            opening = asyncio.create_task(client.open("late", "r"))
            await all_parked(client, [opening], ["late"])
            at_park = ticks
            await until(lambda: ticks >= at_park + 50, what="the loop to tick while the open waits")
            assert not opening.done()
            producer = threading.Thread(target=publish, args=(instance, ["late"], b"served"))
            producer.start()
            f = await asyncio.wait_for(opening, 10)
            producer.join()
            assert await f.read() == b"served"
            await f.close()
            start = time.monotonic()
            with pytest.raises(tfem.Timeout):
                await client.open("never", "r", timeout=0.3)
            assert 0.3 <= time.monotonic() - start < 3
            assert ticks > at_park + 100  # the loop went on during the timed wait too
            ticking.cancel()

    asyncio.run(main())


def test_cancelled_opens_hold_nothing(instance):
    names = [f"cancel/{i}" for i in range(200)]

    async def main() -> None:
        async with await tfem.aio.connect(instance.keyfile) as client:
            tasks = [asyncio.create_task(client.open(name, "r")) for name in names]
            await all_parked(client, tasks, names)
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            assert waiters(client) == [0] * WAKE_BUCKETS  # the watcher counted itself out
            await asyncio.to_thread(publish, instance, names)
            for name in names:  # published and left alone, for another consumer
                assert (await client.stat(name)).state == "WAIT"
        with instance.connect() as other:
            for name in names:
                with other.open(name, "r", wait=False) as f:
                    assert f.read() == b"x"
            assert other.list() == []

    asyncio.run(main())


def test_timeouts_and_opens_that_do_not_wait(instance):
    async def main() -> None:
        async with await tfem.aio.connect(instance.keyfile) as client:
            with pytest.raises(tfem.NotFound):
                await client.open("absent", "r", wait=False)
            with pytest.raises(tfem.Timeout):
                await client.open("absent", "r", timeout=0)
            writing = await client.open("held", "w")
            for wait, timeout in ((False, None), (False, 0), (False, 1)):
                with pytest.raises(tfem.WouldBlock):
                    await client.open("held", "r", timeout=timeout, wait=wait)
            start = time.monotonic()
            with pytest.raises(tfem.Timeout) as caught:
                await client.open("held", "r", timeout=0.2)
            assert 0.2 <= time.monotonic() - start < 3
            assert str(caught.value) == "'held' was not ready to read within 0.2 s"
            await writing.write(b"now")
            await writing.close()
            f = await client.open("held", "r", wait=False)
            with pytest.raises(tfem.WouldBlock):
                await client.open("held", "r", wait=False)  # read by another consumer
            await f.abort()  # given back
            async with await client.open("held", "a", timeout=0) as f:
                assert await f.read() == b"now"
            async with await client.open("held", "a", timeout=0) as f:  # gone: "a" creates it
                assert f.mode == "wb"
            await client.unlink("held")
            assert await client.list() == []

    asyncio.run(main())


def test_a_writer_waits_for_a_slot_within_its_timeout(instance_factory):
    inst = instance_factory("--slots", "4", "--buf-size", "1K", "--block-size", "4K", "--memory", "1M")
    names = [f"full/{i}" for i in range(4)]
    publish(inst, names)

    async def main() -> None:
        async with await tfem.aio.connect(inst.keyfile) as client:
            with pytest.raises(tfem.NoSpace):
                await client.open("more", "w")  # no timeout: at once
            start = time.monotonic()
            with pytest.raises(tfem.NoSpace):  # the blocking attempt aio makes: no wait for a slot
                client.blocking.open("more", "w", timeout=30, wait=False)
            assert time.monotonic() - start < 1
            start = time.monotonic()
            with pytest.raises(tfem.NoSpace, match="no slot was freed within 0.2 s"):
                await client.open("more", "w", timeout=0.2)
            assert 0.2 <= time.monotonic() - start < 3
            opening = asyncio.create_task(client.open("more", "w", timeout=30))
            await asyncio.sleep(0.05)  # let it find the table full (nothing depends on it)
            async with await client.open(names[0], "r") as f:  # frees a slot
                await f.read()
            async with await asyncio.wait_for(opening, 10) as f:
                await f.write(b"fits")
            assert (await client.stat("more")).size == 4

    asyncio.run(main())


def test_a_writer_waits_for_room_within_its_timeout(instance_factory):
    inst = instance_factory("--slots", "16", "--buf-size", "1K", "--block-size", "4K", "--memory", "256K",
                            "--no-spill")
    publish(inst, ["filler"], bytes(200 << 10))
    more = content("more", 100 << 10)

    async def main() -> None:
        async with await tfem.aio.connect(inst.keyfile) as client:
            with pytest.raises(tfem.NoSpace):
                async with await client.open("more", "a") as f:  # no timeout: the arena is full at once
                    await f.write(more)
            async with await client.open("more", "a", timeout=30) as f:  # created: its writes wait for room
                writing = asyncio.create_task(f.write(more))
                await asyncio.sleep(0.05)  # let it find the arena full (nothing depends on it)
                async with await client.open("filler", "r") as filler:  # frees the arena
                    await filler.read()
                assert await asyncio.wait_for(writing, 10) == len(more)
            async with await client.open("more", "r", wait=False) as f:
                assert await f.read() == more

    asyncio.run(main())


def test_errors_are_the_blocking_clients(client, instance):
    bad = [("", "r", None), ("a\0b", "r", None), ("x" * 300, "r", None), (5, "r", None), (b"\xff", "r", None),
           ("ok", "x", None), ("ok", "rw", None), ("ok", 3, None), ("ok", "r", -1), ("ok", "r", math.nan),
           ("", "x", -1)]

    async def main() -> None:
        async with await tfem.aio.connect(instance.keyfile) as aclient:
            for name, mode, timeout in bad:
                with pytest.raises(tfem.TfemError) as blocking:
                    client.open(name, mode, timeout)
                with pytest.raises(tfem.TfemError) as asynchronous:
                    await aclient.open(name, mode, timeout)
                assert (type(asynchronous.value), str(asynchronous.value)) == \
                       (type(blocking.value), str(blocking.value)), (name, mode, timeout)
            f = await aclient.open("w-only", "w")
            with pytest.raises(tfem.WrongMode):
                await f.read()
            await f.abort()
        with pytest.raises(ValueError, match="closed"):
            await aclient.open("late", "r")

    asyncio.run(main())


def test_data_in_memory_and_in_the_spill_store(instance):
    small, large = content("small", 3000), content("large", 3 << 20)  # large: past the 1 MiB arena, spilled

    async def main() -> None:
        async with await tfem.aio.connect(instance.keyfile) as client:
            async with await client.open("small", "w") as f:
                for i in range(0, len(small), 700):
                    assert await f.write(small[i: i + 700]) == len(small[i: i + 700])
            async with await client.open("large", "w") as f:
                for i in range(0, len(large), 256 << 10):
                    await f.write(memoryview(large)[i: i + (256 << 10)])
            assert (await client.stat("large")).spilled
            async with await client.open("small", "r") as f:
                assert await f.read(1000) == small[:1000]
                assert await f.seek(-10, os.SEEK_END) == len(small) - 10
                assert await f.read() == small[-10:]
            async with await client.open("large", "r") as f:
                parts = [await f.read(300 << 10) for _ in range(11)]
                assert b"".join(parts) == large and await f.read() == b""
            with pytest.raises(RuntimeError):
                async with await client.open("dropped", "w") as f:
                    await f.write(b"half")
                    raise RuntimeError("the producer fails")
            assert await client.list() == []  # the consumed freed, the failed dropped

    asyncio.run(main())


def test_a_cancelled_write_on_a_thread_runs_to_its_end_before_close(instance):
    data = content("big", 3 << 20)  # past BIG_TRANSFER: written on a thread

    async def main() -> None:
        async with await tfem.aio.connect(instance.keyfile) as client:
            f = await client.open("big", "w")
            writing = asyncio.create_task(f.write(data))
            await asyncio.sleep(0)  # the write is handed to its thread
            writing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await writing
            await f.close()  # after the thread's write, never under it: all of it is published
            assert (await client.stat("big")).size == len(data)
            async with await client.open("big", "r", wait=False) as f:
                assert await f.read() == data
            stats = await client.stats()
            assert stats["slots_used"] == 0 and stats["arena_bytes_used"] == 0

    asyncio.run(main())


def test_waiting_opens_follow_a_replaced_segment(instance):
    path = "/dev/shm" + instance.names.segment
    names = [f"moved/{i}" for i in range(20)]

    async def main() -> None:
        async with await tfem.aio.connect(instance.keyfile) as client:
            tasks = [asyncio.create_task(client.open(name, "r", timeout=30)) for name in names]
            await all_parked(client, tasks, names)
            before = os.stat(path).st_ino
            os.unlink(path)  # the broker makes it again within 2 s and wakes the waiters of the old one
            await until(lambda: os.path.exists(path) and os.stat(path).st_ino != before, 10, "a new segment")
            await asyncio.to_thread(publish, instance, names, b"new")
            for f in await asyncio.wait_for(asyncio.gather(*tasks), 30):
                assert await f.read() == b"new"
                await f.close()
            assert await client.list() == []

    asyncio.run(main())


def test_lifetimes_go_to_the_blocking_open(client, instance):
    async def main() -> None:
        async with await tfem.aio.connect(instance.keyfile) as aclient:
            readers = [asyncio.create_task(aclient.open("two", "r", timeout=30)) for _ in range(2)]
            await all_parked(aclient, readers, ["two"])
            async with await aclient.open("two", "w", readers=2) as f:
                await f.write(b"for two")
            first, second = await asyncio.wait_for(asyncio.gather(*readers), 10)  # held by both at once
            assert (await aclient.stat("two")).holders == 2
            for f in (first, second):
                assert await f.read() == b"for two"
                await f.close()
            async with await aclient.open("kept", "w", keep=True) as f:
                await f.write(b"kept")
            for _ in range(3):
                async with await aclient.open("kept", "r", wait=False) as f:
                    assert await f.read() == b"kept"
            await aclient.unlink("kept")
            assert await aclient.list() == []
            with pytest.raises(tfem.InvalidArgument) as blocking:
                client.open("both", "w", keep=True, readers=2)
            with pytest.raises(tfem.InvalidArgument) as asynchronous:
                await aclient.open("both", "w", keep=True, readers=2)
            assert str(asynchronous.value) == str(blocking.value)

    asyncio.run(main())


def test_closing_the_client_fails_its_waiting_opens_and_counts_the_watcher_out(instance):
    async def main() -> None:
        client = await tfem.aio.connect(instance.keyfile)
        opening = asyncio.create_task(client.open("never", "r"))
        await all_parked(client, [opening], ["never"])
        await client.close()
        with pytest.raises(ValueError, match="closed while this open waited"):
            await opening
        await client.close()  # idempotent

    asyncio.run(main())
    with instance.connect() as other:
        assert other.segment is not None
        assert list(other.segment.header.wake_waiters) == [0] * WAKE_BUCKETS


def test_the_watchers_wait_returns_when_a_word_moves_or_too_many_to_sleep_on():
    from tfem._native import ffi, lib

    control = ffi.new("uint32_t[]", 1)
    words = ffi.new("uint32_t[]", 200)
    pointers = ffi.new("uint32_t *[]", 200)
    expected = ffi.new("uint32_t[]", 200)
    for i in range(200):
        pointers[i] = words + i

    def bump_later() -> None:
        time.sleep(0.1)
        lib.tfem_add32(words + 5, 1)
        lib.tfem_futex_wake(words + 5, 1)

    bumper = threading.Thread(target=bump_later)
    start = time.monotonic()
    bumper.start()
    assert lib.tfem_wait_any(pointers, expected, 10, control, 0) == 0  # futex_waitv on 10 words and the control
    bumper.join()
    assert 0.09 <= time.monotonic() - start < 5 and words[5] == 1
    start = time.monotonic()
    assert lib.tfem_wait_any(pointers, expected, 200, control, 0) == 0  # past one call's 128: a 1 ms look
    assert time.monotonic() - start < 1


def test_a_client_waits_in_one_loop_at_a_time(instance):
    client = asyncio.run(tfem.aio.connect(instance.keyfile))
    try:
        async def times_out() -> None:
            with pytest.raises(tfem.Timeout):
                await client.open("later", "r", timeout=0.05)

        asyncio.run(times_out())

        async def served() -> None:  # in a new loop, once the first is closed
            opening = asyncio.create_task(client.open("later", "r"))
            await all_parked(client, [opening], ["later"])
            with pytest.raises(tfem.InvalidArgument, match="one event loop at a time"):
                await asyncio.to_thread(asyncio.run, client.open("elsewhere", "r"))
            await asyncio.to_thread(publish, instance, ["later"])
            async with await asyncio.wait_for(opening, 10) as f:
                assert await f.read() == b"x"

        asyncio.run(served())
    finally:
        asyncio.run(client.close())
