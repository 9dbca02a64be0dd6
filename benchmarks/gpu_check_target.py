"""The target step of the GPU check (gpu_check.py): fine-tune a ~1B LLaMA-shaped model with DeepSpeed ZeRO-3
through the finetune stage's Ray-free cores, write one resumable checkpoint, save the model as the stage does, load it
back and generate from it.

What runs is the finetune worker's path with Ray taken out: `ds_config.plan_training` / `deepspeed_config` (bf16
with fp32 gradient accumulation and communication on the GPU), `model.build_trainable` from a `LlamaConfig` (TinyLlama
1.1B's shape, random init), torch AdamW with the stage's warm-up/cosine schedule, `deepspeed.initialize` in one
process (world size 1: no gradient communication is measured), `loop.train_steps`, `engine.save_checkpoint`, then
`engine._zero3_consolidated_16bit_state_dict()` and `model.save_merged` for the final folder (what evaluation reads).

The rows are synthetic: a fixed set of full-length rows of token ids drawn from a Zipf distribution over 2,000 ids,
repeated every epoch, so a working optimiser step must bring the loss down from ln(vocab) quickly. Every row has
`seq_len` tokens (no padding) and its response starts a quarter of the way in; tokens/s counts every position of
the forward (prompt included), which is what the compute scales with. The first `timed_from_step` optimiser steps
(allocator, kernel selection) are left out of the rates.
"""

from __future__ import annotations

import gc
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# Everything else is imported where it is used: gpu_check.py reads the shapes below before its preflight has tried
# the imports (a machine without DeepSpeed or transformers still gets a JSON saying so).
if TYPE_CHECKING:
    import torch

    from gradfilter_ray.config import FinetuneConfig
    from gradfilter_ray.finetune.loop import SubsetRows

DS_TAG = "ds"  # the finetune stage's checkpoint tag
ZIPF_IDS = 2_000
TOKENIZER = "bundled:stories260K"  # LLaMA's tokenizer format, offline; its 512 ids lie inside any LLaMA vocab


@dataclass(frozen=True)
class TargetShape:
    llama: dict  # LlamaConfig fields
    rows: int  # distinct rows, repeated every epoch
    seq_len: int
    micro_batch: int
    effective_batch: int
    epochs: int
    learning_rate: float
    timed_from_step: int
    gen_batches: tuple[int, ...]
    max_new_tokens: int
    max_prompt_tokens: int


TINYLLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
GPU_TARGET = TargetShape(
    llama=TINYLLAMA_1B,
    rows=16,
    seq_len=512,
    micro_batch=4,
    effective_batch=8,  # accumulation 2: the accumulation boundary is exercised
    epochs=10,  # 20 optimiser steps, 16 of them timed
    learning_rate=3e-4,
    timed_from_step=4,
    gen_batches=(8, 16, 32),  # 16 is the shipped configs' evaluation.batch_size
    max_new_tokens=128,
    max_prompt_tokens=256,
)
SMOKE_TARGET = TargetShape(
    llama={
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 512,
        "max_position_embeddings": 256,
    },
    rows=8,
    seq_len=64,
    micro_batch=2,
    effective_batch=4,
    epochs=4,
    learning_rate=3e-3,
    timed_from_step=2,
    gen_batches=(2, 4),
    max_new_tokens=8,
    max_prompt_tokens=64,
)


def finetune_config(shape: TargetShape, device: torch.device) -> FinetuneConfig:
    from gradfilter_ray.config import FinetuneConfig, ModelSpec

    return FinetuneConfig(
        model=ModelSpec(build_from_config={"model_type": "llama", **shape.llama}, tokenizer=TOKENIZER),
        max_length=shape.seq_len,
        method="full",
        zero_stage=3,
        offload_optimizer=False,
        learning_rate=shape.learning_rate,
        epochs=shape.epochs,
        effective_batch_size=shape.effective_batch,
        micro_batch_size=shape.micro_batch,
        warmup_ratio=0.0,
        seed=0,
        num_workers=1,
        gpus_per_worker=1.0 if device.type == "cuda" else 0.0,
        gradient_checkpointing=True,  # as the shipped 7B/13B configs run
    )


def synthetic_rows(shape: TargetShape, seed: int = 0) -> SubsetRows:
    import numpy as np

    from gradfilter_ray.finetune.loop import SubsetRows

    rng = np.random.default_rng(seed)
    vocab = shape.llama["vocab_size"]
    support = rng.permutation(np.arange(3, vocab))[:ZIPF_IDS]  # ids 0-2 are unk/bos/eos
    p = 1.0 / np.arange(1, len(support) + 1)
    ids = [rng.choice(support, shape.seq_len, p=p / p.sum()).tolist() for _ in range(shape.rows)]
    starts = np.full(shape.rows, shape.seq_len // 4, dtype=np.int64)
    return SubsetRows(input_ids=ids, labels_at=starts, rows_in=shape.rows, rows_no_response_tokens=0)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_bytes(device: torch.device) -> int:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS (coarse: the smoke run only checks
    the plumbing)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _ds_config(finetune: FinetuneConfig, plan, bf16: bool) -> dict:
    from gradfilter_ray.finetune.ds_config import deepspeed_config

    config = deepspeed_config(finetune, plan, bf16=bf16)
    # The stage's path: torch AdamW (no DeepSpeed op to build), optimizer state on the GPU.
    if "offload_optimizer" in config["zero_optimization"]:
        raise ValueError(f"the check measures ZeRO-3 without offload, got {config['zero_optimization']}")
    return config


def train_and_save(shape: TargetShape, device: torch.device, folder: Path, dtype: torch.dtype) -> dict:
    """Fine-tune, checkpoint once, final save into folder/model. Returns the measurements."""
    import torch
    from gpu_check_ds import import_deepspeed, init_single_process, shutdown

    deepspeed = import_deepspeed(device)
    init_single_process(deepspeed, device)
    try:
        return _train_and_save(deepspeed, shape, device, folder, dtype)
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        shutdown()


def _train_and_save(deepspeed, shape: TargetShape, device: torch.device, folder: Path, dtype: torch.dtype) -> dict:
    import numpy as np
    import torch

    from gradfilter_ray.finetune.ds_config import lr_factor, plan_training
    from gradfilter_ray.finetune.loop import train_steps
    from gradfilter_ray.finetune.model import build_trainable, save_merged
    from gradfilter_ray.models import load_tokenizer

    finetune = finetune_config(shape, device)
    tokenizer = load_tokenizer(finetune.model)
    rows = synthetic_rows(shape)
    plan = plan_training(len(rows), finetune, world_size=1)
    ds_config = _ds_config(finetune, plan, bf16=dtype == torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    started = time.perf_counter()
    model = build_trainable(finetune, dtype, ds_config)
    n_params = sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=finetune.learning_rate, weight_decay=finetune.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.warmup_steps, plan.total_steps)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    _sync(device)
    init_s = time.perf_counter() - started

    losses: list[float] = []
    stamps = [time.perf_counter()]

    def on_step(step: int, loss: float) -> bool:
        losses.append(loss)  # the loss's .float() has synchronised the device: the stamp is the step's end
        stamps.append(time.perf_counter())
        return False

    finished = train_steps(engine, rows, plan, finetune.seed, 0, tokenizer.pad_token_id, device, 0, on_step)
    train_peak = _peak_bytes(device)
    step_s = np.diff(stamps)
    timed = step_s[shape.timed_from_step :]
    tokens_per_step = plan.global_batch * shape.seq_len
    tokens_per_s = tokens_per_step * len(timed) / float(timed.sum())
    train = {
        "finished": finished,
        "precision": str(dtype).removeprefix("torch."),
        "zero_stage": finetune.zero_stage,
        "gradient_checkpointing": finetune.gradient_checkpointing,
        "plan": asdict(plan) | {"global_batch": plan.global_batch},
        "seq_len": shape.seq_len,
        "init_s": round(init_s, 3),
        "timed_steps": len(timed),
        "step_s_median": round(float(np.median(timed)), 4),
        "first_step_s": round(float(step_s[0]), 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "samples_per_s": round(plan.global_batch * len(timed) / float(timed.sum()), 3),
        # Model FLOPs (6N a token: forward + backward, recompute not counted) the GPU sustained.
        "model_tflops_per_s": float(f"{6 * n_params * tokens_per_s / 1e12:.4g}"),
        "peak_bytes": train_peak,
        "losses": [round(x, 5) for x in losses],
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "ln_vocab": round(math.log(shape.llama["vocab_size"]), 4),
    }

    ckpt = folder / "checkpoint"
    _sync(device)
    t0 = time.perf_counter()
    engine.save_checkpoint(str(ckpt), tag=DS_TAG)
    _sync(device)
    ckpt_s = time.perf_counter() - t0
    ckpt_bytes = _folder_bytes(ckpt)
    checkpoint = {
        "seconds": round(ckpt_s, 3),
        "bytes": ckpt_bytes,
        "bytes_per_param": round(ckpt_bytes / n_params, 3),
        "write_bytes_per_s": round(ckpt_bytes / ckpt_s, 1),
    }
    shutil.rmtree(ckpt)  # ~13 GB at 1.1B: the GPU machine's disk is 64 GiB

    # The final save exactly as the finetune worker does it (rank 0 of one).
    t0 = time.perf_counter()
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    out = folder / "model"
    save_merged(finetune, {k: v.to("cpu") for k, v in state_dict.items()}, dtype, out)
    tokenizer.save_pretrained(out)
    final_s = time.perf_counter() - t0
    final_bytes = _folder_bytes(out)
    final = {"seconds": round(final_s, 3), "bytes": final_bytes, "bytes_per_param": round(final_bytes / n_params, 3)}
    del engine, optimizer, scheduler, model, state_dict
    model_facts = {"family": "llama", **shape.llama, "params": int(n_params)}
    return {"model": model_facts, "train": train, "checkpoint": checkpoint, "final_save": final}


def target(shape: TargetShape, device: torch.device, folder: Path, dtype: torch.dtype | None = None) -> dict:
    """The whole step: fine-tune and save (DeepSpeed, in its own torch.distributed world), then load and generate.
    bf16 on CUDA and fp32 on CPU unless `dtype` says otherwise, as the finetune worker chooses."""
    import numpy as np
    import torch
    from gpu_check_generate import generation

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    result = train_and_save(shape, device, folder, dtype)
    gen = generation(folder / "model", dtype, device, shape.gen_batches, shape.max_new_tokens, shape.max_prompt_tokens)
    train = result["train"]
    losses = train["losses"]
    result["generation"] = gen
    result["checks"] = {
        "finished": train["finished"],
        "losses_finite": bool(np.isfinite(losses).all()),
        # The same rows every epoch: the last two steps' mean must sit clearly below the first step's loss.
        "loss_falls": bool(np.mean(losses[-2:]) < 0.9 * losses[0]),
        "checkpoint_written": result["checkpoint"]["bytes"] > 0,
        "generated_every_token": all(
            g["new_tokens"] == int(b) * shape.max_new_tokens and g["answers"] == int(b) and g["all_text"]
            for b, g in gen["batches"].items()
        ),
    }
    return result
