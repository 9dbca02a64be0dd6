"""The sizing table's arithmetic (benchmarks/sizing.py, benchmarks/sizing_target.py), checked against hand-worked
numbers and slow references; and the shipped fine-tuning configs against the plan estimate that chose them."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from gradfilter_ray.config import load

SPEC = importlib.util.spec_from_file_location("sizing", Path(__file__).resolve().parents[1] / "benchmarks/sizing.py")
sizing = importlib.util.module_from_spec(SPEC)
sys.modules["sizing"] = sizing  # dataclasses look their module up by name
SPEC.loader.exec_module(sizing)
target_sizing = sys.modules["sizing_target"]  # imported by sizing.py from beside it

CHECK = {  # the shape of benchmarks/gpu_check.py's JSON
    "environment": {"gpu": "Test GPU", "gpu_memory_bytes": 80 * 2**30},
    "ensemble": [
        {"rows": 100, "epochs": 2, "seconds": 10.0, "padding_efficiency": 0.8},
        {"rows": 100, "epochs": 2, "seconds": 30.0, "padding_efficiency": 0.8},
    ],
    "extraction": {
        "rows": 100,
        "examples_per_s": 50.0,
        "adapters": 4,
        "stats": {"real_tokens": 40_000, "padded_tokens": 50_000},  # rows of 400 tokens, 80 % real
    },
    "memory_per_token": {"bytes_per_token": 300 * 1024},
}
FLAT = target_sizing.TokenLengths("test", 512, {100: 10})  # every corpus row 100 tokens: no padding at any batch


def test_padded_tokens_a_row_are_the_expected_longest_of_a_random_batch():
    two = target_sizing.TokenLengths("test", 8, {1: 1, 3: 1})
    assert two.mean == 2 and two.padded_per_row(1) == 2
    assert two.padded_per_row(2) == pytest.approx(1 * 1 / 4 + 3 * 3 / 4)  # max is 1 only when both draws are 1
    assert FLAT.padded_per_row(16) == pytest.approx(100) and FLAT.padding_efficiency(16) == pytest.approx(1)
    # Slow reference: the fine-tuning loop's own batches, a permutation cut into micro-batches, each padded to its
    # longest row, on the measured LLaMA-2 lengths of the Alpaca sample.
    lengths = target_sizing.load_lengths("llama2")
    rows = np.repeat(list(lengths.histogram), list(lengths.histogram.values()))
    rng = np.random.default_rng(0)
    for batch in (1, 4, 16):
        whole = len(rows) // batch * batch  # the loop wraps the last batch around; the sample's tail is dropped here
        padded = [rng.permutation(rows)[:whole].reshape(-1, batch).max(axis=1).mean() for _ in range(40)]
        assert lengths.padded_per_row(batch) == pytest.approx(np.mean(padded), rel=0.01), batch
    assert lengths.padded_per_row(1) == pytest.approx(lengths.mean)


def test_the_measured_alpaca_lengths_are_the_bundled_sample_tokenised_by_the_project():
    gpt2 = target_sizing.load_lengths("gpt2")
    llama2 = target_sizing.load_lengths("llama2")
    assert gpt2.rows == llama2.rows == 5_000 and (gpt2.max_length, llama2.max_length) == (512, 1024)
    assert max(gpt2.histogram) <= 512 and max(llama2.histogram) <= 1024
    # GPT-2's BPE ships in the package (LLaMA-2's does not): the recorded lengths are today's tokenisation's
    from gradfilter_ray.config import ModelSpec

    again = target_sizing.measure_lengths("bundled:alpaca_5k.json", ModelSpec(name_or_path="bundled:gpt2"), 512)
    assert again == gpt2.histogram


def test_device_hours_scale_the_measured_tokens_to_the_corpus_rows():
    measured = sizing.Measured.from_check(CHECK)
    assert measured.check_mean_tokens == 400  # 40,000 real tokens over the extraction's 100 rows
    assert measured.member_examples_per_s == pytest.approx(400 / 40)  # 2 x 100 rows x 2 epochs in 40 s
    assert measured.member_tokens_per_s == pytest.approx(400 * 400 / 0.8 / 40)  # padded tokens computed
    assert measured.extract_tokens_per_s == pytest.approx(50.0 * 500)  # 500 padded tokens a row
    # corpus rows of 100 tokens: 5,000 member tokens/s -> 50 rows/s; 25,000 extraction tokens/s -> 250 rows/s
    assert measured.member_rate(FLAT, 16) == pytest.approx(50.0)
    assert measured.extract_rate(FLAT) == pytest.approx(250.0)
    size = sizing.size_for(measured, examples=36_000, members=5, epochs=2, hours=4, lengths=FLAT, batch=16)
    assert size.ensemble_device_hours == pytest.approx(5 * 2 * 36_000 / 50 / 3600)  # 2 h
    assert size.extract_device_hours == pytest.approx(36_000 / 250 * (10 / 4) / 3600)  # 0.1 h, 10 of 4 adapters
    assert size.devices_for_deadline == 1  # 2.1 device-hours in 4 hours
    longer = target_sizing.TokenLengths("test", 512, {100: 1, 300: 1})  # mean 200; a batch of 2 pads to 250
    assert measured.member_rate(longer, 2) == pytest.approx(5_000 / 250)
    assert measured.extract_rate(longer) == pytest.approx(25_000 / 200)
    table = sizing.markdown(measured, [size], 5, 2, 4, FLAT, 16)
    assert "| 36,000 | 2.00 | 0.10 | 2.10 | 1 |" in table and "Test GPU" in table


def test_a_check_without_throughput_or_token_counts_is_refused():
    with pytest.raises(ValueError, match="no ensemble or extraction throughput"):
        sizing.Measured.from_check({k: v for k, v in CHECK.items() if k != "extraction"})
    with pytest.raises(ValueError, match="token counts"):
        sizing.Measured.from_check({**CHECK, "extraction": {**CHECK["extraction"], "stats": {}}})


def test_the_token_budget_fits_the_measured_memory_per_token():
    measured = sizing.Measured.from_check(CHECK)
    # 0.7 x 80 GiB / 300 KiB = 195,734 tokens -> the power of two below: 131,072
    assert measured.tokens_per_batch() == 131_072
    text = sizing.markdown(measured, [], 5, 2, 4, FLAT, 16).replace("\n", " ")
    assert "gradients.tokens_per_batch up to 131,072" in text
    assert sizing.Measured.from_check({**CHECK, "memory_per_token": {}}).tokens_per_batch() is None


# --- the fine-tuning plan estimate: communication, compute, memory, the choice, the checkpoint policy ---
NODE = sizing.Node("test node", "T", 8, 100e12, 100e9, 80e9)
SHAPE = {"hidden_size": 1000, "num_hidden_layers": 10, "intermediate_size": 3000, "vocab_size": 1000}
ZERO = {"reduce_bucket_size": 1e8, "allgather_bucket_size": 2e8, "stage3_max_live_parameters": 3e8}


def test_the_step_estimate_by_hand():
    n = 1_000_000_000
    # ZeRO-3, 2 micro-batches: each gathers the bf16 weights 3 times (2 GB each) and reduce-scatters fp32
    # gradients (4 GB), a ring moving 7/8 of each: 2 x (3 x 2 + 4) x 7/8 = 17.5 GB a GPU
    assert sizing.comm_bytes_per_step(n, 3, 8, 2, recompute=True) == pytest.approx(17.5e9)
    assert sizing.comm_bytes_per_step(n, 3, 8, 2, recompute=False) == pytest.approx(2 * (2 * 2 + 4) * 7 / 8 * 1e9)
    # ZeRO-2: the gradient reduce every micro-batch, the bf16 weights gathered once: (2 x 4 + 2) x 7/8 = 8.75 GB
    assert sizing.comm_bytes_per_step(n, 2, 8, 2, recompute=True) == pytest.approx(8.75e9)
    # 8 x 1e9 FLOPs a token x 2 rows x 2 micro-batches x 100 tokens = 3.2e12 FLOPs; at 40 % of 100 TFLOP/s: 0.08 s
    assert sizing.flops_per_step(n, 2, 2, 100.0, recompute=True) == pytest.approx(3.2e12)
    e = sizing.step_estimate(n, SHAPE, 3, 2, 2, 100.0, 50, NODE, ZERO, recompute=True, mfu=0.4)
    assert e.compute_s == pytest.approx(0.08) and e.comm_s == pytest.approx(17.5e9 / 100e9)
    assert e.overlapped_s == pytest.approx(0.175) and e.serial_s == pytest.approx(0.255)

    # Memory, ZeRO-3: (2 + 6 + 12) bytes a parameter over 8 GPUs = 2.5 GB; buckets 2 x 4 x 1e8 + gathered weights
    # 2 x (3e8 + the default 5e7 prefetch) = 1.5 GB; 2 rows x 50 tokens: layer inputs 10 x 100 x 1000 x 2,
    # one layer 100 x 2 x (13,000 + 12,000), logits 100 x 1000 x 14
    parts = sizing.memory_per_gpu(n, SHAPE, 3, 2, 50, 8, ZERO, recompute=True)
    assert parts["weights"] + parts["gradients"] + parts["optimizer"] == pytest.approx(2.5e9)
    assert parts["buffers"] == pytest.approx(8e8 + 7e8)
    assert parts["activations"] == pytest.approx(2e6 + 5e6 + 1.4e6)
    assert e.memory_bytes == pytest.approx(sum(parts.values())) and e.fits
    # ZeRO-2: the bf16 weights whole (2 GB) + 22 bytes a parameter over 8 (2.75 GB); buckets 8e8 + 2 x 2e8
    two = sizing.memory_per_gpu(n, SHAPE, 2, 2, 50, 8, ZERO, recompute=True)
    assert two["weights"] + two["gradients"] + two["optimizer"] == pytest.approx(4.75e9)
    assert two["buffers"] == pytest.approx(1.2e9)
    # without recompute every layer keeps its working set: 10 x 5e6 + logits
    assert sizing.memory_per_gpu(n, SHAPE, 2, 2, 50, 8, ZERO, recompute=False)["activations"] == pytest.approx(
        10 * 5e6 + 1.4e6
    )


def _option(memory_fits: bool, *times: tuple[float, float]) -> list:
    return [
        sizing.StepEstimate(f"node {i}", 2, 1, 1, 1.0, compute, 0.0, comm, 1.0, memory_fits)
        for i, (compute, comm) in enumerate(times)
    ]


def test_the_choice_is_the_least_worst_slowdown_among_the_options_that_fit():
    fast_on_0 = _option(True, (1.0, 0.2), (3.0, 0.5))  # node 0: 1.0-1.2 s; node 1: 3.0-3.5 s
    fast_on_1 = _option(True, (1.5, 0.6), (2.0, 0.1))  # 1.5-2.1; 2.0-2.1
    balanced = _option(True, (1.2, 0.2), (2.2, 0.2))  # 1.2-1.4; 2.2-2.4
    huge = _option(False, (0.1, 0.0), (0.1, 0.0))  # fastest, does not fit: out of the running and the bests
    options = [fast_on_0, fast_on_1, balanced, huge]
    worst = sizing.regrets(options)
    # bests: node 0 overlapped 1.0, serial 1.2; node 1 overlapped 2.0, serial 2.1
    assert worst[0] == pytest.approx(max(3.5 / 2.1, 3.0 / 2.0) - 1)
    assert worst[1] == pytest.approx(max(1.5 / 1.0, 2.1 / 1.2) - 1)
    assert worst[2] == pytest.approx(max(1.2 / 1.0, 1.4 / 1.2, 2.2 / 2.0, 2.4 / 2.1) - 1)
    assert worst[3] == math.inf
    assert sizing.choose_batching(options) is balanced


def test_the_checkpoint_tradeoff_by_hand():
    t = sizing.CheckpointTradeoff("c", "n", 1000, 300, train_s=600.0, save_bytes=80e9, save_s=40.0, epoch_saves=2,
                                  epochs=3)  # fmt: skip
    assert t.overhead == pytest.approx(80 / 600)
    # without checkpoints a failure costs half the subset (300 s), with them half an epoch (100 s): the 80 s of
    # writes pay off above a failure probability of 80 / 200
    assert t.breakeven_failure_probability == pytest.approx(0.4)
    cheap = sizing.CheckpointTradeoff("c", "n", 1000, 300, 6000.0, 80e9, 40.0, 2, 3)
    assert sizing.checkpoint_policy([cheap]) == "epoch" and sizing.checkpoint_policy([cheap, t]) == "none"


def test_the_shipped_configs_are_the_plans_choice():
    """The 7B, 13B and 1M-row configs' ZeRO stage, micro-batch and checkpoint policy are what the estimate picks
    (docs/scale.md): a config edited without re-estimating, or an estimate changed without the configs, fails."""
    planned = sizing.plan()
    for name, p in planned.items():
        cfg = load(target_sizing.CONFIGS / f"{name}.yaml").finetune
        chosen = p["chosen"][0]
        assert (cfg.zero_stage, cfg.micro_batch_size) == (chosen.stage, chosen.micro), name
        assert p["shipped"] is p["chosen"] and all(e.fits for e in p["chosen"])
        assert cfg.checkpoint == p["policy"], name
        assert chosen.micro * chosen.accumulation * cfg.num_workers == cfg.effective_batch_size
    assert planned["alpaca_llama2_7b"]["policy"] == planned["alpaca_llama2_13b"]["policy"] == "none"
    assert planned["million_template"]["policy"] == "epoch"
    text = sizing.plan_markdown(planned)
    assert "| 2 **chosen** | 4 x 4 |" in text and "| 3 **chosen** | 8 x 2 |" in text


# --- target fine-tuning and evaluation (benchmarks/sizing_target.py), scaled from the check's ~1B measurement ---
TARGET = {  # the shape of gpu_check.py's "target" section
    "model": {"params": 1_000_000_000},
    "train": {"tokens_per_s": 10_000.0, "zero_stage": 3},
    "checkpoint": {"bytes_per_param": 12.5, "write_bytes_per_s": 2e9},
    "final_save": {"bytes_per_param": 2.0},
    "generation": {"batches": {str(b): {"new_tokens_per_s": r} for b, r in [(8, 400.0), (16, 700.0), (32, 1200.0)]}},
}
N7, N13 = 6_738_415_616, 13_015_864_320  # LLaMA-2's published parameter counts


def _estimates(name: str, lengths=FLAT):
    measured = target_sizing.TargetMeasured.from_check({**CHECK, "target": TARGET})
    rows = target_sizing.SHIPPED[name]
    return measured, target_sizing.estimate(measured, name, rows, lengths)


def test_the_llama_parameter_formula_gives_the_published_counts():
    assert target_sizing.llama_params(target_sizing.LLAMA2["7b"]) == N7
    assert target_sizing.llama_params(target_sizing.LLAMA2["13b"]) == N13
    tinyllama = {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4}
    assert target_sizing.llama_params({**tinyllama, "intermediate_size": 5632}) == 1_100_048_384  # TinyLlama 1.1B


def test_fine_tuning_hours_follow_the_measured_tokens_per_second_and_the_config():
    cfg = load(target_sizing.CONFIGS / "alpaca_llama2_7b.yaml")
    _, estimates = _estimates("alpaca_llama2_7b")
    assert [e.ratio for e in estimates] == cfg.selection.ratios
    zero2_bytes = target_sizing.checkpoint_bytes_per_param(2)
    for e in estimates:
        rows = int(52_002 * e.ratio)
        tokens_per_s_per_gpu = 10_000.0 * 1e9 / N7  # the 1B rate scaled by N_measured / N
        hours = rows * cfg.finetune.epochs * 100.0 / (tokens_per_s_per_gpu * cfg.finetune.num_workers) / 3600
        assert e.rows == rows and e.gpus == cfg.finetune.num_workers == 8
        assert e.finetune_hours == pytest.approx(hours)
        assert e.runs == len(cfg.finetune.scorers)
        # the config runs ZeRO-2 and the check measured ZeRO-3: the ZeRO-2 bytes of checkpoint_bytes.json
        assert e.checkpoint_bytes == pytest.approx(zero2_bytes * N7) and e.model_bytes == pytest.approx(2.0 * N7)
        assert 14 <= zero2_bytes < 14.01
        assert e.saves == 0  # checkpoint: none
    # 2,600 rows x 3 epochs x 100 tokens = 780,000 tokens / (1,484 tokens/s x 8 GPUs) = 65.7 s
    assert estimates[0].finetune_hours * 3600 == pytest.approx(65.70, rel=1e-3)
    _, million = _estimates("million_template")
    assert all(e.saves == 2 for e in million)  # checkpoint: epoch, 3 epochs, never after the last step


def test_padding_costs_what_the_micro_batch_pads_to():
    lengths = target_sizing.TokenLengths("test", 1024, {100: 1, 300: 1})  # a micro-batch of 4 pads to 300 - 1/16 x 200
    _, base = _estimates("alpaca_llama2_7b")
    _, padded = _estimates("alpaca_llama2_7b", lengths)
    per_row = 100 * (1 / 2) ** 4 + 300 * (1 - (1 / 2) ** 4)  # micro_batch_size 4 in the 7B config
    assert [b.finetune_hours * per_row / 100 for b in base] == pytest.approx([e.finetune_hours for e in padded])


def test_the_13b_target_costs_the_parameter_ratio_more_than_7b():
    _, small = _estimates("alpaca_llama2_7b")
    _, large = _estimates("alpaca_llama2_13b")
    for a, b in zip(small, large):
        assert (a.ratio, a.rows, a.gpus) == (b.ratio, b.rows, b.gpus)  # the same data and cluster
        assert b.finetune_hours / a.finetune_hours == pytest.approx(N13 / N7)  # no padding in FLAT
        assert b.checkpoint_bytes == pytest.approx(12.5 * N13)  # ZeRO-3, as the check measured it
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
        assert result["corpus_lengths"]["mean_tokens"] == pytest.approx(target_sizing.load_lengths("gpt2").mean)


def test_the_plan_is_written_without_a_check(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sizing.py", "--plan", "--out", str(tmp_path)])
    assert sizing.main() == 0
    assert (tmp_path / "finetune_plan.md").read_text() == sizing.plan_markdown(sizing.plan())
    saved = json.loads((tmp_path / "finetune_plan.json").read_text())
    assert saved["alpaca_llama2_13b"]["policy"] == "none" and saved["million_template"]["policy"] == "epoch"


def test_the_scale_doc_shows_the_current_plan():
    doc = (target_sizing.REPO / "docs" / "scale.md").read_text()
    begin = "<!-- generated by python benchmarks/sizing.py --plan: do not edit by hand -->\n"
    shown = doc[doc.index(begin) + len(begin) : doc.index("<!-- end of generated text -->")]
    assert shown == sizing.plan_markdown(sizing.plan()), "regenerate it: python benchmarks/sizing.py --plan"
