"""The benchmark suite runs end to end (`python -m bench --quick`) and
writes a report that parses. Timings are never checked here: only that
every workload ran and every output exists and is well-formed. Redis is
left out (--no-redis): a fresh machine has no redis-server; the full run
(`python -m bench`) needs it."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKLOADS = {"handoff", "pairs", "stream", "pipeline", "c", "memory", "spill", "putget", "zerocopy", "waits",
             "broker", "cluster"}


def test_quick_run_writes_a_report(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "results"
    env = dict(os.environ)
    env.pop("TFEM_KEYFILE", None)
    env.pop("TFEM_BROKER", None)
    # One run of each figure: every workload and every output is what this
    # checks, and the suite's time is what a second run would cost (~20 s).
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--repeats", "1", "--no-redis", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"python -m bench --quick failed:\n{run.stderr[-4000:]}"

    report = json.loads((out / "latest.json").read_text())
    assert set(report["workloads"]) == WORKLOADS
    failed = {name: w["error"] for name, w in report["workloads"].items() if "error" in w}
    assert not failed, f"workloads failed: {failed}"
    assert report["meta"]["quick"] is True
    for target in report["targets"]:
        assert target["met"] in (True, False, None)
        assert target["value"] is None or isinstance(target["value"], (int, float))

    markdown = (out / "latest.md").read_text()
    assert markdown.startswith("# tfem benchmarks")
    assert "## Targets" in markdown and "## One handoff" in markdown

    for png in ("handoff_latency.png", "handoff_throughput.png", "pairs.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_cluster_quick_run_measures_every_peer_and_leaves_nothing(tmp_path: pathlib.Path) -> None:
    """The cross-node workload alone, one run: every peer has a figure in
    both securities, the report has its section, and its teardown found
    nothing left (the nodes check their segments, queues, processes and
    network; the services say so on stderr)."""
    out = tmp_path / "results"
    # Redis as a peer needs the server and the bench extra's client; the
    # README's test command installs neither.
    redis = shutil.which("redis-server") is not None and importlib.util.find_spec("redis") is not None
    env = dict(os.environ)
    env.pop("TFEM_KEYFILE", None)
    env.pop("TFEM_BROKER", None)
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--repeats", "1", "--only", "cluster",
                          "--out", str(out), *(() if redis else ("--no-redis",))], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"python -m bench --only cluster failed:\n{run.stderr[-4000:]}"
    assert "left behind" not in run.stderr and "cleanup step failed" not in run.stderr, run.stderr[-4000:]

    cluster = json.loads((out / "latest.json").read_text())["workloads"]["cluster"]
    assert "error" not in cluster, cluster.get("error")
    peers = {"curve": {"tfem-big", "zmq-big", "tfem-small"},
             "insecure": {"tfem-big", "zmq-big", "tfem-small", *(("redis-small",) if redis else ())}}
    for security, expected in peers.items():
        figures = cluster["results"][security]
        assert set(figures) == expected, security
        assert all(f["median"] > 0 and len(f["runs"]) == 1 for f in figures.values()), figures
    markdown = (out / "latest.md").read_text()
    assert "## Across two nodes" in markdown and "raw pyzmq" in markdown
