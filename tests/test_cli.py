"""The `tfem` command line, run as a user runs it: every command in a real
process against a real instance."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time

import pytest
import sysv_ipc
from prometheus_client.parser import text_string_to_metric_families

import tfem
from tfem.config import Instance
from tfem.discovery import queue_key
from tfem.keyfile import registry_pid

from tests._instances import SMALL, leftovers
from tests._proc_tools import pid_gone, stop_server, tfem_cli, wait_until
from tests._tfem_worker import KIB, MIB, content
from tests.test_recovery import mapped  # the segment as a test sees it


# The exit statuses `tfem --help` documents.
EXIT_CODES = {0: "done", 1: "error", 2: "usage", 3: "not found", 4: "not ready in time", 5: "no instance",
              130: "interrupted"}
ERROR, USAGE, NOT_FOUND, NOT_READY, NO_BROKER = 1, 2, 3, 4, 5


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
    "ls": ["--keyfile", "prefix", "-l", "--long", "--json"],
    "save": ["--keyfile", "DIR", "PREFIX", "--consume"],
    "stat": ["--keyfile", "name", "--json"],
    "rm": ["--keyfile", "names"],
    "status": ["--keyfile", "--json", "--prometheus", "--watch"],
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
    for code in EXIT_CODES:
        assert f"\n  {code:<3} " in out(top), out(top)  # the exit statuses, for scripts
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


def test_put_with_a_lifetime(instance, client, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"twice")
    instance.tfem("put", "--readers", "2", str(src), "cli/two")
    instance.tfem("put", "--keep", "--ttl", "3600", str(src), "cli/kept")
    assert (client.stat("cli/two").lifetime, client.stat("cli/kept").lifetime) == ("2 readers", "keep")
    assert client.stat("cli/kept").expires is not None
    for i in range(2):
        instance.tfem("get", "cli/two", str(tmp_path / f"two-{i}"))
        instance.tfem("get", "cli/kept", str(tmp_path / f"kept-{i}"))
    assert client.list() == ["cli/kept"]
    bad = instance.tfem("put", "--keep", "--readers", "2", str(src), "cli/bad", check=False)
    assert bad.returncode == 2 and "not allowed with argument" in err(bad)
    bad = instance.tfem("put", "--readers", "0", str(src), "cli/bad", check=False)
    assert_clear_failure(bad, 2, "readers must be an integer from 1")
    instance.tfem("rm", "cli/kept")
    assert client.list() == []


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
    assert_clear_failure(bad, USAGE, "ending in /")
    assert out(instance.tfem("ls")) == ""
    instance.tfem("put", str(tmp_path / "a"), str(tmp_path / "b"), "p/")
    bad = instance.tfem("get", "p/a", "p/b", str(tmp_path / "not-a-dir"), check=False)
    assert_clear_failure(bad, USAGE, "must be a directory")
    assert out(instance.tfem("ls")).split() == ["p/a", "p/b"]  # nothing consumed


def test_put_of_a_missing_local_file_leaves_nothing(instance, tmp_path):
    bad = instance.tfem("put", str(tmp_path / "absent"), "x", check=False)
    assert_clear_failure(bad, ERROR, "tfem: error: ", "No such file", "absent")
    assert out(instance.tfem("ls")) == ""


def test_get_that_cannot_write_locally_leaves_the_file(instance, tmp_path):
    instance.tfem("put", "-", "kept", input=b"do not lose me")
    bad = instance.tfem("get", "kept", str(tmp_path / "no" / "such" / "dir"), check=False)
    assert_clear_failure(bad, ERROR, "tfem: error: ", "No such file")
    listed = json.loads(out(instance.tfem("ls", "--json")))
    assert [(st["name"], st["state"], st["size"]) for st in listed] == [("kept", "WAIT", 14)]  # given back
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
    assert_clear_failure(result, NOT_FOUND, "tfem: error: ", "missing")
    assert not (tmp_path / "x").exists()
    start = time.monotonic()
    result = instance.tfem("get", "--timeout", "0.5", "missing", "-", check=False)
    assert_clear_failure(result, NOT_READY, "within 0.5 s")
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
        assert lines == [["STATE", "SIZE", "LIFETIME", "AGE", "NAME"], ["WAIT", "5000", "once", "0s", "w/done"],
                         ["WRITE", "3", "once", "0s", "w/writing"]]
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
    assert_clear_failure(missing, NOT_FOUND, "tfem: error: ", "nothing")


def test_rm(instance, client):
    for name in ("r/1", "r/2", "r/3"):
        with client.open(name, "w") as f:
            f.write(content(name, 10_000))
    instance.tfem("rm", "r/1", "r/2")
    assert client.list() == ["r/3"]
    result = instance.tfem("rm", "r/3", "r/missing", check=False)
    assert_clear_failure(result, NOT_FOUND, "tfem: error: ", "r/missing")
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
        assert_clear_failure(result, NO_BROKER, "tfem: error: ", "tfem up")
        assert len(err(result).splitlines()) == 1, err(result)
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


# ---- metrics: status --prometheus ----


def scrape(inst):
    """`tfem status --prometheus`, parsed by Prometheus' own client library:
    {(name, labels without segment): value}, and the families' types."""
    text = out(inst.tfem("status", "--prometheus"))
    assert text.endswith("\n")
    values, types = {}, {}
    segment = inst.names.segment
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        assert family.documentation, family.name  # every family has its HELP
        assert family.name.startswith("tfem_"), family.name
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("segment") == segment, sample
            values[sample.name, tuple(sorted(labels.items()))] = sample.value
    return values, types


def test_status_prometheus_parses_and_moves_with_the_files(instance_factory):
    inst = instance_factory("--slots", "8", "--buf-size", "1K", "--block-size", "4K", "--memory", "1M",
                            "--max-file-size", "4M")
    before, types = scrape(inst)
    assert types["tfem_files"] == "gauge" and types["tfem_errors"] == "counter"  # the parser drops _total
    assert {"tfem_memory_bytes", "tfem_spilled_bytes", "tfem_published_files", "tfem_waits", "tfem_spills",
            "tfem_restores", "tfem_clients", "tfem_requests", "tfem_expired_files"} <= set(types)
    assert before["tfem_files", (("state", "shared"),)] == 0
    assert before["tfem_up", ()] == 1
    assert before["tfem_files", (("state", "wait"),)] == 0
    assert before["tfem_memory_bytes", (("status", "free"),)] == MIB

    with inst.connect() as c:
        with c.open("m/big", "w") as f:  # past the 1 MiB arena: spilled
            f.write(content("m/big", 2 * MIB))
        with c.open("m/mem", "w") as f:
            f.write(content("m/mem", 100_000))
        with c.open("m/damaged", "w") as f:
            f.write(content("m/damaged", 500))
        with mapped(inst.names.segment) as seg:
            seg.view[seg.inline_data_offset(c.stat("m/damaged").slot) + 7] ^= 0xFF
        with pytest.raises(tfem.ChecksumMismatch):
            with c.open("m/damaged") as f:
                f.read()
        with c.open("m/mem") as f:
            assert f.read() == content("m/mem", 100_000)
        with pytest.raises(tfem.Timeout):  # a wait, and a timeout
            c.open("m/never", timeout=0.05)
        with pytest.raises(tfem.FileTooLarge):
            with c.open("m/huge", "w") as f:
                f.seek(5 * MIB)
                f.write(b"x")
        held = [c.open(f"m/held{i}", "w") for i in range(6)]  # with m/big and m/damaged: all 8 slots
        try:
            with pytest.raises(tfem.NoSpace):
                c.open("m/one-too-many", "w")
            during, _ = scrape(inst)
        finally:
            for f in held:
                f.abort()
    after, _ = scrape(inst)

    def moved(name, *labels):
        return after[name, tuple(labels)] - before[name, tuple(labels)]

    assert during["tfem_files", (("state", "write"),)] == 6
    assert during["tfem_slots", (("status", "free"),)] == 0
    assert after["tfem_files", (("state", "wait"),)] == 2  # m/big, and m/damaged given back
    assert after["tfem_files", (("state", "write"),)] == 0
    assert moved("tfem_published_files_total") == 3
    assert moved("tfem_consumed_files_total") == 1
    assert moved("tfem_opened_files_total", ("mode", "read")) == 2
    assert moved("tfem_waits_total", ("for", "file")) == 1
    for kind in ("timeout", "no_space", "too_large", "checksum"):
        assert moved("tfem_errors_total", ("kind", kind)) == 1, kind
    assert moved("tfem_spills_total") >= 1
    assert after["tfem_spilled_files", ()] == 1
    assert after["tfem_spilled_bytes", ()] >= 2 * MIB - KIB
    assert after["tfem_spill_written_bytes_total", ()] >= 2 * MIB - KIB
    assert after["tfem_requests_total", (("op", "stats"),)] > before["tfem_requests_total", (("op", "stats"),)]


def test_status_prometheus_without_an_instance_says_it_is_down(tmp_path):
    keyfile = tmp_path / "none.key"
    env = dict(os.environ)
    env.pop("TFEM_BROKER", None)
    result = tfem_cli("status", "--prometheus", "--keyfile", str(keyfile), env=env)
    assert_clear_failure(result, NO_BROKER, "tfem: error: ")
    [family] = text_string_to_metric_families(out(result))
    [sample] = family.samples
    assert (sample.name, sample.value) == ("tfem_up", 0)
    assert sample.labels == {"segment": Instance.for_keyfile(keyfile).segment}


# ---- status --watch ----


def read_until(stream, done, timeout=30.0):
    """Bytes from a pipe until done(bytes so far) or the timeout."""
    got = b""
    deadline = time.monotonic() + timeout
    os.set_blocking(stream.fileno(), False)
    while not done(got):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out; read so far: {got!r}")
        chunk = stream.read()
        if chunk:
            got += chunk
        else:
            time.sleep(0.02)
    return got


def test_status_watch_redraws_until_ctrl_c(instance, client):
    watch = subprocess.Popen([sys.executable, "-m", "tfem", "status", "--watch", "0.1"], env=instance.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = read_until(watch.stdout, lambda got: b"requests" in got)
        assert first.startswith(b"\033[H\033[2J\033[H")  # the screen cleared once
        assert b"slots       0 used" in first
        with client.open("watched", "w") as f:
            f.write(b"x")
        later = read_until(watch.stdout, lambda got: b"slots       1 used" in got)
        assert b"\033[2J" not in later  # redrawn in place: no blank screen between frames
        watch.send_signal(signal.SIGINT)
        assert watch.wait(30) == 0
        assert watch.stderr.read() == b""
    finally:
        watch.kill()
        watch.wait()
        watch.stdout.close()
        watch.stderr.close()


def test_status_watch_of_a_broker_that_goes_away_is_one_line(instance_factory):
    inst = instance_factory(*SMALL)
    env = dict(inst.env, TFEM_RECONNECT_TIMEOUT="1")
    watch = subprocess.Popen([sys.executable, "-m", "tfem", "status", "--watch", "0.1"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_until(watch.stdout, lambda got: b"requests" in got)
        assert stop_server(inst.process) == 0
        assert watch.wait(30) == NO_BROKER
        stderr = watch.stderr.read().decode()
        assert stderr.startswith("tfem: error: ") and len(stderr.splitlines()) == 1, stderr
    finally:
        watch.kill()
        watch.wait()
        watch.stdout.close()
        watch.stderr.close()


# ---- progress bars ----


@pytest.fixture
def roomy(instance_factory):
    """An instance that holds a 24 MiB file in memory."""
    return instance_factory("--slots", "64", "--memory", "64M")


def test_no_progress_bar_without_a_terminal(roomy, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(content("quiet", 24 * MIB))
    put = roomy.tfem("put", str(src), "quiet")
    got = roomy.tfem("get", "quiet", str(dst))
    assert (put.stdout, put.stderr, got.stdout, got.stderr) == (b"", b"", b"", b"")
    assert dst.read_bytes() == src.read_bytes()


def run_on_a_terminal(args, env):
    """Run the command line with stderr on a pseudo-terminal; (status,
    what the terminal showed)."""
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new one has no size
    proc = subprocess.Popen([sys.executable, "-m", "tfem", *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    shown = b""
    try:
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the last holder of the terminal closed it
                break
            if not chunk:
                break
            shown += chunk
        return proc.wait(60), shown.decode(errors="replace")
    finally:
        os.close(main)
        proc.kill()
        proc.wait()


def test_progress_bar_on_a_terminal(roomy, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(content("loud", 24 * MIB))
    status, shown = run_on_a_terminal(["put", str(src), "loud"], roomy.env)
    assert status == 0, shown
    assert "loud" in shown and "100%" in shown and "24.0M" in shown, shown
    status, shown = run_on_a_terminal(["get", "loud", str(dst)], roomy.env)
    assert status == 0, shown
    assert "100%" in shown, shown
    assert dst.read_bytes() == src.read_bytes()
    small = tmp_path / "small"
    small.write_bytes(b"s" * 1000)
    status, shown = run_on_a_terminal(["put", str(small), "small"], roomy.env)
    assert (status, shown) == (0, "")  # a small file has no bar


# ---- ls ----


def test_ls_long_and_json(instance, client):
    with client.open("l/a", "w", readers=3) as f:
        f.write(content("l/a", 2 * MIB))  # spilled
    with client.open("l/b", "w") as f:
        f.write(b"b" * 10)
    with client.open("l/c", "w", keep=True) as f:
        f.write(b"c")
    reading, sharing = client.open("l/b"), client.open("l/c")
    try:
        table = out(instance.tfem("ls", "--long", "l/"))
        assert [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()] == [  # "3 readers" is one
            ["STATE", "SIZE", "LIFETIME", "AGE", "NAME"], ["WAIT", str(2 * MIB), "3 readers", "0s", "l/a"],
            ["READ", "10", "once", "0s", "l/b"], ["SHARED", "1", "keep", "0s", "l/c"]]
        listed = json.loads(out(instance.tfem("ls", "--json")))
    finally:
        reading.close()
        sharing.close()
    assert [(st["name"], st["state"], st["size"], st["spilled"], st["lifetime"]) for st in listed] == [
        ("l/a", "WAIT", 2 * MIB, True, "3 readers"), ("l/b", "READ", 10, False, "once"),
        ("l/c", "SHARED", 1, False, "keep")]
    # (readers, readers_left, holders): a read counts at its close
    assert [(st["readers"], st["readers_left"], st["holders"]) for st in listed] == [(3, 3, 0), (1, 1, 1), (0, None, 1)]
    assert all(abs(st["created"] - time.time()) < 60 for st in listed)
    assert json.loads(out(instance.tfem("ls", "--json", "nothing/"))) == []
    both = instance.tfem("ls", "-l", "--json", check=False)
    assert_clear_failure(both, USAGE, "not allowed with")


# ---- errors ----


@pytest.mark.parametrize("args, code, phrase", [
    (["get", "--no-wait", "absent", "-"], NOT_FOUND, "no file named 'absent'"),
    (["stat", "absent"], NOT_FOUND, "absent"),
    (["get", "--timeout", "0.1", "absent", "-"], NOT_READY, "within 0.1 s"),
    (["get", "--no-wait", "writing", "-"], NOT_READY, "writing"),
    (["put", "-", "x" * 300], USAGE, "name"),
    (["get", "a", "b", "-"], USAGE, "must be a directory"),
    (["status", "--watch", "0"], USAGE, "--watch"),
    (["ls", "--bogus"], USAGE, "unrecognized arguments"),
])
def test_errors_are_one_line_with_a_status_by_cause(instance, client, args, code, phrase):
    with client.open("writing", "w"):
        result = instance.tfem(*args, check=False, input=b"")
    assert_clear_failure(result, code, phrase)
    if code != USAGE or "--bogus" not in args:  # argparse's own usage errors say how to call
        assert err(result).startswith("tfem: error: ") and len(err(result).splitlines()) == 1, err(result)


def test_debug_shows_the_traceback(instance):
    result = instance.tfem("--debug", "stat", "absent", check=False)
    assert result.returncode != 0
    assert "Traceback" in err(result) and "NotFound" in err(result)


# ---- save ----


def test_save_copies_what_is_published_and_keeps_it(instance, client, tmp_path):
    files = {"run/a": content("run/a", 10), "run/sub/b": content("run/sub/b", 2 * MIB), "other/c": b"c"}
    for name, data in files.items():
        with client.open(name, "w") as f:
            f.write(data)
    writing = client.open("run/writing", "w")
    writing.write(b"not yet")
    with client.open("run/being-read", "w") as f:
        f.write(b"taken")
    with client.open("run/kept", "w", keep=True) as f:
        f.write(b"for all")
    reading, sharing = client.open("run/being-read"), client.open("run/kept")  # SHARED: still savable
    dest = tmp_path / "dest"
    dest.mkdir()
    try:
        result = instance.tfem("save", str(dest), "run/")
        assert client.stat("run/kept").holders == 1  # the save's read was given back
    finally:
        writing.abort()
        reading.abort()
        sharing.close()
    text = out(result)
    assert f"saved 3 files, {10 + 2 * MIB + 7} bytes" in text and "kept in tfem" in text, text
    assert "skipped 2 being written or read: run/being-read run/writing" in text, text
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "run/a", "run/kept", "run/sub/b"]
    for name in ("run/a", "run/sub/b"):
        assert (dest / name).read_bytes() == files[name]
    assert (dest / "run/kept").read_bytes() == b"for all"
    # Kept: each is still there for its one consumer.
    assert sorted(client.list()) == ["other/c", "run/a", "run/being-read", "run/kept", "run/sub/b"]
    for name, data in files.items():
        with client.open(name, wait=False) as f:
            assert f.read() == data
    assert sorted(client.list()) == ["run/being-read", "run/kept"]


def test_save_consume_frees_what_it_saved(instance, client, tmp_path):
    for name in ("c/1", "c/2"):
        with client.open(name, "w") as f:
            f.write(content(name, 50_000))
    result = instance.tfem("save", "--consume", str(tmp_path))
    assert "saved 2 files, 100000 bytes" in out(result) and "consumed" in out(result), out(result)
    assert client.list() == []
    assert (tmp_path / "c" / "2").read_bytes() == content("c/2", 50_000)
    stats = client.stats()
    assert stats["consumed"] == 2 and stats["arena_bytes_used"] == 0


def test_save_refuses_names_outside_the_directory_and_damaged_files(instance, client, tmp_path):
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "link").symlink_to(outside)
    for name in ("../escape", "link/escape", "/abs/ok", "damaged"):
        with client.open(name, "w") as f:
            f.write(content(name, 300))
    with mapped(instance.names.segment) as seg:
        seg.view[seg.inline_data_offset(client.stat("damaged").slot) + 5] ^= 0xFF
    result = instance.tfem("save", str(dest), check=False)
    assert_clear_failure(result, ERROR, "'../escape'", "'link/escape'", "damaged: not saved")
    assert "saved 1 file, 300 bytes" in out(result), out(result)
    assert list(outside.iterdir()) == [] and not (tmp_path / "escape").exists()
    assert (dest / "abs" / "ok").read_bytes() == content("/abs/ok", 300)  # a leading / is no way out
    assert not (dest / "damaged").exists()  # no half copy
    assert sorted(client.list()) == ["../escape", "/abs/ok", "damaged", "link/escape"]
    assert client.stat("damaged").state == "WAIT"
    missing = instance.tfem("save", str(tmp_path / "nope"), check=False)
    assert_clear_failure(missing, USAGE, "not a directory")
