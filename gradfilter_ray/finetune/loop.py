"""Target fine-tuning loop (no Ray): tokenise a subset, then step a DeepSpeed engine through a TrainPlan.

The same Alpaca template and response-only labels as the proxy (gradfilter_ray/data/prompt.py); the loss is the
model's own token-mean cross-entropy over each micro-batch's response tokens, as the Alpaca/Superfiltering
training code computes it. The data order is a pure function of (seed, epoch), so a resumed run continues from
any optimiser step with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from gradfilter_ray.config import FinetuneConfig, ProxyConfig
from gradfilter_ray.data.prompt import collate_rows
from gradfilter_ray.data.tokenized import tokenize_table
from gradfilter_ray.finetune.ds_config import TrainPlan, epoch_positions


@dataclass
class SubsetRows:
    input_ids: Sequence  # row i's token ids: lists, or PackedRows (the shared copy read back)
    labels_at: np.ndarray  # [N] per row: its first labelled position, or its flat [start, stop) label spans
    rows_in: int
    rows_no_response_tokens: int  # dropped: nothing left to train on (the prompt fills max_length, or no form)

    def __len__(self) -> int:
        return len(self.input_ids)


def prompt_format(finetune: FinetuneConfig) -> ProxyConfig:
    """The target's tokenisation settings in the shape the tokens stage reads them (one tokenisation for both)."""
    return ProxyConfig(
        model=finetune.model,
        max_length=finetune.max_length,
        template=finetune.template,
        chat_template=finetune.chat_template,
        train_tool_calls=finetune.train_tool_calls,
    )


def tokenize_subset(tokenizer, table: pa.Table, finetune: FinetuneConfig) -> SubsetRows:
    """Canonical rows (instruction, input, output, and conversation when present) -> trainable token rows, in the
    target's prompt format (`data.tokenized`, as the proxy's tokens); rows with no labelled token are counted and
    dropped (their loss would be 0/0)."""
    if "id" not in table.column_names:
        table = table.append_column("id", pa.array(np.arange(table.num_rows), pa.int64()))
    tokens = tokenize_table(table, tokenizer, prompt_format(finetune))
    keep = np.asarray(tokens["n_response_tokens"]) > 0
    kept = tokens.filter(pa.array(keep))
    at = np.empty(kept.num_rows, dtype=object)
    at[:] = list(kept["loss_spans"].to_numpy(zero_copy_only=False))
    return SubsetRows(
        input_ids=[np.asarray(x, dtype=np.int32) for x in kept["input_ids"].to_numpy(zero_copy_only=False)],
        labels_at=at,
        rows_in=tokens.num_rows,
        rows_no_response_tokens=int((~keep).sum()),
    )


def sum_across_workers(value: float, device: torch.device) -> float:
    """The sum of `value` over all workers (a collective: every worker must call it), or `value` alone."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item())


def mean_across_workers(value: float, device: torch.device) -> float:
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return sum_across_workers(value, device) / world


def train_steps(
    engine,
    rows: SubsetRows,
    plan: TrainPlan,
    seed: int,
    rank: int,
    pad_id: int,
    device: torch.device,
    start_step: int,
    on_step: Callable[[int, float], bool],
) -> bool:
    """Optimiser steps start_step..plan.total_steps-1; `on_step(step, loss)` after each, with the loss averaged
    over this step's micro-batches and all workers (every worker calls it: it may report to Ray); it returns True
    to stop early. Returns whether every step ran."""
    engine.train()
    positions = None
    for step in range(start_step, plan.total_steps):
        epoch, within = divmod(step, plan.steps_per_epoch)
        if positions is None or within == 0:
            positions = epoch_positions(plan, seed, epoch)
        micro_losses = []
        for micro in positions[within, rank]:  # [accumulation, micro_batch]
            batch = collate_rows([rows.input_ids[i] for i in micro], rows.labels_at[micro], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimiser only at the accumulation boundary
            micro_losses.append(float(loss.detach().float()))
        if on_step(step, mean_across_workers(float(np.mean(micro_losses)), device)) and step + 1 < plan.total_steps:
            return False
    return True
