"""`make gpu-check`'s script in its CPU smoke mode: every step runs (member training, extraction with a token
budget, memory per token, accuracy against the fp64 batch-size-1 reference, batched vs loop), its JSON has what
`benchmarks/sizing.py` reads, and the sizing table builds from it. The GPU numbers themselves need a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_the_gpu_check_runs_on_cpu_and_feeds_the_sizing_table(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.smoke.json").read_text())
    assert report["mode"] == "smoke" and all(report["checks"].values())
    assert report["accuracy"]["float32"]["max_rel_err"] < 1e-4  # fp32 batched vs fp64 batch-size-1
    assert report["accuracy"]["longest"] == report["shape"]["long_len"]
    extraction = report["extraction"]
    assert extraction["adapters"] == 2 * report["shape"]["members"] and extraction["examples_per_s"] > 0
    assert extraction["stats"]["padded_tokens"] <= report["shape"]["tokens_per_batch"] * extraction["stats"]["batches"]
    assert all(0 < m["padding_efficiency"] <= 1 for m in report["ensemble"])

    spec = importlib.util.spec_from_file_location("sizing", REPO / "benchmarks" / "sizing.py")
    sizing = importlib.util.module_from_spec(spec)
    sys.modules["sizing"] = sizing
    spec.loader.exec_module(sizing)
    measured = sizing.Measured.from_check(report)
    assert measured.member_examples_per_s > 0 and measured.extract_adapters == extraction["adapters"]
