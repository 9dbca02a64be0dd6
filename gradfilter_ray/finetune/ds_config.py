"""Target fine-tuning plan (pure): step counts, the learning-rate schedule and the DeepSpeed config.

The ZeRO templates ship as JSON beside this file (zero2.json, zero3.json) so users can read and diff them; the
fields that depend on the run (micro batch, accumulation, bf16, offload) are filled here. Not named deepspeed.py:
it would shadow the package.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradfilter_ray.config import FinetuneConfig, accumulation_steps

TEMPLATES = {2: Path(__file__).with_name("zero2.json"), 3: Path(__file__).with_name("zero3.json")}


@dataclass(frozen=True)
class TrainPlan:
    """How n examples become optimiser steps on `world_size` workers."""

    n_examples: int
    world_size: int
    micro_batch_size: int  # examples per worker per forward
    accumulation_steps: int  # forwards per worker per optimiser step
    steps_per_epoch: int
    epochs: int
    warmup_steps: int

    @property
    def global_batch(self) -> int:
        """Examples per optimiser step across all workers (the effective batch actually used)."""
        return self.micro_batch_size * self.world_size * self.accumulation_steps

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def plan_training(n_examples: int, cfg: FinetuneConfig, world_size: int) -> TrainPlan:
    """Accumulation = ceil(effective / (micro x workers)), so the effective batch is met or exceeded, never
    undershot; an epoch's last step is filled up by wrapping around the epoch's order (as DistributedSampler
    pads), so every worker runs the same number of forwards, which DeepSpeed's collectives need."""
    if n_examples < 1:
        raise ValueError("cannot plan training on an empty subset")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    accumulation = accumulation_steps(cfg.effective_batch_size, cfg.micro_batch_size, world_size)
    global_batch = cfg.micro_batch_size * world_size * accumulation
    steps_per_epoch = math.ceil(n_examples / global_batch)
    total = steps_per_epoch * cfg.epochs
    return TrainPlan(
        n_examples=n_examples,
        world_size=world_size,
        micro_batch_size=cfg.micro_batch_size,
        accumulation_steps=accumulation,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.epochs,
        warmup_steps=math.ceil(cfg.warmup_ratio * total),
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate before optimiser step `step` (0-based): linear warm-up from 1/warmup
    to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps` (the HF/Alpaca `cosine` schedule)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def checkpoint_due(steps_done: int, plan: TrainPlan, policy: str, every_steps: int = 0) -> bool:
    """Whether to write a resumable checkpoint after `steps_done` optimiser steps under `finetune.checkpoint`:
    never with `none`, at each epoch's end with `epoch`, every `every_steps` with `steps`; never after the last
    step, where the final save follows at once (a full ZeRO state is 12-14 bytes a parameter, written for
    nothing)."""
    if steps_done >= plan.total_steps or policy == "none":
        return False
    if policy == "epoch":
        return steps_done % plan.steps_per_epoch == 0
    if policy == "steps":
        if every_steps < 1:
            raise ValueError(f"checkpoint: steps needs every_steps >= 1, got {every_steps}")
        return steps_done % every_steps == 0
    raise ValueError(f"unknown checkpoint policy {policy!r} (none, epoch or steps)")


def checkpoint_steps(plan: TrainPlan, policy: str, every_steps: int = 0) -> list[int]:
    """The optimiser steps after which `checkpoint_due` writes a checkpoint, over the whole plan."""
    return [s for s in range(1, plan.total_steps + 1) if checkpoint_due(s, plan, policy, every_steps)]


def epoch_positions(plan: TrainPlan, seed: int, epoch: int) -> np.ndarray:
    """Example positions for one epoch, [steps_per_epoch, world_size, accumulation, micro]: a seeded permutation,
    wrapped around to fill the last step. Worker r takes [:, r]; every worker sees a disjoint share."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(plan.n_examples)
    slots = plan.steps_per_epoch * plan.global_batch
    order = np.resize(order, slots)  # np.resize repeats the array to fill
    return order.reshape(
        plan.steps_per_epoch, plan.accumulation_steps, plan.world_size, plan.micro_batch_size
    ).swapaxes(1, 2)


def use_cpu_adam(cfg: FinetuneConfig, prebuilt: bool) -> bool:
    """Whether the offloaded optimiser step runs DeepSpeed's CPU Adam (vectorised, one thread per CPU of the
    worker: several times torch's AdamW on CPU) rather than torch's AdamW: `always` (it JIT-compiles where
    it was not prebuilt), `auto` when the op was prebuilt, `never`; only with offload_optimizer."""
    if not cfg.offload_optimizer:
        return False
    return cfg.cpu_adam == "always" or (cfg.cpu_adam == "auto" and prebuilt)


def deepspeed_config(cfg: FinetuneConfig, plan: TrainPlan, bf16: bool, cpu_adam: bool = False) -> dict:
    """The ZeRO template for cfg.zero_stage with the run-dependent fields filled in; `cpu_adam` as `use_cpu_adam`
    decided (the worker builds the matching optimiser)."""
    config = json.loads(TEMPLATES[cfg.zero_stage].read_text())
    config["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    config["gradient_accumulation_steps"] = plan.accumulation_steps
    config["train_batch_size"] = plan.global_batch
    config["bf16"] = {"enabled": bool(bf16)}
    if bf16:
        # bf16 keeps 8 bits of mantissa: summed over many micro-batches and reduced across ranks in bf16, small
        # gradients vanish. Accumulate and all-reduce in fp32 (DeepSpeed accepts this with ZeRO 2 and 3).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    zero = config["zero_optimization"]
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bf16}
        # DeepSpeed insists on its own CPU optimiser under offload unless told that torch's AdamW is intended.
        config["zero_force_ds_cpu_optimizer"] = bool(cpu_adam)
    else:
        zero.pop("offload_optimizer", None)
    if cfg.zero_stage == 3 and not cfg.offload_optimizer:
        zero.pop("offload_param", None)
    return config
