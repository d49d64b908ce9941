"""The simulated nodes of tests/_nodes.py, tested: what each namespace
keeps apart, TCP between nodes, a real `tfem up` in each, killed and started
again, and a teardown that leaves nothing, even after a failure or a killed
run. Each test that does not need namespaces runs on both kinds of node."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
from typing import Callable

import pytest
import sysv_ipc

from tests._instances import SMALL, leftovers
from tests._nodes import (ENV_NODES, LOCK_DIR, NETNS_DIR, Nodes, NodesNotIsolated, _mounts_under,
                          namespaces_unavailable)
from tests._proc_tools import pid_gone, wait_until
from tfem.broker.spill import STORE_FILES
from tfem.config import Instance

REPO = pathlib.Path(__file__).resolve().parents[1]

Make = Callable[..., Nodes]


@pytest.fixture(params=["netns", "loopback"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "netns" and (why := namespaces_unavailable()):
        pytest.skip(f"namespaced nodes cannot be made here: {why}")
    return str(request.param)


@pytest.fixture
def netns() -> None:
    if why := namespaces_unavailable():
        pytest.skip(f"namespaced nodes cannot be made here: {why}")


def host_names(token: str) -> list[str]:
    """The host's netns and links named by `token`."""
    netns = os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else []
    return [name for name in os.listdir("/sys/class/net") + netns if name.startswith(token)]


MAKE_SHM_AND_QUEUE = """
import posix_ipc, sys, sysv_ipc
posix_ipc.SharedMemory(sys.argv[1], posix_ipc.O_CREX, size=4096).close_fd()
print(sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX).key)
"""

REMOVE_SHM_AND_QUEUE = """
import posix_ipc, sys, sysv_ipc
posix_ipc.unlink_shared_memory(sys.argv[1])
sysv_ipc.MessageQueue(int(sys.argv[2])).remove()
"""


def test_a_segment_or_queue_made_in_a_node_is_absent_elsewhere(nodes: Make, netns: None) -> None:
    a, b = nodes(2, kind="netns")
    segment = f"/tfem-nodes-test-{os.getpid()}"
    key = int(a.python(MAKE_SHM_AND_QUEUE, segment).stdout)
    try:
        assert segment[1:] in a.shm_names() and key in a.queue_keys()  # kept by the node, not its process
        assert segment[1:] not in b.shm_names() and key not in b.queue_keys()
        assert not os.path.exists(f"/dev/shm{segment}")
        with pytest.raises(sysv_ipc.ExistentialError):
            sysv_ipc.MessageQueue(key)
    finally:
        a.python(REMOVE_SHM_AND_QUEUE, segment, str(key))
    assert a.shm_names() == [] and a.queue_keys() == []


REPLY = """
import os, sys, zmq
s = zmq.Context().socket(zmq.REP)
s.bind(sys.argv[1])
print("bound", flush=True)
s.send(s.recv() + b" from " + os.environ["TFEM_TEST_NODE"].encode())
"""

ASK = """
import socket, sys, zmq
try:  # the other node's loopback is not ours
    socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=5).close()
    print("loopback reached")
except ConnectionRefusedError:
    print("loopback refused")
s = zmq.Context().socket(zmq.REQ)
s.RCVTIMEO, s.LINGER = 10_000, 0
s.connect(sys.argv[1])
s.send(b"ping")
print(s.recv().decode())
"""


def test_nodes_reach_each_other_over_tcp_by_address(nodes: Make, kind: str) -> None:
    ns = nodes(2, kind=kind)
    a, b = ns
    assert a.address != b.address if ns.isolated else a.address == b.address == "127.0.0.1"
    if ns.isolated:
        assert [node.run(["hostname"]).stdout for node in ns] == [b"node0\n", b"node1\n"]
    port = b.free_port()
    server = b.popen([sys.executable, "-c", REPLY, f"tcp://*:{port}"], stdout=subprocess.PIPE)
    assert server.stdout is not None and server.stdout.readline() == b"bound\n"
    socket.create_connection((b.address, port), timeout=5).close()  # the host reaches it too
    answer = a.python(ASK, f"tcp://{b.address}:{port}", str(port)).stdout.decode().split("\n")
    assert answer[0] == ("loopback refused" if ns.isolated else "loopback reached")
    assert answer[1] == "ping from node1"
    assert server.wait(10) == 0


PRODUCE = """
import os, sys, tfem
with tfem.connect() as c, c.open(sys.argv[1], "w", **({"keep": True} if sys.argv[2:] else {})) as f:
    f.write(os.environ["TFEM_TEST_NODE"].encode() + b" wrote " + sys.argv[1].encode())
"""

CONSUME = """
import sys, tfem
with tfem.connect() as c, c.open(sys.argv[1], "r", timeout=30) as f:
    sys.stdout.buffer.write(f.read())
"""


def test_a_tfem_up_in_each_node_hands_files_within_it(nodes: Make, kind: str) -> None:
    ns = nodes(2, kind=kind)
    for node in ns:
        node.up(*SMALL)
    if ns.isolated:  # the same key file, socket and segment names: the namespaces alone keep them apart
        assert ns[0].keyfile == ns[1].keyfile
    consumers = [node.popen([sys.executable, "-c", CONSUME, "part0"], stdout=subprocess.PIPE) for node in ns]
    for node in ns:
        node.python(PRODUCE, "part0")
    for node, consumer in zip(ns, consumers):
        out, _ = consumer.communicate(timeout=30)
        assert out == f"{node.name} wrote part0".encode()

    ns[0].python(PRODUCE, "only-on-node0", "keep")
    assert ns[0].tfem("ls").stdout.split() == [b"only-on-node0"]
    assert ns[1].tfem("ls").stdout.split() == []
    ns[0].tfem("rm", "only-on-node0")


def test_a_nodes_tfem_up_killed_and_started_again_keeps_its_files(nodes: Make, kind: str) -> None:
    ns = nodes(2, kind=kind)
    a, b = ns
    a.up(*SMALL)
    b.up(*SMALL)
    a.python(PRODUCE, "before")

    first = a.kill_broker()
    assert a.servers()["broker"] != first
    a.python(PRODUCE, "after-broker")  # the client finds the new broker

    servers = list(a.servers().values())
    a.kill_up()
    assert all(pid_gone(pid) for pid in servers)
    segment = Instance.for_keyfile(a.keyfile).segment
    if ns.isolated:  # the segment outlives its broker, in its node only
        assert segment[1:] in a.shm_names()
        assert not os.path.exists(f"/dev/shm{segment}")
    assert b.tfem("status").returncode == 0  # the other node's instance did not notice
    a.up(*SMALL)  # adopts the segment
    for name in ("before", "after-broker"):
        assert a.python(CONSUME, name).stdout == f"node0 wrote {name}".encode()


class Failed(Exception):
    pass


def test_teardown_leaves_nothing_even_when_the_test_fails(tmp_path: pathlib.Path, kind: str) -> None:
    with pytest.raises(Failed):
        with Nodes(tmp_path / "n", 2, kind) as ns:
            a, b = ns
            a.up(*SMALL)
            a.python(PRODUCE, "left", "keep")
            a.popen(["sleep", "600"])
            b.popen([sys.executable, "-c", CONSUME, "never-written"])
            pids = a.pids() + b.pids()
            assert len(pids) >= 5  # tfem up, its registry and broker, two clients
            token, keyfile = ns.token, a.keyfile
            raise Failed
    assert all(pid_gone(pid) for pid in pids)
    assert not os.path.exists(f"/dev/shm{Instance.for_keyfile(keyfile).segment}")
    assert not any((a.spill_dir / name).exists() for name in STORE_FILES)
    assert _mounts_under(tmp_path) == []
    if token is not None:
        assert host_names(token) == []
        assert not (LOCK_DIR / str(int(token[-3:]))).exists()  # the claim on its subnet
    else:
        assert leftovers(Instance.for_keyfile(keyfile)) == []


HOLD_NODES = """
import pathlib, sys
from tests._nodes import Nodes
ns = Nodes(pathlib.Path(sys.argv[1]), 2, "netns")
ns[0].popen(["sleep", "600"])
print(ns.token, *ns[0].pids(), *ns[1].pids(), flush=True)
sys.stdin.read()
"""


def test_what_a_killed_run_left_goes_at_the_next_start(nodes: Make, netns: None, tmp_path: pathlib.Path) -> None:
    live = nodes(1, kind="netns")
    run = subprocess.Popen([sys.executable, "-c", HOLD_NODES, str(tmp_path / "killed")], cwd=REPO,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert run.stdout is not None
        token, *words = run.stdout.readline().split()
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    pids = [int(word) for word in words]
    assert len(pids) == 3 and not any(pid_gone(pid) for pid in pids)  # two holders and a sleep, orphaned
    assert len(host_names(token.decode())) == 5  # its bridge, two veths, two netns

    again = nodes(1, kind="netns")
    for pid in pids:  # killed; then reaped by init
        wait_until(lambda: pid_gone(pid), 10, f"pid {pid} of the killed run to be gone")
    # Its subnet is free again, and may be the one just claimed: then only the new set's three names are there.
    assert len(host_names(token.decode())) == (3 if again.token == token.decode() else 0)
    for each in (live, again):  # a live run's nodes are not touched
        assert each.token is not None and len(host_names(each.token)) == 3
        assert each[0].run(["true"]).returncode == 0


def test_loopback_chosen_for_the_session_says_so(nodes: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_NODES, "loopback")
    with pytest.warns(NodesNotIsolated, match=f"{ENV_NODES}=loopback"):
        ns = nodes(1)
    assert not ns.isolated and not ns[0].isolated and ns[0].address == "127.0.0.1"


def test_without_namespaces_nodes_fall_back_and_say_why(nodes: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no ip, unshare or nsenter
    monkeypatch.delenv(ENV_NODES, raising=False)
    with pytest.warns(NodesNotIsolated, match="no ip, unshare, nsenter|not root"):
        ns = nodes(1)
    assert not ns.isolated


def test_an_unknown_kind_of_node_is_refused(nodes: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_NODES, "vm")
    with pytest.raises(ValueError, match="TFEM_TEST_NODES .* not 'vm'"):
        nodes(1)
