"""Run every benchmarks/bench_*.py (sorted by name), each in its own process with this Python; `make bench` calls it.

Output streams through as it comes. Exits non-zero if any benchmark fails (a crash, or a correctness gate that
refused to report speeds); a benchmark that runs but misses a speed target still counts as passed, as its results
file records the miss. Extra arguments go to every benchmark (each accepts --quick).

Usage: python benchmarks/run_all.py [--quick] [-k SUBSTRING] [extra args for every benchmark ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (smoke run)")
    ap.add_argument("-k", dest="match", default="", help="only benchmarks whose file name contains this")
    args, extra = ap.parse_known_args()
    scripts = sorted(p for p in HERE.glob("bench_*.py") if args.match in p.name)
    if not scripts:
        print(f"no benchmarks/bench_*.py matches {args.match!r}", file=sys.stderr)
        return 1
    forwarded = (["--quick"] if args.quick else []) + extra
    outcomes = []
    for script in scripts:
        print(f"==> {script.name} {' '.join(forwarded)}".rstrip(), flush=True)
        started = time.perf_counter()
        # Same interpreter (the venv's), repo root as cwd: the benchmarks import the package from the checkout.
        code = subprocess.call([sys.executable, str(script), *forwarded], cwd=HERE.parent)
        outcomes.append((script.name, code, time.perf_counter() - started))
    print("\nbenchmark summary:", flush=True)
    for name, code, seconds in outcomes:
        print(f"  {'ok  ' if code == 0 else 'FAIL'} {name:<32} exit {code:<4} {seconds:7.1f} s")
    return 0 if all(code == 0 for _, code, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
