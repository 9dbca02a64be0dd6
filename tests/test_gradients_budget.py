"""Bounded-memory extraction: token-budget batching, the chunked LM-head loss, and the norm kernel that reduces
per example during backward; every result equals the unbounded one (float64, to rounding) or an independent
reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from test_gradients_norms import assert_matches, build, cached, collate, make_examples, reference
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2LMHeadModel

from gradfilter_ray.config import EnsembleConfig, ModelSpec, ProxyConfig
from gradfilter_ray.data.tokenized import tokenize_table
from gradfilter_ray.gradients.batching import padded_tokens, token_budget_batches
from gradfilter_ray.gradients.extract import GRADIENT_SCHEMA, adapter_name, extract_block
from gradfilter_ray.gradients.head_loss import head_path
from gradfilter_ray.gradients.norms import per_example_sq_norms
from gradfilter_ray.lora import attach_lora, load_adapters, save_adapter
from gradfilter_ray.losses import per_example_losses, per_example_losses_from_hidden
from gradfilter_ray.models import load_causal_lm, load_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "gradfilter_ray" / "assets"
SPEC = ModelSpec(
    build_from_config={"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 128},
    tokenizer="bundled:gpt2",
)
MEMBERS = 1
RTOL = 1e-12  # float64: different batch shapes change BLAS blocking, so values agree to a few ulp, not bitwise


# ---------------------------------------------------------------------------------------------------------------
# A block as the extraction actor sees it (shared with test_gradients_oom)


def extraction_setup(folder: Path, n_rows: int = 12):
    """(PeftModel in float64 with MEMBERS x early/late random-B adapters, tokenised Alpaca rows, pad id)."""
    rows = json.loads((ASSETS / "data" / "alpaca_sample_1k.json").read_text())[:n_rows]
    rows[3] = {**rows[3], "instruction": "word " * 100}  # leaves no response token
    table = pa.table(
        {
            "id": pa.array([5 * i + 1 for i in range(len(rows))], pa.int64()),
            **{c: [r[c] for r in rows] for c in ("instruction", "input", "output")},
        }
    )
    tokenizer = load_tokenizer(SPEC)
    tokens = tokenize_table(table, tokenizer, ProxyConfig(model=SPEC, max_length=96))
    folders = {}
    for m in range(MEMBERS):
        for i, checkpoint in enumerate(("early", "late")):
            model = attach_lora(load_causal_lm(SPEC, torch.float64), EnsembleConfig(lora_rank=4), seed=10 * m + i)
            gen = torch.Generator().manual_seed(10 * m + i)
            with torch.no_grad():  # lora_B starts at 0, which would zero every lora_A gradient
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
            folders[adapter_name(m, checkpoint)] = folder / adapter_name(m, checkpoint)
            save_adapter(model, folders[adapter_name(m, checkpoint)])
    return load_adapters(load_causal_lm(SPEC, torch.float64), folders), tokens, tokenizer.pad_token_id


def run_block(setup, **kwargs) -> pa.Table:
    model, tokens, pad_id = setup
    return extract_block(model, tokens, members=MEMBERS, device=torch.device("cpu"), pad_id=pad_id, **kwargs)


def assert_same_block(got: pa.Table, want: pa.Table) -> None:
    assert got["id"].equals(want["id"])
    for column in GRADIENT_SCHEMA.names[1:]:
        np.testing.assert_allclose(
            np.array(got[column].to_pylist(), dtype=float),
            np.array(want[column].to_pylist(), dtype=float),
            rtol=RTOL,
            atol=0,
            equal_nan=True,
            err_msg=column,
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return extraction_setup(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # These models are tiny: on the 2 shared cores a second intra-op thread made a block ~10x slower, not faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Batching


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch_size,budget", [(4, None), (64, 100), (3, 60), (8, 1), (1, 500), (16, 257)])
def test_batches_respect_budget_cap_and_cover_every_row_once(seed, batch_size, budget):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 120, size=int(rng.integers(1, 60)))
    batches = token_budget_batches(lengths, batch_size, budget)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every row exactly once
    assert flat.tolist() == np.argsort(lengths, kind="stable").tolist()  # ascending length, ties in block order
    for rows in batches:
        assert 1 <= len(rows) <= batch_size
        if budget is not None and len(rows) > 1:
            assert padded_tokens(lengths[rows]) <= budget
    if budget is not None:  # greedy: a batch stops only when the next row would break the budget or the cap
        for rows, following in zip(batches, batches[1:]):
            grown = np.append(rows, following[0])
            assert len(grown) > batch_size or padded_tokens(lengths[grown]) > budget


def test_oversize_rows_go_alone_and_zero_length_rows_count_one_position():
    lengths = [5, 50, 6, 40, 7]
    assert [b.tolist() for b in token_budget_batches(lengths, 8, 20)] == [[0, 2], [4], [3], [1]]
    assert [b.tolist() for b in token_budget_batches([0, 0, 0], 8, 2)] == [[0, 1], [2]]
    assert padded_tokens([0, 0]) == 2 and padded_tokens([3, 9]) == 18
    with pytest.raises(ValueError):
        token_budget_batches(lengths, 0)


# ---------------------------------------------------------------------------------------------------------------
# Chunked LM-head loss


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_chunked_loss_equals_cross_entropy_values_and_gradients(chunk, with_bias):
    gen = torch.Generator().manual_seed(chunk)
    B, T, H, V = 4, 11, 6, 13
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    bias = torch.randn(V, generator=gen, dtype=torch.float64) if with_bias else None
    labels = torch.full((B, T), -100)
    labels[0, 2:] = torch.randint(0, V, (T - 2,), generator=gen)
    labels[1, 6:9] = torch.randint(0, V, (3,), generator=gen)  # ends early, like padding
    labels[3, 0] = 1  # a label at position 0 is never predicted: row 3 scores nothing
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)  # weights the rows differently

    losses, n = per_example_losses_from_hidden(hidden, labels, weight, bias, chunk)
    (grad,) = torch.autograd.grad((losses * upstream).sum(), hidden)
    ref_losses, ref_n = per_example_losses(F.linear(hidden, weight, bias), labels)
    (ref_grad,) = torch.autograd.grad((ref_losses * upstream).sum(), hidden)
    assert n.tolist() == ref_n.tolist() == [T - 2, 3, 0, 0]  # 9 scored positions: chunks of 2, 7 leave a remainder
    assert losses[2] == losses[3] == 0.0
    torch.testing.assert_close(losses, ref_losses, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)
    # by hand: row 1's mean cross-entropy of its 3 labelled tokens, each predicted from the position before
    logits = F.linear(hidden[1, 5:8], weight, bias)
    torch.testing.assert_close(losses[1], F.cross_entropy(logits, labels[1, 6:9]), rtol=1e-13, atol=0)


def test_chunked_loss_rounds_no_logit_of_a_bf16_model_unless_told_to_keep_its_dtype():
    """A pretrained LM's logits sit near -100, where bf16's spacing is 0.5: computed in float32 from the same bf16
    operands, the losses and the gradient that seeds every per-example norm carry no rounding of the logits."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 8, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(40, 8, generator=gen).to(torch.bfloat16)
    bias = (torch.randn(40, generator=gen) - 100.0).to(torch.bfloat16)
    labels = torch.randint(0, 40, (2, 9), generator=gen)
    exact_losses, _ = per_example_losses(F.linear(hidden.double(), weight.double(), bias.double()), labels)
    (exact_grad,) = torch.autograd.grad(exact_losses.sum(), hidden)
    results = {}
    for head_dtype in (torch.float32, None):
        losses, _ = per_example_losses_from_hidden(hidden, labels, weight, bias, 5, head_dtype)
        (grad,) = torch.autograd.grad(losses.sum(), hidden)
        assert losses.dtype == torch.float32 and grad.dtype == torch.bfloat16
        results[head_dtype] = (losses.double() - exact_losses).abs().max(), (grad.double() - exact_grad).abs().max()
    # the model's dtype: bf16 logits upcast, exactly what HF's loss computes
    hf_losses, _ = per_example_losses(F.linear(hidden, weight, bias), labels)
    kept, _ = per_example_losses_from_hidden(hidden.detach(), labels, weight, bias, 5, None)
    torch.testing.assert_close(kept, hf_losses, rtol=1e-6, atol=1e-6)
    (loss_err, grad_err), (kept_loss_err, kept_grad_err) = results[torch.float32], results[None]
    assert loss_err < 1e-4 and kept_loss_err > 100 * loss_err
    # both gradients are rounded to bf16 (hidden's dtype): that rounding alone is all grad_err may hold
    assert kept_grad_err > 1e-3 and kept_grad_err > 4 * grad_err
    with torch.no_grad():
        assert not per_example_losses_from_hidden(hidden.float().requires_grad_(), labels, weight.float())[0].grad_fn


class _LargestVocabTensor(TorchDispatchMode):
    """Records the largest number of rows of any tensor an op produces with a `vocab`-wide dimension."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab, self.hidden, self.rows = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (
                isinstance(t, torch.Tensor)
                and self.vocab in t.shape
                and sorted(t.shape) != sorted((self.vocab, self.hidden))
            ):
                self.rows = max(self.rows, t.numel() // self.vocab)  # (the head's weight is [vocab, hidden])
        return out


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_no_vocab_wide_tensor_exceeds_the_chunk_in_forward_or_backward(chunk):
    model = cached("gpt2", torch.float64)
    examples = make_examples(seed=21, n=8, vocab=model.config.vocab_size)
    batch = collate(examples)
    assert int((batch[2][:, 1:] != -100).sum()) > 3 * 16  # far more scored positions than any chunk
    assert head_path(model) is not None  # (its one-time probe computes a few positions of logits: not in the count)
    with _LargestVocabTensor(model.config.vocab_size, model.config.n_embd) as seen:
        result = per_example_sq_norms(model, *batch, loss_chunk_tokens=chunk)
    assert 0 < seen.rows <= chunk
    assert_matches(result, reference(model, examples), 1e-10)


# ---------------------------------------------------------------------------------------------------------------
# The norm kernel on the chunked loss


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_kernel_with_chunked_loss_equals_the_bs1_reference(kind, chunk):
    model = cached(kind, torch.float64)
    assert head_path(model) is not None  # the chunked path, not the fallback
    examples = make_examples(seed=30 + chunk, n=6, vocab=model.config.vocab_size)
    result = per_example_sq_norms(model, *collate(examples, width=30), loss_chunk_tokens=chunk)
    assert_matches(result, reference(model, examples), 1e-10)
    assert all(p.grad is None for p in model.parameters())  # no LoRA (or other) weight gradient is formed


def test_weight_shared_module_sums_its_calls_before_squaring():
    # One LLaMA decoder layer used twice per forward: its LoRA modules are called twice, and their gradient (what the
    # reference's autograd sums over both calls) is one G_i per example, not a sum of squares per call.
    model = build("llama", torch.float64)
    lm = model.get_base_model()
    lm.model.layers[1] = lm.model.layers[0]
    lm.config.use_cache = False  # the reference's forward: a KV cache would mix the shared layer's two calls
    examples = make_examples(seed=40, n=5, vocab=model.config.vocab_size)
    result = per_example_sq_norms(model, *collate(examples), loss_chunk_tokens=3)
    assert_matches(result, reference(model, examples), 1e-10)


class _DoubledLogitsGPT2(GPT2LMHeadModel):
    """A causal LM whose logits are not lm_head(hidden): only the probe can tell."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_models_whose_logits_are_not_the_head_fall_back_to_their_own_forward():
    from peft import get_peft_model
    from test_gradients_norms import _lora_cfg, _randomise

    torch.manual_seed(0)
    odd = _DoubledLogitsGPT2(build("gpt2", torch.float64).config).to(torch.float64)
    model = get_peft_model(odd, _lora_cfg("gpt2"))
    _randomise(model, "default", seed=3)
    examples = make_examples(seed=50, n=4, vocab=model.config.vocab_size)
    with pytest.warns(UserWarning, match="does not reproduce its logits"):
        assert head_path(model) is None
    assert_matches(per_example_sq_norms(model, *collate(examples)), reference(model, examples), 1e-10)

    softcapped = build("gpt2", torch.float64)
    softcapped.get_base_model().config.final_logit_softcapping = 30.0
    with pytest.warns(UserWarning, match="final_logit_softcapping"):
        assert head_path(softcapped) is None


def test_lora_on_the_head_falls_back():
    from peft import LoraConfig, get_peft_model

    base = build("gpt2", torch.float64).get_base_model()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn", "lm_head"]))
    with pytest.warns(UserWarning, match="not a plain Linear"):
        assert head_path(model) is None


# ---------------------------------------------------------------------------------------------------------------
# extract_block under a token budget


def test_a_token_budget_does_not_change_the_block(setup):
    _, tokens, _ = setup
    lengths = [len(x) for x in tokens["input_ids"].to_pylist()]
    unbounded = run_block(setup, batch_size=64)
    budget = 2 * max(lengths) - 1  # no two of the longest rows fit together; the longest rows go alone
    stats: dict = {}
    bounded = run_block(setup, batch_size=3, tokens_per_batch=budget, loss_chunk_tokens=7, stats=stats)
    assert_same_block(bounded, unbounded)
    plan = token_budget_batches(lengths, 3, budget)
    assert stats["batches"] == len(plan) > 3 and stats["oom_splits"] == 0
    assert stats["real_tokens"] == sum(lengths)
    assert stats["padded_tokens"] == sum(padded_tokens(np.array(lengths)[rows]) for rows in plan)
    assert max(padded_tokens(np.array(lengths)[rows]) for rows in plan if len(rows) > 1) <= budget


def test_on_a_bf16_model_lora_inputs_are_held_in_bf16_and_the_norms_are_bitwise_unchanged(monkeypatch):
    """peft runs adapters in fp32 on a bf16 base; holding lora_A's input at the base's width until backward halves
    the kernel's largest saved tensor and must change nothing (the fp32 copy was an exact upcast of bf16)."""
    from gradfilter_ray.config import EnsembleConfig, ModelSpec
    from gradfilter_ray.data.prompt import collate_rows
    from gradfilter_ray.gradients import norms
    from gradfilter_ray.lora import attach_lora, lora_layers
    from gradfilter_ray.models import load_causal_lm

    config = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "vocab_size": 300}
    spec = ModelSpec(build_from_config=config, tokenizer="bundled:gpt2")
    model = attach_lora(load_causal_lm(spec, torch.bfloat16), EnsembleConfig(lora_rank=4), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    narrow = norms.input_dtypes(lora_layers(model, "default"), "default")
    assert len(narrow) == 6 and set(narrow.values()) == {torch.bfloat16}  # 3 adapted modules x 2 layers, lora_A
    rng = np.random.default_rng(0)
    batch = collate_rows([rng.integers(0, 300, n) for n in (20, 30, 25)], [5, 10, 8], 0)
    held = norms.per_example_sq_norms(model, **batch)
    monkeypatch.setattr(norms, "input_dtypes", lambda layers, name: {})
    wide = norms.per_example_sq_norms(model, **batch)
    assert all(torch.equal(a, b) for a, b in zip(held, wide)) and bool((held[0] > 0).all())
