"""The member training loop, without Ray: seeded order, falling loss, and exact resume from an epoch checkpoint."""

import copy

import numpy as np
import pytest
import torch

from gradfilter_ray.config import EnsembleConfig, ModelSpec
from gradfilter_ray.ensemble.batching import epoch_order
from gradfilter_ray.ensemble.loop import TokenRows, train_member
from gradfilter_ray.lora import attach_lora, target_modules
from gradfilter_ray.models import load_causal_lm

TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "vocab_size": 97}


def make_rows(n=24, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, 30, n)
    # a learnable pattern: the response repeats the prompt's first tokens
    input_ids = []
    for length in lengths:
        prompt = rng.integers(1, 97, length // 2)
        input_ids.append(np.concatenate([prompt, prompt[: length - length // 2]]).astype(np.int32))
    return TokenRows.from_columns(rng.permutation(np.arange(100, 100 + n)), input_ids, lengths // 2)


def fresh_model(cfg, seed):
    torch.manual_seed(0)
    return attach_lora(load_causal_lm(ModelSpec(build_from_config=TINY, tokenizer="bundled:gpt2")), cfg, seed=seed)


CFG = EnsembleConfig(
    members=2,
    epochs=3,
    early_epoch=1,
    late_epoch=3,
    lora_rank=4,
    lora_alpha=8,
    learning_rate=0.02,
    batch_size=5,
    lora_dropout=0.1,
)


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_epoch_order_depends_on_member_and_epoch_only():
    a = epoch_order(50, 42, 1)
    assert np.array_equal(a, epoch_order(50, 42, 1)) and sorted(a) == list(range(50))
    assert not np.array_equal(a, epoch_order(50, 43, 1)) and not np.array_equal(a, epoch_order(50, 42, 2))


def test_rows_are_sorted_by_id_so_input_order_does_not_matter():
    rows = make_rows()
    assert np.all(np.diff(rows.ids) > 0)
    shuffled = TokenRows.from_columns(rows.ids[::-1], rows.input_ids[::-1], rows.labels_at[::-1])
    assert np.array_equal(shuffled.ids, rows.ids)
    assert all(np.array_equal(a, b) for a, b in zip(shuffled.input_ids, rows.input_ids))


def test_training_lowers_the_loss_and_saves_each_epoch():
    model, seen = fresh_model(CFG, 7), {}
    train_member(
        model,
        make_rows(),
        CFG,
        7,
        torch.device("cpu"),
        0,
        lambda e, m, o, losses: seen.setdefault(e, (np.mean(losses), lora_state(m))),
    )
    assert list(seen) == [1, 2, 3]
    assert seen[3][0] < seen[1][0]
    assert any(not torch.equal(seen[1][1][k], seen[3][1][k]) for k in seen[1][1])


def test_resume_from_an_epoch_checkpoint_equals_an_uninterrupted_run():
    rows, saved = make_rows(), {}

    def keep(e, m, opt, losses):
        saved[e] = (lora_state(m), copy.deepcopy(opt.state_dict()), losses)

    clean = fresh_model(CFG, 3)
    train_member(clean, rows, CFG, 3, torch.device("cpu"), 0, keep)

    resumed, after = fresh_model(CFG, 3), {}
    weights, opt_state, _ = saved[1]
    with torch.no_grad():
        for name, param in resumed.named_parameters():
            if name in weights:
                param.copy_(weights[name])
    train_member(
        resumed,
        rows,
        CFG,
        3,
        torch.device("cpu"),
        0,
        lambda e, m, o, losses: after.setdefault(e, (lora_state(m), losses)),
        start_epoch=2,
        optimizer_state=opt_state,
    )
    assert list(after) == [2, 3]
    for name, value in saved[3][0].items():
        torch.testing.assert_close(after[3][0][name], value, rtol=0, atol=1e-6)
    assert np.allclose(after[3][1], saved[3][2], rtol=1e-5)


def test_members_differ_by_seed():
    a, b = fresh_model(CFG, 1), fresh_model(CFG, 2)
    sa, sb = lora_state(a), lora_state(b)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if "lora_A" in k)


def test_default_targets_per_architecture():
    assert target_modules(CFG, "gpt2") == ["c_attn", "c_proj"]
    assert target_modules(CFG, "llama") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(ValueError, match="ensemble.target_modules"):
        target_modules(CFG, "mamba")
