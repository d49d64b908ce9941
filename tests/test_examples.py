"""Every example in the README runs, as the README shows it, and checks its
own result: the quick-start demo, the producer and consumer, the pipeline
through tfem and through plain files, the Slurm batch script (outside
Slurm it runs its one-node fallback), and the Dask job."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests._instances import leftovers
from tfem.config import Instance

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_quickstart_demo_under_tfem_up(tmp_path):
    keyfile = tmp_path / "demo.key"
    out = run([sys.executable, "-m", "tfem", "up", "--keyfile", str(keyfile), "--memory", "64M",
               "--", sys.executable, str(EXAMPLES / "demo.py")])
    assert "consumer: read 2000 files in" in out.stdout and ", 0 with wrong bytes" in out.stdout
    assert "demo: every byte arrived" in out.stdout
    assert leftovers(Instance.for_keyfile(keyfile)) == []


def test_producer_then_consumer(instance):
    common = ["--count", "50", "--size", "100K", "--prefix", "ex"]
    run([sys.executable, str(EXAMPLES / "producer.py"), *common], env=instance.env)
    out = run([sys.executable, str(EXAMPLES / "consumer.py"), *common, "--timeout", "10"], env=instance.env)
    assert "read 50 files" in out.stdout and "0 with wrong bytes" in out.stdout


def test_pipeline_through_tfem_and_through_files(instance, tmp_path):
    args = ["--workers", "3", "--parts", "48", "--part-size", "96K"]
    through_tfem = run([sys.executable, str(EXAMPLES / "pipeline.py"), *args], env=instance.env)
    assert "(ok)" in through_tfem.stdout
    (tmp_path / "parts").mkdir()
    through_files = run([sys.executable, str(EXAMPLES / "pipeline.py"), "--backend", str(tmp_path / "parts"), *args])
    assert "(ok)" in through_files.stdout
    # The same input, so the same checksum.
    assert through_tfem.stdout.split("checksum")[1] == through_files.stdout.split("checksum")[1]


def test_slurm_script_runs_its_one_node_fallback(tmp_path):
    """`bash` it from another directory, with tfem's venv named but not on
    PATH and an XDG_RUNTIME_DIR that does not exist: it finds its examples,
    its venv and a runtime directory of its own, and removes them all."""
    venv_bin = os.path.dirname(sys.executable)
    env = dict(os.environ, PARTS="32", PART_SIZE="64K", WORKERS="2", TFEM_MEMORY="64M",
               TFEM_VENV=os.path.dirname(venv_bin),
               XDG_RUNTIME_DIR=str(tmp_path / "no-such-runtime-dir"),
               PATH=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin))
    for name in ("SLURM_JOB_ID", "TFEM_KEYFILE", "VIRTUAL_ENV"):
        env.pop(name, None)
    (tmp_path / "submit").mkdir()
    result = subprocess.run(["bash", str(EXAMPLES / "slurm" / "pipeline.sbatch")], env=env, capture_output=True,
                            text=True, timeout=180, cwd=tmp_path / "submit")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(ok)" in result.stdout
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("tfem on ")]
    keyfile = line.split("key file ")[1].split(",")[0]
    segment = line.split("segment ")[1].split(",")[0]
    # Each node's tfem up stopped its servers, which removed what they made,
    # and the script removed its directories: the node's (in /tmp) and the shared one.
    assert not os.path.exists(f"/dev/shm{segment}")
    assert keyfile.startswith("/tmp/tfem-") and not os.path.exists(os.path.dirname(keyfile))
    assert list((tmp_path / "submit").iterdir()) == []
    assert not (tmp_path / "no-such-runtime-dir").exists()


def test_dask_job_gives_the_answer_of_a_direct_computation(instance):
    pytest.importorskip("dask.distributed")
    spec = importlib.util.spec_from_file_location("dask_dcr", EXAMPLES / "dask_dcr.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = run([sys.executable, str(EXAMPLES / "dask_dcr.py"), "--rows", "20000", "--parts", "5", "--keys", "7",
               "--workers", "2", "--json"], env=instance.env)
    result = json.loads(out.stdout.splitlines()[-1])
    # The same sums, here in plain Python over the example's input.
    table = example.make_input(20000, 7, 1)
    expected: dict[str, list[int]] = {}
    for key, x in zip(table["key"].tolist(), table["x"].tolist()):
        sums = expected.setdefault(str(key), [0, 0])
        sums[0] += x * x % example.MODULUS
        sums[1] += 1
    assert result["answer"] == expected and result["ok"]
    with instance.connect() as client:
        assert client.list() == []  # every stage's files removed
