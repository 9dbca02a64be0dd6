"""per_example_sq_norms vs an independent batch-size-1 autograd reference (unpadded, eval mode)."""

from __future__ import annotations

import functools
import os
import random

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import gradfilter_ray
from gradfilter_ray.gradients.norms import per_example_sq_norms
from gradfilter_ray.lora import adapted_module_names, lora_parameter_count

# Prefer the copy bundled with the package so the real pretrained LLaMA case also runs on a fresh machine.
_BUNDLED = os.path.join(os.path.dirname(gradfilter_ray.__file__), "assets", "models", "stories260K")
STORIES = _BUNDLED if os.path.isdir(_BUNDLED) else "/work/shared/data/models/stories260K/hf"
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
TARGETS = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "stories": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
KINDS = [
    "gpt2",
    "llama",
    pytest.param("stories", marks=pytest.mark.skipif(not os.path.isdir(STORIES), reason="no model")),
]


def _lora_cfg(kind: str) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS[kind], init_lora_weights=True)


def _randomise(model, adapter: str, seed: int) -> None:
    # lora_B starts at zero, which would make every lora_A gradient zero and hide a broken A path. std 0.05 gives
    # lora_A ~half of the squared norm; much larger LoRA weights push float32 round-off itself past 1e-5.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{adapter}." in n and ("lora_A" in n or "lora_B" in n):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.05)


def build(kind: str, dtype: torch.dtype, adapters: tuple[str, ...] = ("default",)):
    torch.manual_seed(0)
    if kind == "gpt2":
        base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=300, n_positions=128))
    elif kind == "llama":
        cfg = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
        )
        base = LlamaForCausalLM(cfg)
    else:
        base = LlamaForCausalLM.from_pretrained(STORIES)
    model = get_peft_model(base.to(dtype), _lora_cfg(kind), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, _lora_cfg(kind))
    for i, name in enumerate(adapters):
        _randomise(model, name, seed=100 + i)
    return model.to(dtype)


@functools.cache
def cached(kind: str, dtype: torch.dtype):
    return build(kind, dtype)


def make_examples(seed: int, n: int, vocab: int, max_len: int = 24) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, max_len)
        prompt = rng.randint(1, length - 1)
        ids = torch.tensor([rng.randrange(vocab) for _ in range(length)])
        labels = ids.clone()
        labels[:prompt] = -100
        out.append((ids, labels))
    return out


def collate(examples, width: int | None = None, pad_id: int = 0):
    width = width or max(len(ids) for ids, _ in examples)
    B = len(examples)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), -100, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)], labels[i, : len(ids)], mask[i, : len(ids)] = ids, lab, 1
    return input_ids, mask, labels


def reference(model, examples, adapter: str = "default") -> list[tuple[float, float]]:
    """Batch-size-1, unpadded, plain autograd over the adapter's lora_A/lora_B params in eval mode."""
    prev_mode, prev_active = model.training, model.active_adapter
    model.set_adapter(adapter)
    model.eval()
    params = [p for n, p in model.named_parameters() if f".{adapter}." in n and ("lora_A" in n or "lora_B" in n)]
    out = []
    for ids, lab in examples:
        if (lab[1:] == -100).all():
            out.append((0.0, 0.0))
            continue
        logits = model(input_ids=ids[None]).logits[0]
        loss = F.cross_entropy(logits[:-1], lab[1:], ignore_index=-100)
        grads = torch.autograd.grad(loss, params)
        out.append((sum(g.double().pow(2).sum() for g in grads).item(), loss.item()))
    model.set_adapter(prev_active)
    model.train(prev_mode)
    return out


def assert_matches(result, ref, tol: float) -> None:
    sq, losses, n = result
    assert sq.dtype == losses.dtype == torch.float64 and n.dtype == torch.int64
    assert torch.isfinite(sq).all() and torch.isfinite(losses).all()
    for i, (r_sq, r_loss) in enumerate(ref):
        if r_sq == 0.0:
            assert sq[i].item() == 0.0 and losses[i].item() == 0.0 and n[i].item() == 0
            continue
        assert abs(sq[i].item() - r_sq) <= tol * r_sq, (i, sq[i].item(), r_sq)
        assert abs(losses[i].item() - r_loss) <= tol * r_loss, (i, losses[i].item(), r_loss)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_matches_bs1_reference(kind, dtype, batch_size):
    model = cached(kind, dtype)
    examples = make_examples(seed=batch_size, n=batch_size, vocab=model.config.vocab_size)
    result = per_example_sq_norms(model, *collate(examples))
    assert_matches(result, reference(model, examples), TOL[dtype])
    assert result[2].tolist() == [int((lab[1:] != -100).sum()) for _, lab in examples]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_batch_composition_invariance(kind):
    model = cached(kind, torch.float64)
    examples = make_examples(seed=7, n=8, vocab=model.config.vocab_size)
    full = per_example_sq_norms(model, *collate(examples))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = per_example_sq_norms(model, *collate([examples[j] for j in perm]))
    # Different batch-mates and extra right padding.
    others = make_examples(seed=8, n=2, vocab=model.config.vocab_size)
    mixed = per_example_sq_norms(model, *collate([others[0], examples[2], others[1], examples[5]], width=40))
    for k in range(2):
        torch.testing.assert_close(shuffled[k], full[k][perm], rtol=1e-10, atol=0)
        torch.testing.assert_close(mixed[k][[1, 3]], full[k][[2, 5]], rtol=1e-10, atol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_edge_cases(kind, dtype):
    model = cached(kind, dtype)
    vocab, width = model.config.vocab_size, 16
    one_tok = torch.arange(1, 8) % vocab
    one_lab = torch.full_like(one_tok, -100)
    one_lab[-1] = one_tok[-1]
    cut = (torch.arange(width) * 7 + 3) % vocab  # fills the full width and ends mid-response (no EOS)
    cut_lab = cut.clone()
    cut_lab[:5] = -100
    empty = (torch.arange(9) * 5 + 1) % vocab
    only_first = (torch.arange(6) * 3 + 2) % vocab  # label at position 0 cannot be predicted: 0 response tokens
    only_first_lab = torch.full_like(only_first, -100)
    only_first_lab[0] = only_first[0]
    examples = [
        (one_tok, one_lab),
        (cut, cut_lab),
        (empty, torch.full_like(empty, -100)),
        (only_first, only_first_lab),
    ]
    examples += make_examples(seed=3, n=2, vocab=vocab, max_len=width)
    result = per_example_sq_norms(model, *collate(examples, width=width))
    assert result[2][:4].tolist() == [1, width - 5, 0, 0]
    assert_matches(result, reference(model, examples), TOL[dtype])
    # A batch made only of empty rows: zeros, no NaN.
    sq, losses, n = per_example_sq_norms(model, *collate(examples[2:4]))
    assert sq.tolist() == losses.tolist() == [0.0, 0.0] and n.tolist() == [0, 0]


def test_train_mode_dropout_state_and_grads_restored():
    model = cached("gpt2", torch.float64)
    examples = make_examples(seed=11, n=4, vocab=model.config.vocab_size)
    ref = reference(model, examples)
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        result = per_example_sq_norms(model, *collate(examples))
        assert all(m.training for m in model.modules())
    finally:
        model.eval()
    assert_matches(result, ref, 1e-10)
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    per_example_sq_norms(model, *collate(examples))
    assert not any(m.training for m in model.modules())


def test_works_under_no_grad_and_frozen_adapter():
    model = build("gpt2", torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    examples = make_examples(seed=12, n=3, vocab=model.config.vocab_size)
    with torch.no_grad():
        result = per_example_sq_norms(model, *collate(examples))
    assert not any(p.requires_grad for p in model.parameters())
    assert_matches(result, reference(model, examples), 1e-10)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_two_adapters_select_by_name(kind):
    model = build(kind, torch.float64, adapters=("default", "other"))
    assert model.active_adapter == "default"
    examples = make_examples(seed=5, n=5, vocab=model.config.vocab_size)
    batch = collate(examples)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    other = per_example_sq_norms(model, *batch, adapter_name="other")
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    default = per_example_sq_norms(model, *batch)
    assert_matches(other, reference(model, examples, "other"), 1e-10)
    assert_matches(default, reference(model, examples, "default"), 1e-10)
    assert not torch.allclose(other[0], default[0], rtol=1e-3)
    explicit = per_example_sq_norms(model, *batch, adapter_name="default")
    torch.testing.assert_close(explicit[0], default[0], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_helpers():
    model = build("gpt2", torch.float32, adapters=("default", "other"))
    names = adapted_module_names(model)
    assert len(names) == 6 and sum(n.endswith("mlp.c_proj") for n in names) == 2
    assert adapted_module_names(model, "other") == names
    # Per layer: c_attn 4*(64+192), attn.c_proj 4*(64+64), mlp.c_proj 4*(256+64).
    expected = 2 * 4 * ((64 + 192) + (64 + 64) + (256 + 64))
    assert lora_parameter_count(model) == lora_parameter_count(model, "other") == expected
    with pytest.raises(ValueError):
        adapted_module_names(model, "missing")
