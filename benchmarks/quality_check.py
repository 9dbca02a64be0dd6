"""The quality check (`make quality`, run by CI after the tests): does G-SNR still find planted noise?

Runs the planted-noise audit of `jobs/configs/quality.yaml` through the CLI (`gradfilter-ray data`, then
`gradfilter-ray audit`: the same code a user runs) and asserts that G-SNR's 10% selection keeps fewer planted rows
than random selection does, by a margin, and that G-SNR ranks clean rows above planted ones more often than not:

    planted share of gsnr_0.1  <=  planted share of the pool (what random keeps)  -  MARGIN
    AUROC of gsnr, clean vs planted, over every row  >  0.5

A change to how the ensemble trains, how rows are tokenised, batched or scored moves this number; one that makes
G-SNR no better than random fails here instead of in a user's fine-tune. docs/quality.md gives the check's power and
how MARGIN was set (measured with shuffled and with length-grouped batches). Extra `--set` overrides go to both
commands, e.g. `--set ensemble.batching=length_grouped` to see it fail. Writes the result to --json.

Exit status: 0 passed, 1 failed (the margin), 2 the audit itself did not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "quality.yaml"
SCORER, RATIO = "gsnr", 0.1
# Below the pool's planted share by this much (4.5 points): midway between G-SNR with shuffled batches (10.4%, pool
# 19.1%) and with length-grouped batches (18.8%), measured on this config (docs/quality.md).
MARGIN = 0.045
MIN_AUROC = 0.5


def gradfilter(verb: str, config: Path, overrides: list[str]) -> None:
    # --force: the stage keys hash the config, not the code, so a finished audit of the same config would otherwise
    # be read back unchanged after a code change: exactly what this check is for.
    cmd = [sys.executable, "-m", "gradfilter_ray", verb, "--config", str(config), "--force"]
    for item in overrides:
        cmd += ["--set", item]
    print("$ gradfilter-ray " + " ".join(cmd[3:]), flush=True)
    with tempfile.TemporaryDirectory(prefix="gfr-q-", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
        done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "RAY_TMPDIR": ray_tmp})
    if done.returncode != 0:
        raise SystemExit(f"quality check: `gradfilter-ray {verb}` exited {done.returncode}")


def verdict(recovery: dict, margin: float = MARGIN) -> dict:
    """The check's numbers from audit/recovery.json: G-SNR's and random's planted shares at RATIO and the bar."""
    rows = {(r["scorer"], r["kind"]): r for r in recovery["recovery"] if r["ratio"] == RATIO}
    ours, random = rows[(SCORER, "all")], rows.get(("random", "all"))
    bar = ours["pool_planted_share"] - margin
    return {
        "scorer": SCORER,
        "ratio": RATIO,
        "k": ours["k"],
        "planted_share": ours["planted_share"],
        "ci": [ours["ci_low"], ours["ci_high"]],
        "auroc": ours["auroc"],
        "pool_planted_share": ours["pool_planted_share"],
        "random_planted_share": random["planted_share"] if random else None,
        "margin": margin,
        "bar": bar,
        "min_auroc": MIN_AUROC,
        "passed": ours["planted_share"] <= bar and ours["auroc"] > MIN_AUROC,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "quality"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, default=None, help="write the verdict here as JSON")
    args = parser.parse_args(argv)
    overrides = [f"output_dir={args.output_dir}", *args.overrides]
    started = time.time()
    try:
        gradfilter("data", args.config, overrides)
        gradfilter("audit", args.config, overrides)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    recovery = json.loads((Path(args.output_dir) / "audit" / "recovery.json").read_text())
    try:
        result = verdict(recovery)
    except KeyError as exc:
        print(
            f"quality check: the audit has no {exc} row: the config must score gsnr and select {RATIO}",
            file=sys.stderr,
        )
        return 2
    result.update(seconds=round(time.time() - started, 1), overrides=args.overrides, headline=recovery["headline"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"audit: {recovery['headline']}")
    state = "passed" if result["passed"] else "FAILED"
    print(
        f"quality check {state}: {SCORER} at {RATIO:.0%} kept {result['planted_share']:.1%} planted rows "
        f"(95% CI {result['ci'][0]:.1%}-{result['ci'][1]:.1%}, k={result['k']}); it must stay at or below "
        f"{result['bar']:.1%} (the pool's {result['pool_planted_share']:.1%} minus {MARGIN:.1%}); "
        f"AUROC clean vs planted {result['auroc']:.3f} (must be > {MIN_AUROC}); {result['seconds']:.0f} s"
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
