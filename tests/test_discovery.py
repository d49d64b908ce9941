"""Finding a broker: through the registry of a key file, through
TFEM_BROKER, through TFEM_KEYFILE, and the per-job default key file; what
a client gets when there is nothing to find; independence of instances."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import sysv_ipc

import tfem
from tfem import config
from tfem.config import Instance
from tfem.discovery import ask_registry, queue_key
from tfem.protocol import Action
from tfem.keyfile import registry_pid

from tests._instances import SMALL, leftovers, stop_instance
from tests._proc_tools import stop_server, tfem_cli

QUICK = 2.0  # seconds within which "nothing to find" must be reported

CLIENT_SCRIPT = textwrap.dedent("""
    import sys, tfem
    with tfem.connect() as c:
        with c.open(sys.argv[1], "w") as f:
            f.write(sys.argv[2].encode())
        print(c.endpoint)
""")


def run_client(env, name, text):
    return subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, name, text], env=env,
                          capture_output=True, timeout=60)


def read_text(client, name):
    with client.open(name, wait=False) as f:
        return f.read().decode()


def assert_unavailable_quickly(call):
    start = time.monotonic()
    with pytest.raises(tfem.BrokerUnavailable) as caught:
        call()
    assert time.monotonic() - start < QUICK
    assert caught.value.errno == errno.ECONNREFUSED
    assert isinstance(caught.value, ConnectionError)
    return caught.value


# ---- finding the broker ----


def test_connect_through_the_registry(instance):
    for keyfile in (instance.keyfile, str(instance.keyfile)):
        with tfem.connect(keyfile) as client:
            assert client.endpoint == instance.names.endpoint
            with client.open("hello", "w") as f:
                f.write(b"through the registry")
            assert read_text(client, "hello") == "through the registry"


@pytest.mark.parametrize("keyfile_env", [None, "/nonexistent/dir/bogus.key"], ids=["unset", "bogus"])
def test_tfem_broker_in_a_subprocess(instance, keyfile_env):
    env = dict(os.environ, TFEM_BROKER=instance.names.endpoint)
    env.pop("TFEM_KEYFILE", None)
    if keyfile_env:
        env["TFEM_KEYFILE"] = keyfile_env
    result = run_client(env, "via/broker", "no registry needed")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == instance.names.endpoint
    with instance.connect() as client:
        assert read_text(client, "via/broker") == "no registry needed"
        assert client.list() == []


def test_explicit_broker_argument(instance):
    with tfem.connect(broker=instance.names.endpoint) as client:
        with client.open("x", "w") as f:
            f.write(b"1")
    with instance.connect() as client:
        assert read_text(client, "x") == "1"


def test_tfem_keyfile_used_by_connect_without_argument(instance, monkeypatch):
    monkeypatch.delenv("TFEM_BROKER", raising=False)
    monkeypatch.setenv("TFEM_KEYFILE", str(instance.keyfile))
    with tfem.connect() as client:
        assert client.endpoint == instance.names.endpoint
        with client.open("env", "w") as f:
            f.write(b"found by TFEM_KEYFILE")
    # and in another process, as a job step would use it
    result = run_client(instance.env, "env2", "also in a child")
    assert result.returncode == 0, result.stderr.decode()
    with instance.connect() as client:
        assert read_text(client, "env") == "found by TFEM_KEYFILE"
        assert read_text(client, "env2") == "also in a child"


def test_an_explicit_keyfile_beats_tfem_broker(instance, instance_factory, monkeypatch):
    other = instance_factory(*SMALL, subdir="other")
    monkeypatch.setenv("TFEM_BROKER", other.names.endpoint)
    with tfem.connect(instance.keyfile) as client:
        assert client.endpoint == instance.names.endpoint
    with tfem.connect() as client:
        assert client.endpoint == other.names.endpoint


# ---- nothing to find ----


def test_missing_keyfile_is_broker_unavailable(tmp_path, monkeypatch):
    missing = tmp_path / "missing.key"
    error = assert_unavailable_quickly(lambda: tfem.connect(missing))
    assert str(missing) in str(error)
    monkeypatch.delenv("TFEM_BROKER", raising=False)
    monkeypatch.setenv("TFEM_KEYFILE", str(missing))
    assert_unavailable_quickly(lambda: tfem.connect())


def test_keyfile_without_a_registry_is_broker_unavailable(tmp_path):
    keyfile = tmp_path / "idle.key"
    keyfile.write_text("")
    assert_unavailable_quickly(lambda: tfem.connect(keyfile))


def test_stopped_instance_is_broker_unavailable(instance_factory, tmp_path):
    keyfile = tmp_path / "x" / "tfem.key"
    keyfile.parent.mkdir()
    keyfile.write_text("")  # made by the user: the registry leaves it in place
    inst = instance_factory(*SMALL, subdir="x")
    assert inst.keyfile == keyfile
    with tfem.connect(keyfile):
        pass
    assert stop_instance(inst) == []
    assert keyfile.exists()
    assert_unavailable_quickly(lambda: tfem.connect(keyfile))


def test_registry_without_a_broker_is_broker_unavailable(tmp_path, servers):
    keyfile = tmp_path / "lonely.key"
    servers.track(keyfile)
    registry = servers.start("registry", "--keyfile", str(keyfile))
    error = assert_unavailable_quickly(lambda: tfem.connect(keyfile))
    assert "no broker" in str(error)
    assert ask_registry(keyfile, Action.LIST)["brokers"] == []
    key = queue_key(keyfile)
    assert stop_server(registry) == 0
    assert not keyfile.exists()  # the registry made it, the registry removed it
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.MessageQueue(key)


def test_killed_registry_is_broker_unavailable(tmp_path, servers):
    keyfile = tmp_path / "killed.key"
    servers.track(keyfile)
    registry = servers.start("registry", "--keyfile", str(keyfile))
    assert registry_pid(keyfile) == registry.pid
    registry.kill()
    registry.wait()
    sysv_ipc.MessageQueue(queue_key(keyfile))  # it left its queue and key file behind
    assert_unavailable_quickly(lambda: tfem.connect(keyfile))


def test_dead_broker_endpoint_is_broker_unavailable(tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    assert_unavailable_quickly(lambda: tfem.connect(broker=endpoint, timeout=1.0))


# ---- the registry and its brokers ----


def test_registry_list_shows_the_broker_and_its_clients(instance):
    listing = ask_registry(instance.keyfile, Action.LIST)
    with instance.connect() as client:
        broker_pid = client.stats()["broker_pid"]
        during = ask_registry(instance.keyfile, Action.LIST)
    after = ask_registry(instance.keyfile, Action.LIST)
    assert listing["brokers"] == [{"endpoint": instance.names.endpoint, "pid": broker_pid, "load": 0}]
    assert during["brokers"] == listing["brokers"]
    assert during["clients"] == listing["clients"] + 1
    assert after["clients"] == listing["clients"]


def test_separate_registry_and_broker_processes(tmp_path, servers):
    keyfile = tmp_path / "split.key"
    spill = tmp_path / "spill"
    servers.track(keyfile)
    registry = servers.start("registry", "--keyfile", str(keyfile))
    broker = servers.start("broker", "--keyfile", str(keyfile), "--spill-dir", str(spill), *SMALL)
    names = Instance.for_keyfile(keyfile)
    assert ask_registry(keyfile, Action.LIST)["brokers"] == [
        {"endpoint": names.endpoint, "pid": broker.pid, "load": 0}]
    with tfem.connect(keyfile) as client:
        with client.open("a", "w") as f:
            f.write(b"split")
        assert read_text(client, "a") == "split"

    # A broker that dies is forgotten: clients are told at once.
    broker.kill()
    broker.wait()
    assert ask_registry(keyfile, Action.LIST)["brokers"] == []
    assert_unavailable_quickly(lambda: tfem.connect(keyfile))
    assert names.socket_path.exists()  # left behind, nobody listening
    assert_unavailable_quickly(lambda: tfem.connect(broker=names.endpoint, timeout=1.0))

    assert tfem_cli("clean", "--keyfile", str(keyfile)).returncode == 1  # the registry still runs
    assert stop_server(registry) == 0
    assert leftovers(names)  # the killed broker's segment and socket
    cleaned = tfem_cli("clean", "--keyfile", str(keyfile))
    assert cleaned.returncode == 0, cleaned.stderr.decode()
    assert leftovers(names) == []
    assert not spill.exists()  # the broker told clean where its store was


def test_two_instances_are_independent(instance_factory):
    one = instance_factory(*SMALL, subdir="one")
    two = instance_factory(*SMALL, subdir="two")
    assert one.names.segment != two.names.segment
    assert one.names.endpoint != two.names.endpoint
    assert queue_key(one.keyfile) != queue_key(two.keyfile)
    with one.connect() as a, two.connect() as b:
        assert a.endpoint == one.names.endpoint and b.endpoint == two.names.endpoint
        with a.open("only-in-one", "w") as f:
            f.write(b"1")
        with a.open("both", "w") as f:
            f.write(b"one's")
        assert b.list() == []
        with pytest.raises(tfem.NotFound):
            b.stat("only-in-one")
        with pytest.raises(tfem.NotFound):
            b.open("only-in-one", wait=False)
        with pytest.raises(tfem.Timeout):
            b.open("only-in-one", timeout=0.2)
        with b.open("both", "w") as f:  # the same name is free in the other
            f.write(b"two's")
        assert read_text(b, "both") == "two's"
        assert sorted(a.list()) == ["both", "only-in-one"]
        assert read_text(a, "both") == "one's"
        assert a.stats()["published"] == 2 and b.stats()["published"] == 1
        assert a.stats()["broker_pid"] != b.stats()["broker_pid"]


def test_a_second_registry_for_a_live_keyfile_refuses(instance):
    first = registry_pid(instance.keyfile)
    assert first
    start = time.monotonic()
    result = tfem_cli("registry", "--keyfile", str(instance.keyfile), timeout=30)
    assert time.monotonic() - start < 10
    assert result.returncode != 0
    assert f"pid {first}" in result.stderr.decode()
    assert registry_pid(instance.keyfile) == first
    with instance.connect() as client:  # the first is undisturbed
        with client.open("still", "w") as f:
            f.write(b"here")
        assert read_text(client, "still") == "here"


def test_a_second_up_or_broker_for_a_live_keyfile_refuses(instance):
    with instance.connect() as client:
        with client.open("precious", "w") as f:
            f.write(b"keep me")
        broker_pid = client.stats()["broker_pid"]
    up = tfem_cli("up", "--keyfile", str(instance.keyfile), *SMALL, "--", "true", timeout=60)
    assert up.returncode == 1
    assert "already serves" in up.stderr.decode()
    broker = tfem_cli("broker", "--keyfile", str(instance.keyfile), *SMALL, timeout=60)
    assert broker.returncode == 1
    assert f"a broker (pid {broker_pid}) already serves" in broker.stderr.decode()
    with instance.connect() as client:
        assert client.stats()["broker_pid"] == broker_pid
        assert read_text(client, "precious") == "keep me"
    assert leftovers(instance.names)  # still all there, and still in use


# ---- the default key file ----


def test_default_keyfile_is_scoped_by_slurm_job(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("TFEM_KEYFILE", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    plain = config.default_keyfile()
    assert plain == tmp_path / "tfem" / "registry.key"
    assert (tmp_path / "tfem").stat().st_mode & 0o777 == 0o700
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    job = config.default_keyfile()
    assert job == tmp_path / "tfem" / "registry-job4242.key"
    assert config.resolve_keyfile() == job
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    other = config.default_keyfile()
    assert len({plain, job, other}) == 3
    assert Instance.for_keyfile().segment != Instance.for_keyfile(job).segment
    monkeypatch.setenv("TFEM_KEYFILE", str(tmp_path / "mine.key"))
    assert config.resolve_keyfile() == tmp_path / "mine.key"  # TFEM_KEYFILE wins

    env = dict(os.environ)  # as monkeypatched
    env.pop("TFEM_KEYFILE")
    result = subprocess.run([sys.executable, "-c", "from tfem.config import default_keyfile as d; print(d())"],
                            env=dict(env, SLURM_JOB_ID="77"), capture_output=True, timeout=30)
    assert result.stdout.decode().strip() == str(tmp_path / "tfem" / "registry-job77.key")


@pytest.fixture
def short_runtime_dir():
    """A runtime directory with a short path (an ipc:// socket path must fit
    in 107 bytes), removed after the servers using it are gone."""
    path = tempfile.mkdtemp(prefix="tfx", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_jobs_on_one_node_find_only_their_own_instance(short_runtime_dir, servers, monkeypatch):
    base = dict(os.environ, XDG_RUNTIME_DIR=short_runtime_dir)
    base.pop("TFEM_KEYFILE", None)
    base.pop("TFEM_BROKER", None)
    job1, job2 = dict(base, SLURM_JOB_ID="101"), dict(base, SLURM_JOB_ID="102")
    monkeypatch.delenv("TFEM_KEYFILE", raising=False)
    monkeypatch.delenv("TFEM_BROKER", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", short_runtime_dir)
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    keyfile = config.default_keyfile()
    names = Instance.for_keyfile()
    servers.track(keyfile, job1)
    up = servers.start("up", *SMALL, env=job1)
    assert keyfile.exists() and registry_pid(keyfile)

    result = run_client(job1, "job/file", "job 101")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == names.endpoint
    result = run_client(job2, "job/file", "job 102")
    assert result.returncode != 0
    assert "BrokerUnavailable" in result.stderr.decode()
    with tfem.connect() as client:
        assert read_text(client, "job/file") == "job 101"

    assert stop_server(up, signal.SIGINT) == 0
    assert leftovers(names) == []
    assert not names.spill_dir.exists()
    assert not keyfile.exists()
