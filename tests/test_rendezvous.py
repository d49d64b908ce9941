"""Homes of names (rendezvous hashing) and the peer wire format: pure code."""

from __future__ import annotations

import collections
import json
import os

import msgpack
import pytest

from tfem import cluster_dir, peer_protocol, rendezvous
from tfem.errors import ProtocolError
from tfem.peer_protocol import Kind, Message

NODES = [f"tcp://10.0.0.{i}:5555" for i in range(1, 9)]
NAMES = [f"run1/part{i}" for i in range(20_000)]


def test_a_home_is_stable_and_independent_of_the_order_of_nodes():
    homes = [rendezvous.home(name, NODES) for name in NAMES[:500]]
    assert homes == [rendezvous.home(name, list(reversed(NODES))) for name in NAMES[:500]]
    assert all(home in NODES for home in homes)


def test_homes_are_balanced():
    counts = collections.Counter(rendezvous.home(name, NODES) for name in NAMES)
    expected = len(NAMES) / len(NODES)
    assert set(counts) == set(NODES)
    assert max(counts.values()) < expected * 1.1 and min(counts.values()) > expected * 0.9, counts


def test_a_node_leaving_moves_only_its_own_names():
    before = {name: rendezvous.home(name, NODES) for name in NAMES}
    gone = NODES[3]
    after = {name: rendezvous.home(name, [n for n in NODES if n != gone]) for name in NAMES}
    moved = [name for name in NAMES if before[name] != after[name]]
    assert moved and all(before[name] == gone for name in moved)
    assert len(moved) == sum(1 for home in before.values() if home == gone)
    # ... spread over the others, not dumped on one
    assert len(collections.Counter(after[name] for name in moved)) == len(NODES) - 1


def test_a_node_joining_takes_only_names():
    before = {name: rendezvous.home(name, NODES[:-1]) for name in NAMES}
    after = {name: rendezvous.home(name, NODES) for name in NAMES}
    assert all(after[name] == NODES[-1] for name in NAMES if before[name] != after[name])


def test_no_nodes_is_an_error():
    with pytest.raises(ValueError):
        rendezvous.home("x", [])


def test_peer_messages_round_trip():
    m = Message(Kind.LOOKUP, NODES[0], {"ticket": 3, "name": "a/b", "wait": True})
    assert peer_protocol.decode(peer_protocol.encode(NODES[0], [m])) == [m]
    chunk = Message(Kind.CHUNK, NODES[0], {"ticket": 1, "offset": 4096}, memoryview(b"bytes"))
    found = Message(Kind.FOUND_NEXT, NODES[0], {"ticket": 2, "names": [["a", 5], ["b", 7]]})
    second = Message(Kind.CHUNK, NODES[0], {"ticket": 9, "offset": 0}, b"more")
    frames = peer_protocol.encode(NODES[0], [chunk, found, m, second])
    assert len(frames) == 3  # the header, then each chunk's data in turn
    back = peer_protocol.decode(frames)
    assert [x.kind for x in back] == [Kind.CHUNK, Kind.FOUND_NEXT, Kind.LOOKUP, Kind.CHUNK]
    assert [bytes(x.data) for x in back if x.kind is Kind.CHUNK] == [b"bytes", b"more"]
    assert back[1] == found and back[2] == m and back[3].args == {"ticket": 9, "offset": 0}


def test_an_empty_batch_is_not_sent():
    with pytest.raises(ProtocolError):
        peer_protocol.encode(NODES[0], [])


V = peer_protocol.VERSION


@pytest.mark.parametrize("frames", [
    [],
    [b"\xc1"],
    [msgpack.packb([V + 1, "n", [["ping", {}]]])],
    [msgpack.packb([V, "n", [["nope", {}]]])],
    [msgpack.packb([V, "n", [[3, {}]]])],
    [msgpack.packb([V, "", [["ping", {}]]])],
    [msgpack.packb([V, "n", []])],
    [msgpack.packb([V, "n", ["ping"]])],
    [msgpack.packb([V, "n", [["ping", {}, 1]]])],
    [msgpack.packb([V, "n", [["ping", {"extra": 1}]]])],
    [msgpack.packb([V, "n", [["lookup", {"ticket": -1, "name": "a", "wait": True}]]])],
    [msgpack.packb([V, "n", [["lookup", {"ticket": 1, "name": "a", "wait": 1}]]])],
    [msgpack.packb([V, "n", [["announce", {"names": ["a", 3]}]]])],
    [msgpack.packb([V, "n", [["announce", {"names": ["x" * 256]}]]])],
    [msgpack.packb([V, "n", [["chunk", {"ticket": 1, "offset": 0}]]])],  # no data frame
    [msgpack.packb([V, "n", [["chunk", {"ticket": 1, "offset": 0}], ["chunk", {"ticket": 1, "offset": 9}]]]),
     b"one frame for two chunks"],
    [msgpack.packb([V, "n", [["ping", {}]]]), b"data"],
])
def test_malformed_peer_messages_are_refused(frames):
    with pytest.raises(ProtocolError):
        peer_protocol.decode(frames)


def test_cluster_directory_entries(tmp_path):
    directory = tmp_path / "cluster"
    mine = cluster_dir.PeerEntry(NODES[0], "KEY", os.getpid(), "host-a", "/tfem-1-abc")
    path = cluster_dir.write_entry(directory, mine)
    assert path.stat().st_mode & 0o777 == 0o600
    assert directory.stat().st_mode & 0o777 == 0o700
    (directory / "junk.peer").write_text("{")  # half a file of someone else: skipped
    (directory / "forged.peer").write_text(json.dumps({"endpoint": NODES[1], "public_key": "", "pid": 1, "host": "h",
                                                        "instance": "/i"}))  # not under its own name
    assert cluster_dir.read_entries(directory) == [mine]
    successor = cluster_dir.PeerEntry(NODES[1], "KEY2", os.getpid() + 1, "host-a", "/tfem-1-abc")  # restarted
    cluster_dir.write_entry(directory, successor)
    cluster_dir.remove_entry(directory, mine)  # not ours any more: stays
    assert cluster_dir.read_entries(directory) == [successor]
    cluster_dir.remove_entry(directory, successor)
    assert cluster_dir.read_entries(directory) == []
    assert not list(directory.glob(".*.tmp"))
