"""What the broker reports of itself (STATS, `tfem status`)."""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Any

from tfem.states import STATE_MASK, State

from .clients import Clients
from .dispatch import Dispatch
from .holdings import Holdings, state_words
from .recovery import Recovery


def stats(holdings: Holdings, dispatch: Dispatch, clients: Clients, *, endpoint: str, started: float,
          recovery: Recovery | None, limit_from: str, broker_mode: dict[str, Any], expired: int) -> dict[str, Any]:
    """Answered in the request loop, while the disk worker may be changing
    the table and the store: each figure is read once, and together they
    are a near snapshot, not an exact one."""
    seg, spill = holdings.segment, holdings.spill
    counts = collections.Counter(word & STATE_MASK for word in state_words(seg))
    by_state = {state.name: counts[int(state)] for state in State}
    # Freed files' records wait for the broker's next tidy: not counted.
    held_spilled = spill.file_ids() & holdings.owned_spilled() if spill else set()
    used_blocks = seg.blocks_in_use()
    h = seg.header
    return {
        "broker_pid": os.getpid(),
        "endpoint": endpoint,
        "segment": seg.name,
        "uptime_s": round(time.time() - started, 1),
        "slots_total": seg.slot_count,
        "slots_used": seg.slot_count - by_state["INVALID"],
        "slots_free": by_state["INVALID"],
        "files_by_state": {k: v for k, v in by_state.items() if k != "INVALID"},
        "buf_size": seg.buf_size,
        "block_size": seg.block_size,
        "arena_bytes_total": seg.block_count * seg.block_size,
        "arena_bytes_used": used_blocks * seg.block_size,
        "arena_bytes_free": (seg.block_count - used_blocks) * seg.block_size,
        "max_file_size": h.max_file_size,
        "spill": str(spill.path) if spill else None,
        "spilled_bytes": spill.bytes_of(held_spilled) if spill else 0,
        "spilled_files": len(held_spilled),
        "spill_store": {"limit": spill.limit, "limit_from": limit_from, "codec": spill.codec.name.lower(),
                        "raw_bytes": spill.raw_bytes, "file_bytes": spill.file_bytes, "written_bytes": spill.written,
                        "renewals": spill.renewals, "spills": dispatch.memory.spills,
                        "restores": dispatch.memory.restores,
                        "restore_hits": dispatch.memory.restore_hits,
                        "restores_spilled_again": dispatch.memory.restores_evicted} if spill else None,
        "clients": len(clients.pids),
        "requests_served": dict(dispatch.served),
        "broker_mode": broker_mode,
        "request_errors": dispatch.errors,
        "dead_clients_settled": clients.settled,
        "segments_replaced": holdings.segments_replaced,
        "recovery": {k: v for k, v in dataclasses.asdict(recovery).items()
                     if k != "discard_file_ids"} if recovery else None,
        "opened_for_write": h.opened_write,
        "opened_for_read": h.opened_read,
        "published": h.closed_write,
        "consumed": h.closed_read,
        "read_waits": h.read_waits,
        "room_waits": h.room_waits,
        "timeouts": h.timeouts,
        "refused_full": h.refused_full,
        "refused_large": h.refused_large,
        "checksum_errors": h.checksum_errors,
        "expired": expired,
    }
