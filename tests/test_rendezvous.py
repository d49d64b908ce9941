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
    assert peer_protocol.decode(peer_protocol.encode(m)) == m
    chunk = Message(Kind.CHUNK, NODES[0], {"ticket": 1, "offset": 4096}, memoryview(b"bytes"))
    frames = peer_protocol.encode(chunk)
    assert len(frames) == 2 and bytes(peer_protocol.decode(frames).data) == b"bytes"
    found = Message(Kind.FOUND_NEXT, NODES[1], {"ticket": 2, "names": [["a", 5], ["b", 7]]})
    assert peer_protocol.decode(peer_protocol.encode(found)) == found


@pytest.mark.parametrize("frames", [
    [],
    [b"\xc1"],
    [msgpack.packb([2, "ping", "n", {}])],
    [msgpack.packb([1, "nope", "n", {}])],
    [msgpack.packb([1, "ping", "", {}])],
    [msgpack.packb([1, "ping", "n", {"extra": 1}])],
    [msgpack.packb([1, "lookup", "n", {"ticket": -1, "name": "a", "wait": True}])],
    [msgpack.packb([1, "lookup", "n", {"ticket": 1, "name": "a", "wait": 1}])],
    [msgpack.packb([1, "announce", "n", {"names": ["a", 3]}])],
    [msgpack.packb([1, "announce", "n", {"names": ["x" * 256]}])],
    [msgpack.packb([1, "chunk", "n", {"ticket": 1, "offset": 0}])],  # no data frame
    [msgpack.packb([1, "ping", "n", {}]), b"data"],
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
