"""The GPU check's script in its CPU smoke mode: the preflight, every step (member training, extraction with a token
budget, memory per token, accuracy against the fp64 batch-size-1 reference on realistic logits, batched vs loop, and
the target step: DeepSpeed ZeRO-3 fine-tuning, one checkpoint, the final save, loading it back and generating), the
JSON and the sizing table in $OUT; a step whose import fails is skipped with the reason, not a crash. The GPU numbers
themselves need a GPU (and `make gpu-rehearsal` runs this against the GPU image's packages alone)."""

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
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
pytestmark = pytest.mark.slow


def load_module(name: str, path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as when it runs as a script: its sibling modules
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_runs_every_step_on_cpu_and_leaves_its_json_and_the_sizing_table_in_out(tmp_path, monkeypatch):
    done = subprocess.run(  # no --out: on a lent GPU machine only $OUT comes back, so it is the default there
        [sys.executable, str(SCRIPT), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.smoke.json").read_text())
    assert report["mode"] == "smoke" and report["verdict"] == "PASS" and all(report["checks"].values())
    pre = report["preflight"]
    assert pre["device"]["device"] == "cpu" and not pre["skip"]
    assert all(entry["ok"] for entry in pre["imports"].values()) and "deepspeed" in pre["imports"]
    assert set(report["step_seconds"]) == set(report["steps_wanted"]) == {
        "ensemble", "extraction", "memory_per_token", "accuracy", "batched_vs_loop", "target"
    }  # fmt: skip
    assert "[preflight] import deepspeed" in done.stdout and "[gpu-check] target done" in done.stdout

    accuracy = report["accuracy"]
    assert accuracy["float32"]["max_rel_err"] < 1e-4  # fp32 batched vs fp64 batch-size-1
    assert accuracy["longest"] == report["shape"]["long_len"]
    logits = accuracy["logits"]["measured"]  # the proxy's head was given GPT-2-like logits
    assert logits["mean"] == pytest.approx(-100, abs=1) and logits["std_over_vocab"] == pytest.approx(4, rel=0.1)
    assert accuracy["bfloat16"]["head_dtype"] == "float32" and accuracy["bfloat16"]["within_bf16_thresholds"]
    assert "accuracy_bfloat16" not in report["checks"]  # an opt-in: reported, never failing the run
    # Rounding the logits near -100 to bf16 (spacing 0.5) costs accuracy that the fp32 head keeps.
    rounded = accuracy["bfloat16_head_in_model_dtype"]
    assert rounded["median_rel_err"] > 2 * accuracy["bfloat16"]["median_rel_err"]
    assert accuracy["head_rounding_error_ratio"] > 2
    speed = report["batched_vs_loop"]
    assert set(speed["opt_ins"]) == {"bfloat16", "bfloat16_head_bfloat16"} and speed["time_over_bfloat16"] > 0

    extraction = report["extraction"]
    assert extraction["adapters"] == 2 * report["shape"]["members"] and extraction["examples_per_s"] > 0
    assert extraction["stats"]["padded_tokens"] <= report["shape"]["tokens_per_batch"] * extraction["stats"]["batches"]
    assert all(0 < m["padding_efficiency"] <= 1 for m in report["ensemble"])

    # The sizing table was built from this run, into $OUT beside the JSON.
    assert report["sizing"]["built"] and "target" in report["sizing"]["steps"]
    assert (tmp_path / "sizing.md").read_text().strip()
    sizing_json = json.loads((tmp_path / "sizing.json").read_text())
    assert sizing_json["measured"]["extract_adapters"] == extraction["adapters"]
    sizing = load_module("sizing", REPO / "benchmarks" / "sizing.py", monkeypatch)
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
    assert target["model"]["params"] == sys.modules["sizing_target"].llama_params(shape["llama"])
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


def test_a_step_whose_import_fails_is_skipped_with_the_reason_and_the_run_says_so(tmp_path, monkeypatch, capsys):
    # DeepSpeed made unimportable (as on a GPU machine without the carry): the preflight finds it, the target step
    # is skipped with the reason, and the exit status says "passed what ran, skipped some" (3), not a crash. In this
    # process, so the suite's already-imported torch and transformers cost nothing.
    import torch

    gpu_check = load_module("gpu_check", SCRIPT, monkeypatch)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ModuleNotFoundError
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--smoke", "--steps", "target", "--out", str(tmp_path)])
    threads = torch.get_num_threads()
    try:
        code = gpu_check.main()
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert code == 3, stdout[-3000:]
    report = json.loads((tmp_path / "gpu_check.smoke.json").read_text())
    deepspeed = report["preflight"]["imports"]["deepspeed"]
    assert not deepspeed["ok"] and deepspeed["error"].startswith("ModuleNotFoundError")
    assert report["preflight"]["imports"]["transformers"]["ok"]  # each import tried on its own
    assert report["target"] == {"skipped": f"missing: deepspeed ({deepspeed['error']})"}
    assert report["verdict"].startswith("PASSED WHAT RAN, SKIPPED ['target']")
    assert report["checks"] == {} and "sizing.py needs the ensemble" in report["sizing"]["skipped"]
    assert "target will be SKIPPED" in stdout and "(exit 3)" in stdout


def test_a_failed_step_is_recorded_and_the_steps_that_need_it_say_why_they_did_not_run(tmp_path, monkeypatch):
    gpu_check = load_module("gpu_check", SCRIPT, monkeypatch)

    def crash():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    failed = gpu_check.guarded(crash)
    assert failed["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "crash" in failed["traceback"]
    report = {"ensemble": failed, "extraction": {"skipped": "needs the ensemble step's adapters"}}
    path = tmp_path / "out" / "gpu_check.json"
    checks = gpu_check.write_report(report, path, started=0.0)
    assert checks == {"ensemble_ran": False}
    assert json.loads(path.read_text())["checks"] == checks and not list(path.parent.glob("*.tmp"))
    assert gpu_check.verdict(report, checks) == ("FAIL: ['ensemble_ran'], skipped ['extraction']", 1)
    skipped_only = {"ensemble": [{"finite": True}], "target": {"skipped": "missing: deepspeed (...)"}}
    text, code = gpu_check.verdict(skipped_only, gpu_check.checks_of(skipped_only))
    assert code == 3 and "target: missing: deepspeed" in text
    assert gpu_check.verdict({"ensemble": [{"finite": True}]}, {"ensemble_finite": True}) == ("PASS", 0)


def test_a_carry_built_for_another_python_stays_off_the_path(tmp_path, monkeypatch):
    # Its compiled modules (pydantic-core, msgpack) would not load: the check runs without it and says why.
    gpu_check = load_module("gpu_check", SCRIPT, monkeypatch)
    monkeypatch.setattr(sys, "path", list(sys.path))
    running = gpu_check._running_python()
    other, same = tmp_path / "other", tmp_path / "same"
    for folder, python in ((other, "2.7"), (same, running)):
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"python": python, "carried": []}))
    assert gpu_check.use_carry(other) is None and str(other) not in sys.path
    assert gpu_check.use_carry(same) == str(same) and sys.path[0] == str(same)


def test_without_a_gpu_the_full_check_stops_at_once_and_its_json_holds_the_preflight_and_the_plan(
    tmp_path, monkeypatch, capsys
):
    gpu_check = load_module("gpu_check", SCRIPT, monkeypatch)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--steps", "ensemble", "--out", str(tmp_path)])
    assert gpu_check.main() == 2
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["verdict"].startswith("NOT RUN: no CUDA device") and report["preflight"]["device"]["device"] == "cpu"
    plan = report["plan"]
    assert plan["steps"]["target"]["planned_s"] > 0 and plan["planned_total_s"] > sum(
        step["planned_s"] for step in plan["steps"].values()
    )  # start-up comes on top of the steps
    assert "[plan]" in capsys.readouterr().out
