"""The temp-file state machine: one table, no I/O.

Everything that decides whether a slot may change state lives here, in the
manner of h11's ``_state.py``. The C operations on the segment (tfem_table.c)
apply the same table: the build generates their copy of it from this module
(tfem_states.h), so there is one state machine, written once. The module does not know who applies an event
(a client on the node through a compare-and-swap, the broker on a client's
behalf, or a recovering broker): callers compute the next state here and then
make it so. An illegal transition raises and changes nothing.

States are the paper's: WRITE (a producer holds the file), WAIT (closed by its
producer, waiting for a consumer), READ (a consumer holds it), INVALID (free),
and one for lifetimes beyond one reader: SHARED (one or more readers hold a
file written for several readers, or kept). Which event a shared reader's
close is depends on the counts kept beside the word (`shared_close`): a
table stays a table, and the arithmetic is one pure function.
"""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    """Slot states, numbered as in tfem_segment.h."""

    INVALID = 0
    WRITE = 1
    WAIT = 2
    READ = 3
    SHARED = 4


class Event(enum.Enum):
    OPEN_WRITE = "open for write"
    CLOSE_WRITE = "producer close"
    ABORT_WRITE = "producer abort"
    OPEN_READ = "open for read"
    CLOSE_READ = "consumer close"
    RELEASE_READ = "consumer released"  # died, or the broker finished moving it
    UNLINK = "unlink"
    # Lifetimes beyond one reader; numbered after the first seven, so that
    # the C numbering of those never changes.
    OPEN_SHARED = "open for a shared read"
    CLOSE_SHARED = "shared reader close, others still hold it"
    LAST_CLOSE = "last holder close, readers still to come"
    FINAL_CLOSE = "last reader close"


TRANSITIONS: dict[State, dict[Event, State]] = {
    State.INVALID: {Event.OPEN_WRITE: State.WRITE},
    State.WRITE: {
        Event.CLOSE_WRITE: State.WAIT,
        Event.ABORT_WRITE: State.INVALID,
        Event.UNLINK: State.INVALID,
    },
    State.WAIT: {Event.OPEN_READ: State.READ, Event.OPEN_SHARED: State.SHARED, Event.UNLINK: State.INVALID},
    State.READ: {
        Event.CLOSE_READ: State.INVALID,
        Event.RELEASE_READ: State.WAIT,
        Event.UNLINK: State.INVALID,
    },
    State.SHARED: {
        Event.OPEN_SHARED: State.SHARED,
        Event.CLOSE_SHARED: State.SHARED,
        Event.LAST_CLOSE: State.WAIT,
        Event.FINAL_CLOSE: State.INVALID,
        Event.UNLINK: State.INVALID,
    },
}


# How C code numbers the events (tfem_states.h).
EVENT_NUMBER = {event: number for number, event in enumerate(Event)}
# Claiming a slot starts a new generation, so stale handles to it fail.
BUMPS_GENERATION = frozenset({Event.OPEN_WRITE})
# States in which one process holds the file; its pid is kept in the word.
# A SHARED file's readers are in the segment's hold table instead.
HELD = frozenset({State.WRITE, State.READ})
# A lifetime's reader count for a file kept until unlinked.
KEPT = 0


def shared_close(holders_after: int, readers_left: int | None) -> Event:
    """The event for a reader letting go of a SHARED file: `holders_after`
    readers still hold it, `readers_left` opens are still to come (None:
    kept, any number). A reader that gives its read back (abort, or died)
    counts it in `readers_left` first."""
    if holders_after:
        return Event.CLOSE_SHARED
    if readers_left is None or readers_left > 0:
        return Event.LAST_CLOSE
    return Event.FINAL_CLOSE


def moved_reads(readers: int, readers_left: int, delta: int) -> int:
    """A shared reader's move of reads to (`delta` > 0) or from (< 0) a
    file's count of reads still to come, the state staying SHARED (a broker
    lending reads to a copy on another node): the count after it. A file
    gets back at most its `readers`; a take takes at most what is left.
    ValueError for a file not counted in reads (consume-once or kept), or
    one given more than its readers. Mirrored by moved_reads in C."""
    if readers <= 1:
        raise ValueError("only a file of several readers counts its reads")
    if delta > readers - readers_left:
        raise ValueError(f"{readers_left} + {delta} reads is more than the file's {readers}")
    return max(readers_left + delta, 0)


class TransitionError(Exception):
    """An event that the table does not allow from the current state."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"cannot {event.value} a file in state {state.name}")
        self.state = state
        self.event = event


def next_state(state: State, event: Event) -> State:
    """The state that `event` leads to from `state`, or TransitionError."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise TransitionError(state, event) from None


# ---- the state word of a slot: state, generation, holder pid ----
# The one definition of its layout: the build writes it into tfem_states.h.

STATE_MASK = 0xFF
GENERATION_SHIFT = 8
GENERATION_MASK = 0xFFFFFF
HOLDER_SHIFT = 32


def pack_word(state: State, generation: int, holder: int) -> int:
    return (holder << HOLDER_SHIFT) | ((generation & GENERATION_MASK) << GENERATION_SHIFT) | int(state)


def unpack_word(word: int) -> tuple[State, int, int]:
    """(state, generation, holder pid) of a state word."""
    return State(word & STATE_MASK), (word >> GENERATION_SHIFT) & GENERATION_MASK, word >> HOLDER_SHIFT


def generation_of(word: int) -> int:
    return (word >> GENERATION_SHIFT) & GENERATION_MASK


def holder_of(word: int) -> int:
    return word >> HOLDER_SHIFT


def apply(word: int, event: Event, holder: int = 0) -> int:
    """The state word after `event`: claims bump the generation, the new
    holder is recorded with the state (so a dead producer is found from the
    word alone), and a freed slot has no holder."""
    state, generation, _ = unpack_word(word)
    target = next_state(state, event)
    if event in BUMPS_GENERATION:
        generation = (generation + 1) & GENERATION_MASK
    return pack_word(target, generation, holder if target in HELD else 0)
