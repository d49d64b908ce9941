"""IPC removed under a running instance: what systemd's RemoveIPC=yes does
to a user's POSIX shared memory when the last login session ends, or a
careless `rm /dev/shm/tfem-*`, or a cleaner of /run that takes the socket.

The broker notices within a few seconds and makes what is missing again:
the socket is bound anew; the segment is made anew and every file in the
old one moves into it, those published while the move runs included. Old
clients carry on, new clients connect, and no file is lost.
"""

from __future__ import annotations

import os

import tfem

from tests._instances import RunningInstance
from tests._proc_tools import wait_until
from tests._tfem_worker import KIB, MIB, content

NOTICE_S = 10  # the broker looks every 2 s; room for a loaded machine

# Inline, one block, several blocks, and larger than the 1 MiB arena (spilled).
SIZES = {"empty": 0, "inline": 300, "block": 3 * KIB, "blocks": 40 * KIB, "spilled": 3 * MIB}


def publish_all(client: tfem.Client, prefix: str) -> dict[str, bytes]:
    files = {}
    for label, size in SIZES.items():
        name = f"{prefix}/{label}"
        files[name] = content(name, size)
        with client.open(name, "w") as f:
            f.write(files[name])
    return files


def read_all(client: tfem.Client, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with client.open(name, "r", timeout=10) as f:
            assert f.read() == data, f"{name} changed"


def inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def test_a_removed_socket_is_bound_again(instance: RunningInstance) -> None:
    with instance.connect() as old:
        files = publish_all(old, "sock")
        path = str(instance.names.socket_path)
        before = inode(path)
        os.unlink(path)
        wait_until(lambda: inode(path) not in (None, before), NOTICE_S, "the socket to be bound again")
        with instance.connect() as new:
            read_all(new, files)
        with old.open("sock/after", "w") as f:  # the old connection works on
            f.write(b"still here")
        with old.open("sock/after", "r") as f:
            assert f.read() == b"still here"


def test_a_removed_segment_is_made_again_with_every_file(instance: RunningInstance) -> None:
    path = "/dev/shm" + instance.names.segment
    with instance.connect() as old:
        files = publish_all(old, "seg")
        in_flight = old.open("seg/in-flight", "w")  # a writer the move overtakes
        in_flight.write(content("seg/in-flight", 20 * KIB))
        with old.open("seg/kept", "w", keep=True, ttl=3600) as f:  # lifetimes move with their files
            f.write(b"kept")
        with old.open("seg/three", "w", readers=3) as f:
            f.write(b"three")
        with old.open("seg/three") as f:
            f.read()
        expires = old.stat("seg/kept").expires
        before = inode(path)
        os.unlink(path)
        wait_until(lambda: inode(path) not in (None, before), NOTICE_S, "a new segment")
        in_flight.write(b"tail")
        in_flight.close()
        files["seg/in-flight"] = content("seg/in-flight", 20 * KIB) + b"tail"
        with old.open("seg/old-client", "w") as f:  # an old client's new file lands in the new segment
            f.write(b"written after the move")
        files["seg/old-client"] = b"written after the move"
        with instance.connect() as new:
            wait_until(lambda: new.stat("seg/three").readers_left == 2, NOTICE_S, "the move of seg/three")
            st = new.stat("seg/kept")
            assert (st.lifetime, st.expires) == ("keep", expires)
            read_all(new, {"seg/three": b"three"} | files)
            assert new.stat("seg/three").readers_left == 1
            read_all(new, {"seg/three": b"three"})
            new.unlink("seg/kept")
            assert new.list() == []
            assert new.stats()["spilled_files"] == 0, "a moved spilled file left its records"


def test_waiting_consumers_and_views_follow_a_replaced_segment(instance: RunningInstance) -> None:
    import threading

    path = "/dev/shm" + instance.names.segment
    got: list[bytes] = []
    with instance.connect() as old:
        with old.create("seg/whole", 8 * KIB) as f:  # made whole for views: whole again after the move
            f.getbuffer()[:] = content("seg/whole", 8 * KIB)
        waiter = threading.Thread(target=lambda: got.append(old.open("seg/later", "r", timeout=30).read()))
        waiter.start()
        header = old.segment.header
        wait_until(lambda: any(header.wake_waiters), 5, "the consumer to sleep")
        before = inode(path)
        os.unlink(path)
        wait_until(lambda: inode(path) not in (None, before), NOTICE_S, "a new segment")
        with instance.connect() as new:
            with new.open("seg/later", "w") as f:
                f.write(b"published in the new segment")
            waiter.join(30)
            assert got == [b"published in the new segment"]
            with new.open("seg/whole", "r", timeout=10) as f:
                view = f.getbuffer()
                assert view == content("seg/whole", 8 * KIB)
                view.release()
        assert old.list() == []
