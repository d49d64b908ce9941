"""The C API: real C programs compiled with gcc against libtfem.so, run
against a live instance, handing files to and from Python."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests._c_programs import expected, run
from tests._instances import SMALL
from tests._proc_tools import wait_until


def test_c_to_c(instance, programs):
    consumer = subprocess.Popen([str(programs["consumer"]), "50", "70000", "cc"],
                                env={"PATH": "/usr/bin:/bin", "TFEM_KEYFILE": str(instance.keyfile)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        produced = run(programs["producer"], "50", "70000", "cc", env=instance.env)
        out, err = consumer.communicate(timeout=120)
    finally:
        consumer.kill()
    assert produced.returncode == 0, produced.stderr
    assert consumer.returncode == 0, err
    assert "read 50 files, 0 with wrong bytes" in out


def test_c_producer_python_consumer(instance, programs, client):
    produced = run(programs["producer"], "20", "3000", "cp", env=instance.env)
    assert produced.returncode == 0, produced.stderr
    for n in range(20):
        name = f"cp/{n}"
        with client.open(name, "r", timeout=10) as f:
            assert f.read() == expected(name, 3000)
    assert client.list() == []


def test_python_producer_c_consumer(instance, programs, client):
    size = 1_500_000  # past the 1 MiB arena: part of the files spill
    for n in range(3):
        name = f"pc/{n}"
        with client.open(name, "w") as f:
            f.write(expected(name, size))
    consumed = run(programs["consumer"], "3", str(size), "pc", env=instance.env)
    assert consumed.returncode == 0, consumed.stderr
    assert "read 3 files, 0 with wrong bytes" in consumed.stdout


def test_threads(instance, programs):
    result = run(programs["threads"], "8", "40", "5000", env=instance.env)
    assert result.returncode == 0, result.stderr
    assert "8 threads x 40 files, 0 failures" in result.stdout


def test_fork_while_threads_call(instance, programs, client):
    result = run(programs["fork"], "20", env=instance.env, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "20 forks, 0 failures" in result.stdout
    assert client.list() == []


EXPECTED_ERRNO = {
    "open-missing-nonblock": "ENOENT",
    "stat-missing": "ENOENT",
    "unlink-missing": "ENOENT",
    "open-timeout": "ETIMEDOUT",
    "open-writer": "OK",
    "open-existing-for-write": "EEXIST",
    "open-being-written-nonblock": "EAGAIN",
    "read-on-write-fd": "EBADF",
    "write-null-buffer": "EFAULT",
    "write-huge-count": "EINVAL",
    "lseek-negative": "EINVAL",
    "lseek-bad-whence": "EINVAL",
    "write": "OK",
    "fstat-null": "EFAULT",
    "close-writer": "OK",
    "close-again": "EBADF",
    "write-closed": "EBADF",
    "open-reader": "OK",
    "write-on-read-fd": "EBADF",
    "read-null-buffer": "EFAULT",
    "close-reader": "OK",
    "read-bad-fd": "EBADF",
    "write-negative-fd": "EBADF",
    "lseek-bad-fd": "EBADF",
    "close-bad-fd": "EBADF",
    "open-bad-flags": "EINVAL",
    "open-null-name": "EFAULT",
    "stat-null": "EFAULT",
    "open-empty-name": "EINVAL",
    "open-long-name": "ENAMETOOLONG",
    "open-not-utf8": "EINVAL",
    "fill-slots": "OK",
    "open-table-full": "ENOSPC",
}


NO_PYTHON = "/nonexistent/python3"  # TFEM_PYTHON: the embedded runtime cannot start


@pytest.mark.parametrize("python", ["available", "unavailable"])
def test_errno_cases(instance_factory, programs, python):
    inst = instance_factory("--slots", "2", *SMALL[2:])
    env = inst.env if python == "available" else {**inst.env, "TFEM_PYTHON": NO_PYTHON}
    result = run(programs["errno_cases"], env=env)
    assert result.returncode == 0, result.stderr
    got = dict(line.split(" ", 1) for line in result.stdout.splitlines() if not line.startswith("read-bytes"))
    assert got == EXPECTED_ERRNO
    assert "read-bytes 5 hello" in result.stdout
    with inst.connect() as c:  # the instance still serves, and nothing is left held
        assert c.list() == []


def test_no_server_is_econnrefused(tmp_path, programs):
    result = run(programs["errno_cases"], "noserver", env={"TFEM_KEYFILE": str(tmp_path / "none.key")})
    assert result.stdout.strip() == "open-no-server ECONNREFUSED"


def test_memory_files_need_no_interpreter(instance, programs, client):
    """Every call on files that fit in memory is C: with the Python runtime
    made unavailable, a C producer and consumer still hand over files that
    fill arena blocks. Only a file that must spill needs the broker's
    protocol, and then the error says why."""
    env = {**instance.env, "TFEM_PYTHON": NO_PYTHON}
    produced = run(programs["producer"], "10", "70000", "np", env=env)
    assert produced.returncode == 0, produced.stderr
    assert "Python" not in produced.stderr
    consumed = run(programs["consumer"], "10", "70000", "np", env=env)
    assert consumed.returncode == 0, consumed.stderr
    assert "read 10 files, 0 with wrong bytes" in consumed.stdout
    assert client.list() == []

    big = run(programs["producer"], "1", str(3 << 20), "big", env=env)  # 3 MiB through a 1 MiB arena
    assert big.returncode == 1
    assert "libtfem: " in big.stderr  # why the runtime could not serve: on stderr
    assert "write big/0: Function not implemented" in big.stderr
    # The producer exited holding the file: the broker's sweep drops it.
    wait_until(lambda: client.list() == [], timeout=10, what="the dead producer's file dropped")
    assert client.stats()["arena_bytes_used"] == 0


def test_a_waiting_c_consumer_follows_a_replaced_segment(instance, programs, client):
    """The segment's name removed under a C program waiting for a file: it
    maps the segment the broker made again and reads the file there."""
    first = "mv/0"
    with client.open(first, "w") as f:
        f.write(expected(first, 3000))
    consumer = subprocess.Popen([str(programs["consumer"]), "2", "3000", "mv"],
                                env={"PATH": "/usr/bin:/bin", "TFEM_KEYFILE": str(instance.keyfile)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        header = client.segment.header
        wait_until(lambda: not client.list() and any(header.wake_waiters), 10, "the consumer to wait for mv/1")
        path = "/dev/shm" + instance.names.segment
        before = os.stat(path).st_ino
        os.unlink(path)
        wait_until(lambda: os.path.exists(path) and os.stat(path).st_ino != before, 10, "a new segment")
        with instance.connect() as new:
            with new.open("mv/1", "w") as f:
                f.write(expected("mv/1", 3000))
        out, err = consumer.communicate(timeout=60)
    finally:
        consumer.kill()
        consumer.wait()
    assert consumer.returncode == 0, err
    assert "read 2 files, 0 with wrong bytes" in out
