"""Read PREFIX/0 .. PREFIX/COUNT-1 from tfem, waiting for each, and check them.

Start it before or after the producer: it waits for each name until its
producer has closed it. Exits 1 if any byte differs.

    python examples/consumer.py --count 1000 --size 4K --prefix demo
"""

from __future__ import annotations

import argparse
import sys
import time

import tfem
from tfem.config import parse_size

from producer import content


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=parse_size, default="4K")
    parser.add_argument("--prefix", default="demo")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each file")
    args = parser.parse_args()
    bad = 0
    start = time.perf_counter()
    with tfem.connect() as client:
        for i in range(args.count):
            name = f"{args.prefix}/{i}"
            with client.open(name, "r", timeout=args.timeout) as f:
                if f.read() != content(name, args.size):
                    bad += 1
    elapsed = time.perf_counter() - start
    print(f"consumer: read {args.count} files in {elapsed:.3f} s, {bad} with wrong bytes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
