"""The `tfem` command line, run as a user runs it: every command in a real
process against a real instance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import sysv_ipc

import tfem
from tfem.config import Instance
from tfem.discovery import queue_key
from tfem.keyfile import registry_pid

from tests._instances import SMALL, leftovers
from tests._proc_tools import pid_gone, stop_server, tfem_cli, wait_until
from tests._tfem_worker import KIB, MIB, content


def out(result):
    return result.stdout.decode()


def err(result):
    return result.stderr.decode()


def assert_clear_failure(result, code, *phrases):
    """Failed with `code`, saying why on stderr, without a traceback."""
    assert result.returncode == code, (result.returncode, err(result))
    assert "Traceback" not in err(result), err(result)
    for phrase in phrases:
        assert phrase in err(result), err(result)


def queue_exists(key):
    try:
        sysv_ipc.MessageQueue(key)
        return True
    except sysv_ipc.ExistentialError:
        return False


# ---- help ----

HELP = {
    "up": ["--keyfile", "--slots", "--buf-size", "--block-size", "--memory", "--spill-dir", "--spill-size",
           "--no-spill", "--keep", "--broker-mode", "--ready-fd", "COMMAND", "SIGTERM"],
    "registry": ["--keyfile", "--ready-fd"],
    "broker": ["--keyfile", "--slots", "--buf-size", "--block-size", "--memory", "--spill-dir", "--no-spill",
               "--broker-mode", "--endpoint", "--ready-fd"],
    "put": ["--keyfile", "LOCAL", "NAME", "standard input"],
    "get": ["--keyfile", "NAME", "LOCAL", "--timeout", "--no-wait", "standard output"],
    "ls": ["--keyfile", "prefix", "-l", "--long"],
    "stat": ["--keyfile", "name", "--json"],
    "rm": ["--keyfile", "names"],
    "status": ["--keyfile", "--json"],
    "clean": ["--keyfile"],
}


def test_every_command_has_help():
    runs = {command: subprocess.Popen([sys.executable, "-m", "tfem", command, "--help"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for command in HELP}
    top = tfem_cli("--help")
    assert top.returncode == 0
    for command in HELP:
        assert command in out(top)
    for command, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, (command, stderr.decode())
        text = " ".join(stdout.decode().split())  # argparse wraps lines
        assert text.startswith(f"usage: tfem {command}"), text
        for word in HELP[command]:
            assert word in text, f"`tfem {command} --help` does not mention {word}"


def test_no_command_is_a_usage_error():
    result = tfem_cli()
    assert result.returncode == 2
    assert "usage:" in err(result)


# ---- put and get ----


@pytest.mark.parametrize("size", [0, 100_000, 3_000_000])
def test_put_get_round_trip(instance, tmp_path, size):
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = content(f"cli/{size}", size)
    src.write_bytes(data)
    instance.tfem("put", str(src), "cli/file")
    st = json.loads(out(instance.tfem("stat", "--json", "cli/file")))
    assert st["size"] == size and st["state"] == "WAIT"
    assert st["spilled"] == (size > MIB)
    instance.tfem("get", "cli/file", str(dst))
    assert dst.read_bytes() == data
    assert out(instance.tfem("ls")) == ""


def test_put_several_with_a_prefix_and_get_them_into_a_directory(instance, tmp_path):
    local = {}
    for name, size in (("a", 10), ("b", 20 * KIB), ("c", 0)):
        local[name] = tmp_path / name
        local[name].write_bytes(content(name, size))
    instance.tfem("put", *(str(p) for p in local.values()), "run/")
    assert out(instance.tfem("ls")).split() == ["run/a", "run/b", "run/c"]
    assert out(instance.tfem("ls", "run/b")).split() == ["run/b"]
    assert out(instance.tfem("ls", "nope/")) == ""

    dest = tmp_path / "dest"
    dest.mkdir()
    instance.tfem("get", "run/a", "run/b", "run/c", str(dest))
    for name, path in local.items():
        assert (dest / "run" / name).read_bytes() == path.read_bytes()
    assert out(instance.tfem("ls")) == ""


def test_put_several_needs_a_prefix_and_get_several_needs_a_directory(instance, tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    bad = instance.tfem("put", str(tmp_path / "a"), str(tmp_path / "b"), "noslash", check=False)
    assert_clear_failure(bad, 1, "ending in /")
    assert out(instance.tfem("ls")) == ""
    instance.tfem("put", str(tmp_path / "a"), str(tmp_path / "b"), "p/")
    bad = instance.tfem("get", "p/a", "p/b", str(tmp_path / "not-a-dir"), check=False)
    assert_clear_failure(bad, 1, "must be a directory")
    assert out(instance.tfem("ls")).split() == ["p/a", "p/b"]  # nothing consumed


def test_put_of_a_missing_local_file_leaves_nothing(instance, tmp_path):
    bad = instance.tfem("put", str(tmp_path / "absent"), "x", check=False)
    assert_clear_failure(bad, 1, "tfem put:", "No such file", "absent")
    assert out(instance.tfem("ls")) == ""


def test_get_that_cannot_write_locally_leaves_the_file(instance, tmp_path):
    instance.tfem("put", "-", "kept", input=b"do not lose me")
    bad = instance.tfem("get", "kept", str(tmp_path / "no" / "such" / "dir"), check=False)
    assert_clear_failure(bad, 1, "tfem get:", "No such file")
    assert out(instance.tfem("ls", "-l")).split() == ["WAIT", "14", "kept"]  # given back, not consumed
    assert instance.tfem("get", "kept", "-").stdout == b"do not lose me"


def test_stdin_and_stdout(instance):
    data = content("pipe", 200_000)
    instance.tfem("put", "-", "piped", input=data)
    assert json.loads(out(instance.tfem("stat", "--json", "piped")))["size"] == len(data)
    got = instance.tfem("get", "piped", "-")
    assert got.stdout == data
    assert out(instance.tfem("ls")) == ""
    instance.tfem("put", "-", "empty", input=b"")
    assert instance.tfem("get", "empty", "-").stdout == b""


def test_client_closes_while_a_chunk_view_is_still_referenced(client):
    """What `tfem get` does: the last view from chunks() is still referenced
    when the client closes (it once failed with BufferError)."""
    with client.open("view", "w") as f:
        f.write(content("view", 50_000))
    with client.open("view") as f:
        chunks = list(f.chunks(10_000))
    assert b"".join(chunks) == content("view", 50_000)
    client.close()
    assert bytes(chunks[-1]) == content("view", 50_000)[-len(chunks[-1]):]


def test_get_waits_for_a_file_put_later(instance, tmp_path):
    dst = tmp_path / "late"
    getter = subprocess.Popen([sys.executable, "-m", "tfem", "get", "--timeout", "30", "late", str(dst)],
                              env=instance.env, stderr=subprocess.PIPE)
    try:
        instance.tfem("put", "-", "late", input=b"worth the wait")
        assert getter.wait(30) == 0, getter.stderr.read().decode()
    finally:
        getter.kill()
        getter.wait()
        getter.stderr.close()
    assert dst.read_bytes() == b"worth the wait"


def test_get_no_wait_on_a_missing_name(instance, tmp_path):
    result = instance.tfem("get", "--no-wait", "missing", str(tmp_path / "x"), check=False)
    assert_clear_failure(result, 1, "tfem get:", "missing")
    assert not (tmp_path / "x").exists()
    start = time.monotonic()
    result = instance.tfem("get", "--timeout", "0.5", "missing", "-", check=False)
    assert_clear_failure(result, 1, "within 0.5 s")
    assert time.monotonic() - start < 10
    assert result.stdout == b""


# ---- ls, stat, rm, status ----


def test_ls_long_and_stat(instance, client):
    with client.open("w/done", "w") as f:
        f.write(content("w/done", 5000))
    writing = client.open("w/writing", "w")
    writing.write(b"abc")
    try:
        lines = [line.split() for line in out(instance.tfem("ls", "-l")).splitlines()]
        assert lines == [["WAIT", "5000", "w/done"], ["WRITE", "3", "w/writing"]]
        text = out(instance.tfem("stat", "w/done"))
        assert "name:    w/done" in text
        assert "size:    5000" in text
        assert "state:   WAIT" in text
        assert "spilled: no" in text
        st = json.loads(out(instance.tfem("stat", "--json", "w/writing")))
        assert set(st) == {"name", "size", "state", "created", "spilled", "slot", "readers", "readers_left",
                           "holders", "expires", "lifetime"}
        assert (st["name"], st["size"], st["state"], st["spilled"]) == ("w/writing", 3, "WRITE", False)
        assert (st["lifetime"], st["readers_left"], st["expires"]) == ("once", 1, None)
        assert abs(st["created"] - time.time()) < 60
        assert "life:    once, 0 reading now" in text
    finally:
        writing.close()
    with client.open("w/kept", "w", keep=True, ttl=3600) as f:
        f.write(b"k")
    reading = client.open("w/kept")
    text = out(instance.tfem("stat", "w/kept"))
    reading.close()
    client.unlink("w/kept")
    assert "state:   SHARED" in text and "life:    keep, 1 reading now" in text and "expires: " in text
    missing = instance.tfem("stat", "nothing", check=False)
    assert_clear_failure(missing, 1, "nothing")


def test_rm(instance, client):
    for name in ("r/1", "r/2", "r/3"):
        with client.open(name, "w") as f:
            f.write(content(name, 10_000))
    instance.tfem("rm", "r/1", "r/2")
    assert client.list() == ["r/3"]
    result = instance.tfem("rm", "r/3", "r/missing", check=False)
    assert_clear_failure(result, 1, "r/missing")
    assert client.list() == []  # the existing one went anyway
    assert client.stats()["arena_bytes_used"] == 0


STATUS_KEYS = {"slots_used", "slots_free", "arena_bytes_used", "arena_bytes_free", "spilled_bytes",
               "files_by_state", "requests_served"}


def test_status(instance, client):
    with client.open("s/big", "w") as f:  # spills itself: larger than the arena
        f.write(content("s/big", 2 * MIB))
    with client.open("s/mem", "w") as f:
        f.write(content("s/mem", 100_000))
    text = out(instance.tfem("status"))
    for word in ("slots", "arena", "spill", "requests", "2 used"):
        assert word in text, text
    stats = json.loads(out(instance.tfem("status", "--json")))
    assert STATUS_KEYS <= set(stats)
    assert stats["slots_used"] == 2
    assert stats["slots_free"] == 254
    assert stats["files_by_state"] == {"WRITE": 0, "WAIT": 2, "READ": 0, "SHARED": 0}
    assert 100_000 - KIB <= stats["arena_bytes_used"] < 200_000
    assert stats["arena_bytes_used"] + stats["arena_bytes_free"] == MIB
    assert stats["spilled_bytes"] >= 2 * MIB - KIB
    assert stats["requests_served"]["hello"] >= 1
    assert all(isinstance(v, int) for v in stats["requests_served"].values())
    assert f"files up to {stats['max_file_size'] / MIB:.1f} MiB each" in text, text
    assert "0 removed segments made again" in text, text
    instance.tfem("rm", "s/mem", "s/big")
    stats = json.loads(out(instance.tfem("status", "--json")))
    assert (stats["slots_used"], stats["arena_bytes_used"], stats["spilled_bytes"]) == (0, 0, 0)


def test_client_commands_without_an_instance(tmp_path):
    keyfile = str(tmp_path / "none.key")
    env = dict(os.environ)
    env.pop("TFEM_BROKER", None)
    for args in (["ls"], ["status"], ["stat", "x"], ["rm", "x"], ["get", "--no-wait", "x", "-"]):
        start = time.monotonic()
        result = tfem_cli(*args, "--keyfile", keyfile, env=env)
        assert_clear_failure(result, 1, "tfem up")
        assert time.monotonic() - start < 10


# ---- up: sizes, a command, signals ----


def test_up_accepts_sizes_with_units(instance_factory):
    inst = instance_factory("--slots", "64", "--buf-size", "1.5K", "--block-size", "8KiB", "--memory", "512k",
                            "--spill-size", "64M")
    stats = json.loads(out(inst.tfem("status", "--json")))
    assert (stats["buf_size"], stats["block_size"], stats["arena_bytes_total"]) == (1536, 8192, 512 * KIB)
    assert stats["slots_total"] == 64


@pytest.mark.parametrize("option, value", [("--memory", "12Q"), ("--buf-size", "lots"), ("--block-size", "1.2.3M"),
                                           ("--spill-size", "K")])
def test_up_rejects_a_bad_size(tmp_path, option, value):
    keyfile = tmp_path / "bad.key"
    result = tfem_cli("up", "--keyfile", str(keyfile), option, value)
    assert_clear_failure(result, 2, f"not a size: {value!r}", option)
    assert not keyfile.exists()


def test_up_with_an_unusable_block_size_stops_cleanly(tmp_path, servers):
    keyfile = tmp_path / "odd.key"
    servers.track(keyfile)
    result = tfem_cli("up", "--keyfile", str(keyfile), "--block-size", "5000", "--", "true")
    assert result.returncode == 1
    assert "power of two" in err(result)
    assert "broker did not start" in err(result)
    assert leftovers(Instance.for_keyfile(keyfile)) == []
    assert not keyfile.exists()


UP_SCRIPT = textwrap.dedent("""
    import os, pathlib, sys, tfem
    from tfem.keyfile import registry_pid
    keyfile = os.environ["TFEM_KEYFILE"]
    with tfem.connect() as c:
        with c.open("x", "w") as f:
            f.write(b"y" * 3_000_000)
        with c.open("x") as f:
            assert f.read() == b"y" * 3_000_000
        print(keyfile, c.stats()["broker_pid"], registry_pid(pathlib.Path(keyfile)), flush=True)
        with c.open("left/for/later", "w") as f:  # still there when the instance stops
            f.write(b"z" * 3_000_000)
    sys.exit(int(sys.argv[1]))
""")


@pytest.mark.parametrize("status", [0, 7])
def test_up_runs_a_command_and_exits_with_its_status(tmp_path, servers, status):
    keyfile, spill = tmp_path / "cmd.key", tmp_path / "spill"
    servers.track(keyfile)
    result = tfem_cli("up", "--keyfile", str(keyfile), "--spill-dir", str(spill), *SMALL,
                      "--", sys.executable, "-c", UP_SCRIPT, str(status))
    assert result.returncode == status, err(result)
    seen_keyfile, broker_pid, reg_pid = out(result).split()
    assert seen_keyfile == str(keyfile)
    for pid in (int(broker_pid), int(reg_pid)):
        assert pid_gone(pid)  # `tfem up` waited for its servers
    names = Instance.for_keyfile(keyfile)
    assert leftovers(names) == []
    assert not spill.exists()
    assert not keyfile.exists()  # made by the registry, so removed by it


def test_up_with_a_command_removes_its_queue(tmp_path, servers):
    """leftovers() can look for the queue only while the key file exists:
    with a key file of the user's own, it stays, and the queue must be gone."""
    keyfile = tmp_path / "q.key"
    servers.track(keyfile)
    keyfile.write_text("")  # ours: the registry keeps it, so its ftok key stays computable
    key = queue_key(keyfile)
    result = tfem_cli("up", "--keyfile", str(keyfile), *SMALL, "--", sys.executable, "-c", "print('hi')")
    assert result.returncode == 0, err(result)
    assert out(result) == "hi\n"
    assert keyfile.exists() and keyfile.read_text() == ""
    assert not queue_exists(key)
    assert leftovers(Instance.for_keyfile(keyfile)) == []


def test_up_with_a_command_that_cannot_run(tmp_path, servers):
    keyfile = tmp_path / "nocmd.key"
    servers.track(keyfile)
    result = tfem_cli("up", "--keyfile", str(keyfile), *SMALL, "--", str(tmp_path / "no-such-program"))
    assert_clear_failure(result, 1, "cannot run", "no-such-program")
    assert leftovers(Instance.for_keyfile(keyfile)) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_stopped_by_a_signal_leaves_nothing(tmp_path, servers, sig):
    keyfile, spill = tmp_path / "sig.key", tmp_path / "spill"
    servers.track(keyfile)
    up = servers.start("up", "--keyfile", str(keyfile), "--spill-dir", str(spill), *SMALL)
    names = Instance.for_keyfile(keyfile)
    key = queue_key(keyfile)
    with tfem.connect(keyfile) as client:
        for i in range(3):
            with client.open(f"kept/{i}", "w") as f:
                f.write(content(f"kept/{i}", 2 * MIB if i == 0 else 300_000))
        held = client.open("kept/held", "w")  # still held when the instance stops
        held.write(b"partial")
        assert client.stats()["spilled_bytes"] > 0
        broker_pid = client.stats()["broker_pid"]
        reg_pid = registry_pid(keyfile)
        assert leftovers(names) and spill.exists()

        assert stop_server(up, sig) == 0

        assert pid_gone(broker_pid) and pid_gone(reg_pid)
        assert leftovers(names) == []
        assert not queue_exists(key)
        assert not spill.exists()
        assert not keyfile.exists()
        start = time.monotonic()
        held.abort()
    assert time.monotonic() - start < 5  # a client outliving its instance closes promptly


def test_up_stops_under_a_burst_of_signals(tmp_path, servers):
    """Slurm signals every process of a job step at once, and a batch script
    passes the stop on too: TERMs reach `tfem up` while its handler for the
    first one runs. It must stop every time, not wait on itself."""
    for attempt in range(8):
        keyfile = tmp_path / f"burst{attempt}.key"
        servers.track(keyfile)
        up = servers.start("up", "--keyfile", str(keyfile), *SMALL)
        names = Instance.for_keyfile(keyfile)
        for _ in range(50):  # back to back: the earlier code hung in about half the attempts
            if up.poll() is None:
                up.send_signal(signal.SIGTERM)
        try:
            status = up.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"tfem up hung after a burst of SIGTERM (attempt {attempt + 1})")
        # 0, or killed by a TERM that came after its cleanup, as the interpreter exited
        assert status in (0, -signal.SIGTERM)
        assert leftovers(names) == []
        assert not keyfile.exists()


def test_clean_after_sigkill_removes_only_that_instance(tmp_path, instance_factory, servers):
    other = instance_factory(*SMALL, subdir="other")
    with other.connect() as c:
        with c.open("other/file", "w") as f:
            f.write(content("other/file", 2 * MIB))
    keyfile = tmp_path / "killed.key"
    servers.track(keyfile)
    up = servers.start("up", "--keyfile", str(keyfile), *SMALL)  # default spill store: clean knows it
    names = Instance.for_keyfile(keyfile)
    key = queue_key(keyfile)
    with tfem.connect(keyfile) as c:
        with c.open("lost", "w") as f:
            f.write(content("lost", 2 * MIB))
        assert c.stats()["spill"] == str(names.spill_dir)
        broker_pid = c.stats()["broker_pid"]
    reg_pid = registry_pid(keyfile)

    # SIGKILL `tfem up`: its servers die with it (the kernel kills them,
    # by their own request), leaving their data behind.
    up.kill()
    up.wait(30)
    for pid in (broker_pid, reg_pid):
        wait_until(lambda: pid_gone(pid), 30, f"server {pid} to die with tfem up")

    assert sorted(leftovers(names)) == sorted([f"segment {names.segment}", f"socket {names.socket_path}",
                                               "registry queue"])
    assert names.spill_dir.exists()
    assert registry_pid(keyfile) == reg_pid
    start = time.monotonic()
    with pytest.raises(tfem.BrokerUnavailable):
        tfem.connect(keyfile)
    assert time.monotonic() - start < 2

    # The other instance's registry is alive: clean refuses to touch it.
    refused = tfem_cli("clean", "--keyfile", str(other.keyfile))
    assert_clear_failure(refused, 1, "is running")

    cleaned = tfem_cli("clean", "--keyfile", str(keyfile))
    assert cleaned.returncode == 0, err(cleaned)
    for what in ("registry queue", "segment", "socket", "spill store"):
        assert what in out(cleaned)
    assert leftovers(names) == []
    assert not queue_exists(key)
    assert not names.spill_dir.exists()
    assert out(tfem_cli("clean", "--keyfile", str(keyfile))).strip() == "nothing to clean"

    # The other instance is untouched...
    assert len(leftovers(other.names)) == 3
    with other.connect() as c:
        with c.open("other/file") as f:
            assert f.read() == content("other/file", 2 * MIB)
    # ...and the cleaned key file can serve a new instance.
    again = servers.start("up", "--keyfile", str(keyfile), *SMALL)
    with tfem.connect(keyfile) as c:
        assert c.list() == []
    assert stop_server(again) == 0
    assert leftovers(names) == []
