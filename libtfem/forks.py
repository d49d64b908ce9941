"""The one fork hook of the client side.

A forked child has copies of its parent's connection, open files and locks.
`epoch` counts the forks this process descends from: an object made before
a fork compares it with its own (cheaper than asking for the pid on every
call) and lets go of the parent's things. Module state that must be renewed
in the child (a lock a parent's thread may have held) registers a function
with `in_child`, run by this one hook.
"""

from __future__ import annotations

import os
from typing import Callable

epoch = 0
_renewals: list[Callable[[], None]] = []


def in_child(renew: Callable[[], None]) -> Callable[[], None]:
    """Run `renew` in every forked child (a decorator)."""
    _renewals.append(renew)
    return renew


def _after_fork_in_child() -> None:
    global epoch
    epoch += 1
    for renew in _renewals:
        renew()


os.register_at_fork(after_in_child=_after_fork_in_child)
