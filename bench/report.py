"""The report: latest.json (everything measured), latest.md (tables, the
targets met or not) and PNG plots, written into one directory.

Ratios compare tfem with the peers measured in the same run. "×N" is
tfem's speed-up over a peer: the peer's time over tfem's time, or tfem's
rate over the peer's rate; above 1, tfem is faster. The targets are
reported, never enforced: timings do not gate anything.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .plan import G, K, M

MiB = 1 << 20


# ---- reading results ----


def _get(d: Any, *path: Any) -> Any:
    for p in path:
        if not isinstance(d, dict) or str(p) not in d:
            return None
        d = d[str(p)]
    return d


def _med(d: Any, *path: Any) -> float | None:
    v = _get(d, *path, "median")
    return float(v) if v is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def size_label(n: int) -> str:
    for unit, name in ((G, "GiB"), (M, "MiB"), (K, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"


# ---- targets ----


def targets(w: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, op: str, goal: float, unit: str = "") -> None:
        met = None if value is None else (value <= goal if op == "<=" else value >= goal if op == ">=" else
                                          value < goal)
        out.append({"target": name, "value": value, "op": op, "goal": goal, "unit": unit, "met": met})

    pg = w.get("putget", {}).get("results", {})
    add("4 KiB put + get in one process, tfem ÷ /dev/shm file",
        _ratio(_med(pg, "tfem", "us_per_putget"), _med(pg, "file", "us_per_putget")), "<=", 0.3)
    h = w.get("handoff", {}).get("results", {})

    def gbps(peer: str, size: int) -> float | None:
        return _med(h, peer, size, "gbps")

    add("4 KiB acked handoff latency, tfem ÷ tmpfs",
        _ratio(_med(h, "tfem", 4 * K, "latency_us"), _med(h, "tmpfs", 4 * K, "latency_us")), "<=", 0.5)
    s = w.get("stream", {}).get("results", {})
    add("4 KiB stream files/s, tfem ÷ tmpfs", _ratio(_med(s, "tfem", "files_per_s"), _med(s, "tmpfs", "files_per_s")),
        ">=", 3.0)
    p = w.get("pairs", {}).get("results", {})
    for n in (1, 2, 4, 8, 16):
        add(f"{n} pair{'s' if n > 1 else ''} files/s, tfem ÷ tmpfs",
            _ratio(_med(p, "tfem", n, "files_per_s"), _med(p, "tmpfs", n, "files_per_s")), ">=", 1.0)
    for size, goal in ((64 * K, 1.5), (M, 2.0), (16 * M, 3.0), (256 * M, 3.0), (G, 3.0)):
        add(f"{size_label(size)} handoff throughput, tfem ÷ tmpfs", _ratio(gbps("tfem", size), gbps("tmpfs", size)),
            ">=", goal)
    memcpy = w.get("handoff", {}).get("memcpy_gbps", {})
    for size in (16 * M, 256 * M, G):
        add(f"{size_label(size)} handoff throughput, tfem ÷ memcpy", _ratio(gbps("tfem", size), _med(memcpy, size)),
            ">=", 0.4)
    zc = w.get("zerocopy", {})
    add("1 GiB zero copy, unchecked: producer's close to consumer's view",
        _med(zc, "results", "tfem-unchecked", "ms") if zc.get("size") == G else None, "<", 1.0, "ms")
    c = w.get("c", {})
    add("C: tfem_lseek + 1-byte tfem_read, per pair", _med(c, "pair_ns", "tfem"), "<=", 100.0, "ns")
    add("1 GiB handoff from C, tfem ÷ memcpy",
        _ratio(_med(c, "handoff", "tfem", "gbps"), _med(c, "memcpy_gbps")) if c.get("handoff_size") == G else None,
        ">=", 0.4)
    sp = w.get("spill", {}).get("results", {})
    add("spill (4x the arena), write + read, tfem ÷ raw LMDB",
        _ratio(_med(sp, "lmdb", "total_s"), _med(sp, "tfem", "total_s")), ">=", 0.5)
    add("spill (4x the arena), read, tfem ÷ raw LMDB", _ratio(_med(sp, "tfem", "read_gbps"), _med(sp, "lmdb", "read_gbps")),
        ">=", 0.5)
    br = w.get("broker", {})
    during = _get(br, "results", "adaptive", "during_spill") if br.get("big_file") == G else None
    for op, label in (("stats", "STATS"), ("hello", "HELLO"), ("alloc", "a small ALLOC")):
        add(f"{label} from another client while 1 GiB spills (adaptive), p99",
            _med(during, f"{op}_p99_ms") if during else None, "<=", 10.0, "ms")
    mem = w.get("memory", {})
    rss = [_get(mem, when, "rss_without_shmem") for when in ("broker_at_start", "broker_now")]
    rss = [r for r in rss if r is not None]
    add("broker idle RSS without the segment", max(rss) / MiB if rss else None, "<", 60.0, "MiB")
    add("segment metadata per held file", _get(mem, "metadata", "per_held_file"), "<", 512.0, "B")
    return out


# ---- Markdown ----


def _num(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _cell(d: Any, digits: int = 3) -> str:
    """median [min–max]"""
    if d is None or d.get("median") is None:
        return "–"
    if len(d.get("runs", [])) < 2:
        return _num(d["median"], digits)
    return f"{_num(d['median'], digits)} [{_num(d['min'], digits)}–{_num(d['max'], digits)}]"


def _speedup(v: float | None) -> str:
    return "" if v is None else f" ×{v:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def _failed(name: str, data: dict[str, Any]) -> list[str]:
    last = data["error"].strip().splitlines()[-1]
    return [f"**{name} failed**: `{last}` (the traceback is in latest.json)", ""]


def _spill_compression(comp: dict[str, Any] | None) -> list[str]:
    """The spill workload's table of --spill-compress codecs."""
    if not comp:
        return []
    L = ["### Compression of the spill store", ""]
    if "error" in comp:
        return L + _failed("spill compression", comp)
    data = "; ".join(f"{name}, {what}" for name, what in comp["data"].items())
    L += ["The same pattern through an instance of its own per `--spill-compress` codec, on each kind of data "
          f"({data}). GB/s of the files' bytes; stored ÷ raw is the store's ratio after writing "
          "(1: stored as written).", ""]
    rows = []
    for kind in comp["data"]:
        for codec in comp["codecs"]:
            r = _get(comp, "results", kind, codec)
            rows.append([kind, codec, *(_cell(_get(r, f"{phase}_gbps")) for phase in ("write", "read", "total")),
                         _cell(_get(r, "stored_to_raw"), 2)])
    return L + _table(["data", "codec", "write GB/s", "read GB/s", "write + read GB/s", "stored ÷ raw"], rows)


def markdown(meta: dict[str, Any], w: dict[str, Any], goals: list[dict[str, Any]]) -> str:
    L: list[str] = ["# tfem benchmarks", ""]
    L += [f"`{meta['command']}` on {meta['date']}, {meta['elapsed_s']:.0f} s. "
          f"{meta['cpus']} CPUs ({meta['cpu_model']}), Linux {meta['kernel']}, Python {meta['python']}, "
          f"tfem {meta['tfem']} (git {meta['git']}), redis-server {meta['redis']}, load average at start "
          f"{meta['load_at_start']}.", ""]
    if meta["quick"]:
        L += ["**Quick run**: small sizes and few repeats, a smoke check of the suite; do not quote its figures.", ""]
    L += [f"Each figure is the median of {meta['repeats']} runs, [min–max] across runs; peers are interleaved "
          "within a run. ×N is tfem's speed-up over the peer in the same run (peer time ÷ tfem time; above 1 "
          "tfem is faster).", ""]

    L += ["## Targets", ""]
    rows = []
    for g in goals:
        unit = f" {g['unit']}" if g["unit"] else ""
        verdict = "not measured" if g["met"] is None else "met" if g["met"] else "**not met**"
        rows.append([g["target"], _num(g["value"]) + (unit if g["value"] is not None else ""),
                     f"{g['op']} {_num(g['goal'])}{unit}", verdict])
    L += _table(["target", "measured", "goal", ""], rows)

    h = w.get("handoff")
    if h:
        L += ["## One handoff", "",
              "A producer process writes and closes a file; a consumer process, already waiting, opens it, "
              "reads it all and closes (removes) it. Time from the producer's open to the consumer's close.", ""]
        if "error" in h:
            L += _failed("handoff", h)
        else:
            peers, res = h["peers"], h["results"]
            others = [k for k in peers if k != "tfem"]
            L += ["### Latency, µs", ""]
            rows = []
            for size in h["sizes"]:
                t = _med(res, "tfem", size, "latency_us")
                row = [size_label(size), _cell(_get(res, "tfem", size, "latency_us")),
                       _num(_get(res, "tfem", size, "p99_us"))]
                for k in others:
                    row.append(_cell(_get(res, k, size, "latency_us"))
                               + _speedup(_ratio(_med(res, k, size, "latency_us"), t)))
                rows.append(row)
            L += _table(["size", "tfem", "tfem p99", *[peers[k] for k in others]], rows)
            L += ["### Throughput, GB/s", ""]
            rows = []
            for size in h["sizes"]:
                t = _med(res, "tfem", size, "gbps")
                mc = _med(h["memcpy_gbps"], size)
                row = [size_label(size), _cell(_get(h["memcpy_gbps"], size)), _cell(_get(res, "tfem", size, "gbps")),
                       _num(_ratio(t, mc), 2)]
                for k in others:
                    row.append(_cell(_get(res, k, size, "gbps")) + _speedup(_ratio(t, _med(res, k, size, "gbps"))))
                rows.append(row)
            L += _table(["size", "memcpy", "tfem", "tfem ÷ memcpy", *[peers[k] for k in others]], rows)
            counts = ", ".join(f"{size_label(int(s))}: {n}" for s, n in h["counts"].items())
            L += [f"Handoffs per run: {counts}. memcpy: a copy into an already-touched buffer of the same size, "
                  "measured in the same run (small sizes copy in a loop, from cache); a handoff copies twice.", ""]

    pg = w.get("putget")
    if pg:
        L += ["## Put + get in one process", ""]
        if "error" in pg:
            L += _failed("putget", pg)
        else:
            L += [f"One process writes a {size_label(pg['file_size'])} file (open for writing, write, close) and "
                  "reads it back (open for reading, read it all, close), under a new name each time: what the "
                  "calls cost, with nobody waiting. The /dev/shm file is written, read back and unlinked with "
                  f"os.open/os.write/os.readv. {pg['rounds']:,} rounds per run.", ""]
            res = pg["results"]
            t = _med(res, "tfem", "us_per_putget")
            L += _table(["µs per put + get", "tfem", pg["peers"]["file"], "tfem ÷ file"],
                        [["", _cell(_get(res, "tfem", "us_per_putget")),
                          _cell(_get(res, "file", "us_per_putget"))
                          + _speedup(_ratio(_med(res, "file", "us_per_putget"), t)),
                          _num(_ratio(t, _med(res, "file", "us_per_putget")), 2)]])

    zc = w.get("zerocopy")
    if zc:
        L += ["## Zero copy", ""]
        if "error" in zc:
            L += _failed("zerocopy", zc)
        else:
            L += [f"A {size_label(zc['size'])} file made with Client.create and filled in place through its "
                  "getbuffer() view (not timed); the consumer, already waiting in open, takes a read-only "
                  "getbuffer() view. Time from just before the producer's close (which publishes the file) to the "
                  "consumer holding its view, time.monotonic_ns() in both processes. Checked, the default, "
                  "includes the producer's and the consumer's checksum passes over the bytes; unchecked, "
                  "create(..., checksum=False), skips both. The peer writes a /dev/shm file through a writable "
                  "mmap, closes it and sends a byte down a pipe; the consumer, waiting on the pipe, opens the "
                  f"file and maps it read-only. {zc['count']} handoffs per run and variant; the figure of a run "
                  "is their median.", ""]
            res = zc["results"]
            peer = _med(res, "mmap", "ms")
            rows = [[zc["peers"][k], _cell(_get(res, k, "ms")), _num(_ratio(_med(res, k, "ms"), peer), 2)]
                    for k in ("tfem-checked", "tfem-unchecked")]
            rows.append([zc["peers"]["mmap"], _cell(_get(res, "mmap", "ms")), ""])
            L += _table(["ms from close to view", "median [min–max]", "tfem ÷ mmap file"], rows)

    for name, title, what in (
            ("pairs", "Small files, N producer/consumer pairs",
             "Each pair hands over 4 KiB files one at a time, the consumer acknowledging each one down a pipe "
             "before the producer writes the next; aggregate files per second over all pairs."),
            ("stream", "A stream of 4 KiB files",
             "One producer, one consumer, no per-file acknowledgement (the producer stays at most "
             f"{w.get('stream', {}).get('window', '')} files ahead); files per second.")):
        d = w.get(name)
        if not d:
            continue
        L += [f"## {title}", "", what, ""]
        if "error" in d:
            L += _failed(name, d)
            continue
        peers, res = d["peers"], d["results"]
        others = [k for k in peers if k != "tfem"]
        if name == "pairs":
            rows = []
            for n in d["pairs"]:
                t = _med(res, "tfem", n, "files_per_s")
                rows.append([str(n), _cell(_get(res, "tfem", n, "files_per_s"))]
                            + [_cell(_get(res, k, n, "files_per_s"))
                               + _speedup(_ratio(t, _med(res, k, n, "files_per_s"))) for k in others])
            L += _table(["pairs", "tfem", *[peers[k] for k in others]], rows)
        else:
            t = _med(res, "tfem", "files_per_s")
            L += _table(["", "tfem", *[peers[k] for k in others]],
                        [["files/s", _cell(_get(res, "tfem", "files_per_s"))]
                         + [_cell(_get(res, k, "files_per_s")) + _speedup(_ratio(t, _med(res, k, "files_per_s")))
                            for k in others]])

    wt = w.get("waits")
    if wt:
        L += ["## Wait modes", ""]
        if "error" in wt:
            L += _failed("waits", wt)
        else:
            L += ["A waiting tfem consumer can be told how to wait (tfem.set_wait_mode, or TFEM_WAIT at import). "
                  "Adaptive, the default, spins while CPUs are idle and recent waits were short, and sleeps on "
                  "the futex at once otherwise; spin always spins (yielding) before it sleeps; sleep sleeps at "
                  "once. One producer and one consumer process hand 4 KiB files over, each acknowledged down a "
                  f"pipe before the next, {wt['count']:,} per run (or as many as fit in {wt['seconds']:g} s) after "
                  f"{wt['warmup']} not counted; light load is nothing else running, under load "
                  f"{wt['loads']['loaded']}. Latency from the producer's open to the consumer's close; CPU is "
                  "user + sys of both processes per handoff; spun is the share of the consumer's waits that "
                  "ended in the spin. ×N is the speed-up over tmpfs files under the same load.", ""]
            rows = []
            for load in ("light", "loaded"):
                res = wt["results"][load]
                t_lat, t_cpu = _med(res, "tmpfs", "latency_us"), _med(res, "tmpfs", "cpu_us")
                for k, label in wt["peers"].items():
                    lat, cpu = _med(res, k, "latency_us"), _med(res, k, "cpu_us")
                    spun = _med(res, k, "spun")
                    rows.append(["light" if load == "light" else "under load", label,
                                 _cell(_get(res, k, "latency_us")) + ("" if k == "tmpfs" else
                                                                       _speedup(_ratio(t_lat, lat))),
                                 _cell(_get(res, k, "cpu_us")) + ("" if k == "tmpfs" else _speedup(_ratio(t_cpu, cpu))),
                                 "" if spun is None else f"{spun:.0%}"])
            L += _table(["load", "waiting", "latency, µs", "CPU µs per handoff", "spun"], rows)

    sp = w.get("spill")
    if sp:
        L += ["## Spill", ""]
        if "error" in sp:
            L += _failed("spill", sp)
        else:
            L += [f"{size_label(sp['bytes'])} in {sp['files']} files of {size_label(sp['file_size'])}, four times "
                  f"the {size_label(sp['arena'])} arena of a tfem instance of its own, written by one process and "
                  "then read back by another; against py-lmdb (sync off, one transaction per value) in the same "
                  f"pattern. tfem had {_num((_med(sp, 'tfem_spilled_bytes_after_write') or 0) / MiB)} MiB in its "
                  f"spill store after writing; {sp['tfem_files_left']} files left after reading.", ""]
            res = sp["results"]
            rows = []
            for phase in ("write", "read", "total"):
                t = _med(res, "tfem", f"{phase}_gbps")
                lm = _med(res, "lmdb", f"{phase}_gbps")
                rows.append([phase if phase != "total" else "write + read", _cell(_get(res, "tfem", f"{phase}_gbps")),
                             _cell(_get(res, "lmdb", f"{phase}_gbps")), _num(_ratio(t, lm), 2)])
            L += _table(["GB/s", "tfem", "raw LMDB", "tfem ÷ LMDB"], rows)
            L += _spill_compression(sp.get("compression"))

    br = w.get("broker")
    if br:
        L += _broker_section(br)

    cl = w.get("cluster")
    if cl:
        L += _cluster_section(cl)

    pl = w.get("pipeline")
    if pl:
        L += ["## Decompose, compute, reduce", ""]
        if "error" in pl:
            L += _failed("pipeline", pl)
        else:
            L += [f"examples/pipeline.py: one splitter, {pl['workers']} workers, one reducer, "
                  f"{pl['parts']} parts of {size_label(pl['part_size'])} ({size_label(pl['bytes'])}); "
                  "checksum verified.", ""]
            res = pl["results"]
            t = _med(res, "tfem", "seconds")
            L += _table(["", "tfem", "tmpfs files"],
                        [["seconds", _cell(_get(res, "tfem", "seconds")),
                          _cell(_get(res, "tmpfs", "seconds")) + _speedup(_ratio(_med(res, "tmpfs", "seconds"), t))],
                         ["GB/s", _cell(_get(res, "tfem", "gbps")), _cell(_get(res, "tmpfs", "gbps"))]])

    c = w.get("c")
    if c:
        L += ["## C", ""]
        if "error" in c:
            L += _failed("c", c)
        else:
            call = c["pair_ns"]
            L += [f"Calls into libtfem: tfem_lseek + a 1-byte tfem_read on an open reader, "
                  f"{c['call_iterations']:,} pairs a round; against lseek + read(2) on a /dev/shm file.", ""]
            L += _table(["ns per lseek + read", "tfem", "/dev/shm file (syscalls)", "tfem ÷ file"],
                        [["", _cell(call["tfem"]), _cell(call["file"]),
                          _num(_ratio(_med(call, "tfem"), _med(call, "file")), 2)]])
            hd = c["handoff"]
            t = _med(hd, "tfem", "gbps")
            L += [f"A {size_label(c['handoff_size'])} handoff from C: one tfem_write, one tfem_read, the consumer "
                  "already waiting; against write(2)/read(2) of a /dev/shm file whose name goes down a pipe.", ""]
            L += _table(["GB/s", "tfem", "/dev/shm file", "memcpy", "tfem ÷ memcpy"],
                        [["", _cell(_get(hd, "tfem", "gbps")),
                          _cell(_get(hd, "file", "gbps")) + _speedup(_ratio(t, _med(hd, "file", "gbps"))),
                          _cell(c["memcpy_gbps"]), _num(_ratio(t, _med(c, "memcpy_gbps")), 2)]])

    mem = w.get("memory")
    if mem:
        L += ["## Memory", ""]
        if "error" in mem:
            L += _failed("memory", mem)
        else:
            rows = []
            for when, label in (("broker_at_start", "after start"), ("broker_now", "idle, after the other workloads")):
                m = mem.get(when)
                if m:
                    rows.append([label, _num(m["VmRSS"] / MiB), _num(m["RssShmem"] / MiB),
                                 _num(m["rss_without_shmem"] / MiB)])
            L += ["Broker resident memory (/proc/PID/status), MiB: the segment is the shared part.", ""]
            L += _table(["broker", "VmRSS", "RssShmem", "VmRSS − RssShmem"], rows)
            md = mem["metadata"]
            L += [f"Segment metadata per held file: {md['slot_record_bytes']} B slot record (struct tfem_slot is "
                  f"{md['slot_struct_bytes']} B, padded to a cache line past the {md['buf_size']} B inline buffer) "
                  f"+ {md['index_bytes_per_slot']:g} B name index + {md['free_stack_bytes_per_slot']} B free stack "
                  f"+ {md.get('life_bytes_per_slot', 0)} B lifetime counts "
                  f"= **{md['per_held_file']:g} B**; everything before the arena that is not an inline buffer, "
                  f"per slot: {md['per_slot_amortised']:.0f} B ({md['slots']} slots).", ""]
    return "\n".join(L)


def _broker_section(br: dict[str, Any]) -> list[str]:
    """Broker modes: adaptive against sync and async forced, per figure;
    "adaptive ÷ X" is adaptive's figure over X's (for times, below 1 is
    adaptive faster; for rates, above 1)."""
    L = ["## Broker modes", ""]
    if "error" in br:
        return L + _failed("broker", br)
    res, burst = br["results"], br["burst"]
    L += [f"Where the broker does its disk work (`tfem up --broker-mode`): adaptive (the default) switches by "
          "load between its request loop (sync) and its worker thread (async); sync and async are forced. "
          f"**During a spill**: one process writes a {size_label(br['big_file'])} file through a "
          f"{size_label(br['arena'])} arena while another asks STATS, HELLO, and writes "
          f"{size_label(br['probe_file'])} files that need room from the broker (ALLOC), with a 1 ms pause; answer "
          "times taken around each request in the asking process, for requests started while the large file was "
          f"written; p50 and p99 of each run. **Light load**: round trips (write, read) of a "
          f"{size_label(br['light_file'])} file that spills, one process alone, {br['light_rounds']} per run. "
          f"**Burst**: {burst['writers']} processes ({burst['cpus']} CPUs) each write {burst['files']} files of "
          f"{size_label(burst['file_size'])} through a {size_label(burst['arena'])} arena from one start time; "
          "seconds until the last is closed. Medians over the runs [min–max].", ""]

    def row(label: str, path: tuple[str, ...]) -> list[str]:
        a, sy, asy = (_med(res, mode, *path) for mode in ("adaptive", "sync", "async"))
        return [label, *(_cell(_get(res, mode, *path)) for mode in ("adaptive", "sync", "async")),
                _num(_ratio(a, sy), 2), _num(_ratio(a, asy), 2)]

    rows = []
    for op, name in (("stats", "STATS"), ("hello", "HELLO"), ("alloc", "ALLOC (small write)")):
        for q in ("p50", "p99"):
            rows.append(row(f"{name} {q}, ms", ("during_spill", f"{op}_{q}_ms")))
    rows.append(row("the spill itself, s", ("during_spill", "spill_s")))
    rows.append(row("light load, round trips/s", ("light_round_trips_per_s",)))
    rows.append(row("burst, s", ("burst_s",)))
    L += _table(["", "adaptive", "sync", "async", "adaptive ÷ sync", "adaptive ÷ async"], rows)
    ends = br.get("mode_at_end", {})
    said = [f"{part}: {m.get('mode')} after {m.get('switches')} switches"
            for part, modes in ends.items() for mode, m in modes.items() if mode == "adaptive" and "mode" in m]
    if said:
        L += ["Adaptive at the end of each part: " + "; ".join(said) + ".", ""]
    return L


CLUSTER_GOALS = {"big": 0.6, "small": 3.0}  # tfem ÷ raw pyzmq (GB/s), tfem ÷ Redis (handoffs/s)


def _cluster_section(cl: dict[str, Any]) -> list[str]:
    """Across two nodes: tfem against raw pyzmq (a large file) and Redis
    over TCP (4 KiB files), per security; the targets met or not."""
    L = ["## Across two nodes", ""]
    if "error" in cl:
        return L + _failed("cluster", cl)
    where = ("two simulated nodes, each in network, IPC, UTS and mount namespaces of its own, joined by veths on "
             "a host bridge" if cl["isolated"] else
             f"**two loopback nodes** (no namespaces: {cl['why_not_isolated']}): both on 127.0.0.1, sharing the "
             "host's network stack; the TCP between them never leaves loopback")
    L += [f"Node A to node B: {where}; one `tfem up` per node in a shared cluster directory. **curve**: tfem's "
          "default across nodes (a key pair per broker), raw pyzmq with CURVE too; **insecure**: `tfem up "
          "--insecure`, pyzmq in plain text, and Redis (no encryption), measured with these only. "
          f"**Large**: the producer on A writes one {size_label(cl['big_size'])} file in "
          f"{size_label(cl['write_chunk'])} writes; the consumer on B, already waiting in open, reads it all into "
          "a 1 MiB buffer; from the producer's open to the consumer's last read. Raw pyzmq: DEALER to DEALER, the "
          f"same bytes in chunks of {size_label(cl['chunk'])} (tfem's pull), copy=False, {cl['window']} in flight "
          "with one acknowledgement per chunk (tfem's window); the receiver copies each into its buffer. "
          f"**Small**: {cl['small_count']:,} files of {size_label(cl['small_size'])} per run, the producer on A "
          f"publishing them one after the other while the consumer on B opens each by name (waiting for it), "
          f"reads and closes it, {cl['in_flight']} opens in flight (threads, a client each); Redis: "
          f"redis-server on A, SET from A, GET + DEL from B, both pipelined {cl['in_flight']} keys a round trip; "
          "both sides start together, handoffs per second up to the consumer's last. Medians over the runs "
          "[min–max].", ""]
    res = cl["results"]
    goal_big, goal_small = CLUSTER_GOALS["big"], CLUSTER_GOALS["small"]

    def verdict(ratio: float | None, goal: float) -> str:
        return "not measured" if ratio is None else "met" if ratio >= goal else "not met"

    rows = []
    for security in res:
        t, z = _med(res, security, "tfem-big"), _med(res, security, "zmq-big")
        r = _ratio(t, z)
        rows.append([f"{size_label(cl['big_size'])}, GB/s", security, _cell(_get(res, security, "tfem-big")),
                     f"raw pyzmq {_cell(_get(res, security, 'zmq-big'))}", _num(r, 2),
                     f"≥ {goal_big:g}: {verdict(r, goal_big)}"])
    redis = _get(res, "insecure", "redis-small")
    for security in res:
        r = _ratio(_med(res, security, "tfem-small"), _med(res, "insecure", "redis-small"))
        rows.append([f"{size_label(cl['small_size'])}, handoffs/s", security, _cell(_get(res, security, "tfem-small")),
                     f"Redis over TCP {_cell(redis)}" if redis else "Redis left out (--no-redis)", _num(r, 2),
                     f"≥ {goal_small:g}: {verdict(r, goal_small)}"])
    return L + _table(["A → B", "security", "tfem", "peer", "tfem ÷ peer", "target"], rows)


# ---- plots ----


def plots(out: str, w: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    h = w.get("handoff")
    if h and "error" not in h:
        sizes, peers, res = h["sizes"], h["peers"], h["results"]
        for metric, ylabel, name in (("latency_us", "latency, µs (median, min–max)", "handoff_latency.png"),
                                     ("gbps", "throughput, GB/s (median, min–max)", "handoff_throughput.png")):
            fig, ax = plt.subplots(figsize=(8, 5))
            for k, label in peers.items():
                d = [_get(res, k, s, metric) for s in sizes]
                med = [x["median"] for x in d]
                err = [[x["median"] - x["min"] for x in d], [x["max"] - x["median"] for x in d]]
                ax.errorbar(sizes, med, yerr=err, marker="o", capsize=3, label=label,
                            linewidth=2.5 if k == "tfem" else 1.2)
            if metric == "gbps":
                mc = [_med(h["memcpy_gbps"], s) for s in sizes]
                ax.plot(sizes, mc, "k--", label="memcpy")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sizes, [size_label(s) for s in sizes])
            ax.set_xlabel("file size")
            ax.set_ylabel(ylabel)
            ax.set_title("One handoff between two processes")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(loc="upper left" if metric == "latency_us" else "lower right", fontsize="small")
            fig.tight_layout()
            fig.savefig(os.path.join(out, name), dpi=110)
            plt.close(fig)
            written.append(name)
    p = w.get("pairs")
    if p and "error" not in p:
        fig, ax = plt.subplots(figsize=(8, 5))
        for k, label in p["peers"].items():
            d = [_get(p["results"], k, n, "files_per_s") for n in p["pairs"]]
            med = [x["median"] for x in d]
            err = [[x["median"] - x["min"] for x in d], [x["max"] - x["median"] for x in d]]
            ax.errorbar(p["pairs"], med, yerr=err, marker="o", capsize=3, label=label,
                        linewidth=2.5 if k == "tfem" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(p["pairs"], [str(n) for n in p["pairs"]])
        ax.set_xlabel("producer/consumer pairs")
        ax.set_ylabel("4 KiB handoffs per second, all pairs")
        ax.set_title("Small files, acknowledged, N pairs")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "pairs.png"), dpi=110)
        plt.close(fig)
        written.append("pairs.png")
    return written


def write(out: str, meta: dict[str, Any], workloads: dict[str, Any]) -> dict[str, Any]:
    """Write latest.json, latest.md and the plots into `out`; the report."""
    os.makedirs(out, exist_ok=True)
    goals = targets(workloads)
    report = {"meta": meta, "targets": goals, "workloads": workloads}
    with open(os.path.join(out, "latest.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(meta, workloads, goals)
    with open(os.path.join(out, "latest.md"), "w") as f:
        f.write(text)
    report["plots"] = plots(out, workloads)
    report["markdown"] = text
    return report
