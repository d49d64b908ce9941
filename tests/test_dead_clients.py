"""Clients that die holding files (SIGKILL: no close, no goodbye).

The broker watches every client process through a pidfd, so the kernel tells
it at once when one exits: a file a dead producer was writing is dropped and
its slot, blocks and spilled bytes freed; a file a dead consumer was reading
goes back to WAIT, and a consumer waiting for it gets it. Nothing is polled:
each death is settled well within a second (the broker's sweep runs only
every 2 s, and only for holders nobody introduced).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

import tfem

from tests._instances import SMALL
from tests._proc_tools import STEPS_WORKER, Worker, in_futex_wait, wait_until
from tests._tfem_worker import KIB, MIB, content, sha256

BUF, BLOCK = KIB, 4 * KIB  # the small instance's inline buffer and block
SETTLED_WITHIN = 1.0  # seconds: the kernel tells the broker, nobody polls


def need(size: int) -> int:
    return -(-max(0, size - BUF) // BLOCK) * BLOCK


def usage(client: tfem.Client) -> tuple[int, int, int, int]:
    s = client.stats()
    return s["slots_used"], s["arena_bytes_used"], s["spilled_bytes"], s["spilled_files"]


def broker_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# The spilled case writes more than the client gathers before sending (4 MiB).
@pytest.mark.parametrize("size", [600, 50_000, 5 * MIB + 300 * KIB], ids=["inline", "blocks", "spilled"])
def test_a_producer_killed_while_writing(up_factory, steps_workers, workers, size):
    instance = up_factory(*SMALL)
    client = instance.connect()
    try:
        _producer_killed_while_writing(client, instance, steps_workers, workers, size)
    finally:
        client.close()


def _producer_killed_while_writing(client, instance, steps_workers, workers, size):
    put = content("kept", 700)  # inline: never moved to the spill store
    with client.open("kept", "w") as f:
        f.write(put)
    before = usage(client)
    settled = client.stats()["dead_clients_settled"]
    reader = workers(instance.env, "read", "dying", "--timeout", "30")  # waits for the name
    reader.expect("waiting")
    wait_until(lambda: in_futex_wait(reader.pid), 10, "the reader to wait")

    producer = steps_workers(instance.env)
    producer.do("open", name="dying", mode="w")
    producer.do("write", name="dying", start=0, end=size)
    during = usage(client)
    assert during[0] == before[0] + 1
    if size > MIB:
        assert client.stat("dying").spilled and during[2] >= 4 * MIB
    elif size > BUF:
        assert during[1] == before[1] + need(size)

    start = time.monotonic()
    producer.kill()
    wait_until(lambda: usage(client) == before, SETTLED_WITHIN, "the dead producer's file to be dropped")
    elapsed = time.monotonic() - start
    assert client.stats()["dead_clients_settled"] == settled + 1
    with pytest.raises(tfem.NotFound):
        client.stat("dying")
    # The reader was not given the half-written file...
    assert reader.quiet_for(0.2)
    # ...and gets the one a new producer publishes under the same name.
    with client.open("dying", "w") as f:
        f.write(content("dying/again", 7000))
    got = reader.expect("got", timeout=10)
    assert (got["size"], got["sha256"]) == (7000, sha256(content("dying/again", 7000)))
    assert reader.finish() == 0
    with client.open("kept", "r", wait=False) as f:
        assert f.read() == put
    assert usage(client) == (0, 0, 0, 0)
    assert elapsed < SETTLED_WITHIN


@pytest.mark.parametrize("size", [50_000, MIB + 300 * KIB], ids=["blocks", "spilled"])
def test_a_consumer_killed_while_reading(up_factory, steps_workers, workers, size):
    instance = up_factory(*SMALL)
    with instance.connect() as client:
        _consumer_killed_while_reading(client, instance, steps_workers, workers, size)


def _consumer_killed_while_reading(client, instance, steps_workers, workers, size):
    data = content("taken", size)
    with client.open("taken", "w") as f:
        f.write(data)
    before = usage(client)
    first = steps_workers(instance.env)
    first.do("open", name="taken", mode="r", timeout=10)
    first.do("read", name="taken", n=size // 2)
    assert client.stat("taken").state == "READ"
    second = workers(instance.env, "read", "taken", "--timeout", "30")  # waits for it to come back
    second.expect("waiting")
    wait_until(lambda: in_futex_wait(second.pid), 10, "the second reader to wait")
    assert second.quiet_for(0.2)

    start = time.monotonic()
    first.kill()
    got = second.expect("got", timeout=10)
    assert time.monotonic() - start < SETTLED_WITHIN
    assert (got["size"], got["sha256"]) == (size, sha256(data))  # all of it, from the start
    assert second.finish() == 0
    assert before[0] == 1 and usage(client) == (0, 0, 0, 0)


# ---- a thousand deaths ----

WRITERS, READERS = 600, 400
KEEP_SIZES = (0, 300, BUF, 5000, 20_000, 70_000)
OPTIONS = ("--slots", "1280", "--buf-size", "1K", "--block-size", "4K", "--memory", "16M")


def test_a_thousand_killed_clients_leak_nothing(up_factory):
    inst = up_factory(*OPTIONS)  # its log goes to a file: a line per death
    keep = {f"keep/{i}": KEEP_SIZES[i % len(KEEP_SIZES)] for i in range(READERS)}
    with inst.connect() as client:
        for name, size in keep.items():
            with client.open(name, "w") as f:
                f.write(content(name, size))
        stats = client.stats()
        broker = stats["broker_pid"]
        baseline = (stats["slots_used"], stats["arena_bytes_used"], stats["dead_clients_settled"],
                    stats["clients"], broker_fds(broker))
        assert baseline[:3] == (READERS, sum(need(s) for s in keep.values()), 0)

        forker = Worker([sys.executable, STEPS_WORKER, "die-many", inst.names.endpoint, "--writers",
                         str(WRITERS), "--readers", str(READERS), "--batch", "40"], inst.env)
        try:
            forker.expect("ready", timeout=60)
            done = forker.expect("done", timeout=120)
            assert forker.finish() == 0, forker.stderr
        finally:
            forker.kill()
        assert (done["killed"], done["failed"]) == (WRITERS + READERS, 0), done

        def settled() -> bool:
            s = client.stats()
            return s["dead_clients_settled"] == WRITERS + READERS and s["files_by_state"]["READ"] == 0 \
                and s["files_by_state"]["WRITE"] == 0

        wait_until(settled, 20, "every dead client to be settled")
        stats = client.stats()
        assert stats["files_by_state"] == {"WRITE": 0, "WAIT": READERS, "READ": 0, "SHARED": 0}
        assert stats["slots_used"] == READERS
        assert stats["arena_bytes_used"] == baseline[1]
        assert stats["spilled_bytes"] == 0
        assert stats["clients"] == baseline[3]  # the dead are forgotten
        assert stats["opened_for_write"] == READERS + WRITERS and stats["opened_for_read"] == READERS
        # Their pidfds are closed: the broker's descriptors are back where they were.
        wait_until(lambda: broker_fds(broker) <= baseline[4] + 2, 10, "the broker's descriptors to be closed")
        assert stats["broker_pid"] == broker

        for name, size in keep.items():  # readers that died damaged nothing
            with client.open(name, "r", wait=False) as f:
                assert sha256(f.read()) == sha256(content(name, size)), name
        stats = client.stats()
        assert (stats["slots_used"], stats["arena_bytes_used"], stats["spilled_bytes"]) == (0, 0, 0)
        print(f"\n{WRITERS + READERS} clients forked, connected, killed and settled in {done['seconds']:.1f} s")


SWEEP_S = 2.0  # the broker's sweep interval (broker/server.py SWEEP_INTERVAL_S)


def test_blocks_claimed_by_a_writer_killed_before_recording_them_are_freed(up_factory, workers):
    """Growing a file is two steps: set the blocks' bits, then record them
    in the slot. A writer killed between the two leaked them until the next
    adoption. The helper takes the real first step (tfem_t_claim_blocks) and
    stops there. While it lives, even stopped (SIGSTOP), the sweeps leave
    its blocks alone; once it is killed, a sweep frees them."""
    instance = up_factory(*SMALL)
    with instance.connect() as c:
        helper = workers(instance.env, "claim", "leak/file", "40")
        assert helper.expect("claimed")["count"] == 40
        assert c.stats()["arena_bytes_used"] == 40 * BLOCK
        os.kill(helper.pid, signal.SIGSTOP)
        put_and_check = [("leak/other", 50_000)]  # others are served meanwhile
        deadline = time.monotonic() + 2 * SWEEP_S + 0.5  # two sweeps at least
        while time.monotonic() < deadline:
            for name, size in put_and_check:
                with c.open(name, "w") as f:
                    f.write(content(name, size))
                with c.open(name, "r", wait=False) as f:
                    assert sha256(f.read()) == sha256(content(name, size))
            time.sleep(0.1)
        assert c.stats()["arena_bytes_used"] == 40 * BLOCK, "the sweep freed blocks of a live (stopped) writer"

        helper.kill()  # SIGKILL, mid-claim: its slot is settled at once, its blocks by the next sweep
        wait_until(lambda: c.stats()["arena_bytes_used"] == 0, 2 * SWEEP_S + 1, "the leaked blocks freed")
        assert c.stats()["slots_used"] == 0
        size = BUF + 256 * BLOCK  # the whole arena again: in memory, not spilled
        with c.open("leak/all", "w") as f:
            f.write(content("leak/all", size))
        assert not c.stat("leak/all").spilled
        with c.open("leak/all", "r", wait=False) as f:
            assert sha256(f.read()) == sha256(content("leak/all", size))
    assert "freed 40 arena block(s)" in instance.log()
