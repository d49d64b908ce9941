"""The spill store's records, as pure code: keys, codecs, overlaps.

A spilled file's bytes past its inline buffer are records in one LMDB
database. A record holds up to RECORD_MAX bytes of one file from `start`
(counted from the end of the inline buffer); its key says where and how:

    file id (u64) | start (u64) | length (u32) | codec (u8)      big-endian

Big-endian, so a file's records sort together and in order: a reader finds
the record holding an offset with one cursor seek, and walks on from there.
Records never overlap; bytes no record holds were never written and read
as zeros. A record's length is its raw length, so where a file's bytes lie
is known from the keys alone, without decompressing anything.

A record is stored compressed only when that saves room (the codec's output
is smaller than SAVING of the raw bytes); otherwise raw, so random data
costs no decompression to read back.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

import lz4.block
import zstandard

RECORD_MAX = 1 << 20
SAVING = 0.9  # a compressed record must be at most this share of its raw bytes
ZSTD_LEVEL = 1  # zstd's fastest standard level: the store is on the write path

_KEY = struct.Struct(">QQIB")
_PREFIX = struct.Struct(">QQ")


class Codec(enum.IntEnum):
    NONE = 0
    LZ4 = 1
    ZSTD = 2


CODECS = {"none": Codec.NONE, "lz4": Codec.LZ4, "zstd": Codec.ZSTD}  # --spill-compress


@dataclasses.dataclass(frozen=True)
class Record:
    file_id: int
    start: int
    length: int
    codec: Codec

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def key(self) -> bytes:
        return _KEY.pack(self.file_id, self.start, self.length, self.codec)


def parse_key(key: bytes | memoryview) -> Record:
    file_id, start, length, codec = _KEY.unpack(key)
    return Record(file_id, start, length, Codec(codec))


def seek_key(file_id: int, start: int = 0) -> bytes:
    """The smallest key at or after (file_id, start): a cursor's set_range
    lands on the first record of the file starting there or later."""
    return _PREFIX.pack(file_id, start)


def encode(codec: Codec, data: memoryview) -> tuple[Codec, memoryview | bytes]:
    """How to store `data`: the codec used (NONE if compressing saves too
    little) and the value."""
    if codec is Codec.NONE:
        return Codec.NONE, data
    if codec is Codec.LZ4:
        packed = lz4.block.compress(data, store_size=False)
    else:
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    if len(packed) > SAVING * len(data):
        return Codec.NONE, data
    return codec, packed


def decode(record: Record, value: memoryview | bytes) -> memoryview | bytes:
    """A record's raw bytes from its stored value."""
    if record.codec is Codec.NONE:
        return value
    if record.codec is Codec.LZ4:
        raw: bytes = lz4.block.decompress(value, uncompressed_size=record.length)
        return raw
    return zstandard.ZstdDecompressor().decompress(value, max_output_size=record.length)


def split(record: Record, start: int, end: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """What of `record` a write of [start, end) leaves: the part before it
    and the part after, each as (start, end) in the file, or None."""
    head = (record.start, start) if record.start < start < record.end else None
    tail = (end, record.end) if record.start < end < record.end else None
    return head, tail
