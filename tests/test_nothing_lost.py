"""Nothing lost when two key files share an ftok key, when the registry's
queue is removed under it, or when a server keeps crashing.

ftok keeps 16 bits of a key file's inode, so two key files on one file
system can share a queue key: each instance must keep its own queue and
never remove the other's. systemd's RemoveIPC=yes removes a user's queues
when the last login session ends: the registry must make its queue again.
A server that keeps crashing must never take the published files with it.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import sysv_ipc

from tfem._native import lib
from tfem.cli import MAX_RESTARTS
from tfem.discovery import ask_registry, queue_key
from tfem.keyfile import HEADER, registry_pid
from tfem.errors import TfemError
from tfem.protocol import Action

from tests._instances import SMALL
from tests._proc_tools import tfem_cli, wait_until
from tests.test_leftovers import FILES, kill_up, put_all, queue_id, read_all


def colliding_keyfiles(where: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Two files in `where` with the same ftok key: files are made until two
    inodes share their low 16 bits (by 65,537 distinct inodes at the latest),
    and the others removed."""
    where.mkdir()
    by_low_bits: dict[int, pathlib.Path] = {}
    pair = None
    try:
        for i in itertools.count():
            path = where / f"try{i}"
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            pair = by_low_bits.get(path.stat().st_ino & 0xFFFF), path
            if pair[0] is not None:
                break
            by_low_bits[path.stat().st_ino & 0xFFFF] = path
    finally:
        for path in by_low_bits.values():
            if pair is None or path != pair[0]:
                path.unlink()
    first, second = where / "first.key", where / "second.key"
    pair[0].rename(first)  # the same inodes, so the same key
    pair[1].rename(second)
    assert queue_key(first) == queue_key(second)
    return first, second


def client_works(up) -> bool:
    try:
        with up.connect() as c:
            return c.stats()["endpoint"] == up.names.endpoint
    except TfemError:
        return False


# ---- keys that never collide silently ----


def test_colliding_key_files_run_side_by_side(up_factory, tmp_path):
    first, second = colliding_keyfiles(tmp_path / "keys")
    one = up_factory(*SMALL, subdir="one", keyfile=first)
    two = up_factory(*SMALL, subdir="two", keyfile=second)
    registries = registry_pid(first), registry_pid(second)
    with one.connect() as a, two.connect() as b:
        assert (a.endpoint, b.endpoint) == (one.names.endpoint, two.names.endpoint)
        put_all(a, {f"one/{k}": v for k, v in FILES.items()})
        put_all(b, {f"two/{k}": v for k, v in FILES.items()})
    time.sleep(3)  # past a few of the registries' checks of their queues
    assert one.process.poll() is None and two.process.poll() is None, one.log() + two.log()
    assert (registry_pid(first), registry_pid(second)) == registries
    assert queue_key(first) != queue_key(second)  # the second took the next project id
    with one.connect() as a, two.connect() as b:
        assert (a.endpoint, b.endpoint) == (one.names.endpoint, two.names.endpoint)
        read_all(a, {f"one/{k}": v for k, v in FILES.items()})
        put_all(b, {"two/again": 10})

    # Clean on the second key file, its instance killed: only its own queue goes.
    first_queue = queue_id(first)
    kill_up(two)
    cleaned = tfem_cli("clean", "--keyfile", str(second))
    assert cleaned.returncode == 0, cleaned.stderr.decode()
    assert "registry queue" in cleaned.stdout.decode()
    assert queue_id(first) == first_queue
    with one.connect() as a:
        assert a.list() == []  # everything of one's was read above


def test_clean_of_a_colliding_key_file_leaves_the_live_queue(up_factory, tmp_path):
    first, second = colliding_keyfiles(tmp_path / "keys")
    one = up_factory(*SMALL, keyfile=first)
    with one.connect() as c:
        put_all(c, FILES)
    live_queue = queue_id(first)
    gone = subprocess.Popen(["true"])
    gone.wait()
    # What a killed instance of an earlier tfem left: a dead pid, no queue record.
    second.write_text(f"{HEADER}{gone.pid}\nsegment /tfem-gone\n")
    cleaned = tfem_cli("clean", "--keyfile", str(second))
    assert cleaned.returncode == 0, cleaned.stderr.decode()
    assert queue_id(first) == live_queue
    with one.connect() as c:
        read_all(c, FILES)


def test_a_queue_of_another_user_under_the_key_is_left_alone(up_factory, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("giving a queue to another user needs root")
    keyfile = tmp_path / "mine.key"
    keyfile.touch()
    theirs = sysv_ipc.MessageQueue(queue_key(keyfile), sysv_ipc.IPC_CREX, mode=0o600)
    try:
        theirs.uid = pwd.getpwnam("nobody").pw_uid
        up = up_factory(*SMALL, keyfile=keyfile)
        with up.connect() as c:
            put_all(c, FILES)
            read_all(c, FILES)
        assert sysv_ipc.MessageQueue(theirs.key).id == theirs.id  # still there, still theirs
        assert queue_key(keyfile) != theirs.key
    finally:
        try:
            theirs.remove()
        except sysv_ipc.ExistentialError:
            pass


AS_NOBODY = textwrap.dedent("""
    import os, pathlib, sys
    from tfem.keyfile import identity
    from tfem.registry.ownership import claim_queue
    keyfile = pathlib.Path(sys.argv[1])
    os.setgid(int(sys.argv[2]))
    os.setuid(int(sys.argv[2]))
    queue, project = claim_queue(keyfile, None, identity(keyfile, os.getpid()), 8192)
    queue.remove()
    print(project)
""")


def test_a_queue_another_user_keeps_from_us_means_the_next_project_id(tmp_path):
    """Not root, a registry cannot even open another user's queue (EACCES)."""
    if os.geteuid() != 0:
        pytest.skip("running as another user needs root")
    nobody = pwd.getpwnam("nobody").pw_uid
    public = pathlib.Path(tempfile.mkdtemp(prefix="tfem-test-"))  # tmp_path is closed to nobody
    try:
        public.chmod(0o755)
        keyfile = public / "theirs.key"
        keyfile.touch()
        os.chown(keyfile, nobody, -1)
        ours = sysv_ipc.MessageQueue(queue_key(keyfile), sysv_ipc.IPC_CREX, mode=0o600)
        try:
            claimed = subprocess.run([sys.executable, "-c", AS_NOBODY, str(keyfile), str(nobody)],
                                     capture_output=True, timeout=60)
            assert claimed.returncode == 0, claimed.stderr.decode()
            assert int(claimed.stdout) == ord("T") + 1
            assert sysv_ipc.MessageQueue(ours.key).id == ours.id
        finally:
            ours.remove()
    finally:
        shutil.rmtree(public)


# ---- surviving the removal of the queue ----


def test_removed_queue_is_made_again_and_nothing_is_lost(up_factory):
    up = up_factory(*SMALL)
    with up.connect() as c:
        put_all(c, FILES)
    registry = registry_pid(up.keyfile)
    took = []
    for n in range(MAX_RESTARTS + 2):  # as often as RemoveIPC=yes may within a minute
        sysv_ipc.MessageQueue(queue_key(up.keyfile)).remove()
        start = time.monotonic()
        wait_until(lambda: client_works(up), 10, f"a new client to work after removal {n + 1}", interval=0.05)
        took.append(round(time.monotonic() - start, 2))
    print(f"a new client worked {took} s after each removal")
    assert up.process.poll() is None, up.log()
    assert registry_pid(up.keyfile) == registry  # it noticed and made its queue again
    with up.connect() as c:
        read_all(c, FILES)


DEAD_ASKER = textwrap.dedent("""
    import os, sys, sysv_ipc
    from tfem import protocol
    from tfem.discovery import queue_key
    queue = sysv_ipc.MessageQueue(queue_key(__import__("pathlib").Path(sys.argv[1])))
    for i in range(int(sys.argv[2])):
        body = protocol.encode_registry_request(protocol.RegistryRequest(i, protocol.Action.LIST, os.getpid(), {}))
        queue.send(body, type=protocol.REGISTRY_REQUEST_TYPE)
""")  # and exits without reading a reply


def test_replies_to_dead_askers_are_drained(up_factory):
    up = up_factory(*SMALL)
    asker = subprocess.run([sys.executable, "-c", DEAD_ASKER, str(up.keyfile), "20"], capture_output=True)
    assert asker.returncode == 0, asker.stderr.decode()
    queue = sysv_ipc.MessageQueue(queue_key(up.keyfile))
    wait_until(lambda: queue.current_messages == 0, 10, "the replies nobody reads to be drained")
    assert client_works(up)


# ---- a restart limit that keeps data ----


def serving_registry(up, not_in: list[int]) -> int | None:
    pid = registry_pid(up.keyfile)
    if pid is None or pid in not_in:
        return None
    try:
        ask_registry(up.keyfile, Action.LIST, timeout=1.0)
    except TfemError:
        return None
    return pid


def test_a_registry_that_keeps_crashing_never_takes_the_data(up_factory):
    up = up_factory(*SMALL)
    with up.connect() as keeper:
        put_all(keeper, FILES)
        broker = keeper.stats()["broker_pid"]
        killed: list[int] = []
        for n in range(MAX_RESTARTS + 2):
            pid = wait_until(lambda: serving_registry(up, killed), 60, f"registry {n + 1} to serve", interval=0.05)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        assert up.process.poll() is None, up.log()
        assert keeper.stats()["broker_pid"] == broker  # the broker served on
        wait_until(lambda: serving_registry(up, killed), 60, "the registry to come back", interval=0.1)
    start = time.monotonic()
    wait_until(lambda: client_works(up), 10, "a new client to work", interval=0.05)  # the broker announces again
    print(f"a new client worked {time.monotonic() - start:.2f} s after the registry came back")
    with up.connect() as c:
        assert c.stats()["broker_pid"] == broker
        read_all(c, FILES)


def live_broker(up, not_in: list[int]) -> int | None:
    pid = up.names.read_state().get("broker_pid")
    return pid if isinstance(pid, int) and pid not in not_in and lib.tfem_pid_alive(pid) else None


def test_a_broker_that_keeps_crashing_leaves_its_data_for_the_next_up(up_factory):
    up = up_factory(*SMALL)
    with up.connect() as c:
        put_all(c, FILES)
    killed: list[int] = []
    for n in range(MAX_RESTARTS + 1):
        pid = wait_until(lambda: live_broker(up, killed), 60, f"broker {n + 1} to serve", interval=0.05)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    assert up.process.wait(30) == 1
    assert "keeps exiting" in up.log() and "data is kept" in up.log(), up.log()
    assert f"segment {up.names.segment}" in up.leftovers()

    up.start()  # the same key file: it adopts what was kept
    with up.connect() as c:
        assert c.stats()["recovery"]["kept"] == len(FILES)
        read_all(c, FILES)


# ---- everything found from the key file alone ----


def test_clean_from_another_runtime_directory(up_factory, tmp_path, monkeypatch):
    job_runtime, shell_runtime = tmp_path / "job-run", tmp_path / "shell-run"
    for d in (job_runtime, shell_runtime):
        d.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(job_runtime))
    up = up_factory(*SMALL, subdir="job")
    with up.connect() as c:
        put_all(c, FILES)
    kill_up(up)
    assert up.leftovers() and up.names.state_path.exists()

    cleaned = tfem_cli("clean", "--keyfile", str(up.keyfile),
                       env=dict(os.environ, XDG_RUNTIME_DIR=str(shell_runtime)))
    assert cleaned.returncode == 0, cleaned.stderr.decode()
    assert up.leftovers() == []
    assert not up.names.state_path.exists()


def test_a_key_file_read_while_it_is_rewritten_is_read_whole(tmp_path: pathlib.Path) -> None:
    """A registry rewrites its key file in place (its inode is part of the
    key): truncated, then written. A reader at that instant must get the
    record, not an empty or half file (a half one could name the wrong
    project id)."""
    from tfem import keyfile

    path = tmp_path / "tfem.key"
    record = keyfile.KeyRecord(pid=os.getpid(), segment="/tfem-rewritten", project=91, queue=7,
                               runtime=str(tmp_path))
    keyfile.write_record(path, record)
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time
        from tfem import keyfile
        record = keyfile.read_record(pathlib.Path({str(path)!r}))
        print("ready", flush=True)
        while True:  # a thousand times a second: a registry does it once at start
            keyfile.write_record(pathlib.Path({str(path)!r}), record)
            time.sleep(0.001)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "ready\n"
        reads = [keyfile.read_record(path) for _ in range(3000)]
    finally:
        writer.kill()
        writer.wait()
    assert reads.count(record) == len(reads), f"{len(reads) - reads.count(record)} of {len(reads)} reads were wrong"
