"""The C programs of the tests and examples, compiled with gcc against
libtfem.so once a session (the fixture `programs`), and `run`, which runs one
against an instance the way a C user would: no Python in its environment.
"""

from __future__ import annotations

import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = {
    "producer": ROOT / "examples" / "c" / "producer.c",
    "consumer": ROOT / "examples" / "c" / "consumer.c",
    "errno_cases": ROOT / "tests" / "c" / "errno_cases.c",
    "threads": ROOT / "tests" / "c" / "threads.c",
    "fork": ROOT / "tests" / "c" / "fork.c",
    "space": ROOT / "tests" / "c" / "space.c",
    "cat": ROOT / "tests" / "c" / "cat.c",
    "lifetimes": ROOT / "tests" / "c" / "lifetimes.c",
    "take": ROOT / "tests" / "c" / "take.c",
}


@pytest.fixture(scope="session")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """Each program's name: its executable."""
    flags = subprocess.run([sys.executable, "-m", "tfem", "config", "--cflags", "--libs"],
                           check=True, capture_output=True, text=True).stdout
    out = tmp_path_factory.mktemp("cbin")
    built = {}
    for name, source in SOURCES.items():
        target = out / name
        subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-pthread", "-o", str(target), str(source),
                        *shlex.split(flags)], check=True)
        built[name] = target
    return built


def run(program: pathlib.Path, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # A minimal environment: the program must find its interpreter itself.
    minimal = {"PATH": "/usr/bin:/bin", "TFEM_KEYFILE": env["TFEM_KEYFILE"], "HOME": env.get("HOME", "/")}
    minimal.update({name: env[name] for name in ("TFEM_PYTHON",) if name in env})
    return subprocess.run([str(program), *args], env=minimal, capture_output=True, text=True, timeout=timeout)


def byte_at(name: str, i: int) -> int:
    """The byte examples/c/producer.c writes at offset i of `name`."""
    h = 2166136261
    for c in name.encode():
        h = ((h ^ c) * 16777619) & 0xFFFFFFFF
    return ((h >> (i % 4 * 8)) + i * 31) & 0xFF


def expected(name: str, size: int) -> bytes:
    return bytes(byte_at(name, i) for i in range(size))
