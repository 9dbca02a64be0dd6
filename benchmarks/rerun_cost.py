"""What a re-run costs after a small config change: `make run` on the demo config, then the same run directory again
with one selection ratio added (and fine-tuned: three new subsets, one per fine-tuned scorer), with nothing changed,
and with the ratio removed again. Each arm is the `gradfilter-ray run` command `make run` runs, in a fresh process
with its own embedded Ray, timed from start to exit; the stages each arm ran (not "already done") and the units it
computed come from the run's own console lines and manifest.

    python benchmarks/rerun_cost.py [--quick]    # writes benchmarks/results/rerun_cost[.quick].json

--quick uses the demo config with 120 rows, 3 members and 2 test sets (for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from extraction.report import machine_info  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEMO = REPO / "jobs" / "configs" / "demo.yaml"
QUICK = ("data.limit=120", "ensemble.members=3", "evaluation.test_sets=[vicuna, koala]", "audit.rows=40")
# The demo selects at 5/10/15 % and fine-tunes at 15 %: the added ratio is selected and fine-tuned.
ADDED = ("selection.ratios=[0.05, 0.10, 0.15, 0.20]", "finetune.ratios=[0.15, 0.20]")
STAGE_LINE = re.compile(r"^\[(?P<stage>[a-z]+)\] (?P<what>running|already done)")


def run_arm(out: Path, overrides: tuple[str, ...], log: Path) -> dict:
    """One `gradfilter-ray run` in its own process; its wall seconds and the stages it ran or skipped."""
    args = [str(REPO / ".venv" / "bin" / "gradfilter-ray"), "run", "--config", str(DEMO), "--set", f"output_dir={out}"]
    for item in overrides:
        args += ["--set", item]
    ray_tmp = tempfile.mkdtemp(prefix="rt.", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    started = time.perf_counter()
    try:
        with log.open("w") as fh:
            done = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=False)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)  # Ray's session logs of the arm: the arm's log file is kept
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {done.returncode}: see {log}")
    ran, skipped = [], []
    for line in log.read_text().splitlines():
        match = STAGE_LINE.match(line.strip())
        if match:
            (ran if match["what"] == "running" else skipped).append(match["stage"])
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    return {
        "seconds": round(seconds, 1),
        "stages_ran": ran,
        "stages_already_done": skipped,
        "stage_seconds": {s: manifest[s].get("seconds") for s in ran if s in manifest},
        "finetune_trained": manifest.get("finetune", {}).get("trained"),
        "evaluation_generated": manifest.get("evaluation", {}).get("generated"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (printed)")
    args = parser.parse_args()
    base = QUICK if args.quick else ()
    work = Path(tempfile.mkdtemp(prefix="gfr-rerun-"))
    out = work / "run"
    arms = {
        "full run": base,
        "one ratio added": (*base, *ADDED),
        "nothing changed": (*base, *ADDED),
        "ratio removed again": base,
    }
    results = {}
    for name, overrides in arms.items():
        results[name] = run_arm(out, overrides, work / f"{name.replace(' ', '_')}.log")
        print(f"[rerun_cost] {name}: {results[name]['seconds']} s, ran {results[name]['stages_ran']}", flush=True)
    full = results["full run"]["seconds"]
    summary = {
        "benchmark": "rerun_cost",
        "config": str(DEMO.relative_to(REPO)),
        "quick": args.quick,
        "overrides": list(base),
        "added": list(ADDED),
        "arms": results,
        "ratio_to_full_run": {name: round(r["seconds"] / full, 3) for name, r in results.items()},
        "machine": machine_info(threads=2),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"rerun_cost{'.quick' if args.quick else ''}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[rerun_cost] wrote {path.relative_to(REPO)}" + (f"; run directory {out}" if args.keep else ""))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
