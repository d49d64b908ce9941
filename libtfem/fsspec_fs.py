"""tfem as an fsspec filesystem: the protocol "tfem", for pandas, pyarrow and Dask.

    pandas.read_csv("tfem://stage1/part-0.csv")
    dask.dataframe.read_parquet("tfem://stage1/*")

fsspec finds this class through the `fsspec.specs` entry point, so every
process (Dask's spawned workers too) knows the protocol without importing
tfem first. A path is a tfem name without the protocol and without leading
or trailing "/"; directories are implied by "/" in names, as in object
stores, and there are no empty ones. Only published files are seen: a file
still being written is not listed, as an object store lists an upload only
once it is complete.

Lifetimes. Pandas and Dask open a file more than once (to sample it, to
read its footer, then to read it), so through fsspec a file written is kept
by default: any number of readers, until `rm` (or the instance's stop).
`readers=N` frees it after its N-th reader closes, `readers=1` is tfem's
consume-once; `ttl` frees it that many seconds after it was created. They
are storage options (for every file the filesystem writes) and `open()`
keywords (for one file). Every opened reader counts one read when it
closes, a `cat` too; a copy does not (it gives its read back), so `mv`, a
copy and a delete, moves a file whatever its lifetime.

A reader holds its tfem file open from `open()` to `close()`: range reads
are seeks in it, never new opens, so a consume-once file is freed once,
when its reader closes. Leaving a `with` block through an exception gives a
reader's file back and drops a writer's, as tfem's own files do.

The instance is the one `tfem.connect` finds: `keyfile=` (a storage
option), else $TFEM_KEYFILE, else the per-user default, looked up at each
call: fsspec caches filesystem objects by their arguments, and one made
without a key file must follow the environment. A process has one
connection per instance, made on first use and shared by the filesystem
objects fsspec makes per thread.
"""

from __future__ import annotations

import datetime
import os
import threading
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.spec import AbstractBufferedFile
from fsspec.utils import tokenize

from . import forks
from .client import Client, connect
from .config import ENV_BROKER, ENV_KEYFILE
from .errors import AlreadyExists, InvalidArgument
from .files import TfemFile
from .table import FileStat, file_stat

PROTOCOL = "tfem"
MODES = ("rb", "wb", "xb")


# What tfem.connect's choice of instance depends on (config.py): the
# environment is read at each call, a dict lookup, where resolving the key
# file's path would cost a third of a small file's open.
_CHOICE = (ENV_KEYFILE, ENV_BROKER, "XDG_RUNTIME_DIR", "SLURM_JOB_ID")
_clients: dict[tuple[str | None, ...], Client] = {}  # by that choice: one per instance
_connecting = threading.Lock()


@forks.in_child
def _renew_lock() -> None:
    global _connecting
    _connecting = threading.Lock()  # a thread of the parent may have held it at the fork


def _instance(keyfile: str | None) -> tuple[str | None, ...]:
    """What decides the instance tfem.connect(keyfile) connects to, now."""
    return (keyfile, *map(os.environ.get, _CHOICE))


def _check_lifetime(readers: int | None, ttl: float | None) -> None:
    if readers is not None and (type(readers) is not int or readers < 1):
        raise InvalidArgument(f"readers must be None (keep the file) or an integer of at least 1, not {readers!r}")
    if ttl is not None and (type(ttl) not in (int, float) or not ttl > 0):
        raise InvalidArgument(f"ttl must be None or a number of seconds above 0, not {ttl!r}")


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (type(timeout) not in (int, float) or not timeout >= 0):
        raise InvalidArgument(f"timeout must be None or at least 0 s, not {timeout!r}")


def _info(stat: FileStat) -> dict[str, Any]:
    return {"name": stat.name, "size": stat.size, "type": "file", "created": stat.created, "state": stat.state,
            "spilled": stat.spilled, "lifetime": stat.lifetime, "readers_left": stat.readers_left,
            "holders": stat.holders, "expires": stat.expires}


def _directory(name: str) -> dict[str, Any]:
    return {"name": name, "size": 0, "type": "directory"}


class TfemFileSystem(AbstractFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """The files of one tfem instance, as an fsspec filesystem.

    Storage options: `keyfile` (the instance), `readers` (None: files
    written are kept until removed; N: freed after their N-th reader),
    `ttl` (seconds a file lives at most, read or not), `timeout` (how long
    an open for reading waits for a file that is missing or not yet
    published; None or 0: it does not wait, and a missing file is
    FileNotFoundError).
    """

    protocol = PROTOCOL
    root_marker = ""

    def __init__(self, keyfile: str | None = None, *, readers: int | None = None, ttl: float | None = None,
                 timeout: float | None = None, **storage_options: Any) -> None:
        super().__init__(**storage_options)
        _check_lifetime(readers, ttl)
        _check_timeout(timeout)
        self.keyfile = keyfile
        self.readers = readers
        self.ttl = ttl
        self.timeout = timeout

    @property
    def client(self) -> Client:
        """This process's connection to the instance, made on first use."""
        where = _instance(self.keyfile)
        client = _clients.get(where)
        if client is None:
            with _connecting:
                client = _clients.get(where)
                if client is None:
                    client = _clients[where] = connect(self.keyfile)
        return client

    def close(self) -> None:
        """Disconnect this process from the instance (a later call connects
        again). Files open on it are closed as tfem.Client.close closes
        them: writers' files are dropped."""
        with _connecting:
            client = _clients.pop(_instance(self.keyfile), None)
        if client is not None:
            client.close()

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith(PROTOCOL + "://"):
            path = path[len(PROTOCOL) + 3:]
        return path.strip("/")

    # ---- what is there ----

    def _published(self) -> list[FileStat]:
        return [s for s in self.client.list_stats() if s.state != "WRITE"]

    def _stat(self, name: str) -> FileStat | None:
        """The published file named `name`, if there is one."""
        if not name:
            return None
        try:
            stat = self.client.stat(name)
        except FileNotFoundError:
            return None
        return stat if stat.state != "WRITE" else None

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        prefix = path + "/" if path else ""
        out: dict[str, dict[str, Any]] = {}
        for stat in self._published():
            if stat.name == path:
                return [_info(stat)] if detail else [path]
            if stat.name.startswith(prefix):
                child, sep, _ = stat.name[len(prefix):].partition("/")
                name = prefix + child
                if sep:
                    out.setdefault(name, _directory(name))
                else:
                    out[name] = _info(stat)  # a file, and a directory too: the file is listed
        if not out and path:
            raise FileNotFoundError(f"no file or directory {path!r} in the tfem instance")
        entries = sorted(out.values(), key=lambda e: str(e["name"]))
        return entries if detail else [e["name"] for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        stat = self._stat(path)
        if stat is not None:
            return _info(stat)
        if not path or any(s.name.startswith(path + "/") for s in self._published()):
            return _directory(path)
        raise FileNotFoundError(f"no file or directory {path!r} in the tfem instance")

    def created(self, path: str) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._file_info(path)["created"], tz=datetime.timezone.utc)

    def modified(self, path: str) -> datetime.datetime:
        return self.created(path)  # a published file never changes

    def ukey(self, path: str) -> str:
        """The same while the file lives: its state and holders, in
        info(), change as readers come and go."""
        info = self.info(path)
        return str(tokenize(info["name"], info["size"], info.get("created")))

    def checksum(self, path: str) -> int:
        return int(self.ukey(path), 16)

    def _file_info(self, path: str) -> dict[str, Any]:
        info = self.info(path)
        if info["type"] != "file":
            raise IsADirectoryError(f"{info['name']!r} is a directory")
        return info

    # ---- files ----

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> TfemBufferedFile:
        """`readers`, `ttl` (writers) and `timeout` (readers) as keywords
        set the filesystem's options for this file."""
        path = self._strip_protocol(path)
        if mode not in MODES:
            raise InvalidArgument(f"mode must be one of {', '.join(MODES)} (a published tfem file cannot be "
                                  f"changed), not {mode!r}")
        readers, ttl = kwargs.pop("readers", self.readers), kwargs.pop("ttl", self.ttl)
        timeout = kwargs.pop("timeout", self.timeout)
        if mode == "rb":
            held = self._open_reader(path, timeout)
        else:
            held = self._open_writer(path, mode, readers, ttl)
        return TfemBufferedFile(self, path, mode, held, block_size=block_size, autocommit=autocommit,
                                cache_options=cache_options, **kwargs)

    def _open_reader(self, name: str, timeout: float | None) -> TfemFile:
        _check_timeout(timeout)
        try:
            if timeout:
                return self.client.open(name, "r", timeout=timeout)
            return self.client.open(name, "r", wait=False)
        except (FileNotFoundError, InvalidArgument):  # the root, "", is no name
            if self.isdir(name):
                raise IsADirectoryError(f"{name!r} is a directory") from None
            raise

    def _open_writer(self, name: str, mode: str, readers: int | None, ttl: float | None) -> TfemFile:
        _check_lifetime(readers, ttl)
        try:
            return self._create(name, readers, ttl)
        except AlreadyExists:
            if mode == "xb":
                raise
        self.client.unlink(name)  # "wb" replaces; a reader holding the old file keeps it until it closes
        return self._create(name, readers, ttl)

    def _create(self, name: str, readers: int | None, ttl: float | None) -> TfemFile:
        return self.client.open(name, "w", readers=readers or 1, keep=readers is None, ttl=ttl)

    # cat_file and pipe_file use tfem's file straight: fsspec's buffered
    # file would cost a copy and about 20 us a file.

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """The bytes of `path` from `start` to `end` (Python slice rules). A
        read: it counts one for a file with a number of readers."""
        with self._open_reader(self._strip_protocol(path), kwargs.get("timeout", self.timeout)) as f:
            first, last, _ = slice(start, end).indices(f.seek(0, os.SEEK_END))
            f.seek(first)
            return f.read(max(0, last - first))

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        with self._open_writer(self._strip_protocol(path), "xb" if mode == "create" else "wb",
                               kwargs.get("readers", self.readers), kwargs.get("ttl", self.ttl)) as f:
            f.write(value)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Copy a file (a directory has nothing to copy: it is implied).
        The source's read is given back, never counted."""
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        if self._stat(path1) is None:
            self.info(path1)  # FileNotFoundError unless a directory
            return
        source = self._open_reader(path1, None)
        try:
            with self.open(path2, "wb", **kwargs) as target:
                for chunk in source.chunks(self.blocksize):
                    target.write(chunk)
        finally:
            source.abort()

    def rm_file(self, path: str) -> None:
        self.client.unlink(self._strip_protocol(path))

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """Remove files; directories go with their last file. Without
        `recursive`, a path that is a directory only is IsADirectoryError,
        as for rm(1)."""
        paths = self.expand_path(path, recursive=recursive, maxdepth=maxdepth)
        names = {s.name for s in self._published()}
        for p in paths:
            if p not in names:
                self.info(p)  # FileNotFoundError unless a directory
                if not recursive:
                    raise IsADirectoryError(f"{p!r} is a directory: remove it with recursive=True")
        for p in paths:
            if p in names:
                self.client.unlink(p)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """Nothing to do: directories are implied by the names in them."""

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Nothing to do: directories are implied by the names in them."""

    def rmdir(self, path: str) -> None:
        """Nothing to do: a directory goes with its last file."""


class TfemBufferedFile(AbstractBufferedFile):  # type: ignore[misc]  # fsspec is untyped
    """An fsspec file over one held tfem file: a reader's range reads are
    seeks in it; a writer's buffer is written to it as it fills, and
    close() publishes (or, outside autocommit, commit() does)."""

    closed: bool  # the base class's property

    def __init__(self, fs: TfemFileSystem, path: str, mode: str, held: TfemFile, **kwargs: Any) -> None:
        self._held = held
        if mode == "rb":
            stat = file_stat(held.fstat())
            kwargs["size"] = stat.size
            self.details = _info(stat)
        try:
            super().__init__(fs, path, mode, **kwargs)
        except BaseException:
            held.abort()
            raise

    def _fetch_range(self, start: int, end: int) -> bytes:
        self._held.seek(start)
        return self._held.read(end - start)

    def _upload_chunk(self, final: bool = False) -> bool:
        try:
            self._held.write(self.buffer.getbuffer())
        except BaseException:
            # Dropped: fsspec would write the whole buffer again at close,
            # after whatever part of it went in.
            self._held.abort()
            self.closed = True
            raise
        if final and self.autocommit:
            self.commit()
        return True

    def commit(self) -> None:
        self._held.close()  # published

    def discard(self) -> None:
        self._held.abort()  # dropped, never seen

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()
        except BaseException:
            self._held.abort()  # a writer's file is dropped, a reader's given back
            raise
        if self.mode == "rb":
            self._held.close()  # counts the read

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        elif not self.closed:
            self._held.abort()  # a writer's file is dropped, a reader's given back
            self.closed = True

    def __del__(self) -> None:
        # An unclosed writer's file is dropped, never half-published (as
        # TfemFile does); an unclosed reader is closed, its read counted.
        if not self.closed and self.mode != "rb":
            self._held.abort()
            self.closed = True
        super().__del__()
