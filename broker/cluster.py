"""The peer link: brokers on other nodes, the homes of names, and pulls.

Theory of operation:
- Each broker binds a ROUTER on TCP for its peers and connects a DEALER to
  each peer's ROUTER; it sends on the DEALERs and receives on its ROUTER
  (peer_protocol.py). With keys, both speak CURVE: the ROUTER admits only
  public keys of the trusted directory (zmq.auth), a DEALER connects only
  to a peer whose key it trusts. Peers come from the cluster directory
  (cluster_dir.py, read again every HEARTBEAT_S) or from --peers.
- Every HEARTBEAT_S a broker pings each peer; a peer heard from within
  DEAD_AFTER_S is alive. The live nodes (this one included) decide each
  name's home (rendezvous.py). When they change, every broker announces
  its names again to their homes, consumers look up again, and what was
  lent to or pulled from a dead peer is given back or given up.
- Owner: every SCAN_INTERVAL_S the broker looks for slots whose published
  file changed (publications.py: one C pass, names read only for those)
  and announces new names to their homes, withdraws gone ones. Producers
  publish without the broker; this scan is how it learns of them, off
  their path. A TAKE holds the file as the broker's own read (the state
  machine arbitrates between takers); a file of one chunk or less goes
  back whole in the answer (WHOLE), a larger one in CHUNKs of views of the
  segment (copy=False), WINDOW at a time. The owner keeps it until the
  taker says DONE (freed) or RETURN (given back); a kept file is let go of
  as soon as its copy is whole. A file for N readers lends reads: its
  TAKE one, each MORE one more (taken from the count under the broker's
  read, no bytes), and the taker's SETTLE says how many were read; the
  rest go back to the count.
- Home: knows which nodes hold each name it is home to; answers a LOOKUP
  with one of them, or keeps it (with wait) until an ANNOUNCE arrives. It
  remembers who withdrew a name last (a file being read there), so that a
  LOOKUP without wait asks that owner, whose refusal says why.
- Consumer: a local client's WANT becomes a Want here: LOOKUP at the home,
  TAKE at the owner, the bytes written into a new file of the same name
  in this segment (disk jobs, like any write of the broker's own:
  relocation.OwnWrites; the whole files of one turn in one job),
  published: the waiting client wakes on its own futex. The broker
  watches the copy; once it is consumed here it says DONE to the owner.
  A copy nobody here holds or wants for COPY_IDLE_S (given back by its
  reader, or its reader died) is claimed through the state machine,
  dropped, and given back to the owner (RETURN). A copy of a file for N
  readers is published with no read and held by the broker's keeper hold
  (which takes none), so that local readers share it one after another;
  the reads lent are added to it, a local reader who finds every read
  taken gets one more by MORE, and COPY_KEEP_S after its last local
  reader the broker takes back the reads left, lets go, and SETTLEs.
- Every message for a peer waits in an outbox until the end of the loop's
  turn (flush): what one turn produced for a peer goes as one batch.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import itertools
import logging
import os
import pathlib
import socket
import struct
import time
from typing import Any, Callable, Generator, Iterator

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from tfem import cluster_dir, peer_protocol, rendezvous
from tfem._native import ffi, lib
from tfem.cluster_dir import PeerEntry
from tfem.errors import (BrokerUnavailable, InvalidArgument, NotFound, ProtocolError, TfemError, WouldBlock,
                         errno_of, from_errno)
from tfem.files import TfemFile
from tfem.peer_protocol import Kind, Message
from tfem.protocol import Reply, Wanting
from tfem.states import KEPT, State

from .holdings import Holdings
from .publications import Publications
from .relocation import Ask, OwnWrites

log = logging.getLogger("tfem.broker")

HEARTBEAT_S = 0.5  # ping every peer this often; read the cluster directory again
DEAD_AFTER_S = 3.0  # a peer silent this long is dead
# How often the broker looks at the header's counters for files its
# producers published (and lists them if they moved): the loop wakes this
# often while files come and go or peers ask (ACTIVE_S since), else every
# IDLE_SCAN_S (an idle broker with peers: 6 to 12% of a CPU at 10 ms).
SCAN_INTERVAL_S = 0.01
IDLE_SCAN_S = 0.1
ACTIVE_S = 1.0
# A scan costs ~40 us over 4,096 slots, plus ~5 us for each slot that
# changed (2,000 new files: 10 ms): after one, the next waits at least
# SCAN_SHARE_INV times as long, so scanning takes at most a tenth of the
# broker's time under a burst of publications.
SCAN_SHARE_INV = 10
FULL_SCAN_S = 5.0  # ... and scans even when the header's counters say nothing changed (unlinks, expiry)
RETRY_S = 0.2  # a consumer looks up again after a taker beat it to a file
WANT_LEASE_S = 2.0  # a waiting client renews its want each WANT_SLICE_S (client.py): else it is dropped
FIND_TIMEOUT_S = 1.0  # open_next: how long to wait for the peers' oldest names
FIND_ANSWERS = 8  # ... and how many each gives
# A copy pulled here that nobody holds or wants this long goes back to its
# owner (a reader gave it back, or died); longer than a reader takes to open
# the copy it was told of, short enough that others elsewhere are not kept
# from it long.
COPY_IDLE_S = 1.0
# A copy of a file for N readers stays this long after its last local reader
# (kept by the broker's keeper hold) for the next one: its reads stay in the owner's
# count meanwhile, so it holds only memory (and reads given back here).
COPY_KEEP_S = 5.0
WITHDRAWN_KEPT = 4096  # a home remembers who last withdrew this many names
ALL_READS = 2**32  # a take of every read left
# A lookup, take or pull that made no progress this long (a message lost
# to a reconnection) starts again.
STALL_S = 5.0
CHUNK = 1 << 20
SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address
WINDOW = 4  # chunks in flight per pull
# A message with more bytes than this goes alone, not in a batch: a batch
# is delivered only once all of it has arrived, which would turn the
# window of chunks in flight into one stop-and-wait burst.
ALONE_ABOVE = 64 << 10


@dataclasses.dataclass(frozen=True)
class Keys:
    """This broker's CURVE key pair and the directory of public keys it trusts."""

    public: bytes
    secret: bytes
    trusted: pathlib.Path

    @classmethod
    def load(cls, secret_file: pathlib.Path, trusted: pathlib.Path | None) -> Keys:
        try:
            public, secret = zmq.auth.load_certificate(secret_file)
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot read the key pair {secret_file}: {exc}") from None
        if secret is None:
            raise InvalidArgument(f"{secret_file} holds no secret key: give the .key_secret file `tfem keys` made")
        return cls(public, secret, trusted or secret_file.parent)

    def trusted_keys(self) -> set[str]:
        try:
            return {key.decode() for key in zmq.auth.load_certificates(self.trusted)}
        except OSError:
            return set()

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's question at each handshake (on its thread): is this
        key trusted now? Read from the directory then, so a peer whose key
        was added a moment ago is not refused for good."""
        return key.decode() in self.trusted_keys()


@dataclasses.dataclass
class Peer:
    entry: PeerEntry
    socket: zmq.Socket[Any]
    heard: float = 0.0  # monotonic time of its last message
    alive: bool = False


@dataclasses.dataclass
class Want:
    """A file this broker pulls for its local clients."""

    name: str
    wait: bool
    ticket: int
    lease: float  # monotonic time after which an unrenewed want is dropped
    answer: list[tuple[bytes, int]] = dataclasses.field(default_factory=list)  # clients waiting for the reply
    home: str = ""
    owner: str = ""
    is_next: bool = False  # open_next's: pulls the oldest of `found` that it can take
    retry_at: float = 0.0
    error: TfemError | None = None  # failed: told at the client's next renewal
    pull: Pull | None = None
    finding: set[str] | None = None  # open_next: peers yet to answer FIND
    found: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)  # (created_ns, name, owner)
    find_until: float = 0.0
    moved: float = 0.0  # monotonic time of its last step: looked up, taken, a chunk written
    more: int = 0  # the ticket of a copy here for which it asked the owner one more read


@dataclasses.dataclass
class Pull:
    """A copy being written here from an owner's chunks, then watched until consumed."""

    ticket: int
    name: str
    owner: str
    size: int
    file: TfemFile | None
    kept: bool
    counted: bool = False  # a file for N readers: the copy holds reads lent from the owner's count
    written: int = 0
    chunks_written: int = 0
    acked: int = 0
    published: tuple[int, int] | None = None  # (slot, generation) of the copy, once published
    failed: bool = False
    reads: int = 1  # counted: reads lent and added to the copy
    unused: int = 0  # ... of them taken back unread
    hold: TfemFile | None = None  # counted: the broker's keeper hold, which keeps the copy between readers
    idle_since: float = 0.0  # monotonic time since which nobody here holds or wants it


@dataclasses.dataclass
class Lend:
    """A file of ours held for a taker on another node."""

    ticket: int
    taker: str
    file: TfemFile
    chunks: Generator[memoryview, None, None]
    offset: int = 0
    sent_all: bool = False
    kept: bool = False
    counted: bool = False  # a file for N readers: its reads are lent
    reads: int = 1  # reads lent: the broker's own read, and one per MORE granted


def explicit_peers(specs: list[str], keys: Keys | None) -> list[PeerEntry]:
    """--peers: ENDPOINT=PUBLIC-KEY-FILE each (just ENDPOINT without keys)."""
    entries = []
    for spec in specs:
        endpoint, _, key_file = spec.partition("=")
        if not endpoint.startswith("tcp://"):
            raise InvalidArgument(f"a peer is tcp://HOST:PORT[=PUBLIC-KEY-FILE], not {spec!r}")
        public = ""
        if keys is not None:
            if not key_file:
                raise InvalidArgument(f"peer {endpoint}: with --curve-key, name its public key file: {endpoint}=FILE")
            try:
                public = zmq.auth.load_certificate(key_file)[0].decode()
            except (OSError, ValueError) as exc:
                raise InvalidArgument(f"cannot read the public key of peer {endpoint}: {exc}") from None
        entries.append(PeerEntry(endpoint, public, 0, "", ""))
    return entries


def primary_address() -> str:
    """The address this host reaches others from: the source address of
    its default route (no packet is sent), else its name's address, else
    the first non-loopback address of an interface (a compute network
    without a default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routing only
            routed: str = probe.getsockname()[0]
            return routed
        except OSError:
            pass
        try:
            named = socket.gethostbyname(socket.gethostname())
            if not named.startswith("127."):
                return named
        except OSError:
            pass
        for _, interface in socket.if_nameindex():
            try:
                request = struct.pack("256s", interface.encode()[:15])
                address = socket.inet_ntoa(fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)[20:24])
            except OSError:
                continue  # no IPv4 address
            if not address.startswith("127."):
                return address
    raise InvalidArgument("this host has no address but loopback: give --listen")


def is_loopback(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


class Cluster:
    """This broker's peers, and its part in homes, lends and pulls."""

    def __init__(self, holdings: Holdings, ask: Ask, *, directory: pathlib.Path | None, peers: list[PeerEntry],
                 listen: str | None, keys: Keys | None, insecure: bool,
                 run_disk: Callable[[str, Callable[[], None]], None],
                 reply: Callable[[bytes, Reply], None]) -> None:
        self.holdings = holdings
        self._ask = ask
        self.directory = directory
        self._explicit = peers
        self.keys = keys
        self._run_disk = run_disk
        self._reply = reply
        listen = listen or f"tcp://{primary_address()}:*"
        if keys is None and not insecure and not is_loopback(listen):
            raise InvalidArgument(f"brokers speak to each other on {listen} with CURVE keys: give --curve-key "
                                  "(made by `tfem keys`), or --insecure on a network you trust")
        self.context: zmq.Context[Any] = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            self._auth = ThreadAuthenticator(self.context, log=logging.getLogger("tfem.broker.auth"))
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=keys)
            self.router.curve_server = True
            self.router.curve_secretkey = keys.secret
            self.router.curve_publickey = keys.public
        try:
            self.router.bind(listen)
        except zmq.ZMQError as exc:
            self.router.close()
            if self._auth is not None:
                self._auth.stop()
            self.context.term()
            raise InvalidArgument(f"cannot listen on {listen} for peers: {exc}") from None
        self.node: str = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.entry = PeerEntry(self.node, keys.public.decode() if keys else "", os.getpid(), socket.gethostname(),
                               holdings.segment.name)
        self.peers: dict[str, Peer] = {}
        self.live: tuple[str, ...] = (self.node,)
        self._tickets = itertools.count(1)
        self._own_writes: OwnWrites | None = None
        # WHOLE files that came this turn: (pull, readers, expires_ns, bytes)
        self._arrived: list[tuple[Pull, int, int, Any]] = []
        self._outbox: dict[str, list[Message]] = {}  # by peer: sent at the end of the loop's turn (flush)
        self.wants: dict[str, Want] = {}  # by name
        self._by_ticket: dict[int, Want] = {}
        self.pulls: dict[int, Pull] = {}  # by ticket: being written, or published and watched
        self.lends: dict[tuple[str, int], Lend] = {}  # by (taker, its ticket)
        self.where: dict[str, set[str]] = {}  # home: name -> the nodes that hold it
        self.withdrawn: dict[str, str] = {}  # home: name -> the node that withdrew it last (oldest first)
        self.pending: dict[str, dict[str, int]] = {}  # home: name -> lookups kept, asker -> its latest ticket
        self.announced: dict[str, str] = {}  # owner: name -> the home told
        self.publications = Publications()
        self._announce_again: set[str] = set()  # announcements lost to an unreachable home
        self._next_beat = self._next_scan = self._next_full_scan = 0.0
        self._counters_seen: tuple[int, ...] = ()
        self._active_until = 0.0  # files came and went, or peers asked: scan often until then
        self._untrusted_logged: set[str] = set()
        self.counts = {"pulled": 0, "pulled_bytes": 0, "lent": 0, "lent_bytes": 0, "peers_lost": 0}
        if directory is not None:
            cluster_dir.write_entry(directory, self.entry)
        log.info("listening for peers at %s (%s)", self.node, "CURVE" if keys else "no encryption")

    # ---- peers ----

    def _refresh_peers(self) -> None:
        entries = list(self._explicit)
        if self.directory is not None:
            entries += cluster_dir.read_entries(self.directory)
        trusted = self.keys.trusted_keys() if self.keys else set()
        seen = set()
        for entry in entries:
            if entry.endpoint == self.node:
                continue
            if self.keys is not None and entry.public_key not in trusted:
                if entry.endpoint not in self._untrusted_logged:
                    self._untrusted_logged.add(entry.endpoint)
                    log.warning("not connecting to %s: its key is not among the trusted ones in %s",
                                entry.endpoint, self.keys.trusted)
                continue
            seen.add(entry.endpoint)
            peer = self.peers.get(entry.endpoint)
            if peer is not None and peer.entry != entry:  # started again on the same endpoint
                peer.socket.close()
                peer = None
            if peer is None:
                self.peers[entry.endpoint] = Peer(entry, self._connect(entry))
        for gone in set(self.peers) - seen:
            self.peers.pop(gone).socket.close()

    def _connect(self, entry: PeerEntry) -> zmq.Socket[Any]:
        s: zmq.Socket[Any] = self.context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues for a peer not connected: it is lost, as it would be
        s.setsockopt(zmq.SNDHWM, 10000)
        if self.keys is not None:
            s.curve_secretkey = self.keys.secret
            s.curve_publickey = self.keys.public
            s.curve_serverkey = entry.public_key.encode()
        s.connect(entry.endpoint)
        return s

    def _send(self, node: str, kind: Kind, args: dict[str, Any], data: Any = None) -> bool:
        """Queue for `node` until this turn's flush (to ourselves: handled at
        once); False if it is not a peer."""
        message = Message(kind, self.node, args, data)
        if node == self.node:
            self._handle(message)
            return True
        if node not in self.peers:
            return False
        self._outbox.setdefault(node, []).append(message)
        return True

    def flush(self) -> None:
        """Send each peer what this turn queued for it, in order: small
        messages together as one batch, each large one (data over
        ALONE_ABOVE bytes) alone, since a batch arrives only whole."""
        outbox, self._outbox = self._outbox, {}
        for node, messages in outbox.items():
            peer = self.peers.get(node)
            part: list[Message] = []
            for m in messages:
                if m.data is not None and len(m.data) > ALONE_ABOVE:
                    self._send_batch(node, peer, part)
                    self._send_batch(node, peer, [m])
                    part = []
                else:
                    part.append(m)
                    if len(part) == peer_protocol.MAX_BATCH:
                        self._send_batch(node, peer, part)
                        part = []
            self._send_batch(node, peer, part)

    def _send_batch(self, node: str, peer: Peer | None, messages: list[Message]) -> None:
        if not messages:
            return
        try:
            if peer is None:
                raise zmq.Again()
            peer.socket.send_multipart(peer_protocol.encode(self.node, messages), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            self._lost(node, messages)
        except ProtocolError as exc:  # a fault of ours: the batch is lost, not the broker
            log.error("not sent to %s: %s", node, exc)
            self._lost(node, messages)

    def _lost(self, node: str, messages: list[Message]) -> None:
        """Messages that could not go (the peer not connected, or gone):
        what waits on an answer fails now, announcements go again."""
        for m in messages:
            if m.kind is Kind.ANNOUNCE:  # again at the next scan
                for name in m.args["names"]:
                    self.announced.pop(name, None)
                self._announce_again.update(m.args["names"])
                self._counters_seen = ()
            elif m.kind in (Kind.LOOKUP, Kind.TAKE):
                want = self._by_ticket.get(m.args["ticket"])
                if want is not None and want.error is None and want.pull is None:
                    role = "home" if m.kind is Kind.LOOKUP else "owner"
                    self._fail(want, BrokerUnavailable(f"the broker at {node}, {role} of {want.name!r}, "
                                                       "is not reachable"))

    def _check_members(self, now: float) -> None:
        for peer in self.peers.values():
            alive = now - peer.heard < DEAD_AFTER_S and peer.heard > 0
            if peer.alive and not alive:
                log.warning("peer %s silent for %g s: counted dead", peer.entry.endpoint, DEAD_AFTER_S)
                self.counts["peers_lost"] += 1
            peer.alive = alive
        live = tuple(sorted([self.node, *(n for n, p in self.peers.items() if p.alive)]))
        if live != self.live:
            gone = set(self.live) - set(live)
            self.live = live
            log.info("live brokers now %s", ", ".join(live))
            self._members_changed(gone)

    def _members_changed(self, gone: set[str]) -> None:
        """Homes moved: announce everything again; look up again; give up
        what depended on the dead."""
        self.announced.clear()
        self.publications.forget()
        self._counters_seen = ()  # announce at the next scan
        for name in list(self.where):
            self.where[name] -= gone
            if not self.where[name]:
                del self.where[name]
        for name in list(self.pending):
            if rendezvous.home(name, self.live) != self.node:
                del self.pending[name]  # the asker looks up again at the new home
        for name in [n for n, node in self.withdrawn.items() if node in gone]:
            del self.withdrawn[name]
        for key in [k for k in self.lends if k[0] in gone]:
            self._end_lend(key, unused=self.lends[key].reads)
        for want in list(self.wants.values()):
            dead = {want.home, want.owner} & gone
            if dead:
                self._fail(want, BrokerUnavailable(
                    f"the broker at {dead.pop()}, {'owner' if want.owner in gone else 'home'} of "
                    f"{want.name!r}, stopped answering"))
            elif want.pull is None and want.error is None and not want.is_next and not want.owner:
                self._lookup(want)
        for pull in list(self.pulls.values()):
            if pull.owner in gone and pull.published is None:
                self._abandon(pull)
            elif pull.owner in gone:
                del self.pulls[pull.ticket]  # the copy here stays, with the reads lent to it; nobody to tell
                self._let_go_copy(pull, take_back=False)

    # ---- the loop's calls ----

    def receive(self) -> None:
        for _ in range(256):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                messages = peer_protocol.decode([f.buffer for f in frames[1:]])
            except TfemError as exc:
                log.debug("malformed peer message: %s", exc)
                continue
            sender = messages[0].sender
            peer = self.peers.get(sender)
            if peer is None or self.keys is not None and frames[1].get("User-Id") != peer.entry.public_key:
                continue  # not (yet) a peer of ours, or not who it says: its file will show it
            peer.heard = time.monotonic()
            for message in messages:
                if message.kind is Kind.PING:
                    continue
                self._active_until = peer.heard + ACTIVE_S
                try:
                    self._handle(message)
                except TfemError as exc:
                    log.warning("peer message %s from %s: %s", message.kind.value, message.sender, exc)

    def tick(self, now: float) -> None:
        self._write_arrived()
        if now >= self._next_beat:
            self._next_beat = now + HEARTBEAT_S
            self._refresh_peers()
            for node in list(self.peers):
                self._send(node, Kind.PING, {})
        self._check_members(now)
        if now >= self._next_scan:
            self._next_scan = now + self.wake_ms / 1000
            h = self.holdings.segment.header
            counters = (h.closed_write, h.closed_read, h.opened_read, len(self.pulls), len(self.lends))
            if counters != self._counters_seen or now >= self._next_full_scan:
                if counters != self._counters_seen:
                    self._active_until = now + ACTIVE_S
                self._counters_seen, self._next_full_scan = counters, now + FULL_SCAN_S
                self._scan()
                self._next_scan = max(self._next_scan, now + SCAN_SHARE_INV * (time.monotonic() - now))
            self._watch()
        for pull in list(self.pulls.values()):
            while pull.acked < pull.chunks_written:
                pull.acked += 1
                self._send(pull.owner, Kind.ACK, {"ticket": pull.ticket})
        for want in list(self.wants.values()):
            if want.lease < now and want.pull is None and not want.answer:
                self._drop(want)
            elif want.retry_at and now >= want.retry_at:
                want.retry_at = 0.0
                self._lookup(want)
            elif want.finding is not None and (not want.finding or now >= want.find_until):
                self._found_next(want)
            elif want.error is None and not want.retry_at and now - want.moved > STALL_S:
                self._stalled(want)
        self.flush()

    @property
    def wake_ms(self) -> int:
        """How long the loop may sleep before the next tick."""
        busy = self.wants or self.pulls or self.pending or time.monotonic() < self._active_until
        return int((SCAN_INTERVAL_S if busy else IDLE_SCAN_S) * 1000)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"node": self.node, "curve": self.keys is not None,
                "directory": str(self.directory) if self.directory else None,
                "peers": [{"endpoint": n, "alive": p.alive, "host": p.entry.host,
                           "heard_s_ago": round(now - p.heard, 1) if p.heard else None}
                          for n, p in sorted(self.peers.items())],
                "live": list(self.live), "homed_names": len(self.where), "announced": len(self.announced),
                "wants": len(self.wants), "lends": len(self.lends), **self.counts}

    def close(self) -> None:
        for key in list(self.lends):
            self._end_lend(key, unused=self.lends[key].reads)
        for pull in list(self.pulls.values()):
            if pull.published is None:
                self._abandon(pull)
            elif pull.counted:
                self._let_go_copy(pull, take_back=True)
                self._send(pull.owner, Kind.SETTLE, {"ticket": pull.ticket, "used": pull.reads - pull.unused})
            else:
                self._send(pull.owner, Kind.RETURN, {"ticket": pull.ticket})
        self.flush()
        if self.directory is not None:
            cluster_dir.remove_entry(self.directory, self.entry)
        for peer in self.peers.values():
            peer.socket.close()
        self.router.close()
        if self._auth is not None:
            self._auth.stop()
        self.context.term()

    # ---- local clients (dispatch.py) ----

    def want(self, identity: bytes, request_id: int, name: str, wanting: Wanting) -> Reply | None:
        """A client's WANT: pull `name` here. Waiting, the client sleeps on
        its futex and renews (Wanting.NOW: answered at once, with the
        want's error; NEVER: the first ask, not answered); not waiting,
        answered once pulled or known to be nowhere. None: no answer now."""
        now = time.monotonic()
        wait = wanting is not Wanting.WHEN_PULLED
        want = self.wants.get(name)
        if want is not None and want.error is not None:
            if wanting is Wanting.NEVER:
                return None  # kept for the renewal, which is answered
            self._drop(want)
            raise want.error
        answer = [] if wait else [(identity, request_id)]
        if want is None:
            self._start(name, wait, answer)  # may be answered at once: the home is here
        else:
            want.answer += answer
            want.lease = max(want.lease, now + WANT_LEASE_S)
            want.wait = want.wait or wait
        return Reply(request_id, 0, {}) if wanting is Wanting.NOW else None

    def unwant(self, name: str) -> None:
        want = self.wants.get(name)
        if want is not None and want.pull is None:
            self._drop(want)

    def next(self, identity: bytes, request_id: int, prefix: str) -> Reply | None:
        """open_next: find the oldest published name under `prefix` on the
        peers, pull it, answer with its name (NotFound: none anywhere)."""
        ticket = next(self._tickets)
        want = Want(f"\0next {ticket}", False, ticket, time.monotonic() + WANT_LEASE_S, [(identity, request_id)],
                    is_next=True)
        want.finding = {n for n in self.live if n != self.node}
        want.find_until = want.moved = time.monotonic() + FIND_TIMEOUT_S
        self.wants[want.name] = want
        self._by_ticket[ticket] = want
        for node in list(want.finding):
            if not self._send(node, Kind.FIND, {"ticket": ticket, "prefix": prefix}):
                want.finding.discard(node)
        return None

    def _start(self, name: str, wait: bool, answer: list[tuple[bytes, int]]) -> None:
        ticket = next(self._tickets)
        want = self.wants[name] = Want(name, wait, ticket, time.monotonic() + WANT_LEASE_S, answer)
        self._by_ticket[ticket] = want
        self._lookup(want)

    def _lookup(self, want: Want) -> None:
        del self._by_ticket[want.ticket]
        want.ticket = next(self._tickets)  # late answers to the old ticket are ignored
        self._by_ticket[want.ticket] = want
        copy = next((p for p in self.pulls.values() if p.name == want.name and p.hold is not None), None)
        if copy is not None:  # every read of the copy here is taken: one more from the owner, no bytes
            want.home, want.owner, want.more, want.moved = "", copy.owner, copy.ticket, time.monotonic()
            self._send(copy.owner, Kind.MORE, {"ticket": copy.ticket})
            return
        want.home, want.owner, want.more, want.moved = rendezvous.home(want.name, self.live), "", 0, time.monotonic()
        if not self._send(want.home, Kind.LOOKUP, {"ticket": want.ticket, "name": want.name, "wait": want.wait}):
            self._fail(want, BrokerUnavailable(f"the broker at {want.home}, home of {want.name!r}, is not reachable"))

    def _stalled(self, want: Want) -> None:
        """No answer for STALL_S: ask again (a pull: given up and asked again)."""
        if want.pull is not None:
            if want.pull.published is not None:
                return
            log.info("the pull of %r from %s stalled: asking again", want.name, want.owner)
            self._abandon(want.pull)
        elif want.is_next:
            self._fail(want, NotFound("no peer answered in time"))
        else:
            self._lookup(want)  # a lookup kept at the home is renewed: the home keeps only the latest ticket

    def _finish(self, want: Want, error: TfemError | None = None) -> None:
        for identity, request_id in want.answer:
            reply = Reply(request_id, 0, {"name": want.name}) if error is None else \
                Reply(request_id, errno_of(error), str(error))
            self._reply(identity, reply)
        want.answer = []
        if error is not None and want.wait:
            want.error = error  # told at the next renewal
            want.pull = None
            want.lease = time.monotonic() + WANT_LEASE_S
        else:
            self._drop(want)

    def _fail(self, want: Want, error: TfemError) -> None:
        log.info("want %r failed: %s", want.name, error)
        self._finish(want, error)

    def _drop(self, want: Want) -> None:
        if self.wants.get(want.name) is want:
            del self.wants[want.name]
        self._by_ticket.pop(want.ticket, None)

    # ---- messages ----

    def _handle(self, m: Message) -> None:
        a = m.args
        if m.kind is Kind.ANNOUNCE:
            for name in a["names"]:
                self.where.setdefault(name, set()).add(m.sender)
                self.withdrawn.pop(name, None)
                for asker, ticket in self.pending.pop(name, {}).items():
                    self._answer_lookup(asker, ticket, name, m.sender)
        elif m.kind is Kind.WITHDRAW:
            for name in a["names"]:
                owners = self.where.get(name, set())
                owners.discard(m.sender)
                if not owners:
                    self.where.pop(name, None)
                self.withdrawn.pop(name, None)  # to the end: the oldest go first
                self.withdrawn[name] = m.sender
            while len(self.withdrawn) > WITHDRAWN_KEPT:
                del self.withdrawn[next(iter(self.withdrawn))]
        elif m.kind is Kind.LOOKUP:
            holders = sorted(o for o in self.where.get(a["name"], set()) if o in self.live)
            if holders:
                owner = m.sender if m.sender in holders else self.node if self.node in holders else holders[0]
                self._answer_lookup(m.sender, a["ticket"], a["name"], owner)
            elif a["wait"]:
                self.pending.setdefault(a["name"], {})[m.sender] = a["ticket"]
            else:  # the node that withdrew it last may be reading it: its refusal says (WouldBlock, NotFound)
                last = self.withdrawn.get(a["name"], "")
                self._send(m.sender, Kind.FOUND, {"ticket": a["ticket"], "name": a["name"],
                                                  "owner": last if last in self.live else ""})
        elif m.kind is Kind.FOUND:
            self._found(a)
        elif m.kind is Kind.FIND:
            self._find(m.sender, a["ticket"], a["prefix"])
        elif m.kind is Kind.FOUND_NEXT:
            want = self._by_ticket.get(a["ticket"])
            if want is not None and want.finding is not None:
                want.finding.discard(m.sender)
                want.found += [(created, name, m.sender) for name, created in a["names"]]
        elif m.kind is Kind.TAKE:
            self._take(m.sender, a["ticket"], a["name"])
        elif m.kind is Kind.FILE:
            self._file(m.sender, a)
        elif m.kind is Kind.WHOLE:
            self._file(m.sender, a, m.data)
        elif m.kind is Kind.CHUNK:
            self._chunk(m.sender, a["ticket"], a["offset"], m.data)
        elif m.kind is Kind.ACK:
            lend = self.lends.get((m.sender, a["ticket"]))
            if lend is not None:
                self._send_chunk((m.sender, a["ticket"]), lend)
        elif m.kind in (Kind.DONE, Kind.RETURN, Kind.SETTLE):
            lend = self.lends.get((m.sender, a["ticket"]))
            if lend is not None:
                used = a["used"] if m.kind is Kind.SETTLE else lend.reads if m.kind is Kind.DONE else 0
                self._end_lend((m.sender, a["ticket"]), unused=max(lend.reads - used, 0))
        elif m.kind is Kind.MORE:
            self._more(m.sender, a["ticket"])
        elif m.kind is Kind.GRANT:
            self._granted(m.sender, a["ticket"], a["reads"])

    def _answer_lookup(self, asker: str, ticket: int, name: str, owner: str) -> None:
        """A home's answer: where `name` is; or, when it is here and
        another node asks, the file itself, as the answer to a TAKE (the
        asker's FOUND and TAKE saved: one round trip fewer)."""
        if owner == self.node and asker != self.node:
            self._take(asker, ticket, name)
        else:
            self._send(asker, Kind.FOUND, {"ticket": ticket, "name": name, "owner": owner})

    def _found(self, a: dict[str, Any]) -> None:
        want = self._by_ticket.get(a["ticket"])
        if want is None or want.pull is not None or want.owner:
            return
        owner = a["owner"]
        if not owner:
            self._fail(want, NotFound(f"{want.name!r} is not published on any node"))
        elif owner == self.node:
            self._finish(want)  # published here meanwhile: the client finds it
        else:
            want.owner, want.moved = owner, time.monotonic()
            if not self._send(owner, Kind.TAKE, {"ticket": want.ticket, "name": want.name}):
                self._fail(want, BrokerUnavailable(f"the broker at {owner}, owner of {want.name!r}, "
                                                   "is not reachable"))

    def _found_next(self, want: Want) -> None:
        want.finding = None
        want.found.sort()
        self._next_candidate(want)

    def _next_candidate(self, want: Want) -> None:
        """open_next: take the oldest name found that nobody here pulls yet."""
        while want.found:
            _, name, owner = want.found.pop(0)
            if name not in self.wants:
                break
        else:
            self._fail(want, NotFound("no file under the prefix is published on any node"))
            return
        self.wants.pop(want.name, None)
        want.name, want.owner, want.moved = name, owner, time.monotonic()
        self.wants[name] = want
        self._send(owner, Kind.TAKE, {"ticket": want.ticket, "name": name})

    # ---- owner: scans, lends ----

    def _scan(self) -> None:
        """Announce new published names to their homes; withdraw gone ones."""
        pulled = {p.name for p in self.pulls.values()}
        new, gone = self.publications.changes(self.holdings.table, pulled)
        new |= {name for name in self._announce_again if self.publications.holds(name)}
        self._announce_again.clear()
        to_announce: dict[str, list[str]] = {}
        for name in new - self.announced.keys():
            to_announce.setdefault(rendezvous.home(name, self.live), []).append(name)
        to_withdraw: dict[str, list[str]] = {}
        for name in gone & self.announced.keys():
            to_withdraw.setdefault(self.announced.pop(name), []).append(name)
        for home, names in to_withdraw.items():
            for part in _batches(names):
                self._send(home, Kind.WITHDRAW, {"names": part})
        for home, names in to_announce.items():
            for part in _batches(names):
                if self._send(home, Kind.ANNOUNCE, {"names": part}):
                    self.announced.update((name, home) for name in part)

    def _find(self, asker: str, ticket: int, prefix: str) -> None:
        oldest = self.holdings.table.oldest_waiting(prefix.encode(), FIND_ANSWERS + len(self.wants))
        files = [f for f in oldest if f.name not in self.wants][:FIND_ANSWERS]  # not those pulled here
        self._send(asker, Kind.FOUND_NEXT, {"ticket": ticket,
                                            "names": [[f.name, int(f.created * 1e9)] for f in files]})

    def _owner(self) -> OwnWrites:
        """The broker as a client of its own segment: one for the segment's
        life (made per file, it cost a tenth of a busy owner's time)."""
        if self._own_writes is None or self._own_writes.segment is not self.holdings.segment:
            self._own_writes = OwnWrites(self.holdings.segment, self._ask, self.holdings.spill)
        return self._own_writes

    def _take(self, taker: str, ticket: int, name: str) -> None:
        raw = name.encode()
        owner = self._owner()
        core = ffi.new("struct tfem_file *")
        found = ffi.new("int32_t *")
        rc = lib.tfem_f_open(ffi.cast("struct tfem_header *", owner.base), raw, len(raw), owner.pid,
                             lib.TFEM_OPEN_READ, False, 0, core, found)
        if rc:
            self._send(taker, Kind.FILE, {"ticket": ticket, "errno": rc, "size": 0, "readers": 0, "expires_ns": 0})
            return
        owner.held.add(core)
        f = TfemFile(core, name, owner)
        readers = int(self.holdings.segment.slot(core.index).readers)
        lend = Lend(ticket, taker, f, f.chunks(CHUNK), kept=readers == KEPT, counted=readers > 1)
        self.lends[(taker, ticket)] = lend
        self.counts["lent"] += 1
        about = {"ticket": ticket, "size": int(core.size), "readers": readers,
                 "expires_ns": int(self.holdings.segment.life(core.index).expires_ns)}
        if core.size > CHUNK:
            self._send(taker, Kind.FILE, {**about, "errno": 0})
            for _ in range(WINDOW):
                self._send_chunk((taker, ticket), lend)
            return
        # One chunk or less: the answer carries the bytes (copied into one
        # frame if they lie in pieces), and no ACK is needed. Held until
        # DONE or RETURN even if kept: the frame may be a view of the
        # segment still being sent.
        try:
            pieces = list(lend.chunks)  # views of the inline buffer and each run of arena blocks
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        except TfemError as exc:
            log.error("cannot send %r to %s: %s", name, taker, exc)
            self._send(taker, Kind.FILE, {**about, "errno": errno_of(exc), "size": 0})
            self._end_lend((taker, ticket), unused=lend.reads)
            return
        lend.sent_all = True
        self._send(taker, Kind.WHOLE, about, data)
        self.counts["lent_bytes"] += len(data)

    def _send_chunk(self, key: tuple[str, int], lend: Lend) -> None:
        if lend.sent_all:
            if lend.kept:  # the copy is whole: a kept file needs no hold of ours
                self._end_lend(key, unused=0)
            return
        try:
            chunk = next(lend.chunks)
        except StopIteration:
            lend.sent_all = True
            return
        except TfemError as exc:  # damaged: the taker's pull fails, the file stays here
            log.error("cannot send %r to %s: %s", lend.file.name, lend.taker, exc)
            self._send(lend.taker, Kind.FILE, {"ticket": lend.ticket, "errno": errno_of(exc), "size": 0,
                                               "readers": 0, "expires_ns": 0})
            self._end_lend(key, unused=lend.reads)
            return
        self._send(lend.taker, Kind.CHUNK, {"ticket": lend.ticket, "offset": lend.offset}, chunk)
        lend.offset += len(chunk)
        self.counts["lent_bytes"] += len(chunk)

    def _end_lend(self, key: tuple[str, int], unused: int) -> None:
        """Let go of a lend, `unused` of its reads unread: those go back to
        the file's count (all of them: a consume-once file back to WAIT)."""
        lend = self.lends.pop(key)
        lend.chunks.close()
        try:
            if unused >= lend.reads:  # the read of ours is given back too
                _move_reads(lend.file, lend.reads - 1)
                lend.file.abort()
            else:  # added before our read is closed: the close then finds reads to come (WAIT), not the last
                _move_reads(lend.file, unused)
                lend.file.close()
        except TfemError as exc:
            log.warning("letting go of %r: %s", lend.file.name, exc)

    def _more(self, taker: str, ticket: int) -> None:
        """A taker's copy has a reader wanting one more read: lend it one
        from the count (0: none left now)."""
        lend = self.lends.get((taker, ticket))
        reads = 0
        if lend is not None and lend.counted:
            try:
                reads = _move_reads(lend.file, -1)
            except TfemError as exc:
                log.warning("cannot lend another read of %r: %s", lend.file.name, exc)
            lend.reads += reads
        self._send(taker, Kind.GRANT, {"ticket": ticket, "reads": reads})

    # ---- consumer: pulls ----

    def _file(self, owner: str, a: dict[str, Any], data: Any = None) -> None:
        """The owner's answer to a TAKE: FILE (chunks follow), or WHOLE
        with the bytes of a file of one chunk or less."""
        want = self._by_ticket.get(a["ticket"])
        code = a.get("errno", 0)
        if want is None or (want.owner or want.home) != owner or want.pull is not None:  # (the home took it for us)
            if code == 0:
                self._send(owner, Kind.RETURN, {"ticket": a["ticket"]})
            return
        if code:
            if want.is_next:
                self._next_candidate(want)  # open_next: another taker was first; the next oldest
            elif want.wait:
                want.owner, want.retry_at = "", time.monotonic() + RETRY_S
            elif code == errno.ENOENT:
                self._fail(want, NotFound(f"{want.name!r} was taken meanwhile"))
            else:
                self._fail(want, WouldBlock(f"{want.name!r} is held on {owner}: {os.strerror(code)}"))
            return
        want.owner = owner
        pull = Pull(want.ticket, want.name, owner, a["size"], None, a["readers"] == KEPT, a["readers"] > 1)
        want.pull, want.moved = pull, time.monotonic()
        self.pulls[pull.ticket] = pull
        if data is None:
            self._run_disk(f"pull {want.name}", lambda: self._create(pull, a["readers"], a["expires_ns"]))
        else:
            self._arrived.append((pull, a["readers"], a["expires_ns"], data))

    def _write_arrived(self) -> None:
        """The whole files that came this turn: created, written and
        published here and now, as a client's put is, when the arena has
        room (a few µs each: a disk job's hand-over to the worker thread
        cost more than the write); what needs room or the spill store
        goes on as a disk job."""
        batch, self._arrived = self._arrived, []
        for pull, readers, expires_ns, data in batch:
            if self.pulls.get(pull.ticket) is not pull:
                continue  # given up meanwhile (its owner died)
            self._create(pull, readers, expires_ns)
            f = pull.file
            if f is None or not pull.size:
                continue
            try:
                done = f.write_nowait(data)
            except TfemError as exc:
                self._write_failed(pull, exc)
                continue
            if callable(done):
                self._run_disk(f"pull {pull.name}", functools.partial(self._write_rest, pull, done))
            else:
                pull.written = done
                self._complete(pull)

    def _write_rest(self, pull: Pull, rest: Callable[[], int]) -> None:
        """Disk job: the rest of a whole file, for which the arena had no room."""
        if pull.file is None or pull.failed:
            return
        try:
            pull.written = rest()
        except TfemError as exc:
            self._write_failed(pull, exc)
            return
        self._complete(pull)

    def _write_failed(self, pull: Pull, exc: TfemError) -> None:
        """The copy is dropped; the watch gives the owner's back (RETURN)."""
        assert pull.file is not None
        log.warning("cannot write the copy of %r here: %s", pull.name, exc)
        pull.failed = True
        pull.file.abort()

    def _create(self, pull: Pull, readers: int, expires_ns: int) -> None:
        """The file of the copy, under the same name here (in the loop for
        a whole file, as a client's create is; it never waits for a slot)."""
        owner = self._owner()
        raw = pull.name.encode()
        core = ffi.new("struct tfem_file *")
        rc = lib.tfem_f_create(ffi.cast("struct tfem_header *", owner.base), raw, len(raw), owner.pid, 0, core)
        if rc:
            log.warning("cannot make the copy of %r here: %s", pull.name, os.strerror(rc))
            pull.failed = True
            return
        lib.tfem_f_set_lifetime(core, readers, expires_ns)
        if pull.counted:  # no read until the broker keeps the copy: those lent are added then
            self.holdings.segment.life(core.index).readers_left = 0
        owner.held.add(core)
        pull.file = TfemFile(core, pull.name, owner)
        self._complete(pull)  # a file of no bytes

    def _chunk(self, owner: str, ticket: int, offset: int, data: Any) -> None:
        pull = self.pulls.get(ticket)
        if pull is None or pull.owner != owner:
            return
        want = self._by_ticket.get(ticket)
        if want is not None:
            want.moved = time.monotonic()
        self._run_disk(f"pull {pull.name}", lambda: self._write(pull, offset, data, ack=True))

    def _write(self, pull: Pull, offset: int, data: Any, ack: bool) -> None:
        """Disk job: bytes of the copy at their offset (a chunk's: then
        acknowledged, for the owner's next), published once all are here."""
        if pull.file is None or pull.failed:
            return
        try:
            pull.file.seek(offset)
            pull.file.write(data)
        except TfemError as exc:
            self._write_failed(pull, exc)
            return
        pull.written += len(data)
        pull.chunks_written += ack
        self._complete(pull)

    def _complete(self, pull: Pull) -> None:
        """Disk job's end: publish the copy once every byte is written."""
        f = pull.file
        if f is None or pull.written < pull.size or pull.published is not None:
            return
        where = (int(f._f.index), int(f._f.generation))
        f.close()
        if pull.counted:
            self._hold_copy(pull, *where)
        pull.published = where
        self.counts["pulled"] += 1
        self.counts["pulled_bytes"] += pull.size

    def _hold_copy(self, pull: Pull, slot: int, generation: int) -> None:
        """Disk job's end: keep the copy, published with no read (a keeper's
        hold, which takes none: no local reader can be quicker), then add
        the read lent, which wakes the waiting client."""
        owner = self._owner()
        core = ffi.new("struct tfem_file *")
        rc = lib.tfem_f_keep(ffi.cast("struct tfem_header *", owner.base), slot, generation, owner.pid, core)
        if rc:  # unlinked meanwhile: its read is never taken here, SETTLE gives it back
            log.warning("cannot keep the copy of %r: %s", pull.name, os.strerror(rc))
            pull.unused = pull.reads
            return
        owner.held.add(core)
        pull.hold = TfemFile(core, pull.name, owner)
        pull.reads = _move_reads(pull.hold, pull.reads)

    def _watch(self) -> None:
        """Pulls finished or failed since: tell the want's clients; the
        owner once the copy was consumed here (or at once, if kept), or
        given back."""
        table = self.holdings.table
        for pull in list(self.pulls.values()):
            want = self._by_ticket.get(pull.ticket)
            if pull.failed:
                self._abandon(pull)
                continue
            if pull.published is None:
                continue
            if want is not None and want.pull is pull:
                self._finish(want)
            state, generation, _ = table.state_of(pull.published[0])
            if pull.kept:
                del self.pulls[pull.ticket]
                self._send(pull.owner, Kind.DONE, {"ticket": pull.ticket})
            elif generation != pull.published[1] or state is State.INVALID:
                del self.pulls[pull.ticket]
                self._settle(pull)
            else:
                self._give_back_idle(pull, state)

    def _settle(self, pull: Pull) -> None:
        """The copy is gone: tell its owner how many of its reads were read."""
        if pull.counted:
            self._send(pull.owner, Kind.SETTLE, {"ticket": pull.ticket, "used": pull.reads - pull.unused})
        else:
            self._send(pull.owner, Kind.RETURN if pull.unused else Kind.DONE, {"ticket": pull.ticket})

    def _give_back_idle(self, pull: Pull, state: State) -> None:
        """A copy nobody here holds (but the broker) or wants, for
        COPY_IDLE_S: given back to its owner. Claimed through the state
        machine, so a local reader opening it at that moment either has it
        or finds it gone (and asks again)."""
        assert pull.published is not None
        s, generation = pull.published
        ours = pull.hold is not None
        idle = pull.name not in self.wants and (
            state is State.WAIT or ours and state is State.SHARED and self.holdings.segment.life(s).holders == 1)
        now = time.monotonic()
        if not idle or not pull.idle_since:
            pull.idle_since = now if idle else 0.0
            return
        if now - pull.idle_since < (COPY_KEEP_S if ours else COPY_IDLE_S):
            return
        if ours:  # the reads left come back, and the copy goes at the last close
            self._let_go_copy(pull, take_back=True)
            return
        table = self.holdings.table
        handle = table.hold_waiting(s)
        if handle is None:
            return  # a reader took it meanwhile
        if handle.generation != generation:
            table.release(handle)  # another file in the slot by now: ours went, as the next look shows
            return
        unread = int(self.holdings.segment.life(s).readers_left) if pull.counted else 1
        table.consume(handle)
        del self.pulls[pull.ticket]
        pull.unused += unread
        self._settle(pull)

    def _let_go_copy(self, pull: Pull, take_back: bool) -> None:
        """Let go of the broker's keeper hold of a copy, first taking back
        the reads nobody here took (take_back)."""
        hold, pull.hold = pull.hold, None
        if hold is None:
            return
        try:
            if take_back:
                pull.unused += _move_reads(hold, -ALL_READS)
            hold.close()
        except TfemError as exc:
            log.warning("letting go of the copy of %r: %s", pull.name, exc)

    def _granted(self, owner: str, ticket: int, reads: int) -> None:
        """The owner's answer to MORE: add the reads to the copy, and tell
        the want's clients (a read to take, or none left)."""
        pull = self.pulls.get(ticket)
        if pull is None or pull.owner != owner:
            return  # settled meanwhile: the owner counted these as unread
        if pull.hold is not None:
            pull.reads += _move_reads(pull.hold, reads)
        want = self.wants.get(pull.name)
        if want is None or want.more != ticket:
            return
        want.more = 0
        if reads and pull.hold is not None:
            self._finish(want)  # the client takes the read here
        elif want.wait:
            want.owner, want.retry_at = "", time.monotonic() + RETRY_S
        else:
            self._fail(want, WouldBlock(f"every read of {want.name!r} is taken"))

    def _abandon(self, pull: Pull) -> None:
        """Give up a pull not yet published: drop the partial copy, give the owner's back."""
        self.pulls.pop(pull.ticket, None)
        self._send(pull.owner, Kind.RETURN, {"ticket": pull.ticket})
        want = self._by_ticket.get(pull.ticket)
        if want is not None and want.pull is pull:
            want.pull = None
            if want.wait and pull.owner in self.live:
                want.owner, want.retry_at = "", time.monotonic() + RETRY_S
            else:
                self._fail(want, BrokerUnavailable(f"the pull of {want.name!r} from {pull.owner} failed"))

        def drop() -> None:
            if pull.file is not None:
                pull.file.abort()
        self._run_disk(f"drop the copy of {pull.name}", drop)


def _move_reads(f: TfemFile, delta: int) -> int:
    """Move reads to (delta > 0) or from a shared read's file count
    (tfem_f_add_reads); how many moved."""
    if not delta:
        return 0
    moved = ffi.new("uint32_t *")
    rc = lib.tfem_f_add_reads(f._f, delta, moved)
    if rc:
        raise from_errno(rc, f"cannot move {delta} reads of {f.name!r}: {os.strerror(rc)}")
    return int(moved[0])


def _batches(names: list[str], size: int = 512) -> Iterator[list[str]]:
    for start in range(0, len(names), size):
        yield names[start:start + size]
