"""Target fine-tuning plan (pure): step counts, the warm-up + cosine schedule, each worker's data share, and the
DeepSpeed config filled from the shipped ZeRO templates."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gradfilter_ray.bundled import resolve
from gradfilter_ray.config import ConfigError, FinetuneConfig, ModelSpec, load
from gradfilter_ray.finetune.ds_config import (
    TEMPLATES,
    checkpoint_due,
    checkpoint_steps,
    deepspeed_config,
    epoch_positions,
    lr_factor,
    plan_training,
)


def _target(**kw) -> FinetuneConfig:
    return FinetuneConfig(**kw)


def test_plan_meets_the_effective_batch_and_rounds_steps_up():
    plan = plan_training(1000, _target(effective_batch_size=128, micro_batch_size=4, epochs=3), world_size=8)
    assert (plan.accumulation_steps, plan.global_batch) == (4, 128)
    assert plan.steps_per_epoch == 8 and plan.total_steps == 24  # ceil(1000 / 128)
    assert plan.warmup_steps == 1  # ceil(0.03 * 24)
    odd = plan_training(10, _target(effective_batch_size=100, micro_batch_size=3, epochs=1), world_size=2)
    assert odd.global_batch >= 100 and odd.accumulation_steps == 17 and odd.steps_per_epoch == 1
    with pytest.raises(ValueError):
        plan_training(0, _target(), world_size=1)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    warmup, total = 3, 13
    factors = [lr_factor(s, warmup, total) for s in range(total)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    for s in range(warmup, total):  # independent formula: half cosine over the decay steps
        assert factors[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert lr_factor(total, warmup, total) == pytest.approx(0.0)


def test_each_epoch_covers_every_example_with_disjoint_worker_shares():
    plan = plan_training(50, _target(effective_batch_size=16, micro_batch_size=4, epochs=2), world_size=2)
    pos = epoch_positions(plan, seed=7, epoch=0)
    assert pos.shape == (plan.steps_per_epoch, 2, plan.accumulation_steps, 4)
    flat = pos.reshape(-1)
    assert set(flat[:50].tolist()) == set(range(50))  # a permutation first, then wrapped to fill the last step
    for step in range(plan.steps_per_epoch):
        a, b = pos[step, 0].reshape(-1), pos[step, 1].reshape(-1)
        if step < plan.steps_per_epoch - 1:
            assert not set(a) & set(b)
    np.testing.assert_array_equal(pos, epoch_positions(plan, seed=7, epoch=0))  # a resumed run sees the same
    assert not np.array_equal(pos, epoch_positions(plan, seed=7, epoch=1))


def test_deepspeed_config_comes_from_the_shipped_templates():
    for stage, path in TEMPLATES.items():
        assert json.loads(path.read_text())["zero_optimization"]["stage"] == stage
    cfg = _target(zero_stage=3, effective_batch_size=32, micro_batch_size=2, offload_optimizer=True)
    plan = plan_training(100, cfg, world_size=4)
    ds = deepspeed_config(cfg, plan, bf16=True)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4
    assert ds["bf16"] == {"enabled": True}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    cpu = deepspeed_config(_target(zero_stage=2), plan_training(10, _target(zero_stage=2), 1), bf16=False)
    assert cpu["bf16"] == {"enabled": False} and "offload_optimizer" not in cpu["zero_optimization"]
    assert "data_types" not in cpu and "communication_data_type" not in cpu  # fp32 training: already fp32
    assert all(not isinstance(v, str) for v in cpu.values())  # every template placeholder was filled


def test_deepspeed_takes_the_bf16_config_with_fp32_accumulation_and_reduction():
    """A real DeepSpeed engine (ZeRO 2 and 3, bf16, on CPU) built from `deepspeed_config` accumulates and reduces
    gradients in fp32, and steps."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    probe = Path(__file__).with_name("ds_bf16_probe.py")
    done = subprocess.run([sys.executable, str(probe), str(port)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {"model": "torch.bfloat16", "accumulate": "torch.float32", "reduce": "torch.float32"}
    assert seen == {"2": expected, "3": expected}


def test_the_checkpoint_policy_none_epoch_or_every_n_steps_never_after_the_last_step():
    plan = plan_training(24, _target(epochs=2, effective_batch_size=8, micro_batch_size=4), world_size=2)
    assert (plan.steps_per_epoch, plan.total_steps) == (3, 6)

    def due(policy, every=0):
        return [s for s in range(1, 8) if checkpoint_due(s, plan, policy, every)]

    assert due("none") == [] and checkpoint_steps(plan, "none") == []
    assert due("epoch") == [3] == checkpoint_steps(plan, "epoch")  # epoch 1's end; epoch 2's is the last step
    assert due("steps", 2) == [2, 4] == checkpoint_steps(plan, "steps", 2)  # epoch ends are not added
    assert due("steps", 1) == [1, 2, 3, 4, 5]  # 6 is the last step: the final save follows
    longer = plan_training(100, _target(epochs=3, effective_batch_size=8, micro_batch_size=4), world_size=2)
    assert checkpoint_steps(longer, "epoch") == [13, 26] and checkpoint_steps(longer, "steps", 10) == [10, 20, 30]
    with pytest.raises(ValueError, match="every_steps"):
        checkpoint_due(2, plan, "steps", 0)
    with pytest.raises(ValueError, match="unknown checkpoint policy"):
        checkpoint_due(2, plan, "sometimes")


@pytest.mark.parametrize(
    "fields, ok",
    [
        ({"checkpoint": "none"}, True),
        ({"checkpoint": "epoch"}, True),
        ({"checkpoint": "steps", "checkpoint_every_steps": 50}, True),
        ({"checkpoint": "steps"}, False),  # steps with no N
        ({"checkpoint": "epoch", "checkpoint_every_steps": 50}, False),  # an N that nothing would use
        ({"checkpoint": "none", "checkpoint_every_steps": 5}, False),
        ({"checkpoint": "steps", "checkpoint_every_steps": -1}, False),
    ],
)
def test_checkpoint_every_steps_is_set_exactly_when_the_policy_is_steps(fields, ok):
    if ok:
        assert _target(**fields).checkpoint == fields["checkpoint"]
    else:
        with pytest.raises(ConfigError, match="checkpoint_every_steps"):
            _target(**fields)


def test_a_config_names_one_of_the_three_checkpoint_policies():
    assert load(None, ["finetune.checkpoint=none"]).finetune.checkpoint == "none"
    with pytest.raises(ConfigError, match="checkpoint"):
        load(None, ["finetune.checkpoint=always"])


def test_the_saved_model_keeps_the_generation_defaults_its_base_model_ships_with(tmp_path):
    import shutil

    import torch
    from transformers import GenerationConfig

    from gradfilter_ray.finetune import model as finetune_model
    from gradfilter_ray.models import instantiate

    base = tmp_path / "base"
    shutil.copytree(resolve("bundled:stories260K"), base)
    shipped = {"eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 256}
    GenerationConfig(bos_token_id=1, **shipped).save_pretrained(base)
    spec = ModelSpec(name_or_path=str(base))
    state = instantiate(spec, torch.float32).state_dict()
    finetune_model.save_merged(FinetuneConfig(model=spec), state, torch.float32, tmp_path / "model")
    saved = GenerationConfig.from_pretrained(tmp_path / "model").to_dict()
    assert {k: saved[k] for k in shipped} == shipped  # not the defaults from_config derives from config.json


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(name_or_path="bundled:stories260K"),  # LLaMA: rotary tables are non-persistent buffers
        ModelSpec(  # GPT-2: the LM head is tied to the embeddings
            build_from_config={"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64},
            tokenizer="bundled:gpt2",
        ),
    ],
    ids=["llama", "gpt2"],
)
def test_the_full_model_is_saved_from_a_meta_skeleton_without_reading_the_pretrained_weights(
    spec, tmp_path, monkeypatch
):
    import torch
    from transformers import AutoModelForCausalLM

    from gradfilter_ray.finetune import model as finetune_model
    from gradfilter_ray.models import instantiate

    trained = instantiate(spec, torch.float32).eval()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    state = trained.state_dict()

    def no_second_load(*args, **kwargs):
        raise AssertionError("the pretrained weights were loaded again")

    monkeypatch.setattr(finetune_model, "instantiate", no_second_load)
    finetune_model.save_merged(FinetuneConfig(model=spec), state, torch.float32, tmp_path / "model")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert back.state_dict().keys() == state.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in state.items())
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(back(ids).logits, trained(ids).logits)
