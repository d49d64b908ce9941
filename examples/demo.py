"""The quick-start run: a consumer and a producer, two processes, one tfem.

Run it inside `tfem up -- python examples/demo.py`. The consumer starts
first and waits for files the producer has not written yet.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def main() -> int:
    common = ["--count", "2000", "--size", "4K", "--prefix", "quickstart"]
    consumer = subprocess.Popen([sys.executable, str(HERE / "consumer.py"), *common])
    producer = subprocess.run([sys.executable, str(HERE / "producer.py"), *common])
    status = consumer.wait()
    subprocess.run([sys.executable, "-m", "tfem", "status"])
    ok = producer.returncode == 0 and status == 0
    print("demo: every byte arrived" if ok else "demo: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
