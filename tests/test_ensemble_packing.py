"""Padding-free packing of an ensemble batch (`ensemble.packing`): the bin packing, the packed layout (positions,
block-diagonal causal mask, labels), and that the packed batch gives the padded batch's per-example losses and LoRA
gradients (fp64, dropout off) on the bundled pretrained stories260K and on a tiny GPT-2, that a member trained with
packing ends where the padded one does, and that a model which cannot take the 4D mask is refused."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gradfilter_ray.config import EnsembleConfig, ModelSpec, load
from gradfilter_ray.data.prompt import collate_rows
from gradfilter_ray.ensemble.batching import epoch_batches, packed_padding_stats, padding_stats
from gradfilter_ray.ensemble.loop import TokenRows, train_member
from gradfilter_ray.ensemble.packing import (
    PAD_SEGMENT,
    check_packable,
    mask_dtype,
    pack_batch,
    pack_rows,
    packed_losses,
)
from gradfilter_ray.lora import attach_lora
from gradfilter_ray.losses import IGNORE_INDEX, per_example_losses, scored_window
from gradfilter_ray.models import load_causal_lm

TINY_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny_gpt2.yaml"
STORIES = ModelSpec(name_or_path="bundled:stories260K")
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # GPT-2's own dropout is on in train()
CFG = EnsembleConfig(lora_rank=4, lora_alpha=8, lora_dropout=0.0, batch_size=6, learning_rate=0.01, epochs=2)
EQUAL_ATOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: a second thread only spins (several times the CPU, no faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gpt2_spec() -> ModelSpec:
    spec = load(TINY_CONFIG).proxy.model
    return replace(spec, build_from_config={**spec.build_from_config, **NO_DROPOUT})


def lora_model(spec: ModelSpec, dtype=torch.float64, seed=3, attn=None):
    base = load_causal_lm(spec, dtype)
    if attn is not None:
        base.set_attn_implementation(attn)
    model = attach_lora(base, CFG, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 at init would make every A-gradient 0 and hide a wrong layout
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator, dtype=torch.float64))
    model.train()
    return model


def batch_rows(vocab: int, lengths=(5, 60, 17, 3, 41, 9, 22, 12), seed=0):
    """Rows of very different lengths: Alpaca-like (labelled from the middle), a chat row with three answer spans, a
    row labelled from its first token, and one with no labelled token at all."""
    rng = np.random.default_rng(seed)
    input_ids = [rng.integers(3, vocab, n).astype(np.int32) for n in lengths]
    labels_at = np.empty(len(lengths), dtype=object)
    labels_at[:] = [n // 2 for n in lengths]
    labels_at[4] = np.array([5, 12, 20, 30, 35, 41], dtype=np.int64)  # multi-span (chat) row, 41 tokens
    labels_at[7] = 0  # labelled from its first token: never predicted (nor from the previous packed row)
    labels_at[3] = 3  # no labelled token: loss 0
    return input_ids, labels_at


def padded_losses(model, input_ids, labels_at, pad_id=0):
    """The loop's padded path, line for line."""
    batch = collate_rows(input_ids, labels_at, pad_id)
    window = scored_window(batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=window).logits
    return per_example_losses(logits, batch["labels"][:, -window:])


def lora_params(model):
    return [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]


# ---------------------------------------------------------------------------------------------------------------
# Bin packing and layout


def test_pack_rows_holds_every_row_once_within_the_bound_deterministically():
    rng = np.random.default_rng(0)
    for trial in range(200):
        lengths = rng.integers(0 if trial % 7 == 0 else 1, 300, rng.integers(1, 40))
        bound = None if trial % 2 else int(lengths.max()) + int(rng.integers(0, 200))
        bins = pack_rows(lengths, bound)
        placed = np.concatenate(bins)
        assert sorted(placed.tolist()) == list(range(len(lengths)))
        limit = lengths.max() if bound is None else bound
        assert all(lengths[b].sum() <= limit for b in bins)
        assert all(len(b) for b in bins)
        again = pack_rows(lengths.copy(), bound)
        assert len(again) == len(bins) and all(np.array_equal(a, b) for a, b in zip(again, bins))
    # first-fit-decreasing: longest first, ties in batch order, each into the first bin it fits
    assert [b.tolist() for b in pack_rows([5, 60, 17, 3, 41, 9, 22, 12])] == [[1], [4, 2], [6, 7, 5, 0, 3]]
    assert [b.tolist() for b in pack_rows([4, 4, 4, 4], 8)] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="never split"):
        pack_rows([10, 20], 15)


def test_packed_layout_positions_mask_and_labels():
    input_ids, labels_at = batch_rows(512)
    packed = pack_batch(input_ids, labels_at, pad_id=0)
    padded = collate_rows(input_ids, labels_at, 0)["labels"]
    seqs, length = packed.shape
    assert length == max(len(x) for x in input_ids) and seqs == 3 and packed.rows == len(input_ids)
    seg, pos = packed.segments, packed.position_ids
    for row, ids in enumerate(input_ids):
        s, at = torch.nonzero(seg == row, as_tuple=True)
        assert len(set(s.tolist())) == 1 and torch.equal(at, at[0] + torch.arange(len(ids)))  # one contiguous run
        assert torch.equal(pos[s, at], torch.arange(len(ids)))  # positions restart at 0 for each row
        assert torch.equal(packed.input_ids[s, at], torch.as_tensor(ids, dtype=torch.long))
        want = padded[row, : len(ids)].clone()
        want[0] = IGNORE_INDEX
        assert torch.equal(packed.labels[s, at], want)
    assert (seg == PAD_SEGMENT).any()  # the shorter bins have a pad tail
    assert torch.all(packed.labels[seg == PAD_SEGMENT] == IGNORE_INDEX)
    for dtype in (torch.float32, torch.bfloat16):
        mask = packed.attention_mask(dtype)
        assert mask.shape == (seqs, 1, length, length) and mask.dtype == dtype
        allowed = mask[:, 0] == 0
        assert torch.all(mask[:, 0][~allowed] == torch.finfo(dtype).min)
        i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
        assert torch.equal(allowed, (seg[:, :, None] == seg[:, None, :]) & (j <= i))
        # the pad tail is never seen by a row; it sees only itself (a fully masked query would be NaN in eager's
        # fp32 softmax of an fp64 mask, and P @ V spreads it as 0 * NaN)
        pad = seg == PAD_SEGMENT
        assert not (allowed & pad[:, None, :] & ~pad[:, :, None]).any()
        assert not (allowed & pad[:, :, None] & ~pad[:, None, :]).any()


def test_packed_padding_stats_count_sequences_times_their_length():
    lengths = np.array([5, 60, 17, 3, 41, 9, 22, 12, 30, 30])
    batches = [np.arange(8), np.array([8, 9])]
    packed = [[b[bins] for bins in pack_rows(lengths[b])] for b in batches]
    stats = packed_padding_stats(lengths, packed)
    assert stats.real_tokens == padding_stats(lengths, batches).real_tokens == lengths.sum()
    assert stats.computed_tokens == 3 * 60 + 1 * 60  # [60] [41 17] [22 12 9 5 3]; then [30 30] in one bin of 60


# ---------------------------------------------------------------------------------------------------------------
# Same losses and gradients as the padded batch


def assert_packed_matches_padded(model, vocab, single_rows=(1, 4, 7, 0)):
    input_ids, labels_at = batch_rows(vocab)
    params = lora_params(model)
    want, want_n = padded_losses(model, input_ids, labels_at)
    got, got_n = packed_losses(model, pack_batch(input_ids, labels_at, pad_id=0))
    assert torch.equal(got_n, want_n) and want_n[3] == 0 and want_n[4] == 7 + 10 + 6
    diffs = {"loss": float((got - want).detach().abs().max())}
    assert diffs["loss"] < EQUAL_ATOL, diffs
    for name, index in [("batch", None), *[(f"row{r}", r) for r in single_rows]]:
        pick = (lambda x: x.mean()) if index is None else (lambda x, r=index: x[r])
        g_want = torch.autograd.grad(pick(want), params, retain_graph=True)
        g_got = torch.autograd.grad(pick(got), params, retain_graph=True)
        scale = max(float(g.abs().max()) for g in g_want)
        assert scale > 1e-3  # random B: the A-gradients are not all zero
        diffs[name] = max(float((a - b).abs().max()) for a, b in zip(g_got, g_want))
        assert diffs[name] < EQUAL_ATOL * max(1.0, scale), (name, diffs)
    print(f"max abs differences packed vs padded: {diffs}")
    return diffs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_stories260k_packed_losses_and_gradients_equal_padded(attn):
    model = lora_model(STORIES, attn=attn)
    assert model.config._attn_implementation == attn
    assert_packed_matches_padded(model, vocab=512)


@pytest.mark.slow
def test_tiny_gpt2_packed_losses_and_gradients_equal_padded():
    model = lora_model(gpt2_spec())
    assert model.config._attn_implementation == "sdpa"
    assert_packed_matches_padded(model, vocab=model.config.vocab_size)


def test_bf16_autocast_uses_a_bf16_mask_and_stays_close_to_padded():
    model = lora_model(STORIES, dtype=torch.float32)
    input_ids, labels_at = batch_rows(512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mask_dtype(model, "cpu") == torch.bfloat16
        want, _ = padded_losses(model, input_ids, labels_at)
        got, _ = packed_losses(model, pack_batch(input_ids, labels_at, pad_id=0))
    assert mask_dtype(model, "cpu") == torch.float32
    assert torch.isfinite(got).all()
    got.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in lora_params(model))
    assert torch.allclose(got.float(), want.float(), atol=0.05, rtol=0.02)  # bf16 rounding (~9e-3 seen)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def token_rows(n=30, seed=1):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 70, n)
    lengths[:3] = [120, 3, 95]
    input_ids = [rng.integers(3, 512, length).astype(np.int32) for length in lengths]
    labels_at = [int(length) // 2 for length in lengths]
    labels_at[5] = np.array([1, 3, 6, min(9, int(lengths[5]))], dtype=np.int64)  # a chat row
    return TokenRows.from_columns(np.arange(n), input_ids, labels_at)


def train_one_epoch(packing: bool, rows):
    model = lora_model(STORIES)
    planned, losses, end = {}, [], {}
    cfg = replace(CFG, packing=packing)
    train_member(
        model,
        rows,
        cfg,
        11,
        torch.device("cpu"),
        0,
        lambda e, m, o, step_losses: (losses.extend(step_losses), end.update(lora_state(m))),
        stop_after_epoch=1,
        on_epoch_planned=planned.__setitem__,
    )
    return end, losses, planned[1]


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_a_member_trained_with_packing_ends_where_the_padded_one_does():
    rows = token_rows()
    padded_state, padded_steps, padded_plan = train_one_epoch(False, rows)
    packed_state, packed_steps, packed_plan = train_one_epoch(True, rows)
    assert len(packed_steps) == len(padded_steps) == len(epoch_batches(rows.lengths(), CFG, 11, 1))
    assert max(abs(a - b) for a, b in zip(packed_steps, padded_steps)) < 1e-10
    moved = max(float((padded_state[k] - lora_model(STORIES).state_dict()[k]).abs().max()) for k in padded_state)
    assert moved > 1e-3  # the epoch did train
    worst = max(float((packed_state[k] - padded_state[k]).abs().max()) for k in padded_state)
    print(f"max abs adapter difference after one epoch, packed vs padded: {worst:.3g}")
    assert worst < 1e-8
    assert packed_plan.real_tokens == padded_plan.real_tokens == int(rows.lengths().sum())
    assert packed_plan.computed_tokens < padded_plan.computed_tokens
    assert padded_plan == padding_stats(rows.lengths(), epoch_batches(rows.lengths(), CFG, 11, 1))


def test_a_model_whose_attention_cannot_take_the_mask_is_refused():
    model = lora_model(STORIES, dtype=torch.float32, attn="flex_attention")
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'"):
        check_packable(model)
    with pytest.raises(ValueError, match="ensemble.packing"):
        train_member(model, token_rows(8), replace(CFG, packing=True), 0, torch.device("cpu"), 0, lambda *a: None)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        packed_losses(model, pack_batch(*batch_rows(512), pad_id=0))
