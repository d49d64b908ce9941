"""Lifetimes beyond one reader: readers=N, keep, ttl, through Python and C.

Every reader here is a real open on a real instance; readers that must be
other processes (one killed while it holds a read, one asleep waiting for a
read to come back) are real processes (tests/_tfem_worker.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time

import pytest

import tfem
from tfem._native import ffi, lib
from tfem.segment import Segment
from tfem.states import unpack_word

from tests._c_programs import run
from tests._proc_tools import in_futex_wait, pid_dead, wait_until
from tests._tfem_worker import content, sha256


def put(client: tfem.Client, name: str, size: int, **lifetime) -> bytes:
    data = content(name, size)
    with client.open(name, "w", **lifetime) as f:
        f.write(data)
    return data


def read_all(client: tfem.Client, name: str) -> bytes:
    with client.open(name, "r", wait=False) as f:
        return f.read()


def assert_all_free(client: tfem.Client) -> None:
    stats = client.stats()
    assert client.list() == []
    assert (stats["slots_used"], stats["arena_bytes_used"], stats["spilled_bytes"]) == (0, 0, 0)


# ---- readers=N ----


def test_three_readers_hold_the_file_at_once_and_the_last_close_frees_it(client):
    data = put(client, "three", 20_000, readers=3)  # inline buffer and arena blocks
    st = client.stat("three")
    assert (st.state, st.lifetime, st.readers, st.readers_left, st.holders) == ("WAIT", "3 readers", 3, 3, 0)

    files = [client.open("three", wait=False) for _ in range(3)]
    st = client.stat("three")
    assert (st.state, st.readers_left, st.holders) == ("SHARED", 0, 3)
    with pytest.raises(tfem.WouldBlock, match="every read of 'three' is taken"):
        client.open("three", wait=False)
    assert [f.read() == data for f in files] == [True] * 3

    files[0].close()
    assert (client.stat("three").state, client.stat("three").holders) == ("SHARED", 2)
    files[1].close()
    files[2].close()
    with pytest.raises(tfem.NotFound):
        client.stat("three")
    assert_all_free(client)


def test_readers_one_after_another_find_it_waiting_between_them(client):
    data = put(client, "two", 5_000, readers=2)
    assert read_all(client, "two") == data
    st = client.stat("two")
    assert (st.state, st.readers_left, st.holders) == ("WAIT", 1, 0)
    assert read_all(client, "two") == data
    assert_all_free(client)


def test_a_read_given_back_is_not_counted(client):
    data = put(client, "back", 3_000, readers=2)
    f = client.open("back", wait=False)
    f.abort()  # gives the read back
    st = client.stat("back")
    assert (st.state, st.readers_left, st.holders) == ("WAIT", 2, 0)
    assert read_all(client, "back") == data
    assert read_all(client, "back") == data
    assert_all_free(client)


def test_a_reader_waiting_for_a_taken_read_gets_the_one_given_back(client, instance, workers):
    data = put(client, "scarce", 2_000, readers=2)
    held = [client.open("scarce", wait=False) for _ in range(2)]
    reader = workers(instance.env, "read", "scarce", "--timeout", "30")
    reader.expect("waiting")
    wait_until(lambda: in_futex_wait(reader.pid), 10, "the reader to wait for a read of 'scarce'")
    held[0].abort()
    got = reader.expect("got")
    assert (got["size"], got["sha256"]) == (len(data), sha256(data))
    reader.expect("closed")
    assert reader.finish() == 0
    held[1].close()  # the second of two reads: freed
    assert_all_free(client)


def test_a_reader_waiting_for_a_taken_read_wakes_when_reads_are_added(client, instance, workers):
    """What a broker lending reads across nodes does (tfem_f_add_reads):
    the reads it takes are gone for local readers; given back, a waiting
    reader wakes and takes one."""
    data = put(client, "lent", 2_000, readers=3)
    held = client.open("lent", wait=False)
    moved = ffi.new("uint32_t *")
    assert lib.tfem_f_add_reads(held._f, -5, moved) == 0 and moved[0] == 2
    with pytest.raises(tfem.WouldBlock):
        client.open("lent", wait=False)
    reader = workers(instance.env, "read", "lent", "--timeout", "30")
    reader.expect("waiting")
    wait_until(lambda: in_futex_wait(reader.pid), 10, "the reader to wait for a read of 'lent'")
    assert lib.tfem_f_add_reads(held._f, 1, moved) == 0 and moved[0] == 1
    got = reader.expect("got")
    assert (got["size"], got["sha256"]) == (len(data), sha256(data))
    reader.expect("closed")
    assert reader.finish() == 0
    assert client.stat("lent").readers_left == 0
    held.close()  # freed: two reads done here, the third still taken (as if lent to another node)
    assert_all_free(client)


def test_a_killed_shared_reader_gives_its_read_back(client, instance, workers):
    data = put(client, "victim", 4_000, readers=2)
    reader = workers(instance.env, "read", "victim", "--hold")
    reader.expect("waiting")
    assert reader.expect("got")["size"] == len(data)
    assert (client.stat("victim").state, client.stat("victim").holders) == ("SHARED", 1)
    os.kill(reader.pid, signal.SIGKILL)
    wait_until(lambda: pid_dead(reader.pid), 10, "the reader to die")
    wait_until(lambda: client.stat("victim").holders == 0, 10, "the broker to settle the dead reader")
    st = client.stat("victim")
    assert (st.state, st.readers_left) == ("WAIT", 2)  # its read was given back
    assert client.stats()["dead_clients_settled"] >= 1
    assert read_all(client, "victim") == data
    assert read_all(client, "victim") == data
    assert_all_free(client)


def test_a_file_with_readers_to_come_is_spilled_under_pressure_never_freed(client):
    """The instance's arena is 1 MiB: a second large file pushes the first,
    read once of its two reads, to the spill store."""
    data = put(client, "fanout", 700_000, readers=2)
    assert read_all(client, "fanout") == data
    other = put(client, "pressure", 900_000)
    st = client.stat("fanout")
    assert (st.state, st.spilled, st.readers_left) == ("WAIT", True, 1)
    assert read_all(client, "pressure") == other
    assert read_all(client, "fanout") == data  # from the spill store, checked as read
    wait_until(lambda: client.stats()["spilled_bytes"] == 0, 10, "the spill store to drop the freed file")
    assert_all_free(client)


# ---- keep, unlink, ttl ----


def test_a_kept_file_is_read_any_number_of_times_until_unlinked(client):
    data = put(client, "kept", 30_000, keep=True)
    for _ in range(5):
        assert read_all(client, "kept") == data
    together = [client.open("kept", wait=False) for _ in range(4)]
    st = client.stat("kept")
    assert (st.state, st.lifetime, st.readers, st.readers_left, st.holders) == ("SHARED", "keep", 0, None, 4)
    for f in together:
        assert f.read() == data
        f.close()
    assert client.stat("kept").state == "WAIT"
    client.unlink("kept")
    assert_all_free(client)


def test_unlinking_a_kept_file_while_it_is_read_frees_it_at_the_last_close(client):
    data = put(client, "doomed", 10_000, keep=True)
    readers = [client.open("doomed", wait=False) for _ in range(2)]
    client.unlink("doomed")
    assert client.list() == []  # the name is gone at once
    with pytest.raises(tfem.NotFound):
        client.open("doomed", wait=False)
    assert client.stats()["slots_used"] == 1
    for f in readers:
        assert f.read() == data
        f.close()
    assert_all_free(client)


@pytest.mark.parametrize("lifetime", [{"keep": True}, {"readers": 3}, {}], ids=["keep", "readers", "once"])
def test_a_ttl_unlinks_the_file_whatever_its_lifetime(client, lifetime):
    before = client.stats()["expired"]
    put(client, "brief", 2_000, ttl=0.3, **lifetime)
    expires = client.stat("brief").expires
    assert expires is not None and 0 < expires - time.time() <= 0.3
    wait_until(lambda: client.list() == [], 5, "the broker to unlink the expired file")
    assert time.time() >= expires
    assert client.stats()["expired"] == before + 1
    assert_all_free(client)


def test_an_expired_file_being_read_is_freed_when_its_reader_closes(client):
    data = put(client, "late-reader", 2_000, keep=True, ttl=0.3)
    f = client.open("late-reader", wait=False)
    wait_until(lambda: client.list() == [], 5, "the broker to unlink the expired file")
    assert f.read() == data
    f.close()
    assert_all_free(client)


def test_aborting_a_writer_of_a_kept_file_leaves_nothing(client):
    f = client.open("never", "w", keep=True, ttl=60)
    f.write(b"x" * 5_000)
    f.abort()
    assert_all_free(client)


@pytest.mark.parametrize("mode, kwargs, message", [
    ("w", {"readers": 0}, "readers must be an integer from 1"),
    ("w", {"readers": -2}, "readers must be an integer from 1"),
    ("w", {"readers": 2**31}, "readers must be an integer from 1"),
    ("w", {"readers": True}, "readers must be an integer from 1"),
    ("w", {"readers": 2.0}, "readers must be an integer from 1"),
    ("w", {"keep": 1}, "keep must be True or False"),
    ("w", {"keep": True, "readers": 2}, "give keep=True or readers=N, not both"),
    ("w", {"ttl": 0}, "ttl must be None or seconds greater than 0"),
    ("w", {"ttl": -1.0}, "ttl must be None or seconds greater than 0"),
    ("w", {"ttl": float("nan")}, "ttl must be None or seconds greater than 0"),
    ("w", {"ttl": "60"}, "ttl must be None or seconds greater than 0"),
    ("r", {"keep": True}, "the writer's choice"),
    ("r", {"readers": 2}, "the writer's choice"),
])
def test_a_lifetime_that_means_nothing_is_refused_and_nothing_is_held(client, mode, kwargs, message):
    with pytest.raises(tfem.InvalidArgument, match=message):
        client.open("bad", mode, **kwargs)
    assert_all_free(client)


def test_create_takes_a_lifetime(client):
    with client.create("view", 10_000, readers=2) as f:
        f.getbuffer()[:4] = b"abcd"
    for _ in range(2):
        with client.open("view", wait=False) as f:
            assert bytes(f.getbuffer()[:4]) == b"abcd"
    assert_all_free(client)


# ---- adoption after the broker's crash ----


def test_a_restarted_broker_recounts_shared_reads(up_factory, workers):
    """A live reader and a dead one hold reads of a kept file while the
    broker is killed: the new broker gives the dead one's read back and
    keeps the live one's, which then closes as if nothing happened."""
    up = up_factory()
    with up.connect() as c:
        data = put(c, "k", 50_000, keep=True)
        broker = c.stats()["broker_pid"]
    live = workers(up.env, "read", "k", "--hold")
    dead = workers(up.env, "read", "k", "--hold")
    for reader in (live, dead):
        reader.expect("waiting")
        assert reader.expect("got")["size"] == len(data)
    os.kill(up.process.pid, signal.SIGSTOP)  # no restart until the damage is done
    try:
        os.kill(broker, signal.SIGKILL)
        wait_until(lambda: pid_dead(broker), 10, "the broker to die")
        os.kill(dead.pid, signal.SIGKILL)
        wait_until(lambda: pid_dead(dead.pid), 10, "the reader to die")
    finally:
        os.kill(up.process.pid, signal.SIGCONT)
    wait_until(lambda: _broker_back(up, broker), 30, "tfem up to start a new broker")
    with up.connect() as c:
        wait_until(lambda: c.stat("k").holders == 1, 10, "the dead reader's read to be given back")
        assert c.stat("k").state == "SHARED"
        live.send()  # let it close
        live.expect("closed")
        assert live.finish() == 0
        assert c.stat("k").state == "WAIT"
        assert read_all(c, "k") == data
        c.unlink("k")
        assert c.list() == []


def _broker_back(up, old: int) -> bool:
    from tfem._native import lib

    pid = up.names.read_state().get("broker_pid")
    return isinstance(pid, int) and pid != old and bool(lib.tfem_pid_alive(pid))


def test_adoption_clears_the_hold_of_a_reader_killed_inside_its_open(up_factory):
    """A reader killed between claiming its hold entry and counting it
    leaves an uncounted entry: the new broker clears it, and the file's
    reads are all still to come."""
    up = up_factory()
    with up.connect() as c:
        data = put(c, "pair", 8_000, readers=2)
        slot, broker, segment = c.stat("pair").slot, c.stats()["broker_pid"], c.stats()["segment"]
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that held nothing, and is dead
    os.kill(up.process.pid, signal.SIGSTOP)
    try:
        os.kill(broker, signal.SIGKILL)
        wait_until(lambda: pid_dead(broker), 10, "the broker to die")
        with contextlib.closing(Segment.attach(segment)) as seg:
            generation = unpack_word(seg.slot(slot).state)[1]
            entry = ffi.cast("uint32_t *", ffi.cast("char *", seg.header) + seg.header.holds_offset)
            entry[0:4] = [gone.pid, slot, generation, 0]  # claimed, not counted
    finally:
        os.kill(up.process.pid, signal.SIGCONT)
    wait_until(lambda: _broker_back(up, broker), 30, "tfem up to start a new broker")
    with up.connect() as c:
        assert c.stats()["recovery"]["holds_changed"] == 1
        st = c.stat("pair")
        assert (st.state, st.holders, st.readers_left) == ("WAIT", 0, 2)
        assert read_all(c, "pair") == data
        assert read_all(c, "pair") == data
        assert c.list() == []


# ---- the C API ----


def test_lifetimes_through_the_c_api(instance, programs):
    out = run(programs["lifetimes"], env=instance.env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "put-three 0", "three-open 1", "three-stat 4 3 0 3", "fourth-open -1 EAGAIN", "three-read 1",
        "three-gone -1 ENOENT", "put-kept 0", "kept-read 1 2 0", "kept-unlink 0", "kept-gone -1 ENOENT",
        "ttl-set 0", "ttl-stat 1", "ttl-gone -1 ENOENT", "keep-and-readers -1 EINVAL",
        "reader-chooses -1 EINVAL", "ttl-bad-fd -1 EBADF",
    ]
    with instance.connect() as c:
        assert_all_free(c)


def test_a_full_hold_table_is_a_clear_error_and_loses_nothing(client):
    """The instance's 256 slots give 512 hold entries: shared reads open
    at once past that are refused, and the reads already open go on."""
    data = put(client, "popular", 1_500, keep=True)
    limit = client.table.seg.hold_count
    files = [client.open("popular", wait=False) for _ in range(limit)]
    with pytest.raises(tfem.TfemError, match=f"{limit} shared reads are open at once") as info:
        client.open("popular", wait=False)
    assert info.value.errno == errno.EMFILE
    assert client.stat("popular").holders == limit
    files.pop().close()
    files.append(client.open("popular", wait=False))  # a freed entry is taken again
    assert all(f.read() == data for f in files)
    for f in files:
        f.close()
    st = client.stat("popular")
    assert (st.state, st.holders) == ("WAIT", 0)
    client.unlink("popular")
    assert_all_free(client)
