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

import pytest

import tfem

try:  # tests/ may or may not be a package
    from ._proc_tools import small_disk, up_factory  # noqa: F401  (fixtures)
    from ._tfem_worker import MIB, content, sha256
    from .conftest import SMALL
    from .test_c_api import programs, run  # noqa: F401  (fixture)
except ImportError:
    from _proc_tools import small_disk, up_factory  # noqa: F401
    from _tfem_worker import MIB, content, sha256
    from conftest import SMALL
    from test_c_api import programs, run  # noqa: F401

CHUNK = 1 << 20  # the spill store's record (broker/spill.py)
FILE = 3 * MIB  # through SMALL's 1 MiB arena: spilled; six of them fill the 20 MiB disk


@pytest.fixture
def up(small_disk, up_factory):  # noqa: F811
    """SMALL, its spill store on the 20 MiB disk (64G of spill allowed:
    the disk fills long before the store's own limit)."""
    return up_factory(*SMALL, spill_dir=small_disk / "spill")


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


def test_a_full_disk_is_enospc_for_c_callers(up, programs):  # noqa: F811
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
