"""`make gpu-check`'s script in its CPU smoke mode: every step runs (member training, extraction with a token
budget, memory per token, accuracy against the fp64 batch-size-1 reference, batched vs loop, and the target step:
DeepSpeed ZeRO-3 fine-tuning, one checkpoint, the final save, loading it back and generating), its JSON has what
`benchmarks/sizing.py` reads, and the sizing table builds from it. The GPU numbers themselves need a GPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_the_gpu_check_runs_on_cpu_and_feeds_the_sizing_table(tmp_path):
    done = subprocess.run(  # no --out: on a lent GPU machine only $OUT comes back, so it is the default there
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OUT": str(tmp_path)},
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

    target = report["target"]
    assert "error" not in target, target.get("traceback")
    assert {"model", "train", "checkpoint", "final_save", "generation", "checks"} <= set(target)
    train, shape = target["train"], report["target_shape"]
    losses = train["losses"]
    assert train["finished"] and len(losses) == train["plan"]["epochs"] * train["plan"]["steps_per_epoch"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(train["ln_vocab"], abs=0.3)  # a random-init model starts near uniform
    assert max(losses[-2:]) < 0.95 * losses[0]  # the same rows every epoch: the loss must come down
    assert train["tokens_per_s"] > 0 and train["samples_per_s"] > 0 and train["peak_bytes"] > 0
    # The sizing table's parameter formula, checked against the model that was built.
    assert target["model"]["params"] == sizing.sys.modules["sizing_target"].llama_params(shape["llama"])
    # fp32 ZeRO-3 keeps the fp32 weights (4 bytes) and Adam's two moments (8) per parameter, plus a little framing;
    # fewer bytes would mean optimizer state is missing, 16 or more the weights written twice.
    assert target["checkpoint"]["bytes"] > 0 and 12 <= target["checkpoint"]["bytes_per_param"] < 14
    assert 4 <= target["final_save"]["bytes_per_param"] < 5  # fp32 safetensors (+ config and tokenizer files)
    batches = target["generation"]["batches"]
    assert sorted(int(b) for b in batches) == sorted(shape["gen_batches"])
    for b, g in batches.items():  # the saved folder loaded and answered every prompt with every requested token
        assert g["answers"] == int(b) and g["new_tokens"] == int(b) * shape["max_new_tokens"]
        assert g["new_tokens_per_s"] > 0
    assert sizing.TargetMeasured.from_check(report).params == target["model"]["params"]


def test_a_failed_step_is_recorded_and_the_steps_that_need_it_say_why_they_did_not_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as when it runs as a script: its sibling modules
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up there
    spec.loader.exec_module(gpu_check)

    def crash():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    failed = gpu_check.guarded(crash)
    assert failed["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "crash" in failed["traceback"]
    report = {"ensemble": failed, "extraction": {"error": "skipped: the ensemble step trained no adapters"}}
    path = tmp_path / "out" / "gpu_check.json"
    checks = gpu_check.write_report(report, path, started=0.0)
    assert checks == {"ensemble_ran": False, "extraction_ran": False}
    assert json.loads(path.read_text())["checks"] == checks and not list(path.parent.glob("*.tmp"))
