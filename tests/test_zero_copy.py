"""Zero copy: Client.create and getbuffer(), with real processes' views of
the shared segment, numpy on top, and the rule that a file's memory is
never reused while a view of it lives."""

from __future__ import annotations

import errno
import gc

import numpy as np
import pytest

import tfem
from tests._proc_tools import wait_until

MIB = 1 << 20
# 8 MiB arena in 4 KiB blocks, 1 KiB inline buffers.
ZC = ("--slots", "64", "--buf-size", "1K", "--block-size", "4K", "--memory", "8M")


@pytest.fixture
def zc(instance_factory):
    return instance_factory(*ZC)


@pytest.fixture
def zclient(zc):
    with zc.connect() as c:
        yield c


def test_a_view_written_in_place_is_read_in_place(zclient) -> None:
    size = 3 * MIB + 123
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    f = zclient.create("zc/a", size)
    view = f.getbuffer()
    assert (len(view), view.readonly) == (size, False)
    assert not any(view[:4096])  # made of zeros, never another file's bytes
    arr = np.frombuffer(view, dtype=np.uint8)
    arr[:] = data  # numpy writes straight into the segment
    with pytest.raises(BufferError):  # the array still holds the memory
        f.close()
    assert zclient.stat("zc/a").state == "WRITE"
    del arr
    view.release()
    f.close()  # published

    g = zclient.open("zc/a")
    rview = g.getbuffer()
    assert rview.readonly and len(rview) == size
    got = np.frombuffer(rview, dtype=np.uint8)
    assert np.array_equal(got, data)
    with pytest.raises(TypeError):
        rview[0] = 1  # a consumer's view is read-only
    rview.release()
    with pytest.raises(BufferError):  # numpy's array outlives the view it came from
        g.close()
    del got
    g.close()
    assert zclient.list() == []
    assert zclient.stats()["arena_bytes_used"] == 0


def test_a_slice_of_a_view_also_holds_the_memory(zclient) -> None:
    f = zclient.create("zc/slice", 10_000)
    piece = f.getbuffer()[100:200]  # the full view is gone; its slice is not
    piece[:] = b"x" * 100
    gc.collect()
    with pytest.raises(BufferError):
        f.close()
    piece.release()
    f.close()
    with zclient.open("zc/slice") as g:
        assert g.read()[100:200] == b"x" * 100


def test_a_created_file_reads_and_writes_like_any_other(zclient) -> None:
    with zclient.create("zc/plain", 50_000) as f:
        f.write(b"head")
        f.seek(49_996)
        f.write(b"tail")
    with zclient.open("zc/plain") as g:
        data = g.read()
    assert data[:4] == b"head" and data[-4:] == b"tail" and data[4:-4] == bytes(50_000 - 8)


def test_damage_is_seen_before_the_view_unless_unchecked(zc, zclient) -> None:
    from tests.test_recovery import mapped  # the segment as a test sees it

    for checksum in (True, False):
        name = f"zc/crc-{checksum}"
        f = zclient.create(name, 20_000, checksum=checksum)
        f.getbuffer()[:] = b"\x07" * 20_000
        f.close()
        with mapped(zc.names.segment) as seg:
            offset = seg.block_data_offset(seg.slot(zclient.stat(name).slot).extents[0].start) + 500
            seg.view[offset] ^= 0xFF
        g = zclient.open(name)
        if checksum:
            with pytest.raises(tfem.ChecksumMismatch) as caught:
                g.getbuffer()
            assert caught.value.errno == errno.EBADMSG
            g.close()  # given back, not consumed
            assert zclient.stat(name).state == "WAIT"
            zclient.unlink(name)
        else:
            assert g.getbuffer()[500] == 0x07 ^ 0xFF  # the producer chose no checksum: unseen
            g.close()


def test_the_broker_makes_a_run_of_blocks(zclient) -> None:
    # Fill the arena with published files, every other one then taken, so
    # the free blocks are scattered: no run of 4 MiB is left.
    for i in range(14):
        with zclient.open(f"zc/fill/{i}", "w") as f:
            f.write(b"f" * (512 << 10))
    for i in range(0, 14, 2):
        with zclient.open(f"zc/fill/{i}") as f:
            f.read()
    with zclient.create("zc/big", 4 * MIB) as f:  # the broker spilled others to make one
        f.getbuffer()[-1] = 1
    stats = zclient.stats()
    assert stats["spilled_files"] >= 1
    with zclient.open("zc/big") as g:
        assert g.getbuffer()[-1] == 1
    for i in range(1, 14, 2):  # the spilled files are intact
        with zclient.open(f"zc/fill/{i}") as f:
            assert f.read() == b"f" * (512 << 10)


def test_a_file_made_whole_is_never_spilled(zclient) -> None:
    with zclient.create("zc/pinned", 5 * MIB) as f:
        f.getbuffer()[:3] = b"abc"
    for i in range(8):  # pressure: these spill, the whole one stays
        with zclient.open(f"zc/more/{i}", "w") as f:
            f.write(b"m" * MIB)
    assert not zclient.stat("zc/pinned").spilled
    with zclient.open("zc/pinned") as g:
        assert bytes(g.getbuffer()[:3]) == b"abc"
    with pytest.raises(tfem.NoSpace):  # larger than the arena: said at once
        zclient.create("zc/huge", 64 * MIB)
    assert "zc/huge" not in zclient.list()


def test_getbuffer_refuses_a_file_in_pieces(zclient) -> None:
    with zclient.open("zc/pieces", "w") as f:
        f.write(b"p" * 100_000)  # inline buffer, then an extent: two pieces
    with zclient.open("zc/pieces") as g:
        with pytest.raises(BufferError, match="not one piece"):
            g.getbuffer()
        assert g.read() == b"p" * 100_000
    with zclient.open("zc/small", "w") as f:
        f.write(b"s" * 500)  # within the inline buffer: one piece
    with zclient.open("zc/small") as g:
        assert bytes(g.getbuffer()) == b"s" * 500


def test_bad_sizes(zclient) -> None:
    for size, error in ((-1, tfem.InvalidArgument), (1.5, tfem.InvalidArgument), ("1", tfem.InvalidArgument)):
        with pytest.raises(error):
            zclient.create("zc/bad", size)
    assert zclient.list() == []
    with zclient.create("zc/empty", 0) as f:
        assert len(f.getbuffer()) == 0


def test_a_client_closing_under_a_live_view_keeps_the_file(zc) -> None:
    client = zc.connect()
    f = client.create("zc/kept", 8192)
    view = f.getbuffer()
    client.close()  # the file cannot be dropped while its memory is in view
    view[:4] = b"live"  # still mapped, still this process's
    with zc.connect() as other:
        assert other.stat("zc/kept").state == "WRITE"
    view.release()
    f.abort()  # now it can go
    with zc.connect() as other:
        wait_until(lambda: other.list() == [], timeout=5, what="the file dropped")
