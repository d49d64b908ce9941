"""Benchmarks of tfem against the peers a user would pick instead.

    python -m bench [--quick] [--out DIR] [--repeats N] [--only WORKLOAD...]

from the top of the repository, with tfem installed and redis-server on
PATH (pip install '.[bench]' adds redis and matplotlib). The run starts
its own tfem instance (`tfem up`, a key file in a temporary directory) and
its own redis-server, measures every workload against its peers in the
same run, removes everything it started, and writes latest.json,
latest.md and PNG plots into bench/results/ (or --out).

Modules, one job each:
- plan: how much to measure (full run, --quick smoke run)
- services: tfem instances, redis-server, temporary directories, clean-up
- procs: forked worker processes driven over pipes
- peers: tfem, tmpfs and local-disk files, shared_memory, Redis
- workloads: handoff, putget, zerocopy, pairs, stream, spill, pipeline, memory
- waits: tfem's wait modes, with nothing else running and under load
- brokermodes: the broker's modes (adaptive, sync, async): answers during a
  spill, light load, a burst of spills
- cbench and c/: the C programs and what they measure
- stats: medians and spreads; report: JSON, Markdown, plots, targets

A full run takes about 12-18 minutes on a quiet 2-CPU machine (Redis
moving 1 GiB values is most of it) and needs about 8 GiB of free memory,
3.5 GiB of it in /dev/shm; --quick takes about 30 s. Run it when nothing
else runs: other load shows up in every figure.

Timings are reported, never asserted: no test or CI job depends on them.
"""
