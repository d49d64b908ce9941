"""tfem:// through fsspec, on real instances: fsspec's own reusable test
suite (files kept, the default), the other lifetimes (consume-once,
readers=N, ttl), and pandas, pyarrow and Dask reading and writing tfem://.

fsspec's suite runs on one instance of its own (its own key file) for all
its 137 tests, each under a path of its own: an instance per test would
add 0.7 s to each. Every other test has an instance to itself."""

from __future__ import annotations

import itertools
import time
from typing import Any, Iterator

import fsspec
import pytest
from fsspec.tests.abstract import (AbstractCopyTests, AbstractFixtures, AbstractGetTests, AbstractOpenTests,
                                   AbstractPipeTests, AbstractPutTests)

import tfem
from tests._instances import SMALL, RunningInstance, start_instance, stop_instance
from tests._proc_tools import wait_until
from tfem.fsspec_fs import TfemFileSystem

_paths = itertools.count()


def filesystem(instance: RunningInstance, **options: Any) -> TfemFileSystem:
    return TfemFileSystem(keyfile=str(instance.keyfile), skip_instance_cache=True, **options)


@pytest.fixture
def tfs(instance: RunningInstance) -> Iterator[TfemFileSystem]:
    fs = filesystem(instance)
    yield fs
    fs.close()  # before the instance stops: a goodbye to a stopped broker waits for its answer


# ---- fsspec's own suite ----


@pytest.fixture(scope="module")
def suite_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningInstance]:
    inst = start_instance(tmp_path_factory.mktemp("fsspec-suite"), *SMALL)
    yield inst
    assert stop_instance(inst) == [], "the instance left something behind"


class TestFsspecSuite(AbstractFixtures, AbstractCopyTests, AbstractGetTests, AbstractPutTests, AbstractPipeTests,
                      AbstractOpenTests):
    @pytest.fixture
    def fs(self, suite_instance: RunningInstance) -> Iterator[TfemFileSystem]:
        fs = filesystem(suite_instance)
        yield fs
        fs.close()

    @pytest.fixture
    def fs_path(self, fs: TfemFileSystem) -> Iterator[str]:
        path = f"suite-{next(_paths)}"
        yield path
        if fs.exists(path):
            fs.rm(path, recursive=True)
        assert fs.client.list() == [], "a test of the suite left files"

    @pytest.fixture
    def fs_join(self) -> Any:
        return lambda *parts: "/".join(parts)

    @pytest.fixture
    def supports_empty_directories(self) -> bool:
        return False


# ---- the filesystem's own behaviour ----


def test_names_are_paths_and_directories_are_implied(tfs: TfemFileSystem) -> None:
    for name in ("run/a", "run/b/c", "run/b/d", "top"):
        tfs.pipe_file(f"tfem://{name}", name.encode())
    assert tfs.ls("", detail=False) == ["run", "top"]
    assert tfs.ls("tfem://run/", detail=False) == ["run/a", "run/b"]
    assert tfs.info("run/b") == {"name": "run/b", "size": 0, "type": "directory"}
    info = tfs.info("run/b/c")
    assert (info["name"], info["size"], info["type"]) == ("run/b/c", 7, "file")
    assert tfs.glob("run/**/[cd]") == ["run/b/c", "run/b/d"]
    assert tfs.find("run") == ["run/a", "run/b/c", "run/b/d"]
    assert tfs.cat("run/b/*") == {"run/b/c": b"run/b/c", "run/b/d": b"run/b/d"}
    assert tfs.cat_file("top", start=1, end=-1) == b"o"
    with pytest.raises(FileNotFoundError):
        tfs.info("run/b/e")
    with pytest.raises(FileNotFoundError):
        tfs.ls("nothing")
    for directory in ("run/b", "tfem://"):
        with pytest.raises(IsADirectoryError):
            tfs.open(directory, "rb")
    with pytest.raises(IsADirectoryError):
        tfs.rm("run/b")  # as rm(1) says without -r
    tfs.rm("run", recursive=True)
    assert tfs.ls("", detail=False) == ["top"]
    tfs.rm("top")
    with pytest.raises(FileNotFoundError):
        tfs.rm("top")


def test_a_file_being_written_is_not_seen_until_it_is_published(tfs: TfemFileSystem) -> None:
    f = tfs.open("run/part", "wb", block_size=4)
    f.write(b"12345678")  # past the block size: in the tfem file already
    assert tfs.client.stat("run/part").state == "WRITE"
    assert not tfs.exists("run/part") and tfs.ls("", detail=False) == []
    f.close()
    assert tfs.cat("run/part") == b"12345678"


def test_leaving_with_through_an_exception_drops_a_writer_and_gives_a_reader_back(tfs: TfemFileSystem) -> None:
    with pytest.raises(RuntimeError):
        with tfs.open("dropped", "wb") as f:
            f.write(b"half")
            raise RuntimeError("the producer failed")
    assert tfs.client.list() == []
    tfs.pipe_file("once", b"data", readers=1)
    with pytest.raises(RuntimeError):
        with tfs.open("once", "rb") as f:
            assert f.read() == b"data"
            raise RuntimeError("the consumer failed")
    assert tfs.cat("once") == b"data"  # given back, then read: consumed
    assert not tfs.exists("once")


def test_writing_replaces_and_exclusive_writing_refuses(tfs: TfemFileSystem) -> None:
    tfs.pipe_file("name", b"old")
    tfs.pipe_file("name", b"new")
    assert tfs.cat("name") == b"new"
    with pytest.raises(FileExistsError):
        tfs.open("name", "xb")
    assert tfs.cat("name") == b"new"


def test_a_reader_waits_only_when_given_a_timeout(instance: RunningInstance) -> None:
    fs = filesystem(instance, timeout=0.2)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            fs.open("later", "rb")
        assert time.monotonic() - start >= 0.2
        with pytest.raises(FileNotFoundError):
            fs.open("later", "rb", timeout=None)  # at once: no wait
        fs.pipe_file("later", b"here")
        assert fs.cat("later") == b"here"
    finally:
        fs.close()


def test_bad_options_are_refused(tfs: TfemFileSystem, instance: RunningInstance) -> None:
    for options in ({"readers": 0}, {"readers": 1.5}, {"ttl": -1}, {"timeout": "soon"}):
        with pytest.raises(ValueError):
            filesystem(instance, **options)
    with pytest.raises(ValueError, match="readers"):
        tfs.open("x", "wb", readers=0)
    with pytest.raises(ValueError, match="mode"):
        tfs.open("x", "ab")
    with pytest.raises(ValueError, match="mode"):
        tfs.open("x", "r+b")
    assert tfs.client.list() == []


# ---- lifetimes other than kept ----


def test_consume_once_frees_a_file_at_its_readers_close_not_at_each_range_read(instance: RunningInstance) -> None:
    fs = filesystem(instance, readers=1)
    try:
        data = bytes(range(256)) * 64
        fs.pipe_file("stage/part", data)
        with fs.open("stage/part", "rb", block_size=1024, cache_type="none") as f:
            assert f.size == len(data)
            f.seek(5000)
            assert f.read(10) == data[5000:5010]
            f.seek(10)
            assert f.read(10) == data[10:20]
            assert fs.exists("stage/part")  # still held: read once, freed at close
            with pytest.raises(BlockingIOError):
                fs.open("stage/part", "rb")  # its one reader has it
        assert not fs.exists("stage/part")
        with pytest.raises(FileNotFoundError):
            fs.cat("stage/part")
    finally:
        fs.close()


def test_a_copy_or_a_move_does_not_count_as_a_read(instance: RunningInstance) -> None:
    fs = filesystem(instance, readers=1)
    try:
        fs.pipe_file("a/part", b"payload")
        fs.copy("a/part", "b/part")
        fs.mv("b/part", "c/part")
        assert fs.find("") == ["a/part", "c/part"]
        assert fs.cat("a/part") == b"payload" and fs.cat("c/part") == b"payload"
        assert fs.find("") == []  # each was read once: consumed
    finally:
        fs.close()


def test_n_readers_read_at_once_and_the_nth_close_frees_the_file(instance: RunningInstance) -> None:
    fs = filesystem(instance, readers=3)
    try:
        data = b"shared" * 1000
        fs.pipe_file("stage/shared", data)
        first, second = fs.open("stage/shared", "rb"), fs.open("stage/shared", "rb")
        info = fs.info("stage/shared")
        assert (info["lifetime"], info["state"], info["holders"]) == ("3 readers", "SHARED", 2)
        assert first.read() == data and second.read() == data
        first.close()
        second.close()
        assert fs.info("stage/shared")["readers_left"] == 1
        assert fs.cat("stage/shared") == data
        assert not fs.exists("stage/shared")
    finally:
        fs.close()


def test_a_kept_file_serves_any_number_of_readers_until_it_is_removed(tfs: TfemFileSystem) -> None:
    tfs.pipe_file("kept", b"data")
    for _ in range(5):
        assert tfs.cat("kept") == b"data"
    info = tfs.info("kept")
    assert (info["lifetime"], info["readers_left"], info["expires"]) == ("keep", None, None)
    with tfs.open("kept", "rb") as f:
        tfs.rm("kept")  # the name goes at once; the reader keeps what it holds
        assert not tfs.exists("kept")
        assert f.read() == b"data"
    assert tfs.client.list() == []


def test_a_file_with_a_ttl_is_freed_when_it_expires(tfs: TfemFileSystem) -> None:
    before = time.time()
    tfs.pipe_file("brief", b"data", ttl=0.5)
    tfs.pipe_file("long", b"data", ttl=3600)
    assert before + 3600 <= tfs.info("long")["expires"] <= time.time() + 3600
    wait_until(lambda: not tfs.exists("brief"), what="the file's ttl to free it")
    assert tfs.ls("", detail=False) == ["long"]
    tfs.rm("long")


# ---- pandas, pyarrow and Dask ----


@pytest.fixture
def keyfile_in_environment(instance: RunningInstance, monkeypatch: pytest.MonkeyPatch) -> Iterator[TfemFileSystem]:
    """tfem:// URLs find the instance as under `tfem up -- ...`: through $TFEM_KEYFILE."""
    monkeypatch.setenv("TFEM_KEYFILE", str(instance.keyfile))
    monkeypatch.delenv("TFEM_BROKER", raising=False)
    fs = TfemFileSystem()
    yield fs
    fs.close()


def test_the_instance_is_found_as_tfem_connect_finds_it(keyfile_in_environment: TfemFileSystem,
                                                        instance: RunningInstance) -> None:
    with fsspec.open("tfem://stage1/part-0", "wb") as f:
        f.write(b"found")
    with instance.connect() as client, client.open("stage1/part-0") as f:
        assert f.read() == b"found"


def frame(rows: int) -> Any:
    pd = pytest.importorskip("pandas")
    return pd.DataFrame({"key": [i % 7 for i in range(rows)], "x": range(rows), "y": [f"v{i}" for i in range(rows)]})


def test_pandas_reads_and_writes_tfem_urls(keyfile_in_environment: TfemFileSystem) -> None:
    pd = pytest.importorskip("pandas")
    df = frame(100)
    df.to_csv("tfem://stage1/part.csv", index=False)
    pd.testing.assert_frame_equal(pd.read_csv("tfem://stage1/part.csv"), df)
    df.to_parquet("tfem://stage1/part.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet("tfem://stage1/part.parquet"), df)
    keyfile_in_environment.rm("stage1", recursive=True)
    assert keyfile_in_environment.client.list() == []


def test_pyarrow_reads_and_writes_through_the_filesystem(tfs: TfemFileSystem) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"x": list(range(1000)), "y": [i / 3 for i in range(1000)]})
    pq.write_table(table, "tfem://stage1/part-0.parquet", filesystem=tfs)
    assert pq.read_table("stage1/part-0.parquet", filesystem=tfs).equals(table)
    with tfs.open("stage1/part-0.parquet", "rb") as f:
        assert pq.read_table(f).equals(table)
    tfs.rm("stage1/part-0.parquet")


def test_dask_reads_and_writes_tfem_urls(keyfile_in_environment: TfemFileSystem) -> None:
    dd = pytest.importorskip("dask.dataframe")
    df = frame(3000)
    dd.from_pandas(df, npartitions=3).to_parquet("tfem://stage1/", write_index=False)
    assert len(keyfile_in_environment.ls("stage1")) == 3
    back = dd.read_parquet("tfem://stage1/*").compute()
    pd = pytest.importorskip("pandas")
    # Dask's string dtype marks missing values its own way: the values are compared
    pd.testing.assert_frame_equal(back.sort_values("x").reset_index(drop=True), df, check_dtype=False)
    dd.from_pandas(df, npartitions=2).to_csv("tfem://stage2/part-*.csv", index=False)
    sums = dd.read_csv("tfem://stage2/*.csv").groupby("key").x.sum().compute()
    assert sums.to_dict() == df.groupby("key").x.sum().to_dict()
    keyfile_in_environment.rm(["stage1", "stage2"], recursive=True)
    assert keyfile_in_environment.client.list() == []


def test_files_of_a_transaction_are_published_at_its_end_or_dropped(tfs: TfemFileSystem) -> None:
    with tfs.transaction:
        with tfs.open("t/a", "wb") as f:
            f.write(b"a")
        assert not tfs.exists("t/a")  # written, not yet published
    assert tfs.cat("t/a") == b"a"
    with pytest.raises(RuntimeError):
        with tfs.transaction:
            with tfs.open("t/b", "wb") as f:
                f.write(b"b")
            raise RuntimeError("the job failed")
    assert tfs.find("") == ["t/a"]
    tfs.rm("t/a")


def test_a_spilled_file_reads_in_ranges_as_one_in_memory(tfs: TfemFileSystem) -> None:
    data = bytes(range(251)) * 12000  # 3 MB through a 1 MiB arena: spilled
    tfs.pipe_file("big", data)
    assert tfs.info("big")["spilled"]
    with tfs.open("big", "rb", block_size=1 << 16) as f:
        for start in (2_000_000, 5, 1_500_000):
            f.seek(start)
            assert f.read(100_000) == data[start:start + 100_000]
    assert tfs.cat_file("big", start=-10) == data[-10:]
    tfs.rm("big")


def test_a_write_that_fails_drops_the_file(instance_factory: Any) -> None:
    instance = instance_factory(*SMALL, "--max-file-size", "64K")
    fs = filesystem(instance)
    try:
        f = fs.open("too-big", "wb", block_size=16 << 10)
        with pytest.raises(tfem.FileTooLarge):
            for _ in range(10):
                f.write(b"x" * (10 << 10))
        assert f.closed
        f.close()
        assert fs.client.list() == []  # never published, not even in part
        fs.pipe_file("fits", b"x" * (60 << 10))
        assert fs.info("fits")["size"] == 60 << 10
        fs.rm("fits")
    finally:
        fs.close()
