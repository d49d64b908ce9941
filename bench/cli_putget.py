"""Time `tfem put` and `tfem get` against `cp` through /dev/shm: 10,000
files of 4 KiB and one file of 1 GiB, the same local files both ways.

    python bench/cli_putget.py [--files 10000] [--big 1G]

Starts its own `tfem up`, prints a table (seconds, and the ratio), removes
everything it made. One command per direction, as a user would run it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from tfem import launch
from tfem.config import parse_size


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--big", type=parse_size, default="1G")
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="tfem-putget-", dir="/var/tmp"))
    shm = pathlib.Path(tempfile.mkdtemp(prefix="tfem-putget-", dir="/dev/shm"))
    up = None
    try:
        small = work / "small"
        small.mkdir()
        for i in range(args.files):
            (small / f"f{i:05d}").write_bytes(os.urandom(4096))
        big = work / "big"
        with open(big, "wb") as f:
            for _ in range(args.big >> 20):
                f.write(os.urandom(1 << 20))
        names = sorted(p.name for p in small.iterdir())
        keyfile = work / "tfem.key"
        up = launch.start([sys.executable, "-m", "tfem", "up", "--keyfile", str(keyfile), "--slots",
                           str(args.files + 16), "--memory", str(args.big + (64 << 20))], "tfem up", 60)
        env = dict(os.environ, TFEM_KEYFILE=str(keyfile))
        tfem = [sys.executable, "-m", "tfem"]
        rows = []
        out = work / "out"
        out.mkdir()
        t_put = timed([*tfem, "put", *[str(small / n) for n in names], "small/"], env)
        t_get = timed([*tfem, "get", *[f"small/{n}" for n in names], str(out)], env)
        (shm / "small").mkdir()
        out2 = work / "out2"
        out2.mkdir()
        c_put = timed(["cp", *[str(small / n) for n in names], str(shm / "small")])
        c_get = timed(["sh", "-c", f'cp "{shm}"/small/* "{out2}" && rm -r "{shm}/small"'])
        rows.append((f"{args.files} files of 4 KiB", t_put, t_get, c_put, c_get))
        t_put = timed([*tfem, "put", str(big), "big"], env)
        t_get = timed([*tfem, "get", "big", str(work / "big.out")], env)
        c_put = timed(["cp", str(big), str(shm / "big")])
        c_get = timed(["sh", "-c", f'cp "{shm}/big" "{work}/big.out2" && rm "{shm}/big"'])
        rows.append((f"one file of {args.big >> 20} MiB", t_put, t_get, c_put, c_get))
        for a, b in (("big.out", "big"), ("big.out2", "big")):
            if (work / a).read_bytes() != (work / b).read_bytes():
                raise SystemExit(f"{a} differs")
        print("| work | tfem put | tfem get | cp into /dev/shm | cp out of /dev/shm and rm | tfem ÷ cp (both ways) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for what, tp, tg, cp, cg in rows:
            print(f"| {what} | {tp:.2f} s | {tg:.2f} s | {cp:.2f} s | {cg:.2f} s | {(tp + tg) / (cp + cg):.2f} |")
        return 0
    finally:
        if up is not None:
            launch.stop(up)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
