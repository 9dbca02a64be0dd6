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

from gradfilter_ray.data.prompt import collate_rows, label_start, tokenize_batch
from gradfilter_ray.finetune.ds_config import TrainPlan, epoch_positions


@dataclass
class SubsetRows:
    input_ids: Sequence  # row i's token ids: lists, or PackedRows (the shared copy read back)
    label_starts: np.ndarray  # [N] int64
    rows_in: int
    rows_no_response_tokens: int  # dropped: the prompt fills max_length

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_subset(tokenizer, table: pa.Table, max_length: int) -> SubsetRows:
    """Alpaca rows (instruction, input, output) -> trainable token rows; rows with no response token are counted
    and dropped (their loss would be 0/0)."""
    examples = tokenize_batch(
        tokenizer,
        [str(x) for x in table["instruction"].to_pylist()],
        [str(x or "") for x in table["input"].to_pylist()],
        [str(x) for x in table["output"].to_pylist()],
        max_length,
    )
    kept = [ex for ex in examples if ex.n_response_tokens > 0]
    return SubsetRows(
        input_ids=[ex.input_ids for ex in kept],
        label_starts=np.asarray([label_start(ex) for ex in kept], dtype=np.int64),
        rows_in=len(examples),
        rows_no_response_tokens=len(examples) - len(kept),
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
            batch = collate_rows([rows.input_ids[i] for i in micro], rows.label_starts[micro], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimiser only at the accumulation boundary
            micro_losses.append(float(loss.detach().float()))
        if on_step(step, mean_across_workers(float(np.mean(micro_losses)), device)) and step + 1 < plan.total_steps:
            return False
    return True
