"""How much to measure: the full run and the --quick smoke run.

Counts are per run; every run measures every peer (interleaved), and a
figure is reported as the median of the runs with their spread. Small
sizes get many handoffs per run, large ones few.
"""

from __future__ import annotations

import dataclasses

K, M, G = 1 << 10, 1 << 20, 1 << 30

WORKLOADS = ("handoff", "putget", "zerocopy", "pairs", "stream", "waits", "pipeline", "c", "memory", "spill",
             "broker", "cluster")


@dataclasses.dataclass
class Plan:
    quick: bool
    repeats: int
    handoff_counts: dict[int, int]  # size -> handoffs per run
    putget_count: int  # put + get rounds per run, in one process
    zerocopy_size: int
    zerocopy_count: int  # zero-copy handoffs per run and variant
    pairs: list[int]
    seconds: float  # per pairs / stream measurement
    waits_count: int  # acked handoffs per run, wait mode and load, unless waits_seconds end first
    waits_seconds: float
    tfem_memory: int  # arena of the main instance
    spill_arena: int  # arena of the spill workload's instance; it writes 4x this
    spill_file: int
    pipeline_parts: int
    pipeline_part_size: int
    pipeline_workers: int
    c_size: int
    c_count: int  # C handoffs per run
    call_iterations: int
    broker_arena: int  # the broker workload's instances: answers while broker_big_file spills through this
    broker_big_file: int
    broker_light_rounds: int  # spilled round trips per run, light load
    broker_burst_writers: int  # a burst of spills: more writers than CPUs,
    broker_burst_files: int  # each writing this many files
    broker_burst_file_size: int  # of this size
    broker_burst_arena: int  # through this arena
    cluster_big_size: int  # the file handed from one node to another
    cluster_small_count: int  # 4 KiB handoffs between the nodes per run
    cluster_in_flight: int  # the consumer's opens at once; Redis's pipeline depth

    @property
    def handoff_sizes(self) -> list[int]:
        return sorted(self.handoff_counts)

    def warmup(self, size: int) -> int:
        """Handoffs discarded before counting: none for large files (the
        first one of a pair is never large: sizes go up)."""
        return 0 if size >= 16 * M else max(5, self.handoff_counts[size] // 10)


def make_plan(quick: bool, repeats: int | None = None, sizes: list[int] | None = None) -> Plan:
    if quick:
        plan = Plan(quick=True, repeats=2,
                    handoff_counts={4 * K: 150, 64 * K: 60, 1 * M: 30},
                    putget_count=2000, zerocopy_size=64 * M, zerocopy_count=3,
                    pairs=[1, 2, 4], seconds=0.3, waits_count=300, waits_seconds=0.5, tfem_memory=256 * M,
                    spill_arena=16 * M, spill_file=1 * M,
                    pipeline_parts=32, pipeline_part_size=64 * K, pipeline_workers=2,
                    c_size=64 * M, c_count=2, call_iterations=20_000,
                    broker_arena=16 * M, broker_big_file=128 * M, broker_light_rounds=50,
                    broker_burst_writers=6, broker_burst_files=2, broker_burst_file_size=4 * M,
                    broker_burst_arena=8 * M,
                    cluster_big_size=16 * M, cluster_small_count=200, cluster_in_flight=8)
    else:
        plan = Plan(quick=False, repeats=3,
                    handoff_counts={4 * K: 1000, 64 * K: 400, 1 * M: 200, 16 * M: 30, 256 * M: 5, 1 * G: 3},
                    putget_count=50_000, zerocopy_size=1 * G, zerocopy_count=3,
                    pairs=[1, 2, 4, 8, 16], seconds=2.0, waits_count=10_000, waits_seconds=3.0, tfem_memory=2 * G,
                    spill_arena=64 * M, spill_file=1 * M,
                    pipeline_parts=256, pipeline_part_size=256 * K, pipeline_workers=4,
                    c_size=1 * G, c_count=2, call_iterations=200_000,
                    broker_arena=64 * M, broker_big_file=1 * G, broker_light_rounds=500,
                    broker_burst_writers=6, broker_burst_files=8, broker_burst_file_size=8 * M,
                    broker_burst_arena=16 * M,
                    cluster_big_size=1 * G, cluster_small_count=2000, cluster_in_flight=16)
    if repeats is not None:
        plan.repeats = repeats
    if sizes:
        default = 3 if quick else 5
        plan.handoff_counts = {s: plan.handoff_counts.get(s, 20 if s < 16 * M else default) for s in sizes}
        plan.tfem_memory = max(plan.tfem_memory, 2 * max(sizes))
    return plan
