"""Decompose, compute, reduce on a Dask cluster, the intermediates in tfem.

    decompose: this process cuts a table of --rows rows into --parts parquet
               files, tfem://dcr-PID/in/part-N.parquet
    compute:   the cluster's workers read a part each from tfem, score its
               rows and sum the scores per key, and write the sums back,
               tfem://dcr-PID/out/part.N.parquet
    reduce:    the sums of every part are added up per key

The answer is checked against the same sums computed directly on the whole
table, without Dask or tfem. The cluster is a dask.distributed LocalCluster
of --workers processes; they find the instance as this process does
(through $TFEM_KEYFILE, which `tfem up -- ...` sets). Each stage's files
are kept while Dask reads them (it opens a file more than once) and removed
once the next stage is done. --base puts them anywhere fsspec reaches
instead (plain files in /dev/shm, to compare).

    pip install 'tfem[dask]'
    tfem up -- python examples/dask_dcr.py
    tfem up --memory 2G -- python examples/dask_dcr.py --rows 20M --parts 64 --workers 4
    python examples/dask_dcr.py --base file:///dev/shm/dcr    # plain files, to compare

Prints the time of each stage and whether the answer is right (--json: one
line of JSON); exits 1 if it is wrong or a stage fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

from tfem.config import parse_size

MODULUS = 1_000_003  # scores stay integers: the sums compare exactly


def make_input(rows: int, keys: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"key": rng.integers(0, keys, rows), "x": rng.integers(0, MODULUS, rows)})


def score(part: pd.DataFrame) -> pd.DataFrame:
    """The compute step on one part: a score per row, summed per key."""
    scored = part.assign(score=part["x"] * part["x"] % MODULUS, rows=1)
    return scored.groupby("key", as_index=False)[["score", "rows"]].sum()


def direct(table: pd.DataFrame) -> pd.DataFrame:
    """The answer without Dask or tfem."""
    return score(table).set_index("key").sort_index()


def run(base: str, rows: int, parts: int, keys: int, workers: int, threads: int, seed: int) -> dict[str, Any]:
    import dask.dataframe as dd
    import fsspec
    from dask.distributed import Client, LocalCluster

    fs, _ = fsspec.core.url_to_fs(base)
    if fs.exists(base):
        raise FileExistsError(f"{base} exists: the job's files go there, and it removes them")
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                      dashboard_address=None) as cluster, Client(cluster):
        try:
            t0 = time.perf_counter()
            table = make_input(rows, keys, seed)
            fs.makedirs(f"{base}/in", exist_ok=True)  # tfem: nothing to do, names imply directories
            bounds = np.linspace(0, rows, parts + 1).astype(int)
            for i in range(parts):
                part = table.iloc[bounds[i]:bounds[i + 1]]
                part.to_parquet(f"{base}/in/part-{i:05d}.parquet", index=False)
            t1 = time.perf_counter()
            inputs = dd.read_parquet(f"{base}/in/*.parquet")
            meta = pd.DataFrame({"key": pd.Series(dtype="int64"), "score": pd.Series(dtype="int64"),
                                 "rows": pd.Series(dtype="int64")})
            inputs.map_partitions(score, meta=meta).to_parquet(f"{base}/out/", write_index=False)
            fs.rm(f"{base}/in", recursive=True)  # the compute stage is done with them
            t2 = time.perf_counter()
            results = dd.read_parquet(f"{base}/out/*.parquet")
            sums = results.groupby("key")[["score", "rows"]].sum(split_out=1).compute()  # a tree of sums, no shuffle
            t3 = time.perf_counter()
        finally:
            if fs.exists(base):
                fs.rm(base, recursive=True)
    answer = sums.sort_index()
    ok = answer.astype("int64").equals(direct(table).astype("int64"))
    times = {"decompose": t1 - t0, "compute": t2 - t1, "reduce": t3 - t2}
    return {"base": base, "rows": rows, "parts": parts, "keys": keys, "workers": workers, "threads": threads, "ok": ok,
            "seconds": times, "answer": {int(k): [int(r.score), int(r.rows)] for k, r in answer.iterrows()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=parse_size, default="1M", help="rows of the input table (default 1M; "
                        "K, M, G are powers of 1024)")
    parser.add_argument("--parts", type=int, default=8, help="files the input is cut into (default 8)")
    parser.add_argument("--keys", type=int, default=100, help="distinct keys the sums are grouped by (default 100)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="of the random input (default 1)")
    parser.add_argument("--base", default=f"tfem://dcr-{os.getpid()}",
                        help="where the intermediate files go (default tfem://dcr-PID); any fsspec URL, e.g. "
                        "file:///dev/shm/dcr for plain files, to compare")
    parser.add_argument("--json", action="store_true", help="print one line of JSON, the answer included")
    args = parser.parse_args()
    if min(args.rows, args.parts, args.keys, args.workers, args.threads) < 1:
        parser.error("--rows, --parts, --keys, --workers and --threads must be positive")
    if args.parts > args.rows:
        parser.error("--parts must be at most --rows: every part has a row")
    try:
        result = run(args.base.rstrip("/"), args.rows, args.parts, args.keys, args.workers, args.threads,
                     args.seed)
    except (OSError, ValueError) as exc:
        print(f"dask_dcr: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        stages = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in result["seconds"].items())
        print(f"dask_dcr: {args.rows} rows in {args.parts} parts through {result['base']}, {args.workers} workers "
              f"x {args.threads} threads: {stages}; answer {'(ok)' if result['ok'] else 'WRONG'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
