"""tfem across nodes: brokers that find each other through a cluster
directory, pull files from one another, and share the work.

Each node is a `tfem up` of its own (own key file, segment, registry) with
its own CURVE key pair, listening on loopback; the `nodes` fixture starts
them, waits until they see each other, and at teardown stops them all and
checks that none left anything behind. A test body uses only what the
fixture's Cluster offers (start, kill, restart, and each node's connect,
tfem and status), so the same body runs on nodes in separate network
namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from typing import Any, Iterator

import pytest

from tests._instances import SMALL, RunningInstance, leftovers, start_instance, stop_instance
from tfem import aio as tfem_aio, rendezvous
from tfem.broker.cluster import WANT_LEASE_S
from tfem.config import Instance
from tfem.errors import BrokerUnavailable, InvalidArgument, NotFound, Timeout
from tfem.protocol import Op
from tfem.segment import Segment

PEERS_TIMEOUT_S = 15.0
DEAD_BOUND_S = 3.0 + 0.5 + 0.25 + 1.0  # silence, a heartbeat, a client's slice, slack for a loaded machine


def cluster_stats(node: RunningInstance) -> dict[str, Any]:
    with node.connect() as c:
        cluster: dict[str, Any] = c.stats()["cluster"]
    return cluster


def wait_for(what: str, check: Any, timeout: float = PEERS_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


class Cluster:
    """Nodes with a shared cluster directory and trusted keys."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        self.tmp_path = tmp_path
        self.keys = tmp_path / "keys"
        self.keys.mkdir(mode=0o700)
        self.nodes: list[RunningInstance] = []
        self.options: dict[pathlib.Path, tuple[str, ...]] = {}

    def start(self, n: int, trusted: pathlib.Path | None = None, wait: bool = True,
              keys: bool = True) -> list[RunningInstance]:
        started = []
        for _ in range(n):
            name = f"node{len(self.options) + 1}"
            key_dir = self.keys if trusted is None else trusted
            subprocess.run([sys.executable, "-m", "tfem", "keys", str(key_dir / name)], check=True,
                           capture_output=True)
            where = self.tmp_path / name
            where.mkdir()
            options = (*SMALL, "--cluster", str(self.tmp_path / "cluster"), "--listen", "tcp://127.0.0.1:*",
                       *(("--curve-key", str(key_dir / f"{name}.key_secret")) if keys else ()))
            self.options[where] = options
            started.append(self._up(where))
        if wait:
            self.wait_for_peers(self.nodes)
        return started

    def _up(self, where: pathlib.Path) -> RunningInstance:
        node = start_instance(where, *self.options[where])
        self.nodes.append(node)
        return node

    def wait_for_peers(self, nodes: list[RunningInstance]) -> None:
        """Until each of `nodes` counts exactly `nodes` alive."""
        want = sorted(cluster_stats(n)["node"] for n in nodes)
        wait_for(f"{len(nodes)} nodes seeing each other",
                 lambda: all(sorted(cluster_stats(n)["live"]) == want for n in nodes))

    def kill(self, node: RunningInstance) -> None:
        """SIGKILL of `tfem up`: its broker and registry die with it (the kernel kills them)."""
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
        self.nodes.remove(node)
        wait_for("the killed node's broker gone", lambda: not _alive(node.names.segment))

    def restart(self, node: RunningInstance) -> RunningInstance:
        return self._up(node.keyfile.parent)

    def stop_all(self) -> list[str]:
        left = []
        for node in self.nodes:
            left += stop_instance(node)
        return left


def _alive(segment: str) -> bool:
    """Whether a broker still maps the segment (the header's broker pid is alive)."""
    try:
        seg = Segment.attach(segment)
    except Exception:
        return False
    try:
        pid = seg.header.broker_pid
    finally:
        seg.close()
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def cluster(tmp_path: pathlib.Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        left = c.stop_all()
        assert not left, f"left behind: {left}"
        assert not list((tmp_path / "cluster").glob("*.peer")), "a stopped broker's peer file stayed"


def published(node: RunningInstance, name: str, data: bytes, **lifetime: Any) -> None:
    with node.connect() as c, c.open(name, "w", **lifetime) as f:
        f.write(data)


def name_homed_at(home: str, live: list[str], prefix: str) -> str:
    return next(n for n in (f"{prefix}{i}" for i in range(10_000)) if rendezvous.home(n, live) == home)


def test_a_file_published_on_a_is_read_on_b_and_freed_on_a(cluster):
    a, b = cluster.start(2)
    status = b.tfem("status").stdout.decode()
    assert "with CURVE" in status and "(alive)" in status
    data = os.urandom(300_000)  # inline bytes and arena blocks: several chunks
    published(a, "x/one", data)
    with a.connect() as ca, b.connect() as cb:
        with cb.open("x/one", "r", timeout=10) as f:
            got = f.read()
            assert ca.stat("x/one").state == "READ"  # the owner holds its copy until B's consumer closes
        assert zlib.crc32(got) == zlib.crc32(data) and got == data
        wait_for("the owner's copy freed", lambda: not ca.list() and not cb.list(), 5)
    assert cluster_stats(b)["pulled"] == 1 and cluster_stats(a)["lent"] == 1


def test_waiting_on_b_for_a_name_published_later_on_c(cluster):
    a, b, c = cluster.start(3)
    got: list[bytes] = []

    def consume() -> None:
        with b.connect() as cb, cb.open("later/x", "r", timeout=20) as f:
            got.append(f.read())

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(1.0)  # the consumer waits, its want kept by the name's home
    data = os.urandom(20_000)
    published(c, "later/x", data)
    t.join(25)
    assert got == [data]


def test_two_consumers_race_for_one_consume_once_file(cluster):
    a, b, c = cluster.start(3)
    data = os.urandom(50_000)
    outcomes: dict[str, Any] = {}

    def consume(node: RunningInstance, label: str) -> None:
        with node.connect() as cn:
            try:
                with cn.open("race/x", "r", timeout=4) as f:
                    outcomes[label] = f.read()
            except Timeout as exc:
                outcomes[label] = exc

    threads = [threading.Thread(target=consume, args=(n, label)) for n, label in ((b, "b"), (c, "c"))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    published(a, "race/x", data)
    for t in threads:
        t.join(10)
    assert sorted(type(v).__name__ for v in outcomes.values()) == ["Timeout", "bytes"], outcomes
    assert [v for v in outcomes.values() if isinstance(v, bytes)] == [data]


def test_timeout_and_no_wait_across_nodes(cluster):
    a, b = cluster.start(2)
    with b.connect() as cb:
        with pytest.raises(NotFound):
            cb.open("nowhere", "r", wait=False)
        started = time.monotonic()
        with pytest.raises(Timeout):
            cb.open("nowhere", "r", timeout=0.6)
        assert 0.5 < time.monotonic() - started < 2.0
        published(a, "there", b"abc")
        wait_for("announced", lambda: cluster_stats(a)["announced"] == 1, 5)
        with cb.open("there", "r", wait=False) as f:
            assert f.read() == b"abc"
        with pytest.raises(InvalidArgument, match="wait must be one of"):
            cb.call(Op.WANT, {"name": "there", "wait": 7})
        assert cluster_stats(b)["wants"] == 0  # refused whole, and the broker still answers


def test_open_next_takes_local_files_first_then_any_node(cluster):
    a, b = cluster.start(2)
    for i in range(3):
        published(a, f"work/a{i}", b"a%d" % i)
        time.sleep(0.01)
    published(b, "work/b0", b"b0")
    with b.connect() as cb:
        with cb.open_next("work/", timeout=5) as f:
            assert (f.name, f.read()) == ("work/b0", b"b0")  # on this node first
        names = []
        for _ in range(3):
            with cb.open_next("work/", timeout=5) as f:
                names.append(f.name)
        assert names == ["work/a0", "work/a1", "work/a2"]  # then the oldest anywhere
        with pytest.raises(NotFound):
            cb.open_next("work/", wait=False)
        with pytest.raises(Timeout):
            cb.open_next("work/", timeout=0.3)


def test_a_kept_file_is_pulled_once_for_three_local_readers(cluster):
    a, b = cluster.start(2)
    data = os.urandom(100_000)
    published(a, "kept/x", data, keep=True)
    reads: list[bytes] = []

    def read() -> None:
        with b.connect() as cb, cb.open("kept/x", "r", timeout=10) as f:
            reads.append(f.read())

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert reads == [data] * 3
    assert cluster_stats(b)["pulled"] == 1 and cluster_stats(a)["lent"] == 1
    with a.connect() as ca:
        assert ca.stat("kept/x").lifetime == "keep"  # still on A for anyone else


def test_a_broker_with_a_wrong_key_or_none_is_refused_and_both_sides_keep_serving(cluster, tmp_path):
    a, b = cluster.start(2)
    other = tmp_path / "other-keys"
    other.mkdir(mode=0o700)
    for name in ("node1", "node2"):  # it trusts A and B; they do not trust it
        (other / f"{name}.key").write_bytes((cluster.keys / f"{name}.key").read_bytes())
    (stranger,) = cluster.start(1, trusted=other, wait=False)
    (keyless,) = cluster.start(1, keys=False, wait=False)  # loopback: it may run without keys, but alone
    time.sleep(2.5)  # several heartbeats
    for refused in (stranger, keyless):
        assert cluster_stats(refused)["live"] == [stranger_endpoint(refused)]
        for node in (a, b):
            assert stranger_endpoint(refused) not in cluster_stats(node)["live"]
        published(refused, "local/x", b"still serves")
        with refused.connect() as cs, cs.open("local/x", "r", wait=False) as f:
            assert f.read() == b"still serves"
    published(a, "x", b"across")
    with b.connect() as cb, cb.open("x", "r", timeout=10) as f:
        assert f.read() == b"across"


def stranger_endpoint(node: RunningInstance) -> str:
    node_name: str = cluster_stats(node)["node"]
    return node_name


def test_a_dead_peer_is_noticed_its_names_rehomed_and_it_joins_again(cluster):
    a, b, c = cluster.start(3)
    live = cluster_stats(a)["live"]
    c_node = cluster_stats(c)["node"]
    homed_at_c = [name_homed_at(c_node, live, f"r{i}/") for i in range(3)]
    for name in homed_at_c:
        published(a, name, name.encode())
    waiting_name = name_homed_at(c_node, live, "w/")
    outcome: list[Any] = []

    def wait_on_b() -> None:
        with b.connect() as cb:
            try:
                cb.open(waiting_name, "r", timeout=30)
            except BrokerUnavailable as exc:
                outcome.append((exc, time.monotonic()))

    t = threading.Thread(target=wait_on_b)
    t.start()
    time.sleep(1.0)
    cluster.kill(c)
    killed = time.monotonic()
    t.join(30)
    assert outcome, "the waiting consumer got no error"
    assert outcome[0][1] - killed < DEAD_BOUND_S
    # Re-homed over A and B: every name A holds is found from B, nothing lost.
    with b.connect() as cb:
        for name in homed_at_c:
            with cb.open(name, "r", timeout=10) as f:
                assert f.read() == name.encode()
    c2 = cluster.restart(c)
    cluster.wait_for_peers([a, b, c2])
    published(c2, "back", b"again")
    with a.connect() as ca, ca.open("back", "r", timeout=10) as f:
        assert f.read() == b"again"


def test_a_broker_refuses_to_listen_beyond_loopback_without_keys(tmp_path):
    keyfile = tmp_path / "tfem.key"
    run = subprocess.run([sys.executable, "-m", "tfem", "broker", "--keyfile", str(keyfile), *SMALL,
                          "--spill-dir", str(tmp_path / "spill"), "--cluster", str(tmp_path / "cluster"),
                          "--listen", "tcp://0.0.0.0:*"], capture_output=True, timeout=60)
    assert run.returncode != 0 and b"--curve-key" in run.stderr and b"--insecure" in run.stderr
    assert leftovers(Instance.for_keyfile(keyfile)) == []
    assert not list((tmp_path / "cluster").glob("*.peer"))


def test_the_owner_gives_a_file_back_when_the_takers_node_dies(cluster):
    a, b = cluster.start(2)
    data = os.urandom(40_000)
    published(a, "held/x", data)
    with a.connect() as ca:
        cb = b.connect()
        try:
            f = cb.open("held/x", "r", timeout=10)  # pulled; B's consumer holds its copy, A its original
            assert ca.stat("held/x").state == "READ"
            cluster.kill(b)
            killed = time.monotonic()
            wait_for("the owner's copy given back", lambda: ca.stat("held/x").state == "WAIT", DEAD_BOUND_S)
            assert time.monotonic() - killed < DEAD_BOUND_S
            f.abort()
        finally:
            cb.close()
        with ca.open("held/x", "r", wait=False) as f:
            assert f.read() == data  # nothing lost
    cluster.wait_for_peers([a, cluster.restart(b)])


def test_a_file_larger_than_memory_crosses_spilled_on_both_sides(cluster):
    a, b = cluster.start(2)  # 1 MiB arenas
    data = os.urandom(3 << 20)
    published(a, "big", data)
    with a.connect() as ca, b.connect() as cb:
        assert ca.stat("big").spilled
        with cb.open("big", "r", timeout=20) as f:
            assert cb.stat("big").spilled
            got = f.read()
        assert got == data
        wait_for("both copies freed", lambda: not ca.list() and not cb.list(), 5)


def test_peers_named_explicitly(instance_factory, tmp_path):
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    ends = [f"tcp://127.0.0.1:{port}" for port in ports]
    for i in range(2):
        subprocess.run([sys.executable, "-m", "tfem", "keys", str(tmp_path / f"k{i}")], check=True)
    peers = ",".join(f"{end}={tmp_path / f'k{i}.key'}" for i, end in enumerate(ends))  # itself included: skipped
    a, b = (instance_factory(*SMALL, "--peers", peers, "--listen", ends[i], "--curve-key",
                             str(tmp_path / f"k{i}.key_secret"), subdir=f"n{i}") for i in range(2))
    wait_for("peers", lambda: all(len(cluster_stats(n)["live"]) == 2 for n in (a, b)))
    published(a, "named", b"peers")
    with b.connect() as cb, cb.open("named", "r", timeout=10) as f:
        assert f.read() == b"peers"


def test_an_asyncio_reader_across_nodes(cluster):
    a, b = cluster.start(2)

    async def read() -> bytes:
        async with await tfem_aio.connect(b.keyfile) as cb:
            async with await cb.open("aio/x", "r", timeout=10) as f:
                return await f.read()

    t = threading.Timer(0.5, lambda: published(a, "aio/x", b"from a"))
    t.start()
    try:
        assert asyncio.run(read()) == b"from a"
    finally:
        t.join()


def test_publications_are_learned_from_changed_slots_only(client):
    """What the owner's scan announces and withdraws: new publications,
    files consumed or unlinked, names passed over (a pull's copy) until
    they are not, and everything again once forgotten."""
    from tfem.broker.publications import Publications
    from tfem.table import SlotTable

    table = SlotTable(client.segment, os.getpid())
    seen = Publications()
    assert seen.changes(table, set()) == (set(), set())
    for name in ("p/a", "p/b", "p/c"):
        with client.open(name, "w") as f:
            f.write(b"x")
    with client.open("p/open", "w"):  # being written: not published
        assert seen.changes(table, {"p/c"}) == ({"p/a", "p/b"}, set())
        assert seen.changes(table, set()) == ({"p/c"}, set())  # no longer passed over
        assert seen.changes(table, set()) == (set(), set())  # nothing moved
    with client.open("p/a", "r") as f:
        assert f.read() == b"x"
    client.unlink("p/b")
    assert seen.changes(table, set()) == ({"p/open"}, {"p/a", "p/b"})
    with client.open("p/a", "w") as f:  # the same name again, in another slot or generation
        f.write(b"y")
    assert seen.changes(table, set()) == ({"p/a"}, set())
    seen.forget()
    assert seen.changes(table, set()) == ({"p/a", "p/c", "p/open"}, set())


def test_a_name_read_after_its_slot_was_reused_is_not_taken(client):
    """The scan reads names without the lock: a slot freed and used again
    between the C pass and the name read must not lend its new name (or a
    half-written one) to the old mark."""
    from tfem._native import ffi
    from tfem.table import SlotTable

    table = SlotTable(client.segment, os.getpid())
    with client.open("r/first", "w") as f:
        f.write(b"1")
    seen = ffi.new("uint64_t[]", client.segment.slot_count)
    [(s, mark)] = table.published_changes(seen)
    assert table.published_name(s, mark) == "r/first"
    with client.open("r/first", "r"):
        assert table.published_name(s, mark) is None  # being read: no longer published
    with client.open("r/second", "w") as f:  # the freed slot is the one taken again
        f.write(b"2")
    assert table.stat(b"r/second").slot == s
    assert table.published_name(s, mark) is None
    [(again, new_mark)] = table.published_changes(seen)
    assert again == s and new_mark != mark and table.published_name(s, new_mark) == "r/second"


# ---- C readers (libtfem.so): the embedded runtime asks for the pull, the wait is C ----

@contextlib.contextmanager
def c_reader(programs: dict[str, pathlib.Path], node: RunningInstance, name: str, limit: str,
             python: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """tests/c/take.c reading `name` on `node` (`limit`: seconds, "-" or
    "nonblock"), as a C user runs it, its embedded runtime `python` if
    given; killed at the end whatever happened."""
    env = {"PATH": "/usr/bin:/bin", "TFEM_KEYFILE": str(node.keyfile), "HOME": os.environ.get("HOME", "/"),
           **({"TFEM_PYTHON": python} if python else {})}
    reader = subprocess.Popen([str(programs["take"]), name, limit], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        yield reader
    finally:
        reader.kill()
        reader.communicate()


def c_outcome(reader: subprocess.Popen[bytes], timeout: float = 30) -> tuple[bytes | str, float]:
    """The bytes the C reader read, or the errno's name of its failed open;
    and how long its open took."""
    out, err = reader.communicate(timeout=timeout)
    said = err.decode().strip().splitlines()[-1].split()
    assert said[-3] == "in" and reader.returncode in (0, 1), err.decode()
    return (out if reader.returncode == 0 else said[0]), float(said[-2])


def test_a_c_reader_on_b_takes_a_file_published_on_a(cluster, programs):
    a, b = cluster.start(2)
    data = os.urandom(300_000)
    published(a, "c/before", data)
    with c_reader(programs, b, "c/before", "10") as reader:
        got, _ = c_outcome(reader)
    assert got == data
    assert cluster_stats(b)["pulled"] == 1 and cluster_stats(a)["lent"] == 1
    with a.connect() as ca, b.connect() as cb:
        wait_for("both copies freed", lambda: not ca.list() and not cb.list(), 5)


def test_a_waiting_c_reader_on_b_takes_a_file_published_later_on_a(cluster, programs):
    a, b = cluster.start(2)
    data = os.urandom(20_000)
    with c_reader(programs, b, "c/later", "20") as reader:
        wait_for("the C reader's want", lambda: cluster_stats(b)["wants"] == 1)
        published(a, "c/later", data)
        got, _ = c_outcome(reader)
    assert got == data


def test_a_c_reader_not_waiting_for_a_name_on_no_node_gets_enoent_at_once(cluster, programs):
    a, b = cluster.start(2)
    with c_reader(programs, b, "c/nowhere", "nonblock") as reader:
        got, spent = c_outcome(reader)
    assert got == "ENOENT" and spent < 2.0  # the runtime's start included
    published(a, "c/there", b"abc")
    wait_for("announced", lambda: cluster_stats(a)["announced"] == 1, 5)
    with c_reader(programs, b, "c/there", "nonblock") as reader:
        assert c_outcome(reader)[0] == b"abc"


def test_a_c_reader_times_out_and_its_want_is_dropped(cluster, programs):
    a, b = cluster.start(2)
    with c_reader(programs, b, "c/never", "0.6") as reader:
        got, spent = c_outcome(reader)
    assert got == "ETIMEDOUT" and 0.5 < spent < 2.5
    assert cluster_stats(b)["wants"] == 0  # given up at once (UNWANT), not left to lapse


def test_two_c_readers_on_b_one_consume_once_file_from_a(cluster, programs):
    a, b = cluster.start(2)
    data = os.urandom(50_000)
    with c_reader(programs, b, "c/race", "4") as first, c_reader(programs, b, "c/race", "4") as second:
        wait_for("the C readers' want", lambda: cluster_stats(b)["wants"] == 1)
        time.sleep(0.3)  # the second reader waits too
        published(a, "c/race", data)
        outcomes = [c_outcome(first)[0], c_outcome(second)[0]]
    assert sorted(outcomes, key=lambda o: isinstance(o, str)) == [data, "ETIMEDOUT"], outcomes


def test_a_c_reader_killed_while_waiting_leaves_no_want(cluster, programs):
    a, b = cluster.start(2)
    with c_reader(programs, b, "c/abandoned", "-") as reader:
        wait_for("the C reader's want", lambda: cluster_stats(b)["wants"] == 1)
        reader.kill()
        reader.wait()
    wait_for("the want lapsed", lambda: cluster_stats(b)["wants"] == 0, WANT_LEASE_S + 1.0)


def test_a_c_reader_takes_a_file_on_its_own_node_without_python(cluster, programs, tmp_path):
    a, b = cluster.start(2)
    published(b, "c/here", b"local")
    absent = str(tmp_path / "no-python")
    with c_reader(programs, b, "c/here", "5", python=absent) as reader:
        assert c_outcome(reader)[0] == b"local"  # a local hit is plain C, peers or not
    with c_reader(programs, b, "c/elsewhere", "5", python=absent) as reader:
        assert c_outcome(reader)[0] == "ENOSYS"  # a miss needs the broker's protocol


def test_a_waiting_c_reader_hears_that_the_names_home_died(cluster, programs):
    a, b, c = cluster.start(3)
    name = name_homed_at(cluster_stats(c)["node"], cluster_stats(a)["live"], "c/homeless/")
    try:
        with c_reader(programs, b, name, "30") as reader:
            wait_for("the C reader's want", lambda: cluster_stats(b)["wants"] == 1)
            cluster.kill(c)
            killed = time.monotonic()
            got, _ = c_outcome(reader)
            heard = time.monotonic() - killed
    finally:
        if c not in cluster.nodes:  # killed: again, to take over its segment and peer file and remove them
            cluster.restart(c)
    assert got == "ECONNREFUSED" and heard < DEAD_BOUND_S


def test_open_next_takes_the_oldest_under_its_prefix_once_each(instance, client):
    """On one node: oldest first, only under the prefix, each file to one
    of the consumers racing for them, past more files than one look's
    candidates, and NotFound once none is left."""
    names = [f"job/{i:03d}" for i in range(40)]
    for name in names:
        with client.open(name, "w") as f:
            f.write(name.encode())
        with client.open(f"other/{name}", "w") as f:
            f.write(b"not under the prefix")
    with client.open("job/being-written", "w"):  # not published: never offered
        with client.open_next("job/") as f:
            assert f.name == names[0] and f.read() == names[0].encode()
        got: list[str] = []
        lock = threading.Lock()

        def take() -> None:
            with instance.connect() as c:
                while True:
                    try:
                        with c.open_next("job/", wait=False) as f:
                            assert f.read() == f.name.encode()
                            with lock:
                                got.append(f.name)
                    except NotFound:
                        return

        threads = [threading.Thread(target=take) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(got) == names[1:]  # each once, none lost
        with pytest.raises(NotFound):
            client.open_next("job/", wait=False)
    assert len(client.list()) == 41  # the other prefix's, and the one written
