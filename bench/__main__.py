"""`python -m bench [NAME ...]`: runs the benchmarks one after another, each in its own process.

NAME is the part after `bench_` (e.g. `resource`, `tracker`); no names = all. Each benchmark
prints its own table and writes JSON under bench/results/. The exit status is non-zero if any
benchmark failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def main(argv: list[str]) -> int:
    names = argv or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available())}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n=== bench {name} ===", flush=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", f"bench.bench_{name}"], cwd=HERE.parent)
        print(f"=== {name}: {'ok' if result.returncode == 0 else 'FAILED'} in {time.monotonic() - started:.0f}s", flush=True)
        if result.returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
