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
