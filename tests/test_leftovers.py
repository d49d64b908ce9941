"""What a killed instance leaves, and what happens to it next.

SIGKILL of `tfem up` takes its servers with it (they asked the kernel to,
PR_SET_PDEATHSIG) and leaves the registry queue, the segment, the socket,
the spill store and the state file. The next `tfem up` with the same key file
adopts the data and replaces the stale queue and socket; `tfem clean`
instead removes all of it, data included, and only for its own key file,
even while another instance runs beside it.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import sysv_ipc

import tfem
import tfem.config
from tfem.discovery import queue_key
from tfem.keyfile import registry_pid

from tests._instances import SMALL
from tests._proc_tools import pid_gone, tfem_cli, wait_until
from tests._tfem_worker import KIB, MIB, content, sha256

FILES = {"l/empty": 0, "l/inline": 900, "l/blocks": 70_000, "l/spilled": MIB + 200 * KIB}


def put_all(client: tfem.Client, files: dict[str, int]) -> None:
    for name, size in files.items():
        with client.open(name, "w") as f:
            f.write(content(name, size))


def read_all(client: tfem.Client, files: dict[str, int]) -> None:
    for name, size in files.items():
        with client.open(name, "r", wait=False) as f:
            assert sha256(f.read()) == sha256(content(name, size)), name


def queue_id(keyfile, key: int | None = None) -> int | None:
    """The id of the key file's queue (or of the queue of `key`), if any."""
    try:
        return sysv_ipc.MessageQueue(queue_key(keyfile) if key is None else key).id
    except sysv_ipc.ExistentialError:
        return None


def kill_up(up) -> list[int]:
    """SIGKILL `tfem up`; wait for its servers to die with it."""
    with up.connect() as c:
        broker = c.stats()["broker_pid"]
    registry = registry_pid(up.keyfile)
    up.process.send_signal(signal.SIGKILL)
    up.process.wait(30)
    for pid in (broker, registry):
        wait_until(lambda: pid_gone(pid), 30, f"server {pid} to die with tfem up")
    return [broker, registry]


def test_the_next_up_adopts_what_a_killed_up_left(up_factory):
    up = up_factory(*SMALL)
    keeper = up.connect()  # a producer that outlives the instance
    put_all(keeper, FILES)
    held = keeper.open("l/held", "w")
    held.write(content("l/held", 5000))
    assert keeper.stat("l/spilled").spilled
    old_queue = queue_id(up.keyfile)
    old_socket = os.stat(up.names.socket_path).st_ctime_ns
    old_servers = kill_up(up)

    # What is left: queue, segment, socket, spill store, and the pids of the dead.
    assert sorted(up.leftovers()) == sorted([f"segment {up.names.segment}", f"socket {up.names.socket_path}",
                                             "registry queue", "spill store"])
    assert registry_pid(up.keyfile) == old_servers[1]
    with pytest.raises(tfem.BrokerUnavailable, match="not running"):
        up.connect()

    up.start()  # the same key file, the same options
    try:
        _adopted(up, keeper, held, old_queue, old_socket, old_servers)
    finally:
        keeper.close()


def _adopted(up, keeper, held, old_queue, old_socket, old_servers) -> None:
    assert queue_id(up.keyfile) not in (None, old_queue)  # a new queue, not the stale one
    assert os.stat(up.names.socket_path).st_ctime_ns != old_socket  # made anew
    assert registry_pid(up.keyfile) not in old_servers
    with up.connect() as c:
        stats = c.stats()
        assert stats["broker_pid"] not in old_servers
        assert stats["recovery"]["kept"] == len(FILES) + 1, stats["recovery"]
        assert sorted(c.list()) == sorted([*FILES, "l/held"])
        # The producer that outlived its instance finishes its file on the new one.
        held.write(content("l/held", 300_000)[5000:])
        held.close()
        assert keeper.stats()["broker_pid"] == stats["broker_pid"]  # and its client carries on
        read_all(c, dict(FILES, **{"l/held": 300_000}))
        stats = c.stats()
        assert (stats["slots_used"], stats["arena_bytes_used"], stats["spilled_bytes"]) == (0, 0, 0)


def test_clean_removes_everything_of_its_key_file_and_nothing_else(up_factory, tmp_path):
    other = up_factory(*SMALL, subdir="other")  # runs beside it all along
    with other.connect() as c:
        put_all(c, {f"other/{k}": v for k, v in FILES.items()})
        other_broker = c.stats()["broker_pid"]
    other_registry, other_queue = registry_pid(other.keyfile), queue_id(other.keyfile)

    # A custom spill directory that also holds a file of the user's.
    up = up_factory(*SMALL, subdir="killed")
    with up.connect() as c:
        put_all(c, FILES)
    mine = up.spill_dir / "notes.txt"
    mine.write_text("not tfem's")
    assert json.loads(up.names.state_path.read_text())["spill_dir"] == str(up.spill_dir)
    key = queue_key(up.keyfile)
    kill_up(up)
    assert up.leftovers()

    # While a server of the key file runs, clean refuses.
    refused = tfem_cli("clean", "--keyfile", str(other.keyfile))
    assert refused.returncode == 1 and "is running" in refused.stderr.decode()

    cleaned = tfem_cli("clean", "--keyfile", str(up.keyfile))
    assert cleaned.returncode == 0, cleaned.stderr.decode()
    for what in ("registry queue", "segment", "socket", "spill store"):
        assert what in cleaned.stdout.decode()
    assert up.leftovers() == []
    assert queue_id(None, key) is None and not up.names.state_path.exists()
    assert not up.keyfile.exists()  # the registry made it, so it goes too
    assert not (up.spill_dir / "data.mdb").exists() and mine.read_text() == "not tfem's"
    assert tfem_cli("clean", "--keyfile", str(up.keyfile)).stdout.decode().strip() == "nothing to clean"

    # The data went with it: the next instance of that key file starts empty.
    up.start()
    with up.connect() as c:
        stats = c.stats()
        assert c.list() == [] and stats["recovery"] is None and stats["spilled_files"] == 0

    # The other instance never noticed.
    assert (registry_pid(other.keyfile), queue_id(other.keyfile)) == (other_registry, other_queue)
    with other.connect() as c:
        assert c.stats()["broker_pid"] == other_broker
        read_all(c, {f"other/{k}": v for k, v in FILES.items()})


def test_clean_refuses_while_the_broker_outlives_its_registry(tmp_path, servers):
    keyfile, spill = tmp_path / "half.key", tmp_path / "spill"
    servers.track(keyfile)
    registry = servers.start("registry", "--keyfile", str(keyfile))
    broker = servers.start("broker", "--keyfile", str(keyfile), "--spill-dir", str(spill), *SMALL)
    with tfem.connect(keyfile) as c:
        put_all(c, {"h/blocks": 50_000})
    registry.kill()
    registry.wait()

    refused = tfem_cli("clean", "--keyfile", str(keyfile))
    assert refused.returncode == 1
    assert f"broker of {keyfile} (pid {broker.pid}) is running" in refused.stderr.decode()
    with tfem.connect(broker=f"ipc://{tfem.config.Instance.for_keyfile(keyfile).socket_path}") as c:
        read_all(c, {"h/blocks": 50_000})  # untouched, still served

    broker.kill()
    broker.wait()
    cleaned = tfem_cli("clean", "--keyfile", str(keyfile))
    assert cleaned.returncode == 0, cleaned.stderr.decode()
    assert not (spill / "data.mdb").exists()
    assert not os.path.exists(f"/dev/shm{tfem.config.Instance.for_keyfile(keyfile).segment}")
