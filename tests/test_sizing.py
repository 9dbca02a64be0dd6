"""The sizing table's arithmetic (benchmarks/sizing.py), checked against hand-worked numbers."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from gradfilter_ray.config import load

SPEC = importlib.util.spec_from_file_location("sizing", Path(__file__).resolve().parents[1] / "benchmarks/sizing.py")
sizing = importlib.util.module_from_spec(SPEC)
sys.modules["sizing"] = sizing  # dataclasses look their module up by name
SPEC.loader.exec_module(sizing)

CHECK = {  # the shape of benchmarks/gpu_check.py's JSON
    "environment": {"gpu": "Test GPU", "gpu_memory_bytes": 80 * 2**30},
    "ensemble": [{"rows": 100, "epochs": 2, "seconds": 10.0}, {"rows": 100, "epochs": 2, "seconds": 30.0}],
    "extraction": {"examples_per_s": 50.0, "adapters": 4},
    "memory_per_token": {"bytes_per_token": 300 * 1024},
}


def test_device_hours_and_devices_follow_the_measured_throughput():
    measured = sizing.Measured.from_check(CHECK)
    assert measured.member_examples_per_s == pytest.approx(200 / 20)  # 100 rows x 2 epochs in 20 s on average
    size = sizing.size_for(measured, examples=36_000, members=5, epochs=2, hours=4)
    assert size.ensemble_device_hours == pytest.approx(5 * 2 * 36_000 / 10 / 3600)  # 10 h
    assert size.extract_device_hours == pytest.approx(36_000 / 50 * (10 / 4) / 3600)  # 0.5 h, 10 of 4 adapters
    assert size.devices_for_deadline == 3  # 10.5 device-hours in 4 hours
    assert sizing.size_for(measured, 10, 5, 2, hours=4).devices_for_deadline == 1
    table = sizing.markdown(measured, [size], 5, 2, 4)
    assert "| 36,000 | 10.00 | 0.50 | 10.50 | 3 |" in table and "Test GPU" in table


def test_a_check_without_throughput_is_refused():
    with pytest.raises(ValueError, match="no ensemble or extraction throughput"):
        sizing.Measured.from_check({k: v for k, v in CHECK.items() if k != "extraction"})


def test_the_token_budget_fits_the_measured_memory_per_token():
    measured = sizing.Measured.from_check(CHECK)
    # 0.7 x 80 GiB / 300 KiB = 195,734 tokens -> the power of two below: 131,072
    assert measured.tokens_per_batch() == 131_072
    assert "gradients.tokens_per_batch up to 131,072" in sizing.markdown(measured, [], 5, 2, 4).replace("\n", " ")
    assert sizing.Measured.from_check({**CHECK, "memory_per_token": {}}).tokens_per_batch() is None


# --- target fine-tuning and evaluation (benchmarks/sizing_target.py), scaled from the check's ~1B measurement ---
target_sizing = sys.modules["sizing_target"]  # imported by sizing.py from beside it
TARGET = {  # the shape of gpu_check.py's "target" section
    "model": {"params": 1_000_000_000},
    "train": {"tokens_per_s": 10_000.0},
    "checkpoint": {"bytes_per_param": 14.0, "write_bytes_per_s": 2e9},
    "final_save": {"bytes_per_param": 2.0},
    "generation": {"batches": {str(b): {"new_tokens_per_s": r} for b, r in [(8, 400.0), (16, 700.0), (32, 1200.0)]}},
}
N7, N13 = 6_738_415_616, 13_015_864_320  # LLaMA-2's published parameter counts


def _estimates(name: str, mean_tokens: float = 112.0):
    measured = target_sizing.TargetMeasured.from_check({**CHECK, "target": TARGET})
    rows = target_sizing.SHIPPED[name]
    return measured, target_sizing.estimate(measured, name, rows, mean_tokens)


def test_the_llama_parameter_formula_gives_the_published_counts():
    assert target_sizing.llama_params(target_sizing.LLAMA2["7b"]) == N7
    assert target_sizing.llama_params(target_sizing.LLAMA2["13b"]) == N13
    tinyllama = {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4}
    assert target_sizing.llama_params({**tinyllama, "intermediate_size": 5632}) == 1_100_048_384  # TinyLlama 1.1B


def test_fine_tuning_hours_follow_the_measured_tokens_per_second_and_the_config():
    cfg = load(target_sizing.CONFIGS / "alpaca_llama2_7b.yaml")
    _, estimates = _estimates("alpaca_llama2_7b")
    assert [e.ratio for e in estimates] == cfg.selection.ratios
    for e in estimates:
        rows = int(52_002 * e.ratio)
        tokens_per_s_per_gpu = 10_000.0 * 1e9 / N7  # the 1B rate scaled by N_measured / N
        hours = rows * cfg.finetune.epochs * 112.0 / (tokens_per_s_per_gpu * cfg.finetune.num_workers) / 3600
        assert e.rows == rows and e.gpus == cfg.finetune.num_workers == 8
        assert e.finetune_hours == pytest.approx(hours)
        assert e.runs == len(cfg.finetune.scorers)
        assert e.checkpoint_bytes == pytest.approx(14.0 * N7) and e.model_bytes == pytest.approx(2.0 * N7)
        assert e.saves == cfg.finetune.epochs - 1  # epoch ends, never after the last step (checkpoint_every_steps 0)
    # 2,600 rows x 3 epochs x 112 tokens = 873,600 tokens / (1,484 tokens/s x 8 GPUs) = 73.6 s
    assert estimates[0].finetune_hours * 3600 == pytest.approx(73.58, rel=1e-3)


def test_the_13b_target_costs_the_parameter_ratio_more_than_7b():
    _, small = _estimates("alpaca_llama2_7b")
    _, large = _estimates("alpaca_llama2_13b")
    for a, b in zip(small, large):
        assert (a.ratio, a.rows, a.gpus) == (b.ratio, b.rows, b.gpus)  # the same data and cluster
        assert b.finetune_hours / a.finetune_hours == pytest.approx(N13 / N7)
        assert b.checkpoint_bytes / a.checkpoint_bytes == pytest.approx(N13 / N7)
        assert b.eval_hours / a.eval_hours == pytest.approx(N13 / N7)


def test_evaluation_hours_use_the_measured_rate_at_the_configured_batch():
    measured, estimates = _estimates("alpaca_llama2_7b")
    prompts = 80 + 180 + 218 + 252 + 300  # vicuna, koala, wizardlm, sinstruct, lima
    e = estimates[0]
    assert e.eval_prompts == prompts and e.eval_batch == 16 and e.eval_batch_measured == 16
    assert e.eval_hours == pytest.approx(prompts * 1024 / (700.0 * 1e9 / N7) / 3600)
    assert measured.gen_rate(12) == (8, 400.0)  # the measured batch below: a smaller batch is slower
    assert measured.gen_rate(4) == (8, 400.0)  # below every measured batch: the smallest
    for name in target_sizing.SHIPPED:  # each config's evaluation.batch_size picks its measured rate
        batch = load(target_sizing.CONFIGS / f"{name}.yaml").evaluation.batch_size
        assert {(e.eval_batch, e.eval_batch_measured) for e in _estimates(name)[1]} == {
            (batch, measured.gen_rate(batch)[0])
        }


def test_mean_tokens_scale_fine_tuning_linearly():
    _, base = _estimates("alpaca_llama2_7b", 112.0)
    _, longer = _estimates("alpaca_llama2_7b", 224.0)
    assert [b.finetune_hours * 2 for b in base] == pytest.approx([e.finetune_hours for e in longer])


def test_a_check_without_a_working_target_step_gives_the_first_table_alone(tmp_path, monkeypatch):
    assert target_sizing.TargetMeasured.from_check(CHECK) is None
    assert target_sizing.TargetMeasured.from_check({**CHECK, "target": {"error": "ImportError: deepspeed"}}) is None
    for check, estimated in [(CHECK, False), ({**CHECK, "target": TARGET}, True)]:
        path = tmp_path / "check.json"
        path.write_text(json.dumps(check))
        monkeypatch.setattr(sys, "argv", ["sizing.py", "--check", str(path), "--out", str(tmp_path)])
        assert sizing.main() == 0
        table = (tmp_path / "sizing.md").read_text()
        result = json.loads((tmp_path / "sizing.json").read_text())
        assert "| 52,002 |" in table  # the ensemble/extraction table is always there
        assert ("| alpaca_llama2_13b | LLaMA-2 13B |" in table) == estimated
        assert len(result["target"]["estimates"]) == (9 if estimated else 0)  # 3 configs x 3 ratios
        assert ("not estimated" in table) != estimated
