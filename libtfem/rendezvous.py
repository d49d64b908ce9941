"""Where a name lives: its home broker, by rendezvous (highest random weight) hashing.

Pure code. Every broker computes the same home for a name from the same
list of nodes, so nobody has to ask. A node's weight for a name is a hash
of both; the home is the node of highest weight. When a node leaves, only
the names it was home to move (each to the node of next highest weight);
when one joins, only the names it now wins move to it.
"""

from __future__ import annotations

import hashlib
from typing import Iterable


def weight(node: str, name: str) -> int:
    """The node's weight for the name: 64 bits of blake2b over both."""
    digest = hashlib.blake2b(f"{node}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def home(name: str, nodes: Iterable[str]) -> str:
    """The node of `nodes` that is home to `name`; ValueError if there are none."""
    best = max(nodes, key=lambda node: (weight(node, name), node), default=None)
    if best is None:
        raise ValueError("no node to be home to a name")
    return best
