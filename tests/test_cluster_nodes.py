"""tfem across simulated nodes (tests/_nodes.py): each node in its own
network, IPC and mount namespaces where they can be made, else on
loopback; brokers on each node's own address with CURVE keys, the cluster
directory on the nodes' shared file system. The scenarios of
test_cluster.py that matter most, with every client in its node."""

from __future__ import annotations

import json
import time
import zlib
from typing import Any, Callable

import pytest

from tests._nodes import Node, Nodes, namespaces_unavailable
from tfem import rendezvous

Make = Callable[..., Nodes]

PUBLISH = """
import sys, tfem
with tfem.connect() as c, c.open(sys.argv[1], "w") as f:
    f.write(bytes(range(256)) * int(sys.argv[2]))
"""

READ = """
import sys, zlib, tfem
with tfem.connect() as c:
    try:
        with c.open(sys.argv[1], "r", timeout=float(sys.argv[2])) as f:
            data = f.read()
        print("crc", zlib.crc32(data), len(data))
    except tfem.TfemError as exc:
        print("error", type(exc).__name__)
"""

LIVE = """
import json, tfem
with tfem.connect() as c:
    print(json.dumps(c.stats()["cluster"]))
"""


@pytest.fixture(params=["netns", "loopback"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "netns" and (why := namespaces_unavailable()):
        pytest.skip(f"namespaced nodes cannot be made here: {why}")
    return str(request.param)


def up_all(made: Nodes) -> None:
    keys = made.shared / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    for node in made.nodes:
        if not (keys / f"{node.name}.key_secret").exists():
            node.tfem("keys", str(keys / node.name))
    for node in made.nodes:
        up(made, node)


def up(made: Nodes, node: Node) -> None:
    """tfem up on the node, listening for peers where it chooses by default: its primary
    address (a namespaced node's own, which has no default route), a port the kernel picks."""
    keys = made.shared / "keys"
    node.up("--slots", "256", "--memory", "4M", "--cluster", str(made.shared / "cluster"),
            "--curve-key", str(keys / f"{node.name}.key_secret"))


def cluster_of(node: Node) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(node.python(LIVE).stdout)
    return stats


def wait_live(nodes: list[Node], count: int, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        live = [cluster_of(n)["live"] for n in nodes]
        if all(len(x) == count for x in live):
            return list(live[0])
        assert time.monotonic() < deadline, f"live brokers: {live}"
        time.sleep(0.2)


def test_a_file_crosses_nodes_and_a_dead_peer_is_noticed(nodes: Make, kind: str) -> None:
    made = nodes(3, kind=kind)
    a, b, c = made.nodes
    up_all(made)
    live = wait_live([a, b, c], 3)
    if made.isolated:
        assert all(any(x.startswith(f"tcp://{n.address}:") for x in live) for n in (a, b, c)), live
    assert "with CURVE" in b.tfem("status").stdout.decode()
    a.python(PUBLISH, "x/one", "2000")  # 512,000 bytes
    got = b.python(READ, "x/one", "10").stdout.decode().split()
    assert got == ["crc", str(zlib.crc32(bytes(range(256)) * 2000)), "512000"]
    assert a.python("import tfem; print(tfem.connect().list())").stdout.strip() == b"[]"  # freed on A
    # A consumer on B waits for a name whose home is C; C's tfem up is killed.
    c_node = str(cluster_of(c)["node"])
    name = next(n for n in (f"w{i}" for i in range(1000)) if rendezvous.home(n, live) == c_node)
    waiter = b.popen(["python", "-c", READ, name, "30"], stdout=-1)
    time.sleep(1.0)
    c.kill_up()
    killed = time.monotonic()
    out, _ = waiter.communicate(timeout=30)
    assert out.split() == [b"error", b"BrokerUnavailable"]
    assert time.monotonic() - killed < 6.0
    up(made, c)  # adopts its segment and joins again
    wait_live([a, b, c], 3)
    c.python(PUBLISH, "back", "1")
    assert a.python(READ, "back", "10").stdout.split()[0] == b"crc"


# ---- a file for N readers, a copy given back, a name held elsewhere ----

PUBLISH_FOR = """
import sys, tfem
with tfem.connect() as c, c.open(sys.argv[1], "w", readers=int(sys.argv[3])) as f:
    f.write(bytes(range(256)) * int(sys.argv[2]))
"""

NOWAIT = """
import sys, tfem
with tfem.connect() as c:
    try:
        with c.open(sys.argv[1], "r", wait=False) as f:
            print("read", len(f.read()))
    except tfem.TfemError as exc:
        print("error", type(exc).__name__)
"""

# Opens and reads, says so, then closes or aborts as told on stdin (or is killed first).
HOLD = """
import sys, tfem
with tfem.connect() as c:
    f = c.open(sys.argv[1], "r", timeout=float(sys.argv[2]))
    print("got", len(f.read()), flush=True)
    getattr(f, sys.stdin.readline().strip())()
    print("done", flush=True)
"""

LIST = "import tfem; print(tfem.connect().list())"


def crc_of(blocks: int) -> list[str]:
    data = bytes(range(256)) * blocks
    return ["crc", str(zlib.crc32(data)), str(len(data))]


def holding(node: Node, name: str) -> Any:
    """A reader in `node` holding `name` (read whole) until told to close or abort."""
    reader = node.popen(["python", "-c", HOLD, name, "10"], stdin=-1, stdout=-1)
    assert reader.stdout is not None
    assert reader.stdout.readline().split()[0] == b"got"
    return reader


def let_go(reader: Any, how: str) -> None:
    out, _ = reader.communicate(f"{how}\n".encode(), timeout=30)
    assert out.split() == [b"done"]


def wait_until_empty(nodes: list[Node], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := [n.python(LIST).stdout.strip() for n in nodes]) != [b"[]"] * len(nodes):
        assert time.monotonic() < deadline, f"still held: {left}"
        time.sleep(0.2)


def test_a_file_for_three_readers_crosses_to_a_node_once_and_is_read_three_times(nodes: Make) -> None:
    made = nodes(2)
    a, b = made.nodes
    up_all(made)
    wait_live([a, b], 2)
    a.python(PUBLISH_FOR, "bcast", "1200", "3")  # 307,200 bytes: several chunks
    # Two readers on B one after the other share one copy; the third read is A's.
    for node in (b, b, a):
        assert node.python(READ, "bcast", "10").stdout.decode().split() == crc_of(1200)
    for node in (b, a):  # every read taken: refused on both nodes
        assert node.python(NOWAIT, "bcast").stdout.split()[0] == b"error"
    assert (cluster_of(b)["pulled"], cluster_of(a)["lent"]) == (1, 1)
    wait_until_empty([a, b])  # B's copy idle: its broker settles, and A's last read frees the original
    assert b.python(NOWAIT, "bcast").stdout.split() == [b"error", b"NotFound"]


def test_a_reader_killed_holding_a_shared_copy_loses_no_read(nodes: Make) -> None:
    made = nodes(2)
    a, b = made.nodes
    up_all(made)
    wait_live([a, b], 2)
    a.python(PUBLISH_FOR, "shared", "100", "2")
    reader = holding(b, "shared")
    assert a.python(NOWAIT, "shared").stdout.split()[0] == b"read"  # the other read, on A meanwhile
    reader.kill()
    reader.wait()
    # B's broker gives the dead reader's read back to its copy, and the idle copy back to A.
    wait_until_empty([b])
    assert a.python(READ, "shared", "10").stdout.decode().split() == crc_of(100)
    assert b.python(NOWAIT, "shared").stdout.split() == [b"error", b"NotFound"]
    wait_until_empty([a, b])


def test_a_copy_given_back_goes_back_to_its_owner_and_is_read_on_another_node(nodes: Make) -> None:
    made = nodes(3)
    a, b, c = made.nodes
    up_all(made)
    wait_live([a, b, c], 3)
    a.python(PUBLISH, "back/x", "300")
    let_go(holding(b, "back/x"), "abort")  # pulled to B and given back there
    got = c.python(READ, "back/x", "15").stdout.decode().split()
    assert got == crc_of(300)  # B's copy went back to A, and C took it from there
    assert b.python(NOWAIT, "back/x").stdout.split() == [b"error", b"NotFound"]  # one consumer in the end
    wait_until_empty([a, b, c])
    assert (cluster_of(a)["lent"], cluster_of(b)["pulled"], cluster_of(c)["pulled"]) == (2, 1, 1)


def test_no_wait_on_a_name_being_read_on_another_node_would_block(nodes: Make) -> None:
    made = nodes(3)
    a, b, c = made.nodes
    up_all(made)
    wait_live([a, b, c], 3)
    a.python(PUBLISH, "busy", "10")
    reader = holding(c, "busy")  # pulled to C and read there: A holds the original for it
    assert b.python(NOWAIT, "busy").stdout.split() == [b"error", b"WouldBlock"]
    assert a.python(NOWAIT, "busy").stdout.split() == [b"error", b"WouldBlock"]
    let_go(reader, "close")
    wait_until_empty([a, c])
    assert b.python(NOWAIT, "busy").stdout.split() == [b"error", b"NotFound"]
