"""The broker's statistics (its STATS reply) in Prometheus' text exposition
format, for node_exporter's textfile collector: `tfem status --prometheus`.

Pure: a STATS dict in, text out. Names follow Prometheus' naming guide:
the `tfem_` prefix, base units in the name (`_bytes`, `_seconds`),
`_total` on counters and only on them. Every sample carries the label
`segment`, the instance's segment name, so that several instances on a
node (one per Slurm job) can each write a file for the same collector.
Counters start again from 0 when a broker starts afresh or makes its
segment anew; Prometheus' rate() takes such resets in its stride.
"""

from __future__ import annotations

from typing import Any, Iterable

# (name, type, help, [(labels, value)]): one metric family.
Samples = Iterable[tuple[dict[str, str], float]]
Family = tuple[str, str, str, Samples]


def render(stats: dict[str, Any]) -> str:
    """The exposition text of a STATS reply."""
    return _render(str(stats["segment"]), _families(stats))


def _render(segment: str, families: Iterable[Family]) -> str:
    lines = []
    for name, kind, help_text, samples in families:
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            pairs = ",".join(f'{k}="{_escape_label(v)}"' for k, v in {"segment": segment, **labels}.items())
            lines.append(f"{name}{{{pairs}}} {_number(value)}")
    return "\n".join(lines) + "\n"


def render_down(segment: str) -> str:
    """What to expose while no broker answers for the instance."""
    return _render(segment, [_up(0)])


def _up(value: int) -> Family:
    return ("tfem_up", "gauge", "1 while the instance's broker answers, 0 when it does not", _one(value))


def _one(value: float) -> Samples:
    return [({}, value)]


def _families(stats: dict[str, Any]) -> list[Family]:
    store = stats["spill_store"] or {}
    mode = stats.get("broker_mode") or {}
    families: list[Family] = [
        _up(1),
        ("tfem_uptime_seconds", "gauge", "seconds since the broker started", _one(stats["uptime_s"])),
        ("tfem_files", "gauge", "files held, by state",
         [({"state": state.lower()}, n) for state, n in stats["files_by_state"].items()]),
        ("tfem_slots", "gauge", "slots of the slot table (one per file held), used and free",
         [({"status": "used"}, stats["slots_used"]), ({"status": "free"}, stats["slots_free"])]),
        ("tfem_memory_bytes", "gauge", "bytes of the arena (memory past the inline buffers), used and free",
         [({"status": "used"}, stats["arena_bytes_used"]), ({"status": "free"}, stats["arena_bytes_free"])]),
        ("tfem_max_file_size_bytes", "gauge", "the largest file the instance takes", _one(stats["max_file_size"])),
        ("tfem_spilled_bytes", "gauge", "bytes of held files in the spill store, as stored (compressed)",
         _one(stats["spilled_bytes"])),
        ("tfem_spilled_files", "gauge", "held files whose bytes are in the spill store", _one(stats["spilled_files"])),
        ("tfem_clients", "gauge", "client processes connected to the broker", _one(stats["clients"])),
        ("tfem_opened_files_total", "counter", "opens of a file, for write and for read",
         [({"mode": "write"}, stats["opened_for_write"]), ({"mode": "read"}, stats["opened_for_read"])]),
        ("tfem_published_files_total", "counter", "files closed by their producer (handed off)",
         _one(stats["published"])),
        ("tfem_consumed_files_total", "counter",
         "reads done: closes by a consumer (a file read once is freed by its one)", _one(stats["consumed"])),
        ("tfem_expired_files_total", "counter", "files freed because their ttl passed", _one(stats["expired"])),
        ("tfem_waits_total", "counter",
         "opens that had to wait: for read until the file was published, for write until a slot was free",
         [({"for": "file"}, stats["read_waits"]), ({"for": "slot"}, stats["room_waits"])]),
        ("tfem_errors_total", "counter",
         "failures by kind: waits that timed out, opens refused for a full slot table, writes past the "
         "largest file, reads that found a file damaged, requests the broker refused",
         [({"kind": "timeout"}, stats["timeouts"]), ({"kind": "no_space"}, stats["refused_full"]),
          ({"kind": "too_large"}, stats["refused_large"]), ({"kind": "checksum"}, stats["checksum_errors"]),
          ({"kind": "request"}, stats["request_errors"])]),
        ("tfem_requests_total", "counter", "requests the broker served, by operation",
         [({"op": op}, n) for op, n in sorted(stats["requests_served"].items())]),
        ("tfem_dead_clients_settled_total", "counter", "client processes that died holding files, settled",
         _one(stats["dead_clients_settled"])),
        ("tfem_segments_replaced_total", "counter", "segments made anew after their name was removed",
         _one(stats["segments_replaced"])),
    ]
    if store:
        families += [
            ("tfem_spill_limit_bytes", "gauge", "the spill store's limit", _one(store["limit"])),
            ("tfem_spill_raw_bytes", "gauge", "bytes in the spill store before compression", _one(store["raw_bytes"])),
            ("tfem_spill_file_bytes", "gauge", "size of the spill store's data file on disk", _one(store["file_bytes"])),
            ("tfem_spill_written_bytes_total", "counter", "bytes written to the spill store",
             _one(store["written_bytes"])),
            ("tfem_spills_total", "counter", "files moved from memory to the spill store", _one(store["spills"])),
            ("tfem_restores_total", "counter", "spilled files brought back into memory", _one(store["restores"])),
            ("tfem_restore_hits_total", "counter", "restored files consumed from memory",
             _one(store["restore_hits"])),
            ("tfem_spill_renewals_total", "counter", "times the emptied spill store was made afresh",
             _one(store["renewals"])),
        ]
    if mode:  # a broker of before the modes has none
        families.append(("tfem_disk_jobs_total", "counter", "disk jobs the broker ran, in its loop or on its worker",
                         [({"where": "loop"}, mode["disk_jobs_inline"]),
                          ({"where": "worker"}, mode["disk_jobs_on_worker"])]))
    return families


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
