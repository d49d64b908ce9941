"""Room running out, for real: a spill store on a 20 MiB tmpfs, and holes.

- A full disk under the spill store is ENOSPC (NoSpace) for the writer,
  Python or C, however LMDB reports it (a commit's short write is EIO);
  files stored stay readable byte for byte, the broker logs no traceback,
  and service resumes when room is freed.
- A write past the per-file limit (by default all the instance can hold) is
  EFBIG (FileTooLarge, a NoSpace) at once, decided by the client's native
  core without asking the broker.
- Below the limit, a gap in a spilled file costs nothing: it is not written
  into the spill store, and reads back as zeros.
"""

from __future__ import annotations

import errno
import threading
import time

import pytest

import tfem
from tfem.spill_format import RECORD_MAX

from tests._instances import SMALL
from tests._tfem_worker import MIB, content, sha256
from tests._c_programs import run

FILE = 3 * MIB  # through SMALL's 1 MiB arena: spilled; six of them fill the 20 MiB disk
TIB = 1 << 40


@pytest.fixture
def up(small_disk, up_factory):
    """SMALL, its spill store on the 20 MiB disk, 64G of spill allowed
    (not the default, half the disk): the disk fills long before the
    store's own limit."""
    return up_factory(*SMALL, "--spill-size", "64G", spill_dir=small_disk / "spill")


def pattern(n: int, size: int) -> bytes:
    """What tests/c/space.c writes into file number n."""
    period = bytes((i + n) % 251 for i in range(251))
    return (period * (size // 251 + 1))[:size]


def read_all(client: tfem.Client, name: str) -> bytes:
    with client.open(name, "r", wait=False) as f:
        return f.read()


def no_traceback(up) -> None:
    log = up.log()
    assert "Traceback" not in log and "broker error" not in log, log[-3000:]


# ---- a full disk ----


def test_a_full_disk_under_the_spill_store_is_no_space(up):
    with up.connect() as c:
        stored: dict[str, int] = {}
        for n in range(40):  # twice what the disk holds
            name = f"d/{n}"
            f = c.open(name, "w")
            try:
                f.write(content(name, FILE))
                f.close()
            except OSError as exc:
                f.abort()
                failure = exc
                break
            stored[name] = FILE
        else:
            pytest.fail("the 20 MiB disk never filled up")
        assert failure.errno == errno.ENOSPC and isinstance(failure, tfem.NoSpace), repr(failure)
        assert "spill store" in str(failure) and "full" in str(failure)
        assert len(stored) >= 3 and name not in c.list()
        assert c.stats()["spilled_files"] == len(stored)  # the failed file left nothing behind

        for name, size in stored.items():  # what was stored stays, byte for byte
            data = read_all(c, name)
            assert (len(data), sha256(data)) == (size, sha256(content(name, size))), name
        with c.open("d/after", "w") as f:  # room again: service resumes
            f.write(content("d/after", FILE))
        assert read_all(c, "d/after") == content("d/after", FILE)
        stats = c.stats()
        assert (stats["slots_used"], stats["spilled_bytes"]) == (0, 0)
    no_traceback(up)


def test_a_full_disk_is_enospc_for_c_callers(up, programs):
    result = run(programs["space"], "fill", "c", str(FILE), env=up.env)
    assert result.returncode == 0, result.stderr
    said = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    stored = int(said["stored"])
    assert said["failed"].split()[-1] == "ENOSPC", result.stdout + result.stderr
    assert stored >= 3
    with up.connect() as c:
        assert sorted(c.list()) == sorted(f"c/{n}" for n in range(stored))
        for n in range(stored):
            assert read_all(c, f"c/{n}") == pattern(n, FILE), n
        assert c.list() == []
    no_traceback(up)


# ---- holes ----


def test_a_write_at_1_tib_is_efbig_at_once_while_others_are_served(up):
    with up.connect() as c, up.connect() as other:
        took: list[float] = []
        stop = threading.Event()

        def serve_other() -> None:  # another client's handoffs, through the broker (spilled)
            while not stop.is_set():
                start = time.monotonic()
                with other.open("o/file", "w") as f:
                    f.write(content("o/file", 2 * MIB))
                assert read_all(other, "o/file") == content("o/file", 2 * MIB)
                took.append(time.monotonic() - start)

        thread = threading.Thread(target=serve_other)
        thread.start()
        try:
            f = c.open("h/hole", "w")
            f.write(b"head")
            f.seek(TIB)
            start = time.monotonic()
            with pytest.raises(OSError) as caught:
                f.write(b"x")
            elapsed = time.monotonic() - start
            time.sleep(0.5)
        finally:
            stop.set()
            thread.join(60)
        error = caught.value
        assert error.errno == errno.EFBIG, repr(error)
        assert type(error).__name__ == "FileTooLarge" and isinstance(error, tfem.NoSpace)
        assert "h/hole" in str(error) and "limit" in str(error)
        assert elapsed < 0.05, f"refused after {elapsed:.3f} s"
        assert took and max(took) < 2.0, took
        # Refused whole: the file is as it was, and the writer may go on.
        assert (f.tell(), c.stat("h/hole").size) == (TIB, 4)
        f.seek(4)
        f.write(b"tail")
        f.close()
        assert read_all(c, "h/hole") == b"headtail"
        assert c.stats()["spilled_bytes"] == 0
    no_traceback(up)


def test_a_write_at_1_tib_is_efbig_for_c_callers(up, programs):
    result = run(programs["space"], "hole", "c/hole", env=up.env)
    said = result.stdout.split()
    assert said[:2] == ["hole", "EFBIG"], result.stdout + result.stderr
    assert int(said[2]) < 50_000, f"refused after {said[2]} us"
    assert result.returncode == 0, result.stderr
    with up.connect() as c:
        assert read_all(c, "c/hole") == b"ok"
    no_traceback(up)


GAP = 4 << 30  # far below the limit (64 GiB of spill), far above the 20 MiB disk


def test_a_gap_in_a_spilled_file_is_not_stored(up, programs):
    head = content("g/py", 2 * MIB)
    size = len(head) + GAP + 1
    with up.connect() as c:
        start = time.monotonic()
        with c.open("g/py", "w") as f:
            f.write(head)  # past the 1 MiB arena: spilled
            f.seek(len(head) + GAP)
            f.write(b"!")
        wrote = time.monotonic() - start
        st = c.stat("g/py")
        assert (st.size, st.spilled) == (size, True)
        stored = c.stats()["spilled_bytes"]
        assert stored <= len(head) + RECORD_MAX, f"{stored} bytes stored for {len(head)} bytes and one"
        assert wrote < 5.0

        result = run(programs["space"], "gap", "g/c", str(2 * MIB), str(GAP), env=up.env)
        assert result.stdout.strip() == "gap OK", result.stdout + result.stderr
        assert c.stats()["spilled_bytes"] <= 2 * stored

        for name, first in (("g/py", head), ("g/c", pattern(0, 2 * MIB))):
            start = time.monotonic()
            with c.open(name, "r", wait=False) as f:  # checked at open: the gap's zeros too
                assert f.read(len(first)) == first
                f.seek(len(first) + GAP // 2)
                assert f.read(MIB) == bytes(MIB)
                f.seek(size - MIB - 1)
                assert f.read() == bytes(MIB) + b"!"
            assert time.monotonic() - start < 5.0
        stats = c.stats()
        assert (stats["slots_used"], stats["spilled_bytes"]) == (0, 0)
    no_traceback(up)
