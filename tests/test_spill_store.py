"""The spill store as rewritten for LMDB's speed (broker/spill.py, with
tfem.spill_format and tfem.spill_reader), on real LMDB stores in tmp dirs:

- the record format: split(), the codecs' round trip and the SAVING rule,
  the key order;
- SpillStore against a bytearray model, seeded random writes for each
  codec: what the reader functions return, the checksum, the counts;
- tidy(), a full store, renew(), the lock file on a full disk;
- a process's one SpillReader, open from first acquire to last release;

and through real instances: --spill-compress lz4 and zstd read back by
Python and C consumers, a consumer reading spilled files while a producer
forces evictions, and the default --spill-size.

LMDB must not open one store twice in one process (its locks are the
process's): where a SpillStore is open, readers run in other processes
(tests/_spill_store_worker.py).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import pathlib
import random
import signal
import struct
import subprocess
import sys
from typing import Callable, Iterator

import crc32c
import pytest

from tfem import spill_format, spill_reader
from tfem.broker.spill import FLOCK, LOCK_BYTES, RENEW_AT, SpillStore
from tfem.errors import NoSpace
from tfem.spill_format import RECORD_MAX, SAVING, Codec, Record

from tests._instances import SMALL
from tests._proc_tools import Worker
from tests._spill_store_worker import compressible, incompressible, mapped

KIB, MIB = 1 << 10, 1 << 20
WORKER = str(pathlib.Path(__file__).with_name("_spill_store_worker.py"))
CODEC_IDS = {codec: codec.name.lower() for codec in Codec}


@pytest.fixture
def stores(tmp_path: pathlib.Path) -> Iterator[Callable[..., SpillStore]]:
    """open(codec, limit=64 MiB, owned=None, name="store") -> a SpillStore
    in tmp_path; every one is closed at teardown."""
    opened: list[SpillStore] = []

    def open_store(codec: Codec = Codec.NONE, limit: int = 64 * MIB, owned: Callable[[], set[int]] | None = None,
                   name: str = "store") -> SpillStore:
        store = SpillStore(tmp_path / name, limit, codec, owned or (lambda: set(store.file_ids())))
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def procs() -> Iterator[Callable[..., Worker]]:
    """start(*args, env=None) -> a Worker running _spill_store_worker.py;
    all are killed at teardown."""
    started: list[Worker] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Worker:
        w = Worker([sys.executable, WORKER, *args], env or dict(os.environ))
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


def same(got: bytes | bytearray, want: bytes | bytearray, what: str) -> None:
    """Byte for byte, reporting where they first differ (not a diff of megabytes)."""
    if got == want:
        return
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    pytest.fail(f"{what}: {len(got)} bytes, expected {len(want)}; first difference at {at}")


# ---- the record format ----


RECORD = Record(file_id=9, start=100, length=100, codec=Codec.NONE)  # bytes [100, 200)


@pytest.mark.parametrize("start, end, head, tail", [
    (120, 150, (100, 120), (150, 200)),  # inside: both ends kept
    (50, 150, None, (150, 200)),  # over the start
    (150, 250, (100, 150), None),  # over the end
    (100, 150, None, (150, 200)),  # from the record's start
    (150, 200, (100, 150), None),  # to its end
    (100, 200, None, None),  # exactly the record
    (0, 300, None, None),  # all of it and more
    (199, 200, (100, 199), None),  # its last byte
    (100, 101, None, (101, 200)),  # its first byte
])
def test_split_keeps_what_a_write_leaves(start, end, head, tail):
    assert spill_format.split(RECORD, start, end) == (head, tail)


def test_split_keeps_exactly_the_bytes_outside_any_overlapping_write():
    for start in range(0, 300, 10):
        for end in range(start + 1, 310, 10):
            if end <= RECORD.start or start >= RECORD.end:
                continue  # no overlap: the store never splits for it
            kept = set()
            for part in spill_format.split(RECORD, start, end):
                if part is not None:
                    assert RECORD.start <= part[0] < part[1] <= RECORD.end
                    kept |= set(range(*part))
            assert kept == set(range(RECORD.start, RECORD.end)) - set(range(start, end)), (start, end)


@pytest.mark.parametrize("codec", list(Codec), ids=CODEC_IDS.get)
@pytest.mark.parametrize("size", [1, 4 * KIB + 3, RECORD_MAX])
def test_encode_decode_round_trip(codec, size):
    for kind, raw in (("compressible", compressible(f"rt{size}", size)),
                      ("random", incompressible(f"rt{size}", size))):
        used, value = spill_format.encode(codec, memoryview(raw))
        if kind == "random" or codec is Codec.NONE or size < 64:
            assert used is Codec.NONE, kind  # nothing to gain: stored raw, read without decompressing
            assert bytes(value) == raw
        else:
            assert used is codec, kind
            assert len(value) <= SAVING * size
        back = spill_format.decode(Record(1, 0, size, used), value)
        assert bytes(back) == raw, (codec, kind, size)


@pytest.mark.parametrize("codec", [Codec.LZ4, Codec.ZSTD], ids=CODEC_IDS.get)
def test_a_record_is_compressed_only_when_that_saves_enough(codec):
    def mixed(zero_share: float) -> bytes:  # random runs with zeros between: a known saving
        rng, block = random.Random(zero_share), 4096
        zeros = int(block * zero_share)
        return b"".join(rng.randbytes(block - zeros) + bytes(zeros) for _ in range(RECORD_MAX // block))

    saves_little = mixed(0.05)  # about 5 % smaller compressed: not worth a decompression
    used, value = spill_format.encode(codec, memoryview(saves_little))
    assert used is Codec.NONE and bytes(value) == saves_little
    saves_enough = mixed(0.2)
    used, value = spill_format.encode(codec, memoryview(saves_enough))
    assert used is codec and len(value) <= SAVING * len(saves_enough)
    assert bytes(spill_format.decode(Record(1, 0, len(saves_enough), used), value)) == saves_enough


def test_a_files_records_sort_together_by_start():
    starts = [0, 1, 255, 256, RECORD_MAX, 3 * RECORD_MAX + 7, 1 << 32, (1 << 40) + 1, 2**63]
    records = [Record(file_id, start, length, codec)
               for file_id in (0, 1, 2, 255, 256, 2**40)
               for start, length, codec in zip(starts, [1, RECORD_MAX, 7, 100, 5, 9, 1, 2, 3], list(Codec) * 3)]
    keys = [r.key for r in records]
    random.Random(1).shuffle(keys)
    assert [spill_format.parse_key(k) for k in sorted(keys)] == sorted(records, key=lambda r: (r.file_id, r.start))
    for r in records:
        assert spill_format.parse_key(r.key) == r
        # The seek key lands on the record starting there: after every key
        # of a record before it, at or before its own.
        seek = spill_format.seek_key(r.file_id, r.start)
        assert seek <= r.key
        assert all(k < seek for k in keys if (spill_format.parse_key(k).file_id, spill_format.parse_key(k).start)
                   < (r.file_id, r.start))


def test_records_in_lmdb_are_read_in_file_order(stores):
    store = stores()
    rng = random.Random(3)
    pieces = [(file_id, start) for file_id in (1, 2, 3) for start in range(0, 40 * KIB, 4 * KIB)]
    rng.shuffle(pieces)
    for file_id, start in pieces:  # each write lands between records already there
        store.write(file_id, start, memoryview(bytes([file_id]) * (4 * KIB)))
    with store.env.begin(buffers=True) as txn:
        got = [spill_format.parse_key(k) for k in txn.cursor().iternext(values=False)]
        assert [(r.file_id, r.start) for r in got] == sorted((f, s) for f, s in pieces)
        for file_id, start, end, starts in [
            (2, 6 * KIB, 13 * KIB, [4, 8, 12]),  # from inside a record
            (2, 8 * KIB, 9 * KIB, [8]),  # from a record's start
            (1, 41 * KIB, 50 * KIB, []),  # past a file's end, another file next
            (3, 38 * KIB, 50 * KIB, [36]),  # the store's last record
            (3, 41 * KIB, 50 * KIB, []),  # past the store's last record
            (0, 0, 100, []),  # before the store's first record
        ]:
            got_starts = [r.start // KIB for r, _ in spill_reader.records(txn, file_id, start, end)]
            assert got_starts == starts, (file_id, start, end)


# ---- SpillStore against a model ----


def record_counts(store: SpillStore) -> tuple[dict[int, int], int, list[Record]]:
    """What the records hold, counted with a cursor: stored bytes by file,
    raw bytes, and the records, each checked on the way."""
    stored: dict[int, int] = {}
    raw = 0
    records: list[Record] = []
    with store.env.begin(buffers=True) as txn:
        for key, value in txn.cursor():
            r = spill_format.parse_key(key)
            assert r.key == bytes(key)
            assert 0 < r.length <= RECORD_MAX, r
            if records and records[-1].file_id == r.file_id:
                assert records[-1].end <= r.start, f"records overlap: {records[-1]} {r}"
            if r.codec is not Codec.NONE:
                assert r.codec is store.codec and len(value) <= SAVING * r.length, r
            assert len(spill_format.decode(r, value)) == r.length
            stored[r.file_id] = stored.get(r.file_id, 0) + len(value)
            raw += r.length
            records.append(r)
    return stored, raw, records


def check(store: SpillStore, model: dict[int, bytearray], rng: random.Random) -> None:
    """The reader functions and the counts agree with the model."""
    with store.env.begin(buffers=True) as txn:
        for file_id, want in model.items():
            assert spill_reader.stored_end(txn, file_id) == len(want), file_id
            got = bytearray(len(want) + 1000)  # past the end: zeros
            spill_reader.read_into(txn, file_id, 0, memoryview(got))
            same(got, want + bytes(1000), f"file {file_id}")
            for _ in range(4):  # windows anywhere, across records and gaps
                offset = rng.randrange(len(want) + 10)
                out = bytearray(rng.randint(1, 3 * RECORD_MAX // 2))
                spill_reader.read_into(txn, file_id, offset, memoryview(out))
                expected = want[offset: offset + len(out)]
                same(out, expected + bytes(len(out) - len(expected)), f"file {file_id} at {offset}")
            assert spill_reader.checksum(txn, file_id, len(want), 0) == crc32c.crc32c(want), file_id
            cut, seed = rng.randint(0, len(want)), crc32c.crc32c(b"the inline part")
            assert spill_reader.checksum(txn, file_id, cut, seed) == crc32c.crc32c(want[:cut], seed)
            assert spill_reader.checksum(txn, file_id, len(want) + 5000, 0) == crc32c.crc32c(want + bytes(5000))
    stored, raw, _ = record_counts(store)
    assert store.bytes_by_file == stored
    assert store.raw_bytes == raw


class Model:
    """The files' bytes, and which of them were ever written."""

    def __init__(self) -> None:
        self.files: dict[int, bytearray] = {}
        self.written: dict[int, bytearray] = {}

    def write(self, file_id: int, offset: int, raw: bytes) -> None:
        for target, value in ((self.files, raw), (self.written, b"\1" * len(raw))):
            buf = target.setdefault(file_id, bytearray())
            if len(buf) < offset:
                buf += bytes(offset - len(buf))
            buf[offset: offset + len(raw)] = value

    def raw_bytes(self) -> int:
        return sum(mask.count(1) for mask in self.written.values())


def piece(rng: random.Random, have: int, cap: int) -> tuple[int, bytes]:
    """A write for a file of `have` bytes: anywhere, any length, of
    compressible or random bytes."""
    kind = rng.choice(["inside", "overlap", "append", "gap", "aligned", "cover"] if have < cap else
                      ["inside", "overlap", "aligned"])
    if have == 0 and kind in ("inside", "overlap", "cover"):
        kind = "gap"
    if kind == "inside":
        offset = rng.randrange(have)
        length = rng.randint(1, min(5000, have - offset))
    elif kind == "overlap":  # over several records, maybe past the end
        offset = rng.randrange(have)
        length = rng.randint(1, 5 * RECORD_MAX // 2)
    elif kind == "append":
        offset, length = have, rng.randint(1, 3 * RECORD_MAX // 2)
    elif kind == "gap":
        offset, length = have + rng.randint(1, 3 * RECORD_MAX), rng.choice([1, 100, rng.randint(1, 2 * RECORD_MAX)])
    elif kind == "aligned":  # on records' boundaries
        offset = RECORD_MAX * rng.randint(0, max(0, have // RECORD_MAX))
        length = RECORD_MAX * rng.randint(1, 2) - rng.choice([0, 1])
    else:
        offset, length = 0, have + rng.randint(0, 1000)
    seed = f"{rng.random()}"
    return offset, (compressible(seed, length) if rng.random() < 0.5 else
                    bytes(length) if rng.random() < 0.1 else incompressible(seed, length))


@pytest.mark.parametrize("codec", list(Codec), ids=CODEC_IDS.get)
def test_store_agrees_with_a_bytearray_model(stores, codec):
    rng = random.Random(f"model {codec.name}")
    store = stores(codec)
    model = Model()
    for file_id in (1, 2, 3):  # 2 between neighbours
        model.files[file_id], model.written[file_id] = bytearray(), bytearray()
    for step in range(36):
        file_id = rng.choice([1, 2, 2, 3])
        have = len(model.files[file_id])
        pieces = [piece(rng, have, cap=6 * MIB) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        store.write_pieces(file_id, [(offset, memoryview(raw)) for offset, raw in pieces])
        for offset, raw in pieces:  # in order: a later piece wins where they overlap
            model.write(file_id, offset, raw)
        check(store, model.files, rng)
        assert store.raw_bytes == model.raw_bytes(), f"step {step}"
    # The broker's own reading methods say the same.
    for file_id, want in model.files.items():
        assert store.stored_end(file_id) == len(want)
        out = bytearray(len(want))
        store.read_into(file_id, 0, memoryview(out))
        same(out, want, f"file {file_id} through the store")
        assert store.checksum(file_id, len(want), 7) == crc32c.crc32c(want, 7)
    stored, raw_total, records = record_counts(store)
    if codec is not Codec.NONE:
        assert {r.codec for r in records} == {Codec.NONE, codec}  # random stays raw, the rest shrinks
        assert sum(stored.values()) < raw_total
    else:
        assert sum(stored.values()) == raw_total
    # Opened again, the store counts the same from its records.
    before = dict(store.bytes_by_file), store.raw_bytes
    store.close()
    again = stores(codec)
    assert (again.bytes_by_file, again.raw_bytes) == before
    check(again, model.files, rng)


# ---- tidy, a full store ----


def test_tidy_deletes_exactly_the_files_nobody_owns(stores):
    owned: set[int] = set()
    asked = []

    def owned_now() -> set[int]:
        asked.append(1)
        return set(owned)

    store = stores(Codec.LZ4, owned=owned_now)
    assert store.tidy() == 0 and not asked  # an empty store asks nobody
    model = Model()
    rng = random.Random(5)
    for file_id in range(1, 9):
        owned.add(file_id)
        for offset, raw in (piece(rng, 0, cap=4 * MIB), piece(rng, 2 * MIB, cap=4 * MIB)):
            store.write(file_id, offset, memoryview(raw))
            model.write(file_id, offset, raw)
    assert store.tidy() == 0  # all owned
    owned.clear()
    owned.update({2, 3, 7, 100})  # 100: a spilled file with no records yet
    assert store.tidy() == 5
    assert store.file_ids() == {2, 3, 7}
    stored, _, records = record_counts(store)
    assert {r.file_id for r in records} == {2, 3, 7} == set(stored)
    kept = {file_id: model.files[file_id] for file_id in (2, 3, 7)}
    gone = {file_id: bytearray() for file_id in (1, 4, 5, 6, 8)}
    check(store, kept | gone, rng)
    assert store.raw_bytes == sum(model.written[f].count(1) for f in kept)
    assert store.tidy() == 0
    owned.clear()
    assert store.tidy() == 3
    assert (store.file_ids(), store.raw_bytes, record_counts(store)[2]) == (set(), 0, [])


def test_a_full_store_tidies_first_and_else_is_no_space_with_nothing_half_written(stores):
    owned: set[int] = set()
    store = stores(Codec.NONE, limit=4 * MIB, owned=lambda: set(owned))
    rng = random.Random(11)
    model = Model()
    file_id = 0
    while True:  # 1 MiB files until the store says no
        file_id += 1
        owned.add(file_id)
        raw = rng.randbytes(MIB)
        try:
            store.write(file_id, 0, memoryview(raw))
        except NoSpace as exc:
            assert "full" in str(exc)
            break
        model.write(file_id, 0, raw)
    failed = file_id
    assert failed >= 3
    check(store, model.files | {failed: bytearray()}, rng)

    # All owned, so tidying frees nothing: refused whole, even the pieces
    # that fit (the first cuts into a record, which must stay as it was).
    with pytest.raises(NoSpace):
        store.write_pieces(1, [(100, memoryview(rng.randbytes(1000))), (MIB, memoryview(rng.randbytes(2 * MIB)))])
    check(store, model.files | {failed: bytearray()}, rng)

    # Files 1 and 2 freed: the write finds the store full, tidies, and goes in.
    owned -= {1, 2}
    big = rng.randbytes(2 * MIB)
    store.write_pieces(failed, [(0, memoryview(big[:MIB])), (MIB, memoryview(big[MIB:]))])
    model.write(failed, 0, big)
    del model.files[1], model.files[2], model.written[1], model.written[2]
    assert store.file_ids() == set(model.files)
    check(store, model.files | {1: bytearray(), 2: bytearray()}, rng)

    # One more freed, not enough for what comes: refused, and what stays is whole.
    owned.discard(3)
    with pytest.raises(NoSpace):
        store.write(99, 0, memoryview(rng.randbytes(3 * MIB)))
    del model.files[3], model.written[3]
    check(store, model.files | {3: bytearray(), 99: bytearray()}, rng)

    # Again and again: every write that fits once its room is freed goes in.
    for round_ in range(30):
        size = rng.choice([100 * KIB, 700 * KIB, MIB, 3 * MIB // 2, 2 * MIB])
        while sum(len(b) for b in model.files.values()) + size > 2 * MIB:
            oldest = min(model.files)
            owned.discard(oldest)
            del model.files[oldest], model.written[oldest]
        file_id += 1
        owned.add(file_id)
        raw = rng.randbytes(size)
        store.write(file_id, 0, memoryview(raw))  # not NoSpace: room was freed
        model.write(file_id, 0, raw)
    check(store, model.files, rng)


# ---- renewal ----


def test_an_emptied_store_is_made_afresh_and_readers_then_read_the_new_one(stores, procs):
    owned: set[int] = set()
    store = stores(Codec.NONE, owned=lambda: set(owned))
    data_file = store.path / "data.mdb"
    assert not store.renew()  # empty, and small
    owned |= {1, 2}
    first = [random.Random(f).randbytes(3 * MIB) for f in (1, 2)]
    for file_id, raw in zip((1, 2), first):
        store.write(file_id, 0, memoryview(raw))
    assert store.file_bytes > RENEW_AT

    reader = procs("reader", str(store.path), str(store.map_size))
    reader.expect("ready", timeout=30)
    reader.send("acquire")
    old_inode = os.stat(data_file).st_ino
    assert reader.expect("acquire")["mapped"] == [old_inode]
    reader.send(f"read 2 {3 * MIB}")
    assert reader.expect("read")["sha256"] == hashlib.sha256(first[1]).hexdigest()
    reader.send("release")
    assert reader.expect("release")["mapped"] == [old_inode]  # kept for the process's next spilled file

    old = os.open(data_file, os.O_RDONLY)  # kept open: its inode cannot be reused
    try:
        owned.discard(1)
        store.tidy()
        assert not store.renew()  # not empty
        assert os.stat(data_file).st_ino == old_inode
        owned.clear()
        store.tidy()
        assert store.file_bytes > RENEW_AT
        assert not store.renew()  # empty, but another process has it open
        reader.send("close_idle")  # that process turns to other files
        assert reader.expect("close_idle")["mapped"] == []
        assert store.renew()
        assert os.fstat(old).st_nlink == 0  # the old data file is gone
    finally:
        os.close(old)
    new_inode = os.stat(data_file).st_ino
    assert new_inode != old_inode
    assert store.file_bytes < 256 * KIB
    assert (store.renewals, store.raw_bytes, store.bytes_by_file) == (1, 0, {})
    assert not store.renew()  # empty, and small again

    owned.add(3)
    later = random.Random(3).randbytes(MIB + 5)
    store.write(3, 0, memoryview(later))
    reader.send("acquire")
    event = reader.expect("acquire")
    assert event["mapped"] == [new_inode] and event["same"]  # the same reader, on the new store
    reader.send(f"read 3 {len(later)}")
    assert reader.expect("read")["sha256"] == hashlib.sha256(later).hexdigest()
    reader.send("release")
    reader.expect("release")
    reader.close_stdin()
    assert reader.finish() == 0


# ---- one reader per process ----


def test_one_reader_per_process_open_from_first_acquire_to_last_release(stores, tmp_path):
    store = stores(Codec.ZSTD)
    raw = compressible("shared", 2 * MIB + 3)
    store.write(7, 0, memoryview(raw))
    path, map_size = str(store.path), store.map_size
    store.close()  # the reader alone has the store open in this process
    reader = spill_reader.reader_for(path, map_size)
    try:
        assert spill_reader.reader_for(path + "/", map_size) is reader
        assert spill_reader.reader_for(str(tmp_path / "other"), map_size) is not reader
        assert mapped(path) == []
        reader.acquire()
        inode = mapped(path)
        assert inode == [os.stat(store.path / "data.mdb").st_ino]
        reader.acquire()  # a second file of the process
        reader.release()
        assert mapped(path) == inode  # still open for the first
        out = bytearray(len(raw))
        reader.read_into(7, 0, memoryview(out))
        same(out, raw, "read while held")
        assert reader.checksum(7, len(raw), 0) == crc32c.crc32c(raw)
        reader.release()
        assert mapped(path) == inode  # kept, idle, for the process's next spilled file
        spill_reader.close_idle()
        assert mapped(path) == []  # closed when the process turns to other files
        with pytest.raises(AssertionError):
            reader.read_into(7, 0, memoryview(out))
        reader.acquire()  # and opened again when needed
        reader.read_into(7, 0, memoryview(out))
        same(out, raw, "read after opening again")
        reader.release()
        spill_reader.close_idle()
        assert mapped(path) == []

        pid = os.fork()
        if pid == 0:  # a forked child makes its own reader, and keeps the parent's untouched
            ok = spill_reader.reader_for(path, map_size) is not reader and reader.pid != os.getpid()
            os._exit(0 if ok else 1)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        for key in [k for k in spill_reader._readers if str(k).startswith(str(tmp_path))]:
            del spill_reader._readers[key]


# ---- the lock file on a full disk ----


def fill(disk: pathlib.Path, leave: int) -> None:
    """Fill the file system of `disk` with one big file, leaving `leave` bytes."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = bytes(MIB)
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        for size in (64 * KIB, 4 * KIB):
            try:
                while True:
                    os.write(fd, block[:size])
            except OSError:
                pass
        vfs = os.statvfs(disk)
        assert vfs.f_bavail * vfs.f_frsize == 0
        os.ftruncate(fd, os.fstat(fd).st_size - leave)
    finally:
        os.close(fd)
    vfs = os.statvfs(disk)
    assert vfs.f_bavail * vfs.f_frsize == leave


PAGE = 4096
LOCK_PAGES = (LOCK_BYTES + PAGE - 1) // PAGE * PAGE


@pytest.mark.parametrize("leave", [0, 16 * KIB, LOCK_PAGES], ids=["full", "16K", "lock-file-only"])
def test_a_store_on_a_full_disk_is_no_space_not_sigbus(small_disk, leave):
    fill(small_disk, leave)
    run = subprocess.run([sys.executable, WORKER, "open-store", str(small_disk / "spill")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != -signal.SIGBUS, "died of SIGBUS"
    assert run.returncode == 3, run.stdout + run.stderr
    said = json.loads(run.stdout.splitlines()[-1])
    assert said["event"] == "no-space" and said["errno"] == errno.ENOSPC
    assert str(small_disk / "spill") in said["message"] and "no room" in said["message"], said


def test_lmdb_itself_dies_of_sigbus_on_a_full_disk(small_disk):
    """Why the lock file is reserved: without it, LMDB maps its lock file
    and the first touch of a page the disk has no room for is SIGBUS."""
    fill(small_disk, 0)
    run = subprocess.run([sys.executable, WORKER, "raw-lmdb", str(small_disk / "raw")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == -signal.SIGBUS, run.stdout + run.stderr


# ---- through real instances ----


def c_cat(program: pathlib.Path, name: str, chunk: int, env: dict[str, str]) -> bytes:
    """The bytes a C consumer read from `name` (tests/c/cat.c)."""
    minimal = {"PATH": "/usr/bin:/bin", "TFEM_KEYFILE": env["TFEM_KEYFILE"], "HOME": env.get("HOME", "/")}
    minimal.update({k: env[k] for k in ("TFEM_PYTHON",) if k in env})
    run = subprocess.run([str(program), name, str(chunk)], env=minimal, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert run.stderr.decode().split()[-1] == "1", f"{name} was not spilled: {run.stderr!r}"
    return run.stdout


FILE = 3 * MIB + 12_345  # through SMALL's 1 MiB arena: spilled


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_compressed_spill_reads_back_byte_for_byte_in_python_and_c(instance_factory, programs, codec):
    inst = instance_factory(*SMALL, "--spill-compress", codec)
    with inst.connect() as client:
        store = client.stats()["spill_store"]
        assert (store["codec"], store["raw_bytes"]) == (codec, 0)
        files = {}
        for kind, make in (("compressible", compressible), ("random", incompressible)):
            for reader in ("py", "c"):
                name = f"{kind}/{reader}"
                files[name] = make(name, FILE)
                with client.open(name, "w") as f:
                    for pos in range(0, FILE, 700_001):  # writes across records
                        f.write(files[name][pos: pos + 700_001])
                assert client.stat(name).spilled
            stats = client.stats()
            store = stats["spill_store"]
            if kind == "compressible":
                assert store["raw_bytes"] >= 2 * (FILE - 2 * MIB)  # at least what is past the arena
                assert stats["spilled_bytes"] * 2 < store["raw_bytes"], stats
                compressed = (stats["spilled_bytes"], store["raw_bytes"])
            else:  # random stays raw: as many bytes stored as written
                assert stats["spilled_bytes"] - compressed[0] == store["raw_bytes"] - compressed[1], stats
        status = json.loads(inst.tfem("status", "--json").stdout)
        assert status["spill_store"]["codec"] == codec
        assert status["spill_store"]["raw_bytes"] > status["spilled_bytes"]
        assert f"before compression: {codec}" in inst.tfem("status").stdout.decode()

        for kind in ("compressible", "random"):
            with client.open(f"{kind}/py") as f:
                got = bytearray()
                while piece_ := f.read(300_007):
                    got += piece_
            same(got, files[f"{kind}/py"], f"{kind}/py read by Python")
            same(c_cat(programs["cat"], f"{kind}/c", 65_521, inst.env), files[f"{kind}/c"], f"{kind}/c read by C")
        assert client.list() == []
        stats = client.stats()
        assert (stats["spilled_files"], stats["spilled_bytes"], stats["slots_used"]) == (0, 0, 0)


def test_a_consumer_reads_spilled_files_while_a_producer_forces_evictions(instance_factory, procs):
    inst = instance_factory(*SMALL, "--spill-compress", "lz4")
    # A third of the 1 MiB arena each, the producer 8 files ahead: the
    # files the consumer takes have been pushed out to the store by the
    # newer ones, and while it reads one the producer writes the next,
    # pushing out others.
    count, size, ahead = 48, 384 * KIB, 8
    producer = procs("produce", "e", str(count), str(size), str(ahead), env=inst.env)
    producer.expect("ready", timeout=60)
    for i in range(ahead):
        assert producer.expect("published")["i"] == i
    consumer = procs("consume", "e", str(count), str(size), env=inst.env)
    consumer.expect("ready", timeout=60)
    published = [producer.expect("published")["t"] for _ in range(ahead, count)]
    producer.expect("done")
    done = consumer.expect("done", timeout=60)
    assert done["bad"] == [], done["bad"]
    assert producer.finish() == 0 and consumer.finish() == 0
    spilled = done["spilled"]
    assert len(spilled) >= count // 2, f"only {len(spilled)} of the {count} files read were spilled"
    # Spilled files were being read while the producer published (and the
    # broker evicted).
    overlapping = [i for i, taken, finished in spilled if any(taken <= t <= finished for t in published)]
    assert len(overlapping) >= count // 4, f"only files {overlapping} were read while others were published"
    with inst.connect() as client:
        assert client.list() == []
        stats = client.stats()
        assert (stats["spilled_files"], stats["spilled_bytes"], stats["slots_used"]) == (0, 0, 0)


def test_the_default_spill_size_is_half_the_free_room_of_its_disk(small_disk, up_factory):
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    up = up_factory(*SMALL, spill_dir=small_disk / "spill")
    with up.connect() as client:
        store = client.stats()["spill_store"]
    assert store["limit_from"] == "half the disk's free room at start"
    assert abs(store["limit"] - free // 2) <= 64 * KIB, (store["limit"], free)


def test_the_default_spill_size_on_the_tests_own_disk(instance_factory, tmp_path):
    vfs = os.statvfs(tmp_path)
    before = vfs.f_bavail * vfs.f_frsize
    inst = instance_factory(*SMALL)
    vfs = os.statvfs(tmp_path)
    after = vfs.f_bavail * vfs.f_frsize
    with inst.connect() as client:
        store = client.stats()["spill_store"]
    assert store["limit_from"] == "half the disk's free room at start"
    # Others write on this disk meanwhile: within 5 % of what it had.
    assert 0.95 * min(before, after) // 2 <= store["limit"] <= 1.05 * max(before, after) // 2, (store, before, after)

    given = instance_factory(*SMALL, "--spill-size", "5M", subdir="given")
    with given.connect() as client:
        store = client.stats()["spill_store"]
    assert (store["limit"], store["limit_from"]) == (5 * MIB, "--spill-size")


# ---- the broker's locks on the store ----

HOLD_A_STORE = """
import pathlib, sys, time
from tfem.broker.spill import SpillStore
from tfem.spill_format import Codec
store = SpillStore(pathlib.Path(sys.argv[1]), 1 << 30, Codec.NONE, lambda: set())
assert not store._open_elsewhere()  # what renew() asks before it renews
assert not store._open_elsewhere()
print("asked", flush=True)
sys.stdin.readline()
store.close()
"""


def test_asking_whether_others_have_the_store_open_keeps_the_brokers_own_lock(tmp_path):
    # Closing any descriptor of a file drops every fcntl lock the process
    # holds on it. A probe that opened and closed the lock file took LMDB's
    # read lock from the broker: the next reader to open the store became its
    # "first opener" and reset the lock file under the writer, and commits
    # were lost (seen in the soak as spilled files missing a record).
    path = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_STORE, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "asked"
        fd = os.open(path / "lock.mdb", os.O_RDONLY)
        try:
            answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
        finally:
            os.close(fd)  # this process holds no lock on it: nothing to lose
        kind, _, _, _, pid = struct.unpack(FLOCK, answer)
        assert (kind, pid) == (fcntl.F_RDLCK, holder.pid), "the store's owner no longer holds LMDB's lock"
    finally:
        holder.communicate("\n", timeout=30)
