"""Across nodes: handoffs from node A to node B through tfem, against raw
pyzmq and Redis between the same two nodes.

Two simulated nodes (tests/_nodes.py: each in network, IPC, UTS and mount
namespaces of its own, joined by veths on a host bridge; where those
cannot be made, two directories on 127.0.0.1, and the report says so). The
benchmark's processes are forked workers (procs.Worker) that enter a
node's namespaces first (setns), so they are driven over pipes like every
other workload's. One `tfem up` per node, the two meeting in a cluster
directory on the file system both see.

Each part runs twice, once per security: "curve" (tfem's default across
nodes, each broker with its own key pair; raw pyzmq with CURVE as well)
and "insecure" (`tfem up --insecure`; raw pyzmq in plain text; Redis,
which has no CURVE, is measured here only). Within a security the peers
are interleaved run by run, the order rotating.

- large: the producer on A writes one file of plan.cluster_big_size, in
  16 MiB writes; the consumer on B, already waiting in open, reads all
  of it into a 1 MiB buffer and closes it. Time from the producer's open
  to the consumer's close. Raw pyzmq in the same pattern: DEALER on A
  (bound) to DEALER on B, the same bytes in chunks of tfem's pull
  (broker/cluster.py CHUNK), sent with copy=False, WINDOW in flight with
  one acknowledgement per chunk as tfem's pull does; the receiver copies
  each chunk into its 1 MiB buffer. Time from the sender's first send to
  the receiver's last chunk copied.
- small: plan.cluster_small_count files of 4 KiB; the producer on A
  publishes them one after the other, while the consumer on B opens each
  by name (waiting for it), reads it and closes it, with
  plan.cluster_in_flight threads, each its own client, so that many
  opens are in flight at once. Redis over TCP, redis-server in node A:
  A's client SETs the values, B's client GETs and DELs them, both
  pipelined plan.cluster_in_flight keys a round trip (the consumer asks
  again for a key the producer had not yet set). Both sides start at one
  moment; handoffs per second up to the consumer's last close.

Times are time.perf_counter(), CLOCK_MONOTONIC: the namespaces leave the
clock alone, so the two nodes' readings subtract.
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from tfem import launch
from tfem.broker.cluster import CHUNK, WINDOW
from tfem.errors import TfemError

from .plan import M
from .procs import Worker, WorkerError, orders, sleep_until
from .services import READY_TIMEOUT_S, _pdeathsig_term
from .stats import summary
from .workloads import Context, make_payload, rotated

SECURITIES = ("curve", "insecure")
WRITE_CHUNK = 16 * M
SMALL = 4096
PEERS_TIMEOUT_S = 30.0
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x04000000, 0x08000000, 0x40000000
NS_TYPES = {"net": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS, "mnt": CLONE_NEWNS}


# ---- processes in a node ----


def _enter(namespaces: dict[str, str], env: dict[str, str]) -> None:
    """Join a node's namespaces (the mount one last: it moves the root and
    working directory, which is set back) and take its environment."""
    cwd = os.getcwd()
    libc = ctypes.CDLL(None, use_errno=True)
    for kind in ("net", "ipc", "uts", "mnt"):
        if kind in namespaces:
            fd = os.open(namespaces[kind], os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, NS_TYPES[kind]) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {kind}: {os.strerror(err)}")
            finally:
                os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)


def _in_node(conn: Any, namespaces: dict[str, str], env: dict[str, str], target: Callable[..., None],
             *args: Any) -> None:
    _enter(namespaces, env)
    target(conn, *args)


def node_worker(node: Any, name: str, target: Callable[..., None], *args: Any) -> Worker:
    """A worker process running `target(conn, *args)` inside `node`."""
    return Worker(f"{name} on {node.name}", _in_node, node.namespace_files, node.env, target, *args)


def _client(keyfile: str) -> Any:
    import tfem

    return tfem.connect(keyfile)


# ---- large: tfem ----


def _big_producer(conn: Any, keyfile: str, size: int) -> None:
    """("go", name, start): at `start`, write `name`; answer the time of its open."""
    client = _client(keyfile)
    chunk = memoryview(make_payload(min(size, WRITE_CHUNK)))
    conn.send("ready")
    for _, name, start in orders(conn):
        sleep_until(start)
        t0 = time.perf_counter()
        with client.open(name, "w", timeout=120) as f:  # room: the last run's file may still be freeing
            for offset in range(0, size, len(chunk)):
                f.write(chunk[: min(len(chunk), size - offset)])
        conn.send(t0)
    client.close()


def _big_consumer(conn: Any, keyfile: str, size: int) -> None:
    """("go", name): say "opening", then open `name` (waiting), read it all,
    close it; answer the time of the close."""
    client = _client(keyfile)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    conn.send("ready")
    for _, name in orders(conn):
        conn.send("opening")
        got = 0
        with client.open(name, "r", timeout=600) as f:
            while n := f.readinto(view):
                got += n
        t1 = time.perf_counter()
        if got != size:  # the bytes themselves: the checksum checks them
            raise RuntimeError(f"{name}: {got} bytes read of {size}")
        conn.send(t1)
    client.close()


# ---- large: raw pyzmq ----


def _zmq_socket(security: str, keys: dict[str, bytes], server: bool) -> Any:
    import zmq

    sock: Any = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    if security == "curve":
        if server:
            sock.curve_server = True
            sock.curve_secretkey = keys["server_secret"]
        else:
            sock.curve_serverkey = keys["server_public"]
            sock.curve_publickey, sock.curve_secretkey = keys["client_public"], keys["client_secret"]
    return sock


def _zmq_sender(conn: Any, endpoint: str, security: str, keys: dict[str, bytes], size: int) -> None:
    """Bind at `endpoint`; ("go", start): send `size` bytes, CHUNKs with
    WINDOW in flight, one more per acknowledgement; answer the time of the
    first send."""
    sock: Any = _zmq_socket(security, keys, server=True)
    sock.bind(endpoint)
    payload = memoryview(make_payload(min(size, WRITE_CHUNK)))
    conn.send("ready")
    sock.recv()  # the receiver's hello: connected, the handshake done
    sock.send(b"hello")
    for _, start in orders(conn):
        sleep_until(start)
        t0 = time.perf_counter()
        offsets = iter(range(0, size, CHUNK))
        in_flight = 0
        for offset in offsets:
            at = offset % len(payload)
            sock.send(payload[at: at + min(CHUNK, size - offset)], copy=False)
            in_flight += 1
            if in_flight == WINDOW:
                sock.recv()
                in_flight -= 1
        for _ in range(in_flight):
            sock.recv()
        conn.send(t0)
    sock.close()


def _zmq_receiver(conn: Any, endpoint: str, security: str, keys: dict[str, bytes], size: int) -> None:
    """Connect to `endpoint`; ("go",): copy `size` bytes of chunks into a
    buffer, acknowledging each; answer the time of the last copy."""
    sock: Any = _zmq_socket(security, keys, server=False)
    sock.connect(endpoint)
    sock.send(b"hello")
    sock.recv()
    buf = bytearray(CHUNK)
    conn.send("ready")
    for _ in orders(conn):
        conn.send("receiving")
        got = 0
        while got < size:
            frame = sock.recv(copy=False)
            n = len(frame.buffer)
            buf[:n] = frame.buffer
            got += n
            sock.send(b"")
        conn.send(time.perf_counter())
    sock.close()


# ---- small: tfem ----


def _small_producer(conn: Any, keyfile: str, count: int) -> None:
    """("go", prefix, start): at `start`, publish `count` 4 KiB files."""
    client = _client(keyfile)
    data = memoryview(make_payload(SMALL))
    conn.send("ready")
    for _, prefix, start in orders(conn):
        sleep_until(start)
        for i in range(count):
            with client.open(f"{prefix}{i}", "w", timeout=60) as f:
                f.write(data)
        conn.send(time.perf_counter())
    client.close()


def _small_consumer(conn: Any, keyfile: str, count: int, in_flight: int) -> None:
    """("go", prefix, start): from `start`, open, read and close the
    `count` files with `in_flight` threads, each its own client; answer
    the time of the last close."""
    clients = [_client(keyfile) for _ in range(in_flight)]
    conn.send("ready")
    for _, prefix, start in orders(conn):
        failures: list[BaseException] = []

        def take(k: int) -> None:
            buf = bytearray(SMALL + 1)
            try:
                for i in range(k, count, in_flight):
                    with clients[k].open(f"{prefix}{i}", "r", timeout=120) as f:
                        if f.readinto(buf) != SMALL:
                            raise RuntimeError(f"{prefix}{i}: not {SMALL} bytes")
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=take, args=(k,)) for k in range(in_flight)]
        sleep_until(start)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise failures[0]
        conn.send(time.perf_counter())
    for c in clients:
        c.close()


# ---- small: Redis ----


def _redis_producer(conn: Any, host: str, port: int, count: int, batch: int) -> None:
    """("go", prefix, start): at `start`, SET `count` 4 KiB values, `batch` a round trip."""
    import redis

    r = redis.Redis(host=host, port=port)
    data = bytes(make_payload(SMALL))
    conn.send("ready")
    for _, prefix, start in orders(conn):
        sleep_until(start)
        for first in range(0, count, batch):
            pipe = r.pipeline(transaction=False)
            for i in range(first, min(first + batch, count)):
                pipe.set(f"{prefix}{i}", data)
            pipe.execute()
        conn.send(time.perf_counter())
    r.close()


def _redis_consumer(conn: Any, host: str, port: int, count: int, batch: int) -> None:
    """("go", prefix, start): from `start`, GET and DEL the `count` values,
    `batch` keys a round trip, asking again for those not set yet; answer
    the time of the last."""
    import redis

    r = redis.Redis(host=host, port=port)
    conn.send("ready")
    for _, prefix, start in orders(conn):
        pending = [f"{prefix}{i}" for i in range(count)]
        sleep_until(start)
        while pending:
            keys, pending = pending[:batch], pending[batch:]
            pipe = r.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
                pipe.delete(key)
            replies = pipe.execute()
            for key, value in zip(keys, replies[::2]):
                if value is None:
                    pending.append(key)
                elif len(value) != SMALL:
                    raise RuntimeError(f"{key}: {len(value)} bytes, not {SMALL}")
        conn.send(time.perf_counter())
    r.close()


# ---- the nodes' servers ----


def _as_server(held: set[signal.Signals]) -> None:
    """In the child, before exec: the signals its parent holds back it takes, and it dies with the parent."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    _pdeathsig_term()


def _up(node: Any, cluster_dir: pathlib.Path, security: str, memory: int) -> None:
    """`tfem up` in `node` in the cluster, as Node.up starts it, but dying
    with the benchmark (PR_SET_PDEATHSIG) and in a session of its own."""
    options = ["--cluster", str(cluster_dir), "--listen", f"tcp://{node.address}:*", "--memory", str(memory),
               "--no-spill"]
    if security == "curve":
        options += ["--curve-key", str(cluster_dir.parent / "keys" / f"{node.name}.key_secret")]
    else:
        options += ["--insecure"]
    argv = [sys.executable, "-m", "tfem", "up", "--keyfile", str(node.keyfile), "--spill-dir", str(node.spill_dir),
            *options]
    held = {signal.SIGINT, signal.SIGTERM}  # till the node holds it: its teardown stops only what it knows
    with open(node.log_path, "ab") as log:
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, held)
            node.up_process = launch.start(node.argv(argv), f"tfem up on {node.name}", READY_TIMEOUT_S,
                                           env=node.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                           start_new_session=True, preexec_fn=lambda: _as_server(held))
        except TfemError as exc:
            raise RuntimeError(f"{exc}:\n{node.log()[-3000:]}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _wait_for_peers(nodes: Any) -> None:
    deadline = time.monotonic() + PEERS_TIMEOUT_S
    while True:
        live = [json.loads(node.tfem("status", "--json").stdout)["cluster"]["live"] for node in nodes]
        if all(len(each) == len(nodes) for each in live):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the nodes did not see each other within {PEERS_TIMEOUT_S:g} s: {live}")
        time.sleep(0.2)


class RedisInNode:
    """redis-server in `node`, on its address, persistence off."""

    def __init__(self, node: Any) -> None:
        import redis

        self.node = node
        self.port = node.free_port()
        self.process = node.popen(
            ["redis-server", "--port", str(self.port), "--bind", node.address, "--protected-mode", "no",
             "--save", "", "--appendonly", "no", "--dir", str(node.dir), "--logfile", str(node.dir / "redis.log"),
             "--daemonize", "no", "--databases", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_pdeathsig_term)
        deadline = time.monotonic() + 20
        while True:  # the host reaches a node by its address
            try:
                with redis.Redis(host=node.address, port=self.port) as r:
                    r.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start in {node.name}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        launch.stop(self.process, grace=30)


# ---- the workload ----


def _keys(nodes: Any) -> dict[str, bytes]:
    """tfem keys for each node in shared/keys (the trusted directory), and
    a pair each for raw pyzmq's two sides."""
    import zmq

    keys = nodes.shared / "keys"
    keys.mkdir(mode=0o700)
    for node in nodes:
        subprocess.run([sys.executable, "-m", "tfem", "keys", str(keys / node.name)], check=True,
                       capture_output=True, timeout=60)
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return {"server_public": server_public, "server_secret": server_secret, "client_public": client_public,
            "client_secret": client_secret}


class _Part:
    """One security's workers: a producer on A and a consumer on B per
    peer, started once and driven run by run."""

    def __init__(self, ctx: Context, nodes: Any, security: str, zmq_keys: dict[str, bytes],
                 redis: RedisInNode | None) -> None:
        plan = ctx.plan
        a, b = nodes[0], nodes[1]
        big, count, flight = plan.cluster_big_size, plan.cluster_small_count, plan.cluster_in_flight
        endpoint = f"tcp://{a.address}:{a.free_port()}"
        self.pairs: dict[str, tuple[Worker, Worker]] = {}
        self.pairs["tfem-big"] = (node_worker(a, "tfem producer", _big_producer, str(a.keyfile), big),
                                  node_worker(b, "tfem consumer", _big_consumer, str(b.keyfile), big))
        self.pairs["zmq-big"] = (node_worker(a, "pyzmq sender", _zmq_sender, endpoint, security, zmq_keys, big),
                                 node_worker(b, "pyzmq receiver", _zmq_receiver, endpoint, security, zmq_keys, big))
        self.pairs["tfem-small"] = (
            node_worker(a, "tfem small producer", _small_producer, str(a.keyfile), count),
            node_worker(b, "tfem small consumer", _small_consumer, str(b.keyfile), count, flight))
        if redis is not None:
            self.pairs["redis-small"] = (
                node_worker(a, "redis producer", _redis_producer, a.address, redis.port, count, flight),
                node_worker(b, "redis consumer", _redis_consumer, a.address, redis.port, count, flight))
        for producer, consumer in self.pairs.values():
            consumer.recv(120)
            producer.recv(120)

    def measure(self, peer: str, run: int, plan: Any) -> float:
        """One run of `peer`: GB/s for a large one, handoffs/s for a small one."""
        producer, consumer = self.pairs[peer]
        if peer == "tfem-big":
            name = f"big-{run}"
            consumer.call("go", name, timeout=60)  # "opening"
            producer.send("go", name, time.perf_counter() + 0.1)
            t0 = producer.recv(600)
            return float(plan.cluster_big_size / (consumer.recv(600) - t0) / 1e9)
        if peer == "zmq-big":
            consumer.call("go", timeout=60)  # "receiving"
            producer.send("go", time.perf_counter() + 0.1)
            t0 = producer.recv(600)
            return float(plan.cluster_big_size / (consumer.recv(600) - t0) / 1e9)
        start = time.perf_counter() + 0.2
        prefix = f"{peer}-{run}-"
        producer.send("go", prefix, start)
        consumer.send("go", prefix, start)
        producer.recv(600)
        return float(plan.cluster_small_count / (consumer.recv(600) - start))

    def stop(self) -> None:
        for producer, consumer in self.pairs.values():
            producer.stop()
            consumer.stop()


def cluster(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    nodes = ctx.services.nodes(2)
    why_not = "TFEM_TEST_NODES=loopback" if nodes.why_not_isolated == "chosen" else nodes.why_not_isolated
    ctx.log(f"cluster: two nodes, {'in namespaces' if nodes.isolated else f'on loopback ({why_not})'}")
    zmq_keys = _keys(nodes)
    memory = plan.cluster_big_size + 64 * M
    redis = None
    if not ctx.no_redis:
        redis = RedisInNode(nodes[0])
        ctx.services.register(redis.stop)
    results: dict[str, dict[str, Any]] = {}
    for security in SECURITIES:
        figures: dict[str, list[float]] = {}
        for node in nodes:
            _up(node, nodes.shared / f"cluster-{security}", security, memory)
        try:
            _wait_for_peers(nodes)
            part = _Part(ctx, nodes, security, zmq_keys, redis if security == "insecure" else None)
            try:
                peers = list(part.pairs)
                for run in range(plan.repeats):
                    for peer in rotated(peers, run):
                        ctx.log(f"cluster run {run + 1}/{plan.repeats}, {security}: {peer}")
                        figures.setdefault(peer, []).append(part.measure(peer, run, plan))
            finally:
                part.stop()
        finally:
            for node in nodes:
                node.stop_up()
        results[security] = {peer: summary(v) for peer, v in figures.items()}
        if not figures:
            raise WorkerError(f"cluster: no figures for {security}")
    return {
        "isolated": nodes.isolated,
        "why_not_isolated": why_not,
        "big_size": plan.cluster_big_size,
        "write_chunk": WRITE_CHUNK,
        "chunk": CHUNK,
        "window": WINDOW,
        "small_size": SMALL,
        "small_count": plan.cluster_small_count,
        "in_flight": plan.cluster_in_flight,
        "redis": redis is not None,
        "results": results,
    }
