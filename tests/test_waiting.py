"""Readers that wait: for a name to appear, for its producer to close it,
for another reader to give it back; and what they must never be given.

Readers run in real separate processes (tests/_tfem_worker.py read); the
test process plays the producer or the first consumer. A reader is known
to be waiting when it is asleep in futex(2) inside tfem's open.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import time

import pytest

import tfem
from tfem.table import WAKE_BUCKETS, name_hash

from tests._proc_tools import in_futex_wait, wait_until
from tests._tfem_worker import content, sha256

QUIET = 0.3  # how long a reader must stay silent to count as "not given the file"


def start_reader(workers, instance, name, *options):
    """A reader process that has reached tfem's wait for `name`."""
    reader = workers(instance.env, "read", name, *options)
    reader.expect("waiting")
    wait_until(lambda: in_futex_wait(reader.pid), 10, f"the reader to wait for {name!r}")
    return reader


def assert_still_waiting(reader):
    """The reader has not been given anything and is still asleep in its wait."""
    assert reader.quiet_for(QUIET), f"the reader returned early: {reader.next_event(1)}"
    wait_until(lambda: in_futex_wait(reader.pid), 5, "the reader to be asleep in its wait")


def assert_all_free(client):
    assert client.list() == []
    stats = client.stats()
    assert stats["slots_used"] == 0
    assert stats["arena_bytes_used"] == 0
    assert stats["spilled_bytes"] == 0


# ---- waiting for the producer ----


def test_reader_waits_for_the_producers_close(client, instance, workers):
    data = content("late", 50_000)  # inline buffer and arena blocks
    reader = start_reader(workers, instance, "late", "--timeout", "30")
    with pytest.raises(tfem.NotFound):
        client.stat("late")

    f = client.open("late", "w")
    assert client.stat("late").state == "WRITE"
    assert_still_waiting(reader)
    f.write(data[:500])  # inline only
    assert_still_waiting(reader)
    f.write(data[500:])  # grows into the arena
    assert client.stat("late").state == "WRITE"
    assert client.stat("late").size == len(data)
    assert_still_waiting(reader)

    f.close()
    got = reader.expect("got", timeout=10)
    assert got["size"] == len(data)
    assert got["sha256"] == sha256(data)
    reader.expect("closed")
    assert reader.finish() == 0
    assert_all_free(client)


def test_reader_started_after_publish_does_not_wait(client, instance, workers):
    data = content("early", 3000)
    with client.open("early", "w") as f:
        f.write(data)
    reader = workers(instance.env, "read", "early", "--timeout", "0")
    reader.expect("waiting")
    got = reader.expect("got")
    assert (got["size"], got["sha256"]) == (len(data), sha256(data))
    assert reader.finish() == 0
    assert_all_free(client)


def test_many_readers_of_different_names_each_get_their_own(client, instance, workers):
    names = [f"fan/{i}" for i in range(4)]
    readers = {name: start_reader(workers, instance, name, "--timeout", "30") for name in names}
    for name in reversed(names):
        with client.open(name, "w") as f:
            f.write(content(name, 7000))
    for name, reader in readers.items():
        got = reader.expect("got")
        assert got["sha256"] == sha256(content(name, 7000))
        assert reader.finish() == 0
    assert_all_free(client)


# ---- timeouts ----


def test_timeout_in_a_reader_process(client, instance, workers):
    reader = workers(instance.env, "read", "never", "--timeout", "1.0")
    reader.expect("waiting")
    error = reader.expect("error", timeout=10)
    assert error["type"] == "Timeout"
    assert error["errno"] == errno.ETIMEDOUT
    assert 1.0 <= error["elapsed"] < 2.5
    assert "never" in error["message"]
    assert reader.finish() == 3
    assert_all_free(client)


def test_timeout_in_process(client):
    start = time.monotonic()
    with pytest.raises(tfem.Timeout) as caught:
        client.open("never", timeout=0.5)
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 2.0
    assert caught.value.errno == errno.ETIMEDOUT
    assert isinstance(caught.value, TimeoutError)


def test_timeout_zero_fails_at_once(client):
    start = time.monotonic()
    with pytest.raises(tfem.Timeout):
        client.open("never", timeout=0)
    assert time.monotonic() - start < 0.5


def test_timeout_while_the_producer_keeps_writing(client):
    with client.open("slow", "w") as f:
        f.write(b"partial")
        start = time.monotonic()
        with pytest.raises(tfem.Timeout):
            client.open("slow", timeout=0.5)
        assert 0.5 <= time.monotonic() - start < 2.0
        assert client.stat("slow").state == "WRITE"
    with client.open("slow") as f:  # the timed-out wait took nothing away
        assert f.read() == b"partial"
    assert_all_free(client)


def _same_bucket_names(target: str, count: int) -> list[str]:
    bucket = name_hash(target.encode()) % WAKE_BUCKETS
    found, i = [], 0
    while len(found) < count:
        name = f"noise/{i}"
        if name_hash(name.encode()) % WAKE_BUCKETS == bucket:
            found.append(name)
        i += 1
    return found


def test_wakeups_for_other_names_neither_satisfy_nor_extend_a_wait(client, instance, workers):
    """Publishes of other names that share the reader's wake bucket wake it;
    it must go back to sleep, and still time out on time."""
    noise = workers(instance.env, "churn", *_same_bucket_names("quiet", 3))
    noise.expect("ready")
    reader = workers(instance.env, "read", "quiet", "--timeout", "1.5")
    reader.expect("waiting")
    error = reader.expect("error", timeout=10)
    noise.close_stdin()
    churned = noise.expect("done")
    assert noise.finish() == 0
    assert churned["rounds"] > 0
    assert error["type"] == "Timeout"
    assert 1.5 <= error["elapsed"] < 3.5
    assert_all_free(client)


# ---- non-blocking opens ----


def test_no_wait_on_a_missing_name_is_not_found(client):
    with pytest.raises(tfem.NotFound) as caught:
        client.open("missing", wait=False)
    assert caught.value.errno == errno.ENOENT
    assert isinstance(caught.value, FileNotFoundError)


def test_no_wait_on_a_name_being_written_would_block(client):
    with client.open("busy", "w") as f:
        f.write(b"abc")
        with pytest.raises(tfem.WouldBlock) as caught:
            client.open("busy", wait=False)
        assert caught.value.errno == errno.EAGAIN
        assert isinstance(caught.value, BlockingIOError)
        with pytest.raises(tfem.WouldBlock):
            client.open("busy", "a", wait=False)
    with client.open("busy", wait=False) as f:
        assert f.read() == b"abc"
    assert_all_free(client)


def test_no_wait_on_a_name_being_read_would_block(client):
    with client.open("taken", "w") as f:
        f.write(b"abc")
    with client.open("taken") as first:
        with pytest.raises(tfem.WouldBlock):
            client.open("taken", wait=False)
        assert first.read() == b"abc"
    with pytest.raises(tfem.NotFound):
        client.open("taken", wait=False)


# ---- one reader at a time ----


def test_abort_gives_a_file_in_read_back_whole(client):
    data = content("back", 70_000)
    with client.open("back", "w") as f:
        f.write(data)
    f = client.open("back")
    assert f.read(5000) == data[:5000]
    f.abort()
    st = client.stat("back")
    assert (st.state, st.size) == ("WAIT", len(data))
    assert f.closed
    with client.open("back", wait=False) as g:  # from the start, all of it
        assert g.read() == data
    assert_all_free(client)


def test_a_file_in_read_is_not_given_to_a_second_reader_until_given_back(client, instance, workers):
    data = content("shared", 20_000)
    with client.open("shared", "w") as f:
        f.write(data)
    first = client.open("shared")
    assert first.read(100) == data[:100]
    assert client.stat("shared").state == "READ"

    second = start_reader(workers, instance, "shared", "--timeout", "30")
    assert_still_waiting(second)
    assert client.stat("shared").state == "READ"

    first.abort()  # given back unread: READ -> WAIT
    got = second.expect("got", timeout=10)
    assert (got["size"], got["sha256"]) == (len(data), sha256(data))
    assert second.finish() == 0
    assert_all_free(client)


def test_a_consumed_file_is_not_given_to_a_second_reader(client, instance, workers):
    old, new = content("once/old", 9000), content("once/new", 5000)
    with client.open("once", "w") as f:
        f.write(old)
    first = client.open("once")
    second = start_reader(workers, instance, "once", "--timeout", "30")
    assert first.read() == old
    first.close()  # consumed: gone for good
    with pytest.raises(tfem.NotFound):
        client.stat("once")
    assert_still_waiting(second)

    with client.open("once", "w") as f:  # a new file of the same name
        f.write(new)
    got = second.expect("got", timeout=10)
    assert (got["size"], got["sha256"]) == (len(new), sha256(new))
    assert second.finish() == 0
    assert_all_free(client)


def test_a_reader_holding_a_file_blocks_another_process(client, instance, workers):
    data = content("held", 30_000)
    with client.open("held", "w") as f:
        f.write(data)
    holder = workers(instance.env, "read", "held", "--timeout", "10", "--hold")
    holder.expect("waiting")
    got = holder.expect("got")
    assert got["sha256"] == sha256(data)
    assert client.stat("held").state == "READ"
    with pytest.raises(tfem.WouldBlock):
        client.open("held", wait=False)
    holder.send()  # close it: consumed
    holder.expect("closed")
    assert holder.finish() == 0
    with pytest.raises(tfem.NotFound):
        client.open("held", wait=False)
    assert_all_free(client)


# ---- mode "a" (TFEM_AUTO) ----


def test_mode_a_creates_when_absent_and_reads_when_waiting(client):
    with client.open("auto", "a") as f:
        assert f.writable() and not f.readable()
        f.write(b"made by a")
    assert client.stat("auto").state == "WAIT"
    with client.open("auto", "a") as f:
        assert f.readable() and not f.writable()
        assert f.read() == b"made by a"
    assert_all_free(client)


def test_mode_a_waits_for_a_file_being_written(client, instance, workers):
    data = content("auto/late", 12_345)
    f = client.open("auto/late", "w")
    f.write(data)
    reader = start_reader(workers, instance, "auto/late", "--mode", "a", "--timeout", "30")
    assert_still_waiting(reader)
    f.close()
    got = reader.expect("got", timeout=10)  # read, not created
    assert (got["size"], got["sha256"]) == (len(data), sha256(data))
    assert reader.finish() == 0
    assert_all_free(client)


def test_tfem_auto_flag_through_the_posix_calls(client, instance):
    script = textwrap.dedent("""
        import tfem
        fd = tfem.tfem_open("posix/auto", tfem.TFEM_AUTO)
        assert tfem.tfem_write(fd, b"first half, ") == 12
        tfem.tfem_write(fd, b"second half")
        tfem.tfem_close(fd)
        assert tfem.tfem_stat("posix/auto").state == "WAIT"
        fd = tfem.tfem_open("posix/auto", tfem.TFEM_AUTO)
        assert tfem.tfem_stat("posix/auto").state == "READ"
        print(tfem.tfem_read(fd, 1000).decode())
        tfem.tfem_close(fd)
        try:
            tfem.tfem_open("posix/auto", tfem.TFEM_RDONLY | tfem.TFEM_NONBLOCK)
        except tfem.NotFound:
            print("gone")
    """)
    result = subprocess.run([sys.executable, "-c", script], env=instance.env, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split("\n")[:2] == ["first half, second half", "gone"]
    assert_all_free(client)


# ---- producers that give up ----


def test_a_producer_leaving_with_an_exception_drops_the_file(client, instance, workers):
    reader = start_reader(workers, instance, "doomed", "--timeout", "30")
    with pytest.raises(RuntimeError, match="stage failed"):
        with client.open("doomed", "w") as f:
            f.write(content("doomed/bad", 80_000))
            assert client.stats()["arena_bytes_used"] > 0
            raise RuntimeError("stage failed")
    with pytest.raises(tfem.NotFound):
        client.stat("doomed")
    assert_all_free(client)
    assert_still_waiting(reader)

    good = content("doomed/good", 2_000)
    with client.open("doomed", "w") as f:
        f.write(good)
    got = reader.expect("got", timeout=10)
    assert (got["size"], got["sha256"]) == (len(good), sha256(good))
    assert reader.finish() == 0
    assert_all_free(client)


# ---- unlink ----


def test_unlink_a_waiting_file(client):
    with client.open("gone", "w") as f:
        f.write(content("gone", 100_000))
    assert client.stats()["arena_bytes_used"] > 0
    client.unlink("gone")
    with pytest.raises(tfem.NotFound):
        client.stat("gone")
    with pytest.raises(tfem.NotFound):
        client.open("gone", wait=False)
    with pytest.raises(tfem.NotFound):
        client.unlink("gone")
    assert_all_free(client)


def test_unlink_a_file_being_written(client, instance, workers):
    reader = start_reader(workers, instance, "moving", "--timeout", "30")
    old = content("moving/old", 60_000)
    f = client.open("moving", "w")
    f.write(old[:30_000])
    client.unlink("moving")
    # The name disappears at once...
    with pytest.raises(tfem.NotFound):
        client.stat("moving")
    assert "moving" not in client.list()
    # ...but the producer keeps a working file until it closes it.
    assert client.stats()["slots_used"] == 1
    f.write(old[30_000:])
    assert client.stats()["arena_bytes_used"] > 0
    # The name is free for a new file meanwhile.
    new = content("moving/new", 4_000)
    g = client.open("moving", "w")
    g.write(new)
    assert [s.state for s in client.list_stats()] == ["WRITE"]
    f.close()  # frees the unlinked file instead of publishing it
    assert client.stats()["slots_used"] == 1
    assert_still_waiting(reader)
    g.close()
    got = reader.expect("got", timeout=10)
    assert (got["size"], got["sha256"]) == (len(new), sha256(new))
    assert reader.finish() == 0
    assert_all_free(client)


def test_a_reader_giving_back_an_unlinked_file_frees_it(client):
    """abort() would put the file back in WAIT, but its name is gone: it
    must be freed, not left behind in WAIT where nobody can reach it."""
    with client.open("orphan", "w") as f:
        f.write(content("orphan", 50_000))
    f = client.open("orphan")
    client.unlink("orphan")
    f.abort()
    assert_all_free(client)
    with pytest.raises(tfem.NotFound):
        client.open("orphan", wait=False)


def test_unlink_a_file_being_read(client):
    data = content("reading", 40_000)
    with client.open("reading", "w") as f:
        f.write(data)
    with client.open("reading") as f:
        client.unlink("reading")
        with pytest.raises(tfem.NotFound):
            client.stat("reading")
        assert f.read() == data  # the reader keeps its bytes
    assert_all_free(client)
