"""The state machine as a table: every (state, event) pair, and state words."""

from __future__ import annotations

import copy
import itertools

import pytest

from tfem import states
from tfem.states import GENERATION_MASK, Event, State, TransitionError, apply, next_state, pack_word, unpack_word

# The table of DESIGN.md, written out independently of the module: what is
# not listed here must be refused.
EXPECTED: dict[tuple[State, Event], State] = {
    (State.INVALID, Event.OPEN_WRITE): State.WRITE,
    (State.WRITE, Event.CLOSE_WRITE): State.WAIT,
    (State.WRITE, Event.ABORT_WRITE): State.INVALID,
    (State.WRITE, Event.UNLINK): State.INVALID,
    (State.WAIT, Event.OPEN_READ): State.READ,
    (State.WAIT, Event.UNLINK): State.INVALID,
    (State.READ, Event.CLOSE_READ): State.INVALID,
    (State.READ, Event.RELEASE_READ): State.WAIT,
    (State.READ, Event.UNLINK): State.INVALID,
    # lifetimes beyond one reader
    (State.WAIT, Event.OPEN_SHARED): State.SHARED,
    (State.SHARED, Event.OPEN_SHARED): State.SHARED,
    (State.SHARED, Event.CLOSE_SHARED): State.SHARED,
    (State.SHARED, Event.LAST_CLOSE): State.WAIT,
    (State.SHARED, Event.FINAL_CLOSE): State.INVALID,
    (State.SHARED, Event.UNLINK): State.INVALID,
}

ALL_PAIRS = list(itertools.product(State, Event))
ALLOWED = [pair for pair in ALL_PAIRS if pair in EXPECTED]
REFUSED = [pair for pair in ALL_PAIRS if pair not in EXPECTED]
HOLDING = (State.WRITE, State.READ)


def _id(pair: tuple[State, Event]) -> str:
    return f"{pair[0].name}-{pair[1].name}"


def test_state_numbers_match_the_segment_header() -> None:
    from tfem._native import lib

    assert State.INVALID == lib.TFEM_STATE_INVALID
    assert State.WRITE == lib.TFEM_STATE_WRITE
    assert State.WAIT == lib.TFEM_STATE_WAIT
    assert State.READ == lib.TFEM_STATE_READ
    assert State.SHARED == lib.TFEM_STATE_SHARED


def test_event_numbers_of_the_first_seven_never_change() -> None:
    """C programs built against an older libtfem number them so."""
    first = [Event.OPEN_WRITE, Event.CLOSE_WRITE, Event.ABORT_WRITE, Event.OPEN_READ, Event.CLOSE_READ,
             Event.RELEASE_READ, Event.UNLINK]
    assert [states.EVENT_NUMBER[e] for e in first] == list(range(7))


def test_the_table_is_exactly_the_designed_one() -> None:
    table = {(s, e): t for s, row in states.TRANSITIONS.items() for e, t in row.items()}
    assert table == EXPECTED
    assert len(ALLOWED) == 15 and len(ALLOWED) + len(REFUSED) == len(State) * len(Event)


@pytest.mark.parametrize("pair", ALLOWED, ids=_id)
def test_allowed_transition_gives_the_target(pair: tuple[State, Event]) -> None:
    state, event = pair
    assert next_state(state, event) is EXPECTED[pair]


@pytest.mark.parametrize("pair", REFUSED, ids=_id)
def test_refused_transition_raises_and_changes_nothing(pair: tuple[State, Event]) -> None:
    state, event = pair
    before = copy.deepcopy(states.TRANSITIONS)
    with pytest.raises(TransitionError) as info:
        next_state(state, event)
    assert info.value.state is state and info.value.event is event
    assert state.name in str(info.value) and event.value in str(info.value)
    assert states.TRANSITIONS == before

    # The same on a state word: the word is refused and the table untouched.
    word = pack_word(state, 1234, 4321)
    with pytest.raises(TransitionError):
        apply(word, event, 999)
    assert states.TRANSITIONS == before
    assert unpack_word(word) == (state, 1234, 4321)


# ---- state words ----


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
@pytest.mark.parametrize("generation", [0, 1, 0x123456, GENERATION_MASK])
@pytest.mark.parametrize("holder", [0, 1, 4_194_304, 2**32 - 1])
def test_pack_and_unpack_round_trip(state: State, generation: int, holder: int) -> None:
    word = pack_word(state, generation, holder)
    assert 0 <= word < 2**64
    assert unpack_word(word) == (state, generation, holder)
    assert word & 0xFF == int(state)
    assert (word >> 8) & GENERATION_MASK == generation
    assert word >> 32 == holder


def test_pack_word_keeps_24_bits_of_generation() -> None:
    assert unpack_word(pack_word(State.WAIT, GENERATION_MASK + 1, 7)) == (State.WAIT, 0, 7)
    assert unpack_word(pack_word(State.WAIT, GENERATION_MASK + 5, 7)) == (State.WAIT, 4, 7)


@pytest.mark.parametrize("pair", ALLOWED, ids=_id)
@pytest.mark.parametrize("generation", [0, 41, GENERATION_MASK])
def test_apply_on_state_words(pair: tuple[State, Event], generation: int) -> None:
    state, event = pair
    old_holder, new_holder = 1111, 2222
    word = pack_word(state, generation, old_holder)
    new_state, new_generation, holder = unpack_word(apply(word, event, new_holder))
    assert new_state is EXPECTED[pair]
    if event is Event.OPEN_WRITE:
        assert new_generation == (generation + 1) % 2**24
    else:
        assert new_generation == generation
    if new_state in HOLDING:
        assert holder == new_holder
    else:
        assert holder == 0


def test_generation_bumps_only_on_open_write() -> None:
    word = pack_word(State.INVALID, 0, 0)
    seen = []
    # Two full lives of a slot: write, publish, read, release, read, consume.
    for _ in range(2):
        for event, holder in [(Event.OPEN_WRITE, 10), (Event.CLOSE_WRITE, 0), (Event.OPEN_READ, 20),
                              (Event.RELEASE_READ, 0), (Event.OPEN_READ, 30), (Event.CLOSE_READ, 0)]:
            word = apply(word, event, holder)
            seen.append(unpack_word(word))
    assert [s for s, _, _ in seen[:6]] == [State.WRITE, State.WAIT, State.READ, State.WAIT,
                                           State.READ, State.INVALID]
    assert [g for _, g, _ in seen] == [1] * 6 + [2] * 6
    assert [h for _, _, h in seen[:6]] == [10, 0, 20, 0, 30, 0]


def test_generation_wraps_at_24_bits() -> None:
    word = pack_word(State.INVALID, GENERATION_MASK, 0)
    claimed = apply(word, Event.OPEN_WRITE, 77)
    assert unpack_word(claimed) == (State.WRITE, 0, 77)
    assert claimed >> 32 == 77 and claimed < 2**64
    # and counts on from zero
    freed = apply(claimed, Event.ABORT_WRITE)
    assert unpack_word(apply(freed, Event.OPEN_WRITE, 78)) == (State.WRITE, 1, 78)


def test_holder_is_cleared_when_the_holder_leaves() -> None:
    writing = pack_word(State.WRITE, 3, 500)
    assert unpack_word(apply(writing, Event.CLOSE_WRITE, 500)) == (State.WAIT, 3, 0)
    assert unpack_word(apply(writing, Event.ABORT_WRITE, 500)) == (State.INVALID, 3, 0)
    assert unpack_word(apply(writing, Event.UNLINK, 600)) == (State.INVALID, 3, 0)
    reading = pack_word(State.READ, 3, 501)
    assert unpack_word(apply(reading, Event.CLOSE_READ, 501)) == (State.INVALID, 3, 0)
    assert unpack_word(apply(reading, Event.RELEASE_READ, 501)) == (State.WAIT, 3, 0)
    waiting = pack_word(State.WAIT, 3, 0)
    assert unpack_word(apply(waiting, Event.OPEN_READ, 502)) == (State.READ, 3, 502)


# ---- a shared reader's close: which event, from the counts ----


@pytest.mark.parametrize("holders_after, readers_left, event", [
    (2, 0, Event.CLOSE_SHARED),      # others still read it
    (1, 5, Event.CLOSE_SHARED),
    (1, None, Event.CLOSE_SHARED),   # kept, others still read it
    (0, 3, Event.LAST_CLOSE),        # nobody reads it, three readers to come: WAIT
    (0, None, Event.LAST_CLOSE),     # kept: WAIT for the next reader
    (0, 0, Event.FINAL_CLOSE),       # the last reader of all: freed
])
def test_shared_close_event(holders_after: int, readers_left: int | None, event: Event) -> None:
    assert states.shared_close(holders_after, readers_left) is event
    assert next_state(State.SHARED, event) is {Event.CLOSE_SHARED: State.SHARED, Event.LAST_CLOSE: State.WAIT,
                                               Event.FINAL_CLOSE: State.INVALID}[event]


def test_three_readers_sharing_a_file_walk_the_table() -> None:
    """readers=3: two read at once, one gives the read back, then three
    reads are done and the last close frees the slot."""
    word, readers_left, holders = pack_word(State.WAIT, 7, 0), 3, 0
    trace = []

    def open_shared() -> None:
        nonlocal word, readers_left, holders
        word, readers_left, holders = apply(word, Event.OPEN_SHARED, 0), readers_left - 1, holders + 1
        trace.append(unpack_word(word)[0])

    def let_go(give_back: bool) -> None:
        nonlocal word, readers_left, holders
        readers_left, holders = readers_left + give_back, holders - 1
        word = apply(word, states.shared_close(holders, readers_left))
        trace.append(unpack_word(word)[0])

    open_shared(); open_shared(); let_go(True); let_go(False)
    open_shared(); let_go(False); open_shared(); let_go(False)
    assert trace == [State.SHARED, State.SHARED, State.SHARED, State.WAIT,
                     State.SHARED, State.WAIT, State.SHARED, State.INVALID]
    assert unpack_word(word) == (State.INVALID, 7, 0)  # no claim: the generation stays
    assert readers_left == 0 and holders == 0


@pytest.mark.parametrize("readers, readers_left, delta, after", [
    (3, 2, -1, 1),   # a read lent to a copy on another node
    (3, 2, -5, 0),   # a take takes at most what is left
    (3, 0, -1, 0),
    (3, 1, 2, 3),    # reads given back, up to the file's readers
    (3, 2, 0, 2),
])
def test_moved_reads(readers: int, readers_left: int, delta: int, after: int) -> None:
    assert states.moved_reads(readers, readers_left, delta) == after


@pytest.mark.parametrize("readers, readers_left, delta", [(3, 2, 2), (1, 1, 1), (1, 0, -1), (0, 0, 1)])
def test_moved_reads_refuses_more_than_the_readers_or_an_uncounted_file(readers: int, readers_left: int,
                                                                         delta: int) -> None:
    with pytest.raises(ValueError):
        states.moved_reads(readers, readers_left, delta)


def test_unpack_rejects_an_unknown_state() -> None:
    with pytest.raises(ValueError):
        unpack_word(pack_word(State.WAIT, 1, 1) | 0x7F)
