"""Simulated nodes: the fixture `nodes`, for tests of what crosses nodes.

`nodes(n)` gives n nodes on this machine. Each is a set of namespaces kept
alive by one process of its own, the holder (`sleep infinity`):

- network: a named netns (`ip netns add`) whose eth0 is one end of a veth
  pair; the other end is on a bridge on the host. Node i has 10.77.X.(i+2),
  the bridge 10.77.X.1: nodes reach each other, and the host reaches them,
  over IP only; each has its own loopback.
- IPC: its own SysV queues (a registry's queue is the node's alone).
- UTS: its own host name, its name (node0, node1, ...).
- mount: private propagation (nothing mounted in it reaches the host), a
  tmpfs of its own on /dev/shm (the segments) and one on the runtime
  directory (key file, broker socket, $TMPDIR). The runtime directory has
  the same path on every node, as on a cluster: the namespaces alone keep
  the nodes apart, so a leak between them shows as a clash of names.

Every process of a node runs under `nsenter` into its four namespaces,
with the node's environment ($TFEM_KEYFILE, $XDG_RUNTIME_DIR, $TMPDIR,
$TFEM_TEST_NODE, and the venv's bin first on $PATH). The pid namespace is
the host's: the harness signals and watches node processes by pid.

What a set of nodes makes on the host is named by its token tfemnNNN, NNN
being the subnet 10.77.NNN.0/24 it claimed: bridge tfemnNNNb, veths
tfemnNNNh<i> (and tfemnNNNn<i> until moved into the node), netns
tfemnNNN-<i>. The claim is an flock on /run/tfem-test-nodes/NNN held for the
nodes' life, so a token whose lock nobody holds belongs to a run that was
killed: the next set made removes what it left (its processes, veths,
bridge, netns), and never touches a live run's.

Without namespaces (not root, no `ip`/`unshare`/`nsenter`, a setup that
fails) or with TFEM_TEST_NODES=loopback, the nodes are directories on
127.0.0.1 instead: their own key file, runtime directory and so segment
names, the same API, `isolated` False, and a NodesNotIsolated warning in
the test's output. TFEM_TEST_NODES=netns makes a failing setup an error
instead of a fallback.

Teardown stops each node's `tfem up` as a user would, kills every other
process of the node, removes the network, and fails the test if anything
was left: a segment or queue in a node, a spill store, a process, a netns,
a veth, a mount.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import pathlib
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest

from tests._instances import leftovers
from tests._proc_tools import pid_dead, pid_gone, wait_until
from tfem import launch
from tfem.broker.spill import STORE_FILES
from tfem.config import Instance
from tfem.errors import TfemError

ENV_NODES = "TFEM_TEST_NODES"
KINDS = ("auto", "netns", "loopback")
PREFIX = "tfemn"
LOCK_DIR = pathlib.Path("/run/tfem-test-nodes")
NETNS_DIR = pathlib.Path("/run/netns")  # where `ip netns add` puts its names
_TOKEN = re.compile(rf"^({PREFIX}\d{{3}})(?:b|[hn]\d+|-\d+)$")
SETUP_TIMEOUT_S = 10.0
FIRST_PORT = 20000  # a node's network is new: every port is free


class NodesNotIsolated(UserWarning):
    """The nodes share the host's network, /dev/shm and SysV queues."""


class NodesUnavailable(RuntimeError):
    """Namespaced nodes could not be set up (the reason is the message)."""


def namespaces_unavailable() -> str | None:
    """Why namespaced nodes cannot be made here, or None if they can."""
    if not sys.platform.startswith("linux"):
        return f"namespaces are Linux's ({sys.platform})"
    if os.geteuid() != 0:
        return "not root"
    missing = [tool for tool in ("ip", "unshare", "nsenter", "mount") if shutil.which(tool) is None]
    return f"no {', '.join(missing)} on PATH" if missing else None


def _run_ip(*args: str, input: str | None = None) -> str:
    result = subprocess.run(["ip", *args], input=input, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NodesUnavailable(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _netns_pids(netns: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30)
    return [int(word) for word in result.stdout.split()]


def _host_names() -> list[str]:
    """The host's network interfaces and named netns."""
    netns = os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else []
    return os.listdir("/sys/class/net") + netns


def _token_names(token: str) -> list[str]:
    return [name for name in _host_names() if (m := _TOKEN.match(name)) and m.group(1) == token]


def _kill_all(pids: Sequence[int]) -> list[str]:
    """SIGKILL each pid and wait until it has died (its parent reaps it);
    those that did not."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stayed = []
    for pid in pids:
        try:
            wait_until(lambda: pid_dead(pid), 10, f"pid {pid} to die")
        except pytest.fail.Exception:
            stayed.append(f"process {pid} survived SIGKILL")
    return stayed


def _remove_network(token: str) -> None:
    """Its processes killed, its veths, netns and bridge deleted."""
    netns = [name for name in _token_names(token) if name.startswith(f"{token}-")]
    _kill_all([pid for name in netns for pid in _netns_pids(name)])
    # Deleting a veth's host end removes the pair at once; left to its
    # netns's deletion, it would go later (the kernel frees netns lazily).
    batch = [f"link del {name}" for name in _token_names(token) if not name.startswith(f"{token}-")]
    batch += [f"netns del {name}" for name in netns]
    if batch:
        subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(batch) + "\n", capture_output=True,
                       text=True, timeout=30)
    for runtime in pathlib.Path(tempfile.gettempdir()).glob(f"{token}-*"):  # empty: its tmpfs went with the node
        shutil.rmtree(runtime, ignore_errors=True)


def _try_lock(subnet: int) -> int | None:
    """The claim on `subnet` (an open descriptor) if nobody holds it."""
    LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    path = LOCK_DIR / str(subnet)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not unlinked by its last holder meanwhile
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def _release(subnet: int, fd: int) -> None:
    (LOCK_DIR / str(subnet)).unlink(missing_ok=True)  # before unlocking: a new claimer checks the inode
    os.close(fd)


def remove_stale() -> list[str]:
    """Remove what killed runs left (tokens nobody holds); their tokens."""
    removed = []
    for token in sorted({m.group(1) for name in _host_names() if (m := _TOKEN.match(name))}):
        subnet = int(token[len(PREFIX):])
        fd = _try_lock(subnet)
        if fd is not None:
            try:
                _remove_network(token)
                removed.append(token)
            finally:
                _release(subnet, fd)
    return removed


def _claim_subnet() -> tuple[int, int]:
    """A subnet 10.77.X.0/24 no interface uses and no live run holds: (X, lock)."""
    used = {int(m.group(1)) for m in re.finditer(r"inet 10\.77\.(\d+)\.", _run_ip("-o", "-4", "addr"))}
    for subnet in range(1, 255):
        if subnet not in used:
            fd = _try_lock(subnet)
            if fd is not None:
                return subnet, fd
    raise NodesUnavailable("every subnet 10.77.1-254.0/24 is taken")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


class Node:
    """One simulated node. Its processes run in its namespaces (if
    `isolated`) with its environment; `dir` is a directory on the host's
    file system (logs, spill store), `private` its runtime directory."""

    def __init__(self, name: str, address: str, dir: pathlib.Path, private: pathlib.Path,
                 enter: Sequence[str] = (), holder: subprocess.Popen[bytes] | None = None,
                 netns: str | None = None) -> None:
        self.name, self.address, self.dir, self.private = name, address, dir, private
        self.keyfile = private / "tfem.key"
        self.spill_dir = dir / "spill"
        self.log_path = dir / "up.log"
        self.up_process: subprocess.Popen[bytes] | None = None
        self._enter = list(enter)
        self._holder = holder
        self._netns = netns
        self._started: list[subprocess.Popen[bytes]] = []
        self._ports = itertools.count(FIRST_PORT)

    @property
    def isolated(self) -> bool:
        return self._netns is not None

    @property
    def namespace_files(self) -> dict[str, str]:
        """Its namespaces' files by kind ("net", "ipc", "uts", "mnt"), for a
        process that joins them itself (setns); empty if not isolated."""
        if self._netns is None or self._holder is None:
            return {}
        held = {kind: f"/proc/{self._holder.pid}/ns/{kind}" for kind in ("ipc", "uts", "mnt")}
        return {"net": str(NETNS_DIR / self._netns), **held}

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, TFEM_KEYFILE=str(self.keyfile), XDG_RUNTIME_DIR=str(self.private),
                   TMPDIR=str(self.private / "tmp"), TFEM_TEST_NODE=self.name)
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        env.pop("TFEM_BROKER", None)
        return env

    def argv(self, argv: Sequence[str], cwd: str | os.PathLike[str] | None = None) -> list[str]:
        """`argv` as run inside the node (entering a mount namespace moves
        to its root, hence the working directory)."""
        if not self._enter:
            return list(argv)
        return [*self._enter, f"--wd={os.fspath(cwd or os.getcwd())}", *argv]

    def _environment(self, env: Mapping[str, str] | None) -> dict[str, str]:
        return {**self.env, **(env or {})}

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, input: bytes | None = None,
            timeout: float = 60.0, check: bool = True,
            cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run `argv` in the node to its end (`env`: variables added to the
        node's). With `check`, an exit status other than 0 fails the test."""
        result = subprocess.run(self.argv(argv, cwd), env=self._environment(env), input=input,
                                capture_output=True, timeout=timeout, cwd=cwd)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name}: {list(argv)} exited with {result.returncode}: "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike[str] | None = None, **popen: Any) -> subprocess.Popen[bytes]:
        """Start `argv` in the node; killed at teardown if still running."""
        process = subprocess.Popen(self.argv(argv, cwd), env=self._environment(env), cwd=cwd, **popen)
        self._started.append(process)
        return process

    def tfem(self, *args: str, **run: Any) -> subprocess.CompletedProcess[bytes]:
        """The tfem command line in the node, on its instance."""
        return self.run([sys.executable, "-m", "tfem", *args], **run)

    def python(self, source: str | pathlib.Path, *args: str, **run: Any) -> subprocess.CompletedProcess[bytes]:
        """Run Python in the node: `source` is code (str) or a script (Path)."""
        program = [str(source)] if isinstance(source, pathlib.Path) else ["-c", source]
        return self.run([sys.executable, *program, *args], **run)

    def up(self, *options: str, timeout: float = 60.0) -> subprocess.Popen[bytes]:
        """Start `tfem up OPTIONS` in the node with its key file and spill
        directory; returns once it serves. Its log is `log_path`."""
        if self.up_process is not None and self.up_process.poll() is None:
            raise RuntimeError(f"{self.name}: tfem up already runs (pid {self.up_process.pid})")
        argv = [sys.executable, "-m", "tfem", "up", "--keyfile", str(self.keyfile), "--spill-dir",
                str(self.spill_dir), *options]
        with open(self.log_path, "ab") as log:
            try:
                self.up_process = launch.start(self.argv(argv), f"tfem up on {self.name}", timeout,
                                               env=self.env, stderr=log, stdin=subprocess.DEVNULL)
            except TfemError as exc:
                raise AssertionError(f"{exc}: {self.log()}") from None
        return self.up_process

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def servers(self) -> dict[str, int]:
        """The pids of the running tfem up's servers: {"registry": pid, "broker": pid}."""
        if self.up_process is None or self.up_process.poll() is not None:
            return {}
        found: dict[str, int] = {}
        for pid in _children(self.up_process.pid):
            argv = _cmdline(pid)
            for role in ("registry", "broker"):
                if role in argv:
                    found[role] = pid
        return found

    def stop_up(self) -> int:
        """Stop tfem up as a user would (SIGTERM); its exit status."""
        if self.up_process is None:
            raise RuntimeError(f"{self.name}: no tfem up was started")
        if self.up_process.poll() is None:
            self.up_process.send_signal(signal.SIGCONT)  # in case a test stopped it
        return launch.stop(self.up_process)

    def kill_up(self) -> None:
        """SIGKILL tfem up; returns once its servers have died with it."""
        if self.up_process is None:
            raise RuntimeError(f"{self.name}: no tfem up was started")
        servers = list(self.servers().values())
        self.up_process.kill()
        self.up_process.wait(30)
        for pid in servers:
            wait_until(lambda: pid_gone(pid), 30, f"{self.name}'s server {pid} to die with tfem up")

    def kill_broker(self) -> int:
        """SIGKILL the broker; returns its pid once tfem up's next broker
        serves (it has announced itself: new clients find it)."""
        old = self.servers().get("broker")
        if old is None:
            raise RuntimeError(f"{self.name}: no broker runs")
        os.kill(old, signal.SIGKILL)

        def next_serves() -> bool:
            new = self.servers().get("broker")
            return new not in (None, old) and f"broker {new} serving" in self.log()

        wait_until(next_serves, 30, f"tfem up on {self.name} to start another broker")
        return old

    def free_port(self) -> int:
        """A TCP port nothing in the node listens on."""
        if self.isolated:
            return next(self._ports)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port

    def shm_names(self) -> list[str]:
        """What is in the /dev/shm this node sees (the host's if not isolated)."""
        return self.run(["ls", "-A", "/dev/shm"]).stdout.decode().split()

    def queue_keys(self) -> list[int]:
        """The keys of the SysV queues this node sees (the host's if not isolated)."""
        lines = self.run(["cat", "/proc/sysvipc/msg"]).stdout.decode().splitlines()[1:]
        return [int(line.split()[0]) for line in lines]

    def pids(self) -> list[int]:
        """Every live process of the node: all in its netns if isolated,
        else those started through it and tfem up's servers."""
        if self._netns is not None:
            return _netns_pids(self._netns)
        live = [p.pid for p in [*self._started, *([self.up_process] if self.up_process else [])] if p.poll() is None]
        return live + list(self.servers().values())

    def _close(self) -> list[str]:
        """Kill what the test left running, stop tfem up, report leftovers."""
        keep = {self.up_process.pid if self.up_process else 0, *self.servers().values(),
                self._holder.pid if self._holder else 0}
        left = _kill_all([pid for pid in self.pids() if pid not in keep])
        for process in self._started:
            process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        if self.up_process is not None:
            self.stop_up()
        if self.isolated:
            left += [f"/dev/shm/{name}" for name in self.shm_names()]
            left += [f"SysV queue {key:#010x}" for key in self.queue_keys()]
            # the socket, the state file, a key file with a record (the registry
            # empties one it did not make); $TMPDIR is the test's
            left += self.run(["find", str(self.private), "-path", str(self.private / "tmp"), "-prune", "-o",
                              "(", "-type", "s", "-o", "-type", "f", "-size", "+0c", ")", "-print"]
                             ).stdout.decode().split()
        else:
            found = leftovers(Instance.for_keyfile(self.keyfile))
            if found:
                subprocess.run([sys.executable, "-m", "tfem", "clean", "--keyfile", str(self.keyfile)],
                               env=self.env, capture_output=True, timeout=60)
            left += found
        if any((self.spill_dir / name).exists() for name in STORE_FILES):
            left.append(f"spill store {self.spill_dir}")
        return [f"{self.name}: {what}" for what in left]

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.address}{'' if self.isolated else ' (not isolated)'}>"


class Nodes:
    """n simulated nodes under `base` (see the module's docstring);
    `close()` removes them. `kind`: "netns", "loopback", or "auto" (the
    default, from $TFEM_TEST_NODES): namespaces if they can be made."""

    def __init__(self, base: pathlib.Path, n: int, kind: str | None = None) -> None:
        chosen = kind or os.environ.get(ENV_NODES) or "auto"
        if chosen not in KINDS:
            raise ValueError(f"{ENV_NODES} (or kind) must be one of {', '.join(KINDS)}, not {chosen!r}")
        if n < 1 or n > 252:
            raise ValueError(f"1 to 252 nodes, not {n}")
        self.base = base
        self.shared = base / "shared"  # every node sees it, as a job's shared file system
        self.shared.mkdir(parents=True, exist_ok=True)
        # Runtime directories under /tmp, not `base`: a socket's path must fit in 107 bytes.
        self.runtime: pathlib.Path
        self.nodes: list[Node] = []
        self.token: str | None = None
        self.why_not_isolated: str | None = "chosen" if chosen == "loopback" else namespaces_unavailable()
        self._subnet: tuple[int, int] | None = None
        self._holders: list[subprocess.Popen[bytes]] = []
        self._pids: set[int] = set()  # every process the nodes had, to check they are all gone
        self._closed = False
        if self.why_not_isolated is None:
            try:
                self._make_isolated(n)
                return
            except NodesUnavailable as exc:
                self.why_not_isolated = str(exc)
        if chosen == "netns":
            raise NodesUnavailable(f"namespaced nodes were asked for: {self.why_not_isolated}")
        if kind is None:  # the session's choice, not a test's: say so in its output
            why = f"{ENV_NODES}=loopback" if chosen == "loopback" else self.why_not_isolated
            warnings.warn(NodesNotIsolated(f"simulated nodes share 127.0.0.1, /dev/shm and SysV queues ({why})"),
                          stacklevel=3)
        self._make_loopback(n)

    @property
    def isolated(self) -> bool:
        return self.token is not None

    def _make_loopback(self, n: int) -> None:
        self.runtime = pathlib.Path(tempfile.mkdtemp(prefix="tfem-nodes-"))
        for i in range(n):
            (self.base / f"node{i}").mkdir()
            private = self.runtime / f"node{i}"
            private.mkdir(mode=0o700)
            (private / "tmp").mkdir(mode=0o700)
            self.nodes.append(Node(f"node{i}", "127.0.0.1", self.base / f"node{i}", private))

    def _make_isolated(self, n: int) -> None:
        remove_stale()
        subnet, fd = _claim_subnet()
        self._subnet = (subnet, fd)
        self.token = token = f"{PREFIX}{subnet:03d}"
        try:
            batch = [f"link add {token}b type bridge", f"addr add 10.77.{subnet}.1/24 dev {token}b",
                     f"link set {token}b up"]
            for i in range(n):
                batch += [f"netns add {token}-{i}", f"link add {token}h{i} type veth peer name {token}n{i}",
                          f"link set {token}n{i} netns {token}-{i}", f"link set {token}h{i} master {token}b up"]
            _run_ip("-batch", "-", input="\n".join(batch) + "\n")
            self.runtime = pathlib.Path(tempfile.mkdtemp(prefix=f"{token}-"))
            private = self.runtime  # the same path on every node; a tmpfs of its own on each
            holders = [self._start_holder(i, f"10.77.{subnet}.{i + 2}", private) for i in range(n)]
            for i, holder in enumerate(holders):
                self._wait_ready(i, holder)
                enter = ["nsenter", f"--net={NETNS_DIR}/{token}-{i}", f"--ipc=/proc/{holder.pid}/ns/ipc",
                         f"--uts=/proc/{holder.pid}/ns/uts", f"--mount=/proc/{holder.pid}/ns/mnt"]
                self.nodes.append(Node(f"node{i}", f"10.77.{subnet}.{i + 2}", self.base / f"node{i}", private,
                                       enter, holder, f"{token}-{i}"))
        except BaseException:
            self._remove_isolated()
            self.nodes, self.token = [], None
            raise

    def _start_holder(self, i: int, address: str, private: pathlib.Path) -> subprocess.Popen[bytes]:
        where = self.base / f"node{i}"
        where.mkdir()
        script = f"""set -e
ip -batch - <<EOF
link set lo up
link set {self.token}n{i} name eth0
addr add {address}/24 dev eth0
link set eth0 up
EOF
hostname node{i}
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0700 tmpfs {shlex.quote(str(private))}
mkdir -m 0700 {shlex.quote(str(private / "tmp"))}
echo ready
exec sleep infinity
"""
        with open(where / "holder.log", "wb") as log:
            holder = subprocess.Popen(["ip", "netns", "exec", f"{self.token}-{i}", "unshare", "--ipc", "--uts", "--mount",
                                       "--propagation", "private", "sh", "-c", script],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        self._holders.append(holder)
        self._pids.add(holder.pid)
        return holder

    def _wait_ready(self, i: int, holder: subprocess.Popen[bytes]) -> None:
        assert holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], SETUP_TIMEOUT_S)
        line = holder.stdout.readline() if ready else b""
        holder.stdout.close()  # the holder never writes again
        if line.strip() != b"ready":
            log = (self.base / f"node{i}" / "holder.log").read_text(errors="replace").strip()
            raise NodesUnavailable(f"node{i} could not be set up: {log or f'no word within {SETUP_TIMEOUT_S} s'}")

    def _remove_isolated(self) -> None:
        if self._subnet is None:
            return
        try:
            if self.token is not None:
                _remove_network(self.token)
        finally:
            for holder in self._holders:
                holder.wait()
            _release(*self._subnet)
            self._subnet = None

    def close(self) -> list[str]:
        """Remove the nodes; what was left behind (empty if nothing)."""
        if self._closed:
            return []
        self._closed = True
        left = []
        try:
            for node in self.nodes:
                self._pids.update(node.pids())
                left += node._close()
            if self.isolated:  # what ran outside its node would have written here
                left += [f"{path} on the host" for path in self.runtime.iterdir()]
        finally:
            if self.isolated:
                self._remove_isolated()
            else:
                shutil.rmtree(self.runtime, ignore_errors=True)
        for pid in sorted(self._pids):  # and reaped: by us, by tfem up, or by init for orphans
            try:
                wait_until(lambda: pid_gone(pid), 10, f"pid {pid} to be reaped")
            except pytest.fail.Exception:
                left.append(f"process {pid} ({' '.join(_cmdline(pid))})")
        if self.token is not None:
            left += [f"netns or link {name}" for name in _token_names(self.token)]
            left += [f"mount {point}" for point in _mounts_under(self.base) + _mounts_under(self.runtime)]
            for node in self.nodes:
                segment = Instance.for_keyfile(node.keyfile).segment
                if os.path.exists(f"/dev/shm{segment}"):
                    left.append(f"{node.name}'s segment {segment} on the host")
        return left

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, *exc: object) -> None:
        left = self.close()
        if left:
            raise AssertionError(f"left behind: {left}")

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)


def _mounts_under(base: pathlib.Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [point for point in points if point == str(base) or point.startswith(f"{base}/")]


@pytest.fixture
def nodes(tmp_path: pathlib.Path) -> Iterator[Callable[..., Nodes]]:
    """make(n, kind=None) -> Nodes, n simulated nodes (see Nodes). At
    teardown, whatever the test did, every set is removed, and the test
    fails if anything was left behind."""
    made: list[Nodes] = []

    def make(n: int, kind: str | None = None) -> Nodes:
        made.append(Nodes(tmp_path / f"nodes{len(made)}", n, kind))
        return made[-1]

    yield make
    left = []
    for each in made:
        left += each.close()
    assert not left, f"left behind: {left}"
