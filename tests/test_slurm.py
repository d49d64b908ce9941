"""examples/slurm/pipeline.sbatch under a real Slurm, submitted as a user
would: a normal end, a failing stage, a scancel mid-run and the time-limit
warning, on one node and on two, and after each nothing of it on any node:
no segment, queue, key file, node directory, shared directory or process.

The cluster (tests/slurm_cluster.sh) is a private munged, a slurmctld and
two slurmd on this host, started as root from Debian's packages (installed
here with apt-get if missing) and stopped at the end, even after a failure.
Without root or the packages the whole file is skipped, with a warning that
shows in the summary. The two "nodes" share /tmp, /dev/shm and SysV IPC, so
the checks see both at once.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Iterator

import pytest
import sysv_ipc

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "slurm" / "pipeline.sbatch"
CLUSTER = ROOT / "tests" / "slurm_cluster.sh"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
COMMANDS = ["slurmctld", "slurmd", "sbatch", "munged", "mungekey"]
# slurmctld looks at time limits (and sends --signal warnings) every 30 s
# from its start: the time-limit jobs are submitted to be running then.
LIMIT_CHECK_S = 30
# Long enough (many small parts) to be running when cancelled or warned.
LONG = {"PARTS": "300000", "PART_SIZE": "512"}
ENDINGS = ["normal", "failing", "scancel", "time-limit"]


class SlurmUnavailable(UserWarning):
    """The Slurm tests could not run here."""


def skip_loudly(reason: str) -> None:
    warnings.warn(SlurmUnavailable(f"tests/test_slurm.py skipped: {reason}"))
    pytest.skip(reason)


def install_packages() -> str | None:
    """Debian's Slurm and munge, installed if missing; why not, if they cannot be."""
    if all(shutil.which(c) for c in COMMANDS):
        return None
    if os.getuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed, and installing it needs root and apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return f"{' '.join(argv)} took more than 300 s"
        if done.returncode != 0:
            return f"{' '.join(argv)} failed: {done.stderr.strip()[-300:]}"
    return None


@dataclasses.dataclass
class Cluster:
    directory: pathlib.Path
    nodes: int
    started: float  # when slurmctld started: its time-limit checks follow from it
    env: dict[str, str]

    @property
    def node_dir(self) -> pathlib.Path:
        """TFEM_NODE_DIR of the jobs: their own, not the /tmp of other tests."""
        return self.directory / "node-local"

    @property
    def submit_dir(self) -> pathlib.Path:
        return self.directory / "submit"

    @property
    def out_dir(self) -> pathlib.Path:
        return self.directory / "out"

    def run(self, *argv: str, check: bool = True, cwd: pathlib.Path | None = None) -> str:
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30, cwd=cwd)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: {done.stdout}{done.stderr}")
        return done.stdout

    def cancel_all(self) -> None:
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).split()
        if jobs:
            self.run("scancel", *jobs, check=False)
        deadline = time.monotonic() + 30
        while self.run("squeue", "-h", "-o", "%i", check=False).strip() and time.monotonic() < deadline:
            time.sleep(0.2)


def start_cluster(directory: pathlib.Path, nodes: int) -> Cluster | str:
    started = time.time()
    up = subprocess.run(["bash", str(CLUSTER), "up", str(directory), str(nodes)],
                        capture_output=True, text=True, timeout=60)
    if up.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "stop", str(directory)], capture_output=True, timeout=60)
        return up.stderr.strip()[-500:]
    cluster = Cluster(directory, nodes, started, dict(os.environ, SLURM_CONF=up.stdout.strip()))
    for d in (cluster.node_dir, cluster.submit_dir, cluster.out_dir):
        d.mkdir()
    return cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if os.getuid() != 0:
        skip_loudly("starting slurmctld and slurmd needs root")
    why = install_packages()
    if why:
        skip_loudly(why)
    # Not under pytest's tmp_path: munged wants every directory above its
    # socket searchable by all, and pytest's are private.
    base = pathlib.Path(tempfile.mkdtemp(prefix="tfem-slurm-"))
    base.chmod(0o755)
    started = start_cluster(base / "two", 2)
    if isinstance(started, str):  # one slurmd, then: the two-node runs skip
        first_error = started
        started = start_cluster(base / "one", 1)
        if isinstance(started, str):
            shutil.rmtree(base)
            skip_loudly(f"no Slurm would start: {first_error} / {started}")
        warnings.warn(SlurmUnavailable(f"two slurmd would not start on this host ({first_error}): "
                                       "only one-node runs"))
    try:
        yield started
    finally:
        started.cancel_all()  # a slurmd stopped under a running step would leave its slurmstepd
        stop = subprocess.run(["bash", str(CLUSTER), "stop", str(started.directory)],
                              capture_output=True, text=True, timeout=120)
        left = processes_mentioning(str(base))
        shutil.rmtree(base, ignore_errors=True)
        assert stop.returncode == 0, stop.stderr
        assert left == [], f"Slurm daemons still running: {left}"


def command_lines() -> Iterator[tuple[pathlib.Path, str]]:
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit() and proc.name != str(os.getpid()):
            try:
                yield proc, (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue


def processes_mentioning(text: str) -> list[str]:
    return [f"{proc.name}: {line}" for proc, line in command_lines() if text in line]


def processes_of_job(job: str, conf: str) -> list[str]:
    """Processes of job `job` of the cluster of `conf` (another cluster on
    this host numbers its jobs from 1 too)."""
    markers = [f"\0SLURM_JOB_ID={job}\0".encode(), f"\0SLURM_CONF={conf}\0".encode()]
    found = []
    for proc, line in command_lines():
        try:
            environ = b"\0" + (proc / "environ").read_bytes()
            if all(m in environ for m in markers):
                found.append(f"{proc.name}: {line}")
        except OSError:
            continue
    return found


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def queue_ids() -> set[str]:
    lines = pathlib.Path("/proc/sysvipc/msg").read_text().splitlines()[1:]
    return {line.split()[1] for line in lines}


@dataclasses.dataclass
class Run:
    """One submission of the batch script, and what it left behind."""

    cluster: Cluster
    nodes: int
    ending: str
    submit_dir: pathlib.Path  # SLURM_SUBMIT_DIR: the script's shared directory goes there
    job: str = ""
    state: str = ""
    exit_code: str = ""
    run_time: str = ""
    left: list[str] = dataclasses.field(default_factory=list)

    def submit(self, *options: str, **env: str) -> None:
        """sbatch as a user types it: from the repository with the script's
        relative path, or from elsewhere with its full path; tfem's venv
        named in TFEM_VENV but not on PATH, and an XDG_RUNTIME_DIR of the
        login node that no compute node has. sbatch passes the environment on."""
        job_env = dict(self.cluster.env, TFEM_VENV=str(pathlib.Path(sys.executable).parent.parent),
                       XDG_RUNTIME_DIR=str(self.cluster.directory / "login-node-runtime-dir"),
                       TFEM_NODE_DIR=str(self.cluster.node_dir), TFEM_MEMORY="64M")
        job_env.update(env)
        venv_bin = str(pathlib.Path(sys.executable).parent)
        job_env["PATH"] = os.pathsep.join(p for p in job_env["PATH"].split(os.pathsep) if p != venv_bin)
        for name in ("VIRTUAL_ENV", "TFEM_KEYFILE", "TFEM_BROKER"):
            job_env.pop(name, None)
        script = str(SCRIPT.relative_to(ROOT)) if self.submit_dir == ROOT else str(SCRIPT)
        done = subprocess.run(["sbatch", "--parsable", f"--nodes={self.nodes}", "--cpus-per-task=3", "--mem=600M",
                               f"--output={self.cluster.out_dir}/slurm-%j.out", *options, script],
                              env=job_env, cwd=self.submit_dir, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        self.job = done.stdout.strip().split(";")[0]

    def output(self) -> str:
        path = self.cluster.out_dir / f"slurm-{self.job}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def instances(self) -> list[dict[str, str]]:
        """Each node's `tfem on NODE: key file K, segment S, queue Q` line."""
        pattern = r"^tfem on (?P<node>\S+): key file (?P<keyfile>\S+), segment (?P<segment>\S+), queue (?P<queue>\d+)$"
        return [m.groupdict() for m in re.finditer(pattern, self.output(), re.M)]

    def running(self) -> bool:
        return bool(self.cluster.run("squeue", "-h", "-j", self.job, check=False).strip())

    def finish(self, timeout: float = 120) -> None:
        """Wait until Slurm is done with the job (completing included), then
        take its state and what it left on the nodes."""
        deadline = time.monotonic() + timeout
        while self.running():
            assert time.monotonic() < deadline, f"job {self.job} ({self.ending}) still running: {self.output()}"
            time.sleep(0.2)
        fields = dict(re.findall(r"(\w+)=(\S*)", self.cluster.run("scontrol", "show", "job", "-o", self.job)))
        self.state, self.exit_code, self.run_time = fields["JobState"], fields["ExitCode"], fields["RunTime"]
        self.left = self.leftovers()

    def leftovers(self) -> list[str]:
        """What the job left on the nodes, removed (the test fails on it, and
        leaves nothing either)."""
        deadline = time.monotonic() + 5  # slurmstepd reaps the last processes as the job leaves the queue
        while (processes := processes_of_job(self.job, self.cluster.env["SLURM_CONF"])) and time.monotonic() < deadline:
            time.sleep(0.2)
        found = [f"process {p}" for p in processes]
        for p in processes:
            kill(int(p.split(":")[0]))
        queues = queue_ids()
        for inst in self.instances():
            segment = pathlib.Path(f"/dev/shm{inst['segment']}")
            if segment.exists():
                found.append(f"segment {inst['segment']} of {inst['node']}")
                segment.unlink()
            if inst["queue"] in queues:
                found.append(f"queue {inst['queue']} of {inst['node']}")
                sysv_ipc.remove_message_queue(int(inst["queue"]))
        for directory in [*self.cluster.node_dir.glob(f"tfem-*-job{self.job}-*"),
                          *self.submit_dir.glob(f"tfem-job{self.job}.nodes")]:
            found.append(f"directory {directory}: {sorted(p.name for p in directory.rglob('*'))}")
            shutil.rmtree(directory)
        return found


@pytest.fixture(scope="module")
def runs(cluster: Cluster) -> dict[tuple[int, str], Run]:
    """Every ending on one node and on two, side by side; each job checked for
    leftovers as soon as Slurm is done with it."""
    sizes = [1, 2] if cluster.nodes == 2 else [1]
    runs = {(n, e): Run(cluster, n, e, ROOT if (n, e) == (1, "normal") else cluster.submit_dir)
            for n in sizes for e in ENDINGS}
    try:
        for n in sizes:
            runs[n, "normal"].submit(PARTS="64", PART_SIZE="64K")
            # A stage fails: a 4 MiB part does not fit an instance of 1 MiB without spill.
            runs[n, "failing"].submit(PARTS="4", PART_SIZE="4M", TFEM_MEMORY="1M", TFEM_OPTIONS="--no-spill")
            runs[n, "scancel"].submit(**LONG)
        for n in sizes:
            run = runs[n, "scancel"]
            deadline = time.monotonic() + 60
            while len(run.instances()) < n:  # every node's tfem is up; the pipeline starts next
                assert run.running() and time.monotonic() < deadline, f"no tfem came up: {run.output()}"
                time.sleep(0.1)
            time.sleep(1.5)
            # The check for processes left behind sees the job's while it runs.
            assert processes_of_job(run.job, cluster.env["SLURM_CONF"]), run.output()
            cluster.run("scancel", run.job)
        for n in sizes:
            for e in ("normal", "failing", "scancel"):
                runs[n, e].finish()
        # Submitted 8 s before slurmctld's next time-limit check: the warning
        # (--signal=B:TERM@55 of a one-minute limit) comes while the pipeline runs.
        checks_done = int((time.time() + 8 - cluster.started) // LIMIT_CHECK_S) + 1
        time.sleep(max(0.0, cluster.started + checks_done * LIMIT_CHECK_S - 8 - time.time()))
        for n in sizes:
            runs[n, "time-limit"].submit("--time=1", "--signal=B:TERM@55", **LONG)
        for n in sizes:
            runs[n, "time-limit"].finish()
    finally:
        for run in runs.values():  # after a failure above: ended, and what it left removed
            if run.job and not run.state:
                cluster.run("scancel", run.job, check=False)
                run.finish()
    return runs


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("nodes", [1, 2])
def test_each_ending_leaves_nothing_on_any_node(runs, nodes, ending):
    if (nodes, ending) not in runs:
        skip_loudly("two slurmd would not start on this host: no two-node runs")
    run = runs[nodes, ending]
    out = run.output()
    up = run.instances()
    assert len({i["node"] for i in up}) == len(up) == nodes, f"every node's tfem says it is up: {out}"
    if ending == "normal":
        assert run.state == "COMPLETED" and out.count("(ok)") == nodes, out
    elif ending == "failing":
        assert run.state == "FAILED" and "a stage failed" in out, out
    elif ending == "scancel":
        assert run.state == "CANCELLED" and "(ok)" not in out, out
    else:
        assert "stopping on SIGTERM" in out and "(ok)" not in out, out
        assert run.state == "FAILED" and run.exit_code == "143:0", (run.state, run.exit_code, out)
        assert run.run_time < "00:01:00", f"stopped before the limit, not by it: {run.run_time}"
    assert run.left == [], out
