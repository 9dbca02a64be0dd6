"""One ensemble member's training loop (pure torch: no Ray, no files).

Everything random is a function of (member seed, epoch): the data order and the dropout stream are re-seeded
at the start of every epoch, so a member resumed from its epoch-e checkpoint continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gradfilter_ray.config import EnsembleConfig
from gradfilter_ray.data.prompt import collate_rows
from gradfilter_ray.losses import per_example_losses, scored_window


@dataclass
class TokenRows:
    """Trainable rows of one corpus, sorted by id (so the order, and everything seeded from it, is stable)."""

    ids: np.ndarray  # [N] int64
    input_ids: list[np.ndarray]  # N arrays of int32 token ids
    label_starts: np.ndarray  # [N] first labelled position per row

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_columns(cls, ids, input_ids, label_starts) -> TokenRows:
        order = np.argsort(np.asarray(ids), kind="stable")
        return cls(
            ids=np.asarray(ids, dtype=np.int64)[order],
            input_ids=[np.asarray(input_ids[i], dtype=np.int32) for i in order],
            label_starts=np.asarray(label_starts, dtype=np.int64)[order],
        )


def epoch_seed(member_seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([member_seed, epoch]).generate_state(1)[0])


def epoch_order(n: int, member_seed: int, epoch: int) -> np.ndarray:
    """This member's permutation of the rows for this epoch (the same on every resume)."""
    return np.random.default_rng(epoch_seed(member_seed, epoch)).permutation(n)


EpochCallback = Callable[[int, torch.nn.Module, torch.optim.Optimizer, list[float]], None]


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
) -> None:
    """Train the model's trainable (LoRA) parameters for epochs start_epoch..cfg.epochs, calling back per epoch.

    `stop_after_epoch` ends training early as a preemption would (resume then continues from that epoch).
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
    for epoch in range(start_epoch, last_epoch + 1):
        torch.manual_seed(epoch_seed(member_seed, epoch))  # dropout stream
        order = epoch_order(len(rows), member_seed, epoch)
        step_losses: list[float] = []
        for start in range(0, len(order), cfg.batch_size):
            picked = order[start : start + cfg.batch_size]
            batch = collate_rows([rows.input_ids[i] for i in picked], rows.label_starts[picked], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            window = scored_window(batch["labels"])
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=window
                ).logits
            losses, _ = per_example_losses(logits, batch["labels"][:, -window:])
            loss = losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_losses.append(float(loss.detach()))
        on_epoch_end(epoch, model, optimizer, step_losses)
