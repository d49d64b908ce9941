"""The native core on its own terms: the C transition function against
states.py for every (state, event) pair, the generated state-word layout,
the C checksum against the crc32c package, fstat of a held file, and the
wait modes (forced and adaptive) in fresh processes."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import textwrap
import uuid
from typing import Iterator

import crc32c
import pytest

import tfem
from tfem import states
from tfem._native import ffi, lib
from tfem.segment import Layout, Segment
from tfem.states import EVENT_NUMBER, TRANSITIONS, Event, State, apply, pack_word

from tests._proc_tools import wait_until


@pytest.fixture
def segment() -> Iterator[Segment]:
    name = f"/tfem-test-core-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    seg = Segment.create(name, Layout(4, 64, 4096, 4 * 4096))
    try:
        yield seg
    finally:
        seg.close()
        Segment.unlink(name)


# ---- the state machine, as C applies it ----


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
@pytest.mark.parametrize("event", list(Event), ids=lambda e: e.name)
def test_c_transition_matches_states_py(segment: Segment, state: State, event: Event) -> None:
    slot = segment.slot(0)
    word = pack_word(state, 0xABCDE, 4321 if state in states.HELD else 0)
    slot.state = word
    rc = lib.tfem_t_transition_locked(segment.header, 0, EVENT_NUMBER[event], 0xABCDE, 999)
    if event in TRANSITIONS.get(state, {}):
        assert rc == 0
        assert slot.state == apply(word, event, 999)
    else:
        assert rc == errno.EPERM
        assert slot.state == word  # refused: nothing changed


def test_c_transition_refuses_a_stale_generation(segment: Segment) -> None:
    slot = segment.slot(1)
    slot.state = word = pack_word(State.WAIT, 7, 0)
    assert lib.tfem_t_transition_locked(segment.header, 1, EVENT_NUMBER[Event.OPEN_READ], 6, 999) == errno.ESTALE
    assert slot.state == word
    assert lib.tfem_t_transition_locked(segment.header, 9, EVENT_NUMBER[Event.OPEN_READ], 7, 999) == errno.ESTALE


def test_the_generated_header_is_states_py() -> None:
    assert (lib.TFEM_WORD_STATE_MASK, lib.TFEM_WORD_GENERATION_SHIFT, lib.TFEM_WORD_GENERATION_MASK,
            lib.TFEM_WORD_HOLDER_SHIFT) == (states.STATE_MASK, states.GENERATION_SHIFT, states.GENERATION_MASK,
                                            states.HOLDER_SHIFT)
    assert [getattr(lib, f"TFEM_STATE_{s.name}") for s in State] == [int(s) for s in State]
    assert [getattr(lib, f"TFEM_EVENT_{e.name}") for e in Event] == [EVENT_NUMBER[e] for e in Event]


@pytest.mark.parametrize("readers, delta", [(3, -1), (3, -5), (3, 0), (3, 1), (4, 2), (3, 2), (4, -3)])
def test_c_moved_reads_matches_states_py(client, readers: int, delta: int) -> None:
    """tfem_f_add_reads on a real shared read (readers - 1 left) against
    states.moved_reads: the count after it, and what was moved."""
    with client.open("counted", "w", readers=readers) as f:
        f.write(b"x")
    reader = client.open("counted", "r", wait=False)
    moved = ffi.new("uint32_t *")
    rc = lib.tfem_f_add_reads(reader._f, delta, moved)
    try:
        expected = states.moved_reads(readers, readers - 1, delta)
    except ValueError:
        assert (rc, client.stat("counted").readers_left) == (errno.EINVAL, readers - 1)
    else:
        assert rc == 0
        assert (client.stat("counted").readers_left, moved[0]) == (expected, abs(expected - (readers - 1)))
    assert client.stat("counted").state == "SHARED"
    client.unlink("counted")
    reader.close()
    assert client.list() == []


def test_c_moved_reads_needs_a_shared_read_held(client) -> None:
    moved = ffi.new("uint32_t *")
    with client.open("once", "w") as f:
        f.write(b"x")
    with client.open("once", "r", wait=False) as reader:  # consume-once: no shared read
        assert lib.tfem_f_add_reads(reader._f, 1, moved) == errno.EBADF
    with client.open("kept", "w", keep=True) as f:
        f.write(b"x")
    with client.open("kept", "r", wait=False) as reader:  # kept: no count of reads
        assert lib.tfem_f_add_reads(reader._f, 1, moved) == errno.EINVAL
        core = reader._f
        assert lib.tfem_t_add_reads(core.h, core.index, core.generation + 1, core.pid, core.hold, 1, moved) \
            == errno.ESTALE
    client.unlink("kept")
    assert lib.tfem_f_add_reads(reader._f, 1, moved) == errno.EBADF  # let go of


def test_a_keepers_hold_takes_no_read_and_gives_none_back(client) -> None:
    with client.open("kept2", "w", readers=2) as f:
        f.write(b"x")
    st = client.stat("kept2")
    for let_go in (lib.tfem_f_abort, lib.tfem_f_close):
        core = ffi.new("struct tfem_file *")
        assert lib.tfem_f_keep(client._header, st.slot, client.table.state_of(st.slot)[1], client.pid, core) == 0
        assert (client.stat("kept2").state, client.stat("kept2").holders, client.stat("kept2").readers_left) \
            == ("SHARED", 1, 2)
        assert let_go(core) == 0
        assert (client.stat("kept2").state, client.stat("kept2").readers_left) == ("WAIT", 2)
    client.unlink("kept2")


# ---- checksums ----


def test_c_crc32c_is_the_crc32c_package() -> None:
    r = random.Random(3)
    for n in [0, 1, 7, 8, 9, 4095, 4096, 3 * 4096 - 1, 3 * 4096, 3 * 4096 + 1, 100_000, 1 << 20]:
        data = r.randbytes(n)
        seed = r.getrandbits(32)
        assert lib.tfem_crc32c(0, data, n) == crc32c.crc32c(data), n
        assert lib.tfem_crc32c(seed, data, n) == crc32c.crc32c(data, seed), n
    assert lib.tfem_crc32c(0, b"123456789", 9) == 0xE3069283
    data = r.randbytes(200_000)
    out, crc = bytearray(len(data)), ffi.new("uint32_t *", 5)
    lib.tfem_copy_crc(ffi.from_buffer(out), data, len(data), crc)
    assert out == data and crc[0] == crc32c.crc32c(data, 5)


def test_a_producer_that_seeks_back_is_checksummed_at_close(client) -> None:
    data = bytearray(os.urandom(30_000))
    with client.open("crc/seek", "w") as f:
        f.write(data)
        f.seek(100)
        f.write(b"x" * 50)  # overwrite: the running checksum no longer holds
        data[100:150] = b"x" * 50
        f.seek(40_000)
        f.write(b"end")  # a gap of zeros, then more
        data += bytes(10_000) + b"end"
    with client.open("crc/seek") as f:
        assert f.read() == data  # checked at the end: a wrong checksum would raise


# ---- fstat answers from the held slot ----


def test_fstat_is_the_held_file_after_its_name_is_reused(client) -> None:
    with client.open("reused", "w") as f:
        f.write(b"a" * 1000)
    held = client.open("reused")
    client.unlink("reused")  # the name goes now; the file stays held
    with client.open("reused", "w") as f:
        f.write(b"b" * 7)
    info = held.fstat()
    assert (info.size, State(info.state), ffi.string(info.name)) == (1000, State.READ, b"reused")
    assert held.read() == b"a" * 1000
    held.close()
    assert client.stat("reused").size == 7


def test_posix_fstat_is_the_held_file(instance, monkeypatch) -> None:
    monkeypatch.setenv("TFEM_KEYFILE", str(instance.keyfile))
    fd = tfem.tfem_open("px", tfem.TFEM_WRONLY)
    tfem.tfem_write(fd, b"12345")
    tfem.tfem_unlink("px")
    st = tfem.tfem_fstat(fd)
    assert (st.name, st.size, st.state) == ("px", 5, "WRITE")
    tfem.tfem_close(fd)  # unlinked while written: freed
    with pytest.raises(tfem.NotFound):
        tfem.tfem_stat("px")


# ---- waits: forced and adaptive ----

WAITER = textwrap.dedent("""
    import json, sys, threading, time
    import tfem
    from tfem._native import ffi, lib
    mode, rounds = sys.argv[1], int(sys.argv[2])
    tfem.set_wait_mode(mode, spin_us=200_000)  # a window far longer than the waits
    client = tfem.connect()
    got = []

    def consume():
        for i in range(rounds):
            with client.open(f"w/{i}", "r", timeout=30) as f:
                got.append(f.read())

    reader = threading.Thread(target=consume)
    reader.start()
    for i in range(rounds):
        time.sleep(0.003)  # the consumer is waiting by now
        with client.open(f"w/{i}", "w") as f:
            f.write(b"x" * 100)
    reader.join()
    spun, slept = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    lib.tfem_wait_counters(spun, slept)
    client.close()
    print(json.dumps({"files": len(got), "spun": spun[0], "slept": slept[0]}))
""")


def _waits(instance, mode: str, rounds: int = 8) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", WAITER, mode, str(rounds)], env=instance.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["files"] == rounds
    return result


def _runnable() -> int:
    """The kernel's count of runnable tasks (what adaptive waits read)."""
    with open("/proc/loadavg") as f:
        return int(f.read().split()[3].split("/")[0])


@pytest.fixture
def busy() -> Iterator[None]:
    """More busy processes than CPUs, for the length of a test."""
    cpus = os.cpu_count() or 1
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * cpus + 1)]
    try:
        wait_until(lambda: _runnable() > cpus, timeout=10, what="the busy processes running")
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_forced_sleep_never_spins(instance) -> None:
    result = _waits(instance, "sleep")
    assert result["spun"] == 0 and result["slept"] >= 8


def test_forced_spin_spins_even_when_busy(instance, busy) -> None:
    result = _waits(instance, "spin", rounds=4)
    assert result["spun"] >= 1


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="spinning needs a second CPU")
def test_adaptive_spins_on_an_idle_machine(instance) -> None:
    result = _waits(instance, "adaptive")
    assert result["spun"] >= 4, result


def test_adaptive_sleeps_on_a_busy_machine(instance, busy) -> None:
    result = _waits(instance, "adaptive", rounds=4)
    assert result["spun"] == 0 and result["slept"] >= 1, result  # (a file may be ready before its reader)


def test_wait_mode_is_checked() -> None:
    with pytest.raises(tfem.InvalidArgument):
        tfem.set_wait_mode("sometimes")
    with pytest.raises(tfem.InvalidArgument):
        tfem.set_wait_mode("spin", spin_us=-1)


DAMAGE = {"slots_offset": 1 << 40, "index_offset": 1 << 41, "free_stack_offset": 1 << 42,
          "bitmap_offset": 1 << 43, "arena_offset": 1 << 44, "slot_count": 2**31, "slot_size": 1 << 30,
          "block_size": 1 << 30, "buf_size": 1 << 30, "index_size": 1 << 30}


def test_a_header_damaged_after_attach_sends_nobody_astray(instance):
    """The core works from the geometry each process checked when it mapped
    the segment, never from the shared header's offsets afterwards: a client
    attached before the damage hands a file over as before."""
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, tfem
        with tfem.connect() as c:
            print("attached", flush=True)
            sys.stdin.readline()  # the header is damaged now
            data = bytes(range(256)) * 40  # past the inline buffer: arena blocks
            with c.open("astray", "w") as f:
                f.write(data)
            with c.open("astray", "r") as f:
                assert f.read() == data
            print(c.list(), flush=True)
        """)], env=instance.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seg = Segment.attach(instance.names.segment)
    saved = {field: getattr(seg.header, field) for field in DAMAGE}
    try:
        assert worker.stdout.readline() == "attached\n", worker.stderr.read()
        for field, value in DAMAGE.items():
            setattr(seg.header, field, value)
        out, err = worker.communicate("go\n", timeout=60)
    finally:
        for field, value in saved.items():
            setattr(seg.header, field, value)
        seg.close()
        worker.kill()
        worker.wait()
    assert worker.returncode == 0, err
    assert out == "[]\n"
