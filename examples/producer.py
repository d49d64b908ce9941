"""Write COUNT files named PREFIX/0 .. PREFIX/COUNT-1 into tfem.

Each file is SIZE bytes whose content is derived from its name, so a
consumer can check every byte without being told what was written.

    python examples/producer.py --count 1000 --size 4K --prefix demo
"""

from __future__ import annotations

import argparse
import hashlib
import time

import tfem
from tfem.config import parse_size


def content(name: str, size: int) -> bytes:
    """Deterministic bytes for a name: repeated sha256 blocks."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=parse_size, default="4K")
    parser.add_argument("--prefix", default="demo")
    args = parser.parse_args()
    start = time.perf_counter()
    with tfem.connect() as client:
        for i in range(args.count):
            name = f"{args.prefix}/{i}"
            with client.open(name, "w") as f:
                f.write(content(name, args.size))
    elapsed = time.perf_counter() - start
    print(f"producer: wrote {args.count} files of {args.size} bytes in {elapsed:.3f} s")


if __name__ == "__main__":
    main()
