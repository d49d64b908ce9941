"""A real tfem instance (registry + broker processes) per test: the fixtures
`instance_factory`, `instance` and `client`.

Each instance has its own key file under the test's tmp_path, so its queue,
segment, socket and spill store are its own and tests can run side by side.
Teardown stops the servers and then checks that nothing is left behind; a
server that will not stop is killed and its leftovers removed by `tfem clean`,
and the test fails.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Iterator

import pytest
import sysv_ipc

import tfem
from tfem import launch
from tfem.config import Instance
from tfem.discovery import queue_key
from tfem.errors import TfemError

READY_TIMEOUT_S = 60


@dataclasses.dataclass
class RunningInstance:
    keyfile: pathlib.Path
    names: Instance
    spill_dir: pathlib.Path
    process: subprocess.Popen[bytes]

    @property
    def env(self) -> dict[str, str]:
        """The environment a client process needs to find this instance."""
        env = dict(os.environ, TFEM_KEYFILE=str(self.keyfile))
        env.pop("TFEM_BROKER", None)
        return env

    def connect(self) -> tfem.Client:
        return tfem.connect(self.keyfile)

    def tfem(self, *args: str, check: bool = True, timeout: float = 120,
             input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run the tfem command line against this instance."""
        result = subprocess.run([sys.executable, "-m", "tfem", *args], env=self.env, input=input,
                                capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"tfem {' '.join(args)} failed: {result.stderr.decode()}")
        return result


def leftovers(names: Instance) -> list[str]:
    """What an instance left on the machine."""
    found = []
    if os.path.exists(f"/dev/shm{names.segment}"):
        found.append(f"segment {names.segment}")
    if names.socket_path.exists():
        found.append(f"socket {names.socket_path}")
    if names.keyfile.exists():
        try:
            sysv_ipc.MessageQueue(queue_key(names.keyfile))
            found.append("registry queue")
        except sysv_ipc.ExistentialError:
            pass
    return found


def start_instance(tmp_path: pathlib.Path, *options: str) -> RunningInstance:
    """`tfem up` with a key file in tmp_path; returns once it serves."""
    keyfile = tmp_path / "tfem.key"
    spill_dir = tmp_path / "spill"
    log_path = tmp_path / "tfem-up.log"  # a file, not a pipe: nobody must read it for the servers to go on
    with open(log_path, "ab") as log:
        try:
            process = launch.start([sys.executable, "-m", "tfem", "up", "--keyfile", str(keyfile),
                                    "--spill-dir", str(spill_dir), *options],
                                   "tfem up", READY_TIMEOUT_S, stderr=log)
        except TfemError as exc:
            remove_leftovers(keyfile, spill_dir)
            raise RuntimeError(f"{exc}: {log_path.read_text(errors='replace')}") from None
    return RunningInstance(keyfile, Instance.for_keyfile(keyfile), spill_dir, process)


def stop_instance(instance: RunningInstance) -> list[str]:
    """Stop the instance as a user would (SIGTERM); what it left behind."""
    launch.stop(instance.process)
    return remove_leftovers(instance.keyfile, instance.spill_dir)


def remove_leftovers(keyfile: pathlib.Path, spill_dir: pathlib.Path) -> list[str]:
    """What the stopped instance of `keyfile` left behind, removed."""
    left = leftovers(Instance.for_keyfile(keyfile))
    if left or spill_dir.exists():
        subprocess.run([sys.executable, "-m", "tfem", "clean", "--keyfile", str(keyfile)], capture_output=True)
        shutil.rmtree(spill_dir, ignore_errors=True)
        left.append("spill store")
    return left


@pytest.fixture
def instance_factory(tmp_path: pathlib.Path) -> Iterator:
    """Start instances with options of the test's choosing; all are stopped
    and checked for leftovers at teardown."""
    started: list[RunningInstance] = []

    def start(*options: str, subdir: str = "") -> RunningInstance:
        where = tmp_path / subdir if subdir else tmp_path
        where.mkdir(exist_ok=True)
        inst = start_instance(where, *options)
        started.append(inst)
        return inst

    yield start
    left = []
    for inst in started:
        left += stop_instance(inst)
    assert not left, f"left behind: {left}"


SMALL = ("--slots", "256", "--buf-size", "1K", "--block-size", "4K", "--memory", "1M")


@pytest.fixture
def instance(instance_factory) -> RunningInstance:
    """A small instance: 256 slots, 1 KiB inline, 4 KiB blocks, 1 MiB arena, spill on."""
    return instance_factory(*SMALL)


@pytest.fixture
def client(instance: RunningInstance) -> Iterator[tfem.Client]:
    with instance.connect() as c:
        yield c
