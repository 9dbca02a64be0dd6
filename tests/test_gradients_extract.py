"""The extraction core (`gradients.extract.extract_block`) without Ray, on a tiny GPT-2 built from its config with
the real GPT-2 tokenizer and 2M = 4 adapters loaded as the actor loads them: every norm and loss equals a
batch-size-1 plain-autograd reference, the IFD losses equal the frozen base computed directly, and the result does
not depend on batch size or row order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from gradfilter_ray.config import EnsembleConfig, ModelSpec, ProxyConfig
from gradfilter_ray.data.tokenized import tokenize_table
from gradfilter_ray.gradients.extract import GRADIENT_SCHEMA, adapter_name, extract_block
from gradfilter_ray.lora import attach_lora, load_adapters, save_adapter
from gradfilter_ray.models import load_causal_lm, load_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "gradfilter_ray" / "assets"
SPEC = ModelSpec(
    build_from_config={"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 128},
    tokenizer="bundled:gpt2",
)
PROXY = ProxyConfig(model=SPEC, max_length=96)
MEMBERS = 2
# Rows left without a response token: row 1 (a long prompt, as it comes) and row 3 (its instruction made long).
NO_RESPONSE_ROWS = (1, 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model with the 4 adapters in float64, the tokenised rows, the pad id)."""
    rows = json.loads((ASSETS / "data" / "alpaca_sample_1k.json").read_text())[:9]
    rows[3] = {**rows[3], "instruction": "word " * 100}
    table = pa.table(
        {
            "id": pa.array([7 * i + 2 for i in range(len(rows))], pa.int64()),
            **{c: [r[c] for r in rows] for c in ("instruction", "input", "output")},
        }
    )
    tokenizer = load_tokenizer(SPEC)
    tokens = tokenize_table(table, tokenizer, PROXY)
    ens = EnsembleConfig(members=MEMBERS, lora_rank=4, lora_alpha=8)
    folders = {}
    for m in range(MEMBERS):
        for i, checkpoint in enumerate(("early", "late")):
            name = adapter_name(m, checkpoint)
            model = attach_lora(load_causal_lm(SPEC, torch.float64), ens, seed=10 * m + i)
            gen = torch.Generator().manual_seed(10 * m + i)
            with torch.no_grad():  # lora_B starts at 0, which would zero every lora_A gradient
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
            folders[name] = tmp_path_factory.mktemp(name)
            save_adapter(model, folders[name])
    model = load_adapters(load_causal_lm(SPEC, torch.float64), folders)
    return model, tokens, tokenizer.pad_token_id


def run_core(setup, tokens=None, batch_size=3) -> pa.Table:
    model, all_tokens, pad_id = setup
    tokens = all_tokens if tokens is None else tokens
    return extract_block(
        model, tokens, members=MEMBERS, batch_size=batch_size, device=torch.device("cpu"), pad_id=pad_id
    )


def bs1_reference(model, ids: list[int], start, adapter: str) -> tuple[float, float]:
    """Batch size 1, unpadded, plain autograd over one adapter's lora_A/lora_B params, eval mode. `start`: the first
    labelled position, or a conversation's flat [start, stop) answer spans."""
    model.set_adapter(adapter)
    params = [p for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    try:
        input_ids = torch.tensor([ids])
        labels = torch.full_like(input_ids, -100)
        spans = [(start, len(ids))] if isinstance(start, int) else list(zip(start[0::2], start[1::2]))
        for lo, hi in spans:
            labels[0, lo:hi] = input_ids[0, lo:hi]
        if (labels[0, 1:] == -100).all():
            return 0.0, 0.0
        logits = model(input_ids=input_ids).logits[0]
        loss = F.cross_entropy(logits[:-1], labels[0, 1:], ignore_index=-100)
        grads = torch.autograd.grad(loss, params)
        return sum(g.double().pow(2).sum() for g in grads).item(), loss.item()
    finally:
        for p in params:
            p.requires_grad_(False)


def base_loss(model, ids: list[int], start) -> float:
    """The frozen base's mean loss over tokens start.. of one unpadded row, or over its flat [start, stop) spans
    (NaN when none is predicted)."""
    spans = [(start, len(ids))] if isinstance(start, int) else list(zip(start[0::2], start[1::2]))
    positions = [p for lo, hi in spans for p in range(max(lo, 1), hi)]
    if not positions or len(ids) < 2:
        return float("nan")
    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    at = torch.tensor(positions)
    return F.cross_entropy(logits[at - 1], torch.tensor(ids)[at]).item()


def test_every_norm_and_loss_equals_the_batch_size_1_reference(setup):
    model, tokens, _ = setup
    out = run_core(setup)
    assert out.schema == GRADIENT_SCHEMA and out["id"].to_pylist() == tokens["id"].to_pylist()
    rows = tokens.to_pylist()
    assert [i for i, r in enumerate(rows) if r["n_response_tokens"] == 0] == list(NO_RESPONSE_ROWS)
    for i, row in enumerate(rows):
        got = out.slice(i, 1).to_pylist()[0]
        assert got["n_tokens"] == len(row["input_ids"]) and got["n_response_tokens"] == row["n_response_tokens"]
        for m in range(MEMBERS):
            for checkpoint in ("early", "late"):
                sq, loss = bs1_reference(model, row["input_ids"], row["label_start"], adapter_name(m, checkpoint))
                assert got[f"sq_norm_{checkpoint}"][m] == pytest.approx(sq, rel=1e-9, abs=1e-300), (i, m)
                assert got[f"loss_{checkpoint}"][m] == pytest.approx(loss, rel=1e-9, abs=1e-300), (i, m)
        assert (got["sq_norm_late"][0] > 0) == (i not in NO_RESPONSE_ROWS)


def test_ifd_losses_equal_the_frozen_base_on_both_token_sequences(setup):
    model, tokens, _ = setup
    out = run_core(setup)
    for i, row in enumerate(tokens.to_pylist()):
        cond = base_loss(model, row["input_ids"], row["label_start"])
        uncond = base_loss(model, row["response_input_ids"], row["response_label_start"])
        np.testing.assert_allclose(out["ifd_loss_cond"][i].as_py(), cond, rtol=1e-9, equal_nan=True)
        np.testing.assert_allclose(out["ifd_loss_uncond"][i].as_py(), uncond, rtol=1e-9)
    assert all(np.isnan(out["ifd_loss_cond"][i].as_py()) for i in NO_RESPONSE_ROWS)


def test_the_result_does_not_depend_on_batch_size_or_row_order(setup):
    _, tokens, _ = setup
    first = run_core(setup)
    order = pa.array(np.arange(tokens.num_rows)[::-1])
    again = run_core(setup, tokens.take(order), batch_size=1).take(order)  # reversed back
    assert again["id"].equals(first["id"])
    for column in GRADIENT_SCHEMA.names[1:]:
        np.testing.assert_allclose(
            np.array(again[column].to_pylist(), dtype=float),
            np.array(first[column].to_pylist(), dtype=float),
            rtol=1e-10,
            equal_nan=True,
            err_msg=column,
        )


def test_multi_turn_conversations_equal_the_batch_size_1_reference(setup):
    """Conversations through a chat template (short ones: the test model holds 128 positions): the loss covers
    every answer turn, tool calls included (several spans a row), and batched norms, losses and IFD losses still
    equal the batch-size-1 autograd loop."""
    from test_data_chat_tokens import CHATML, TURNS

    model, _, pad_id = setup
    conversations = [
        json.dumps(TURNS),
        json.dumps(TURNS[1:3] + [{"role": "user", "content": "Spain?"}, {"role": "assistant", "content": "Madrid."}]),
        json.dumps(TURNS[1:3]),
        json.dumps(TURNS[:5]),
        json.dumps([{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1 2 3"}] * 3),
    ]
    table = pa.table(
        {
            "id": pa.array(range(len(conversations)), pa.int64()),
            "instruction": ["q"] * len(conversations),
            "input": [""] * len(conversations),
            "output": ["a"] * len(conversations),
            "conversation": conversations,
        }
    )
    chat = ProxyConfig(model=SPEC, max_length=128, template="chat", chat_template=CHATML)
    tokens = tokenize_table(table, load_tokenizer(SPEC), chat)
    rows = tokens.to_pylist()
    assert sum(len(r["loss_spans"]) > 2 for r in rows) >= 2  # rows with more than one answer under the loss
    assert all(r["skip_reason"] is None and r["n_response_tokens"] > 0 for r in rows)
    out = extract_block(model, tokens, members=MEMBERS, batch_size=3, device=torch.device("cpu"), pad_id=pad_id)
    for i, row in enumerate(rows):
        got = out.slice(i, 1).to_pylist()[0]
        assert got["n_response_tokens"] == row["n_response_tokens"]
        for m in range(MEMBERS):
            for checkpoint in ("early", "late"):
                sq, loss = bs1_reference(model, row["input_ids"], row["loss_spans"], adapter_name(m, checkpoint))
                assert got[f"sq_norm_{checkpoint}"][m] == pytest.approx(sq, rel=1e-9), (i, m)
                assert got[f"loss_{checkpoint}"][m] == pytest.approx(loss, rel=1e-9), (i, m)
        uncond = base_loss(model, row["response_input_ids"], row["response_label_start"])
        np.testing.assert_allclose(out["ifd_loss_uncond"][i].as_py(), uncond, rtol=1e-9)
        cond = base_loss(model, row["input_ids"], row["loss_spans"])  # every answer, given the dialogue
        np.testing.assert_allclose(out["ifd_loss_cond"][i].as_py(), cond, rtol=1e-9)
