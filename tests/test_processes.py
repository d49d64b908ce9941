"""Many real producer and consumer processes exchanging files through one instance.

Four producer and four consumer processes move 1,000 files of mixed sizes
(empty, inline, a few blocks, dozens of blocks, and some past the 1 MiB
arena, which must spill). Consumers start first and ask for names that do
not exist yet; every file is checked against its sha256 by the consumer
that reads it. At the end nothing is left: no name, no slot, no arena
block, no spilled byte.
"""

from __future__ import annotations

from tests._proc_tools import in_futex_wait, wait_until
from tests._tfem_worker import KIB, MIB, catalogue, consumed_by, produced_by

N = 4
TOTAL = 1000
# The small instance's memory geometry, with slots for every file at once,
# so the test is about exchange and waiting, not about a full table.
OPTIONS = ("--slots", "1024", "--buf-size", "1K", "--block-size", "4K", "--memory", "1M")


def test_catalogue_covers_every_size_class():
    sizes = [s for _, s in catalogue(TOTAL)]
    assert sizes.count(0) >= 10
    assert sum(1 for s in sizes if 0 < s < KIB) >= 100  # inline
    assert sum(1 for s in sizes if KIB < s <= 32 * KIB) >= 100  # a few blocks
    assert sum(1 for s in sizes if 64 * KIB <= s < MIB) >= 10
    assert sum(1 for s in sizes if s > MIB) >= 5  # past the arena: must spill
    # Every consumer needs files from every producer.
    for c in range(N):
        assert {produced_by(i, N) for i in range(TOTAL) if consumed_by(i, N) == c} == set(range(N))


def test_producers_and_consumers_exchange_1000_files(instance_factory, workers):
    inst = instance_factory(*OPTIONS)

    consumers = [workers(inst.env, "consume", str(i), str(N), str(TOTAL), "--timeout", "60") for i in range(N)]
    for c in consumers:
        c.expect("ready", timeout=30)
    # Every consumer is asleep waiting for its first name before any
    # producer exists.
    for c in consumers:
        wait_until(lambda: in_futex_wait(c.pid), 10, f"consumer {c.pid} to wait for its first file")

    with inst.connect() as client:
        assert client.list() == []
        producers = [workers(inst.env, "produce", str(i), str(N), str(TOTAL)) for i in range(N)]

        for p in producers:
            p.expect("ready", timeout=30)
        written = 0
        for p in producers:
            done = p.expect("done", timeout=90)
            written += done["written"]
            assert p.finish() == 0, p.stderr
        assert written == TOTAL

        consumed = waited = 0
        failures, codes = [], []
        for c in consumers:
            done = c.expect("done", timeout=90)
            consumed += done["consumed"]
            waited += done["waited"]
            failures += done["bad"]
            codes.append(c.finish())
        assert failures == []
        assert codes == [0] * N
        assert consumed == TOTAL
        # The first file of each consumer at least was waited for.
        assert waited >= N

        assert client.list() == []
        stats = client.stats()
        assert stats["slots_used"] == 0
        assert stats["arena_bytes_used"] == 0
        assert stats["spilled_bytes"] == 0
        assert stats["spilled_files"] == 0
        assert stats["published"] == TOTAL
        assert stats["consumed"] == TOTAL
        # The files past the arena went through the spill store (read back
        # from it by their consumers themselves).
        assert stats["requests_served"]["spill_write"] > 0
