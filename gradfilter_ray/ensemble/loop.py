"""One ensemble member's training loop (pure torch: no Ray, no files).

Everything random is a function of (member seed, epoch): the batches (`batching.epoch_batches`) and the dropout
stream are re-seeded at the start of every epoch, so a member resumed from its epoch-e checkpoint continues exactly
as an uninterrupted run would. Progress and each epoch's padding efficiency leave through callbacks, so the caller
decides where they are printed or written.

`cfg.packing` changes only how a batch is laid out: the same rows of the same batch, packed padding-free into a few
sequences (`packing.py`) instead of padded to the longest row; the loss is the same per-example mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gradfilter_ray.config import EnsembleConfig
from gradfilter_ray.data.prompt import collate_rows
from gradfilter_ray.ensemble.batching import (
    PaddingStats,
    epoch_batches,
    epoch_seed,
    packed_padding_stats,
    padding_stats,
)
from gradfilter_ray.ensemble.packing import pack_batch, pack_rows, packed_forward, packed_row_losses
from gradfilter_ray.losses import per_example_losses, scored_window


@dataclass
class TokenRows:
    """Trainable rows of one corpus, sorted by id (so the order, and everything seeded from it, is stable)."""

    ids: np.ndarray  # [N] int64
    input_ids: list[np.ndarray]  # N arrays of int32 token ids
    labels_at: np.ndarray  # [N] per row: its first labelled position, or its flat [start, stop) label spans

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        """[N] tokens per row (what a batch is padded to the longest of)."""
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    @classmethod
    def from_columns(cls, ids, input_ids, labels_at) -> TokenRows:
        order = np.argsort(np.asarray(ids), kind="stable")
        at = np.empty(len(order), dtype=object)
        at[:] = [labels_at[i] for i in order]
        return cls(
            ids=np.asarray(ids, dtype=np.int64)[order],
            input_ids=[np.asarray(input_ids[i], dtype=np.int32) for i in order],
            labels_at=at,
        )


EpochCallback = Callable[[int, torch.nn.Module, torch.optim.Optimizer, list[float]], None]
# Called before an epoch's first step with that epoch's padding (the batches are fixed by then).
EpochPlannedCallback = Callable[[int, PaddingStats], None]
# Called after every optimiser step with the number of rows it trained on.
RowsDoneCallback = Callable[[int], None]


def train_member(
    model: torch.nn.Module,
    rows: TokenRows,
    cfg: EnsembleConfig,
    member_seed: int,
    device: torch.device,
    pad_id: int,
    on_epoch_end: EpochCallback,
    start_epoch: int = 1,
    optimizer_state: dict | None = None,
    stop_after_epoch: int | None = None,
    on_epoch_planned: EpochPlannedCallback | None = None,
    on_rows_done: RowsDoneCallback | None = None,
) -> None:
    """Train the model's trainable (LoRA) parameters for epochs start_epoch..cfg.epochs, calling back per epoch.

    `stop_after_epoch` ends training early as a preemption would (resume then continues from that epoch).
    Batches follow `cfg.batching` (see `batching.epoch_batches`); with `cfg.packing` each batch's rows are packed
    padding-free (`packing.py`), and `on_epoch_planned` gets the packed layout's computed tokens.
    Loss: mean over the batch of each example's mean response-token cross-entropy (the same per-example loss whose
    gradient norms are measured later). bf16 autocast on CUDA when precision is auto/bfloat16; fp32 on CPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (no LoRA adapter attached?)")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    use_bf16 = device.type == "cuda" and cfg.precision in ("auto", "bfloat16")
    model.train()
    last_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    lengths = rows.lengths()
    for epoch in range(start_epoch, last_epoch + 1):
        torch.manual_seed(epoch_seed(member_seed, epoch))  # dropout stream
        batches = epoch_batches(lengths, cfg, member_seed, epoch)
        # packing: each batch's bins (positions within the batch), fixed before the first step like the batches
        layouts = [pack_rows(lengths[picked]) for picked in batches] if cfg.packing else None
        if on_epoch_planned is not None:
            if layouts is None:
                on_epoch_planned(epoch, padding_stats(lengths, batches))
            else:
                packed_rows = [[picked[b] for b in bins] for picked, bins in zip(batches, layouts)]
                on_epoch_planned(epoch, packed_padding_stats(lengths, packed_rows))
        step_losses: list[float] = []
        for step, picked in enumerate(batches):
            if layouts is None:
                batch = collate_rows([rows.input_ids[i] for i in picked], rows.labels_at[picked], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                window = scored_window(batch["labels"])
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=window
                    ).logits
                losses, _ = per_example_losses(logits, batch["labels"][:, -window:])
            else:
                packed = pack_batch(
                    [rows.input_ids[i] for i in picked], rows.labels_at[picked], pad_id, bins=layouts[step]
                ).to(device)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits, keep = packed_forward(model, packed)
                losses, _ = packed_row_losses(logits, packed, keep)
            loss = losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_losses.append(float(loss.detach()))
            if on_rows_done is not None:
                on_rows_done(len(picked))
        on_epoch_end(epoch, model, optimizer, step_losses)
