"""The checkpoint counting of benchmarks/bench_checkpoint_bytes.py (old policy vs `checkpoint_due`), checked against
hand-worked cases; no DeepSpeed engine is built."""

import importlib.util
import sys
from pathlib import Path

import pytest

from gradfilter_ray.config import FinetuneConfig, ModelSpec

SPEC = importlib.util.spec_from_file_location(
    "bench_checkpoint_bytes", Path(__file__).resolve().parents[1] / "benchmarks/bench_checkpoint_bytes.py"
)
bench = importlib.util.module_from_spec(SPEC)
sys.modules["bench_checkpoint_bytes"] = bench
SPEC.loader.exec_module(bench)


def _finetune(policy: str, every: int = 0) -> FinetuneConfig:
    return FinetuneConfig(
        model=ModelSpec(name_or_path="unused"), epochs=3, effective_batch_size=128, micro_batch_size=4,
        num_workers=8, checkpoint=policy, checkpoint_every_steps=every,
    )  # fmt: skip


def test_old_policy_also_writes_after_the_last_step_and_new_one_at_epoch_ends_only():
    # 5,200 rows / 128 a step -> 41 steps an epoch, 123 in 3 epochs
    counts = bench.checkpoint_steps(5_200, _finetune("epoch"), old_every=50)
    assert (counts["global_batch"], counts["steps_per_epoch"], counts["total_steps"]) == (128, 41, 123)
    assert counts["old_steps"] == [41, 50, 82, 100, 123]
    assert counts["new_steps"] == [41, 82]
    # every 50 steps: the every-N saves alone, still never after the last step; none: no save at all
    assert bench.checkpoint_steps(5_200, _finetune("steps", every=50))["new_steps"] == [50, 100]
    assert bench.checkpoint_steps(5_200, _finetune("none"))["new_steps"] == []

    written = bench.subset_bytes(counts, bytes_per_checkpoint=10.0)
    assert (written["checkpoints_old"], written["checkpoints_new"]) == (5, 2)
    assert (written["bytes_old"], written["bytes_new"]) == (5 * 10.0 * 2, 2 * 10.0)  # old: staged + copied
    assert written["old_over_new"] == pytest.approx(5.0)


def test_the_shipped_configs_totals():
    configs = {c["config"]: c for c in bench.shipped_subsets(bytes_per_param=12.0)}
    alpaca = configs["alpaca_llama2_7b"]
    assert [s["rows"] for s in alpaca["subsets"][:3]] == [2_600, 5_200, 7_800]  # floor(52,002 x ratio)
    # the shipped 7B config writes no resumable state (checkpoint: none); the old policy wrote 45
    assert (alpaca["total"]["checkpoints_old"], alpaca["total"]["checkpoints_new"]) == (45, 0)
    assert alpaca["bytes_per_checkpoint"] == 12.0 * 6_738_415_616
    assert alpaca["total"]["bytes_new"] == 0 and alpaca["total"]["old_over_new"] is None
    # 150,000 rows: 1,172 steps an epoch, 3,516 in all: 70 multiples of 50 + 3 epoch ends (none a multiple of 50)
    million = configs["million_template"]["subsets"][2]
    assert (million["rows"], million["total_steps"], million["checkpoints_old"]) == (150_000, 3_516, 73)
    assert million["checkpoints_new"] == 2  # checkpoint: epoch
    table = bench.subsets_markdown(list(configs.values()))
    assert "| **alpaca_llama2_7b** | **all 9 subsets** |" in table
