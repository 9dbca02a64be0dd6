"""Score + select at scale on synthetic norm columns: wall time and peak RSS at 100k and 1M rows.

Each size runs in a fresh subprocess (peak RSS is per process), on a synthetic run directory whose gradients and
corpus are written in chunks. The subprocess runs the two stages' passes (`score_gradients`, `select_and_write`):
in the job each runs as one Ray task, so this measures that task's work without Ray around it. Flat memory means
the 1M run's peak RSS stays close to the 100k run's, since both passes stream record batches.
Results: benchmarks/results/bench_select.json.
Usage: python benchmarks/bench_select.py [--sizes 100000 1000000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_select.json"
MEMBERS = 5
CHUNK = 100_000


def make_rundir(root: Path, n: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True)
    (root / "gradients").mkdir(parents=True)
    for part, start in enumerate(range(0, n, CHUNK)):
        ids = np.arange(start, min(n, start + CHUNK), dtype=np.int64)
        size = len(ids)
        early = rng.lognormal(1.0, 0.5, (size, MEMBERS))
        late = early * rng.uniform(0.2, 1.0, (size, 1)) * rng.lognormal(0, 0.1, (size, MEMBERS))

        def lists(a):
            return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), MEMBERS).cast(pa.list_(pa.float64()))

        n_resp = rng.integers(0, 300, size).astype(np.int32)
        pq.write_table(
            pa.table(
                {
                    "id": ids,
                    "sq_norm_early": lists(early),
                    "sq_norm_late": lists(late),
                    "loss_early": lists(rng.uniform(1, 3, (size, MEMBERS))),
                    "loss_late": lists(rng.uniform(0.5, 2, (size, MEMBERS))),
                    "n_response_tokens": n_resp,
                    "n_tokens": n_resp + 40,
                    "ifd_loss_cond": rng.uniform(1, 3, size),
                    "ifd_loss_uncond": rng.uniform(1, 3, size),
                }
            ),
            root / "gradients" / f"part-{part:05d}.parquet",
        )
        text = [f"synthetic example {i}" for i in ids]
        pq.write_table(
            pa.table(
                {
                    "id": ids,
                    "instruction": text,
                    "input": [""] * size,
                    "output": text,
                    "conversation": pa.nulls(size, pa.string()),  # Alpaca rows: no conversation, no tools
                    "tools": pa.nulls(size, pa.string()),
                    "extra": ["{}"] * size,
                    "source_format": ["alpaca"] * size,
                    "source_file": ["synthetic"] * size,
                    "source_row": ids,
                }
            ),
            root / "data" / f"part-{part:05d}.parquet",
        )


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: on Linux that keeps the high-water mark of the parent
    process image it was forked from across exec, which here grows with the synthetic data the parent generated."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(root: str) -> None:
    """Score then select in this process; prints one JSON line with timings and peak RSS."""
    sys.path.insert(0, str(REPO))
    from gradfilter_ray.config import load
    from gradfilter_ray.rundir import RunDir
    from gradfilter_ray.scoring.passes import score_gradients, select_and_write

    run = RunDir(root)
    cfg = load(None, [f"output_dir={root}"])
    scorers, s = list(cfg.scoring.scorers), cfg.scoring
    passes = {  # what run_score / run_select run as one Ray task each
        "score": lambda: score_gradients(run.gradients, run.scores, s.eps, s.random_seed),
        "select": lambda: select_and_write(run.scores, run.data, run.selection, scorers, list(cfg.selection.ratios)),
    }
    timings = {}
    for name, fn in passes.items():
        started, cpu = time.perf_counter(), time.process_time()
        counts = fn()
        timings[name] = {
            "wall_s": time.perf_counter() - started,
            "cpu_s": time.process_time() - cpu,
            "peak_rss_mib_after": peak_rss_mib(),
        }
    rss_mib = peak_rss_mib()
    selections = len(counts["selections"])
    print(json.dumps({"timings": timings, "peak_rss_mib": rss_mib, "selections": selections}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--quick", action="store_true", help="10k and 100k rows")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return 0
    sizes = [10_000, 100_000] if args.quick else args.sizes
    runs = {}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="gfr-bench-select-") as tmp:
            make_rundir(Path(tmp), n)
            out = subprocess.run(
                [sys.executable, __file__, "--child", tmp], capture_output=True, text=True, check=True
            )
            runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
        t = runs[n]["timings"]
        print(
            f"{n:>9} rows: score {t['score']['wall_s']:.1f}s wall / {t['score']['cpu_s']:.1f}s cpu, "
            f"select ({runs[n]['selections']} subsets) {t['select']['wall_s']:.1f}s wall / "
            f"{t['select']['cpu_s']:.1f}s cpu, peak RSS {runs[n]['peak_rss_mib']:.0f} MiB"
        )
    small, large = min(sizes), max(sizes)
    rss_ratio = runs[large]["peak_rss_mib"] / runs[small]["peak_rss_mib"]
    rows_per_s = {
        n: n / (runs[n]["timings"]["score"]["wall_s"] + runs[n]["timings"]["select"]["wall_s"]) for n in sizes
    }
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "members": MEMBERS,
        "runs": runs,
        "rows_per_s": rows_per_s,
        "peak_rss_ratio_largest_vs_smallest": rss_ratio,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(
        f"score_select_rows_per_s_{large}={rows_per_s[large]:.0f} "
        f"peak_rss_{small}={runs[small]['peak_rss_mib']:.0f}MiB peak_rss_{large}={runs[large]['peak_rss_mib']:.0f}MiB "
        f"rss_ratio={rss_ratio:.2f} flat_memory={'yes' if rss_ratio < 1.5 else 'no'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
