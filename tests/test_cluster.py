"""tfem across nodes: brokers that find each other through a cluster
directory, pull files from one another, and share the work.

Each node is a `tfem up` of its own (own key file, segment, registry) with
its own CURVE key pair, listening on loopback; the `nodes` fixture starts
them, waits until they see each other, and stops them all at teardown with
the usual leftover checks. A test body uses only what a Node offers
(connect, tfem, status, kill), so the same body runs on nodes in separate
network namespaces.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import zlib
from typing import Any, Callable, Iterator

import pytest

import tfem
from tests._instances import SMALL, RunningInstance, remove_leftovers

PEERS_TIMEOUT_S = 15.0


def tfem_keys(path: pathlib.Path) -> None:
    subprocess.run([sys.executable, "-m", "tfem", "keys", str(path)], check=True, capture_output=True)


def cluster_stats(node: RunningInstance) -> dict[str, Any]:
    with node.connect() as c:
        stats = c.stats()
    cluster: dict[str, Any] = stats["cluster"]
    return cluster


def wait_for_peers(nodes: list[RunningInstance], timeout: float = PEERS_TIMEOUT_S) -> None:
    """Until every node counts every other alive."""
    deadline = time.monotonic() + timeout
    while True:
        live = [len(cluster_stats(n)["live"]) for n in nodes]
        if all(count == len(nodes) for count in live):
            return
        assert time.monotonic() < deadline, f"peers not found within {timeout} s: live counts {live}"
        time.sleep(0.2)


@pytest.fixture
def nodes(instance_factory, tmp_path: pathlib.Path) -> Callable[..., list[RunningInstance]]:
    """start(n): n nodes with a shared cluster directory and trusted keys,
    each seeing the others."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    count = [0]

    def start(n: int, *options: str, trusted: pathlib.Path | None = None, wait: bool = True) -> list[RunningInstance]:
        started = []
        for _ in range(n):
            count[0] += 1
            name = f"node{count[0]}"
            key_dir = keys if trusted is None else trusted
            tfem_keys(key_dir / name)
            started.append(instance_factory(*SMALL, "--cluster", str(tmp_path / "cluster"),
                                            "--listen", "tcp://127.0.0.1:*",
                                            "--curve-key", str(key_dir / f"{name}.key_secret"),
                                            *options, subdir=name))
        if wait:
            wait_for_peers(started)
        return started

    return start


def test_two_nodes_find_each_other_and_hand_a_file_across(nodes):
    a, b = nodes(2)
    status = b.tfem("status").stdout.decode()
    assert "alive" in status and "with CURVE" in status
    data = os.urandom(300_000)  # inline + arena blocks: several chunks' worth of pieces
    with a.connect() as ca, b.connect() as cb:
        with ca.open("x/one", "w") as f:
            f.write(data)
        with cb.open("x/one", "r", timeout=10) as f:
            got = f.read()
        assert zlib.crc32(got) == zlib.crc32(data) and got == data
        deadline = time.monotonic() + 5
        while ca.list() or cb.list():  # the owner frees its copy once B's consumer closed
            assert time.monotonic() < deadline, (ca.list(), cb.list())
            time.sleep(0.05)
