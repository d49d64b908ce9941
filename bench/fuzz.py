"""The three fuzz channels of tests/test_fuzz.py at scale, outside CI.

    python bench/fuzz.py [--cases 1000000] [--seed N] [--out FILE.json]

Runs each channel (the broker's socket, the registry's queue, adoption of a
corrupted segment) as its own pytest run of tests/test_fuzz.py, with
TFEM_FUZZ_CASES cases from TFEM_FUZZ_SEED, so the checks are exactly the
suite's. Prints each channel's summary line and time, writes them as JSON,
and exits 1 if a channel failed (its output then says which seed and case).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHANNELS = {  # pytest -k expression: the first words of the summary line the test prints
    "test_fuzz_broker_frames": "broker frames:",
    "test_fuzz_registry_messages": "registry messages:",
    "test_fuzz_adopting_a_corrupted_segment": "segment corruption:",
}


def run_channel(test: str, cases: int, seed: int | None) -> dict[str, object]:
    env = dict(os.environ, TFEM_FUZZ_CASES=str(cases))
    if seed is not None:
        env["TFEM_FUZZ_SEED"] = str(seed)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_fuzz.py"), "-k", test],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    summary = next((line.strip() for line in done.stdout.splitlines() if line.strip().startswith(CHANNELS[test])),
                   None)
    return {"test": test, "cases": cases, "passed": done.returncode == 0, "seconds": round(seconds, 1),
            "summary": summary, "output": None if done.returncode == 0 else done.stdout[-4000:] + done.stderr[-2000:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=1_000_000, help="cases per channel (default 1,000,000)")
    p.add_argument("--seed", type=int, help="base seed (default: the suite's fixed seed)")
    p.add_argument("--only", choices=CHANNELS, nargs="+", help="run only these channels")
    p.add_argument("--out", type=pathlib.Path, help="write the results as JSON here")
    args = p.parse_args()
    if args.cases < 1:
        p.error("--cases must be at least 1")
    results = []
    for test in args.only or CHANNELS:
        result = run_channel(test, args.cases, args.seed)
        results.append(result)
        status = "passed" if result["passed"] else "FAILED"
        print(f"{test}: {status} in {result['seconds']} s; {result['summary']}", flush=True)
        if result["output"]:
            print(result["output"], file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
