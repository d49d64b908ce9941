"""A client used in a process that then forks.

Parent and child each keep working, each through a connection of its own
(the child's is made on its first call: it never touches the parent's
socket). A file the parent opened stays the parent's: the child cannot read
or write it (an error, not silent damage), its close lets go of its copy
only, and the parent finishes the file as if nothing happened.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import traceback

import pytest

import tfem
import tfem.posix

from tests._proc_tools import wait_until
from tests._tfem_worker import content, sha256

N = 20  # files each way


def exchange_as_child(client: tfem.Client, held_w: tfem.TfemFile, held_r: tfem.TfemFile) -> dict:
    """What a forked child does with its parent's client and files."""
    out: dict = {"pid": os.getpid(), "clients_seen": client.stats()["clients"]}
    for i in range(N):  # child -> parent
        with client.open(f"c2p/{i}", "w") as f:
            f.write(content(f"c2p/{i}", 3000 * i))
    got = []
    for i in range(N):  # parent -> child, published while this runs
        with client.open(f"p2c/{i}", "r", timeout=30) as f:
            got.append(sha256(f.read()) == sha256(content(f"p2c/{i}", 5000 * i)))
    out["p2c_ok"] = all(got)
    errors = {}
    for what, call in (("write", lambda: held_w.write(b"child was here")), ("read", lambda: held_r.read(10)),
                       ("seek", lambda: held_w.seek(0))):
        try:
            call()
            errors[what] = None
        except Exception as exc:
            errors[what] = (type(exc).__name__, getattr(exc, "errno", None))
    out["errors"] = errors
    held_w.close()  # lets go of the child's copy only
    held_r.close()
    out["held_states"] = [client.stat("held/w").state, client.stat("held/r").state]
    return out


def test_multiprocessing_fork_child_and_parent_both_keep_working(client):
    held_w = client.open("held/w", "w")
    held_w.write(content("held/w", 40_000)[:20_000])
    with client.open("held/r", "w") as f:
        f.write(content("held/r", 30_000))
    held_r = client.open("held/r", "r", wait=False)
    assert sha256(held_r.read(1000)) == sha256(content("held/r", 30_000)[:1000])
    clients_before = client.stats()["clients"]

    def child(conn) -> None:
        try:
            conn.send(exchange_as_child(client, held_w, held_r))
        except BaseException:
            conn.send({"failed": traceback.format_exc()})

    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=child, args=(child_end,))
    proc.start()
    try:
        for i in range(N):  # meanwhile the parent keeps working
            with client.open(f"p2c/{i}", "w") as f:
                f.write(content(f"p2c/{i}", 5000 * i))
        for i in range(N):
            with client.open(f"c2p/{i}", "r", timeout=30) as f:
                assert sha256(f.read()) == sha256(content(f"c2p/{i}", 3000 * i))
        assert parent_end.poll(60), "the child reported nothing"
        result = parent_end.recv()
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert "failed" not in result, result.get("failed")
    assert result["pid"] != os.getpid()
    assert result["clients_seen"] == clients_before + 1  # a connection of its own
    assert result["p2c_ok"]
    assert result["errors"] == {what: ("BadDescriptor", errno.EBADF) for what in ("write", "read", "seek")}
    assert result["held_states"] == ["WRITE", "READ"]  # the child's close touched nothing

    # The parent's files are the parent's, untouched.
    held_w.write(content("held/w", 40_000)[20_000:])
    held_w.close()
    assert sha256(held_r.read()) == sha256(content("held/r", 30_000)[1000:])
    held_r.close()
    with client.open("held/w", "r", wait=False) as f:
        assert sha256(f.read()) == sha256(content("held/w", 40_000))
    wait_until(lambda: client.stats()["clients"] == clients_before, 5, "the child's connection to be forgotten")
    assert client.list() == []


def test_os_fork_with_the_posix_calls(instance):
    """tfem_open descriptors across os.fork(): the child's are its own,
    the parent's are not valid in the child."""
    os.environ["TFEM_KEYFILE"] = str(instance.keyfile)
    try:
        tfem.posix._client = None
        fd = tfem.tfem_open("posix/parent", tfem.TFEM_WRONLY)
        tfem.tfem_write(fd, b"parent, before the fork; ")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            code = 1
            try:
                report = []
                try:
                    tfem.tfem_write(fd, b"child")
                    report.append("write worked")
                except tfem.BadDescriptor as exc:
                    report.append(f"write EBADF={exc.errno == errno.EBADF}")
                own = tfem.tfem_open("posix/child", tfem.TFEM_WRONLY)
                tfem.tfem_write(own, content("posix/child", 70_000))
                tfem.tfem_close(own)
                theirs = tfem.tfem_open("posix/from-parent", tfem.TFEM_RDONLY, timeout=30)
                report.append(f"read {tfem.tfem_read(theirs, 100).decode()}")
                tfem.tfem_close(theirs)
                report.append(f"clients {tfem.posix.default_client().stats()['clients']}")
                os.write(write_end, "|".join(report).encode())
                code = 0
            except BaseException:
                os.write(write_end, traceback.format_exc().encode())
            finally:
                os._exit(code)
        os.close(write_end)
        clients_parent = tfem.posix.default_client().stats()["clients"]
        tfem.tfem_write(fd, b"parent, after the fork")
        out = tfem.tfem_open("posix/from-parent", tfem.TFEM_WRONLY)
        tfem.tfem_write(out, b"hello child")
        tfem.tfem_close(out)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, report
        assert report.split("|") == ["write EBADF=True", "read hello child", f"clients {clients_parent + 1}"]
        tfem.tfem_close(fd)
        rfd = tfem.tfem_open("posix/parent", tfem.TFEM_RDONLY | tfem.TFEM_NONBLOCK)
        assert tfem.tfem_read(rfd, 1000) == b"parent, before the fork; parent, after the fork"
        tfem.tfem_close(rfd)
        rfd = tfem.tfem_open("posix/child", tfem.TFEM_RDONLY | tfem.TFEM_NONBLOCK)
        assert sha256(tfem.tfem_read(rfd, 100_000)) == sha256(content("posix/child", 70_000))
        tfem.tfem_close(rfd)
        assert tfem.posix.default_client().list() == []
    finally:
        if tfem.posix._client is not None:
            tfem.posix._client.close()
            tfem.posix._client = None
        del os.environ["TFEM_KEYFILE"]


def test_a_client_made_before_the_fork_is_not_closed_by_the_child(client):
    """A child that exits through the normal path (closing its copy of the
    client) leaves the parent's connection and files alone."""
    held = client.open("kept/by-parent", "w")
    held.write(b"0123456789")

    def child() -> None:
        client.close()  # the child's copy: never said hello, owns nothing

    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=child)
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    held.write(b"abcdef")
    held.close()
    with client.open("kept/by-parent", "r", wait=False) as f:
        assert f.read() == b"0123456789abcdef"
    with pytest.raises(tfem.NotFound):
        client.stat("kept/by-parent")
