"""The checkpoint counting of benchmarks/bench_checkpoint_bytes.py (a baseline of every 50 steps, `epoch`, and each
config's shipped `finetune.checkpoint`), checked against hand-worked cases; no DeepSpeed engine is built."""

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

N7, N13 = 6_738_415_616, 13_015_864_320  # LLaMA-2 parameter counts


def _finetune(policy: str, every: int = 0) -> FinetuneConfig:
    return FinetuneConfig(
        model=ModelSpec(name_or_path="unused"), epochs=3, effective_batch_size=128, micro_batch_size=4,
        num_workers=8, checkpoint=policy, checkpoint_every_steps=every,
    )  # fmt: skip


def test_baseline_also_writes_after_the_last_step_and_epoch_at_epoch_ends_only():
    # 5,200 rows / 128 a step -> 41 steps an epoch, 123 in 3 epochs
    counts = bench.checkpoint_steps(5_200, _finetune("epoch"), baseline_every=50)
    assert (counts["global_batch"], counts["steps_per_epoch"], counts["total_steps"]) == (128, 41, 123)
    assert counts["baseline_steps"] == [41, 50, 82, 100, 123]
    assert counts["epoch_steps"] == counts["shipped_steps"] == [41, 82]
    # every 50 steps: the every-N saves alone, still never after the last step; none: no save at all, while the
    # epoch column still says what epoch saves would have been
    assert bench.checkpoint_steps(5_200, _finetune("steps", every=50))["shipped_steps"] == [50, 100]
    none = bench.checkpoint_steps(5_200, _finetune("none"))
    assert none["shipped_steps"] == [] and none["epoch_steps"] == [41, 82]

    written = bench.subset_bytes(counts, bytes_per_checkpoint=10.0)
    assert (written["checkpoints_baseline"], written["checkpoints_epoch"], written["checkpoints_shipped"]) == (5, 2, 2)
    assert written["bytes_baseline"] == 5 * 10.0 * 2  # staged + copied
    assert written["bytes_epoch"] == written["bytes_shipped"] == 2 * 10.0
    assert written["bytes_shipped_object_store"] == 2 * 10.0 * 2
    assert written["baseline_over_shipped"] == pytest.approx(5.0)
    nothing = bench.subset_bytes(none, bytes_per_checkpoint=10.0)
    assert (nothing["bytes_shipped"], nothing["bytes_epoch"], nothing["baseline_over_shipped"]) == (0.0, 20.0, None)


def test_the_shipped_configs_use_their_own_zero_stage_and_policy():
    configs = {c["config"]: c for c in bench.shipped_subsets(bytes_per_param={2: 14.0, 3: 12.0})}
    # 7B and the 1M-row template run ZeRO-2 (14 bytes a parameter), 13B ZeRO-3 (12)
    seven, thirteen, million = configs["alpaca_llama2_7b"], configs["alpaca_llama2_13b"], configs["million_template"]
    assert (seven["zero_stage"], thirteen["zero_stage"], million["zero_stage"]) == (2, 3, 2)
    assert seven["bytes_per_checkpoint"] == million["bytes_per_checkpoint"] == 14.0 * N7
    assert thirteen["bytes_per_checkpoint"] == 12.0 * N13
    assert [s["rows"] for s in seven["subsets"][:3]] == [2_600, 5_200, 7_800]  # floor(52,002 x ratio)

    # 7B, checkpoint: none: no resumable checkpoint; epoch would write 2 a subset (epochs 1 and 2 of 3), 18 in all;
    # the baseline 4 + 5 + 6 a scorer (as the hand-worked subsets above): 45, each staged and copied
    t = seven["total"]
    assert seven["checkpoint_shipped"] == "none"
    assert (t["checkpoints_baseline"], t["checkpoints_epoch"], t["checkpoints_shipped"]) == (45, 18, 0)
    assert t["bytes_shipped"] == 0 and t["baseline_over_shipped"] is None
    assert t["bytes_epoch"] == pytest.approx(18 * 14.0 * N7)  # 1.698 TB
    assert t["bytes_baseline"] == pytest.approx(45 * 2 * 14.0 * N7)
    assert thirteen["total"]["bytes_epoch"] == pytest.approx(18 * 12.0 * N13)  # 2.812 TB

    # 150,000 rows: 1,172 steps an epoch, 3,516 in all: 70 multiples of 50 + 3 epoch ends (none a multiple of 50)
    sub = million["subsets"][2]
    assert million["checkpoint_shipped"] == "epoch"
    assert (sub["rows"], sub["total_steps"], sub["checkpoints_baseline"], sub["checkpoints_shipped"]) == (
        150_000, 3_516, 73, 2,
    )  # fmt: skip
    assert sub["bytes_shipped"] == pytest.approx(2 * 14.0 * N7)
    assert sub["baseline_over_shipped"] == pytest.approx(73 * 2 / 2)

    table = bench.subsets_markdown(list(configs.values()))
    assert "| **alpaca_llama2_7b** | **all 9 subsets** | | | 45 / 18 / 0 |" in table
    assert "| **- (no checkpoints)** |" in table
    assert (
        "alpaca_llama2_13b (ZeRO-3, 156.2 GB; none)" in table and "million_template (ZeRO-2, 94.3 GB; epoch)" in table
    )
