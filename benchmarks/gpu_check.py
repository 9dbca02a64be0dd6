"""Correctness and throughput check of gradfilter_ray.gradients.norms.per_example_sq_norms on one GPU.

Standalone (imports only the norms module from this repo): python3 benchmarks/gpu_check.py --out DIR
CPU smoke test: python3 benchmarks/gpu_check.py --out DIR --device cpu --small
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from gradfilter_ray.gradients.norms import per_example_sq_norms  # noqa: E402
from gradfilter_ray.lora import lora_parameter_count  # noqa: E402


def build_model(small: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if small:
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=300, n_positions=128)
    else:
        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn", "c_proj"])
    model = get_peft_model(GPT2LMHeadModel(cfg), lora)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero, which would zero every lora_A gradient
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def lora_params(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]


def make_examples(n: int, lo: int, hi: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        prompt = int(torch.randint(1, length // 2 + 1, (1,), generator=gen))
        ids = torch.randint(0, vocab, (length,), generator=gen)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append((ids, labels))
    return out


def collate(examples, device):
    width, B = max(len(i) for i, _ in examples), len(examples)
    ids = torch.zeros(B, width, dtype=torch.long)
    mask = torch.zeros(B, width, dtype=torch.long)
    labels = torch.full((B, width), -100, dtype=torch.long)
    for k, (i, lab) in enumerate(examples):
        ids[k, : len(i)], mask[k, : len(i)], labels[k, : len(i)] = i, 1, lab
    return ids.to(device), mask.to(device), labels.to(device)


def bs1_sq_norms(model, examples, device) -> list[float]:
    """Independent reference: batch-size-1, unpadded, plain autograd over all LoRA params."""
    params, out = lora_params(model), []
    for ids, lab in examples:
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(logits[:-1], lab[1:].to(device), ignore_index=-100)
        grads = torch.autograd.grad(loss, params)
        out.append(sum(g.double().pow(2).sum() for g in grads).item())
    return out


def floor_step(model, batch) -> None:
    """Plain batched forward + backward of the summed per-example losses, no per-example work."""
    ids, mask, labels = batch
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    tok = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="none")
    n = (labels[:, 1:] != -100).sum(1).clamp(min=1)
    torch.autograd.grad((tok.view(ids.shape[0], -1).sum(1) / n).sum(), lora_params(model))


def timed(fn, device, warmup: int, iters: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def rel_errors(got, ref) -> dict:
    errs = [abs(float(g) - r) / r for g, r in zip(got, ref, strict=True)]
    return {"max_rel_err": max(errs), "median_rel_err": statistics.median(errs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny model, few iterations (CPU smoke test)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("highest")  # TF32 would make the float32 comparison meaningless
    small = args.small
    t_start = time.perf_counter()

    base = build_model(small)
    vocab = base.config.vocab_size
    res: dict = {
        "env": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "small": small,
        },
        "model": {"n_layer": base.config.n_layer, "n_embd": base.config.n_embd, "vocab": vocab},
        "lora_params": lora_parameter_count(base),
    }

    # Correctness: batched kernel in float64 / float32 / bf16 vs a float64 batch-size-1 reference.
    n_ex, lo, hi = (6, 8, 64) if small else (16, 32, 256)
    examples = make_examples(n_ex, lo, hi, vocab, seed=2)
    batch = collate(examples, device)
    ref_model = copy.deepcopy(base).to(device, torch.float64)
    ref = bs1_sq_norms(ref_model, examples, device)
    correctness = {"n_examples": n_ex, "lengths": [len(i) for i, _ in examples]}
    for name, dtype in [("float64", torch.float64), ("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        model = ref_model if dtype == torch.float64 else copy.deepcopy(base).to(device, dtype)
        sq, _, _ = per_example_sq_norms(model, *batch)
        correctness[name] = rel_errors(sq.tolist(), ref)
        del model
    del ref_model
    res["correctness_vs_fp64_bs1"] = correctness

    # Throughput in bf16 at a fixed sequence length.
    T = 64 if small else 256
    model = copy.deepcopy(base).to(device, torch.bfloat16)
    warmup, iters = (1, 2) if small else (2, 5)
    gen = torch.Generator().manual_seed(3)

    def fixed_batch(B: int):
        ids = torch.randint(0, vocab, (B, T), generator=gen)
        labels = ids.clone()
        labels[:, : T // 4] = -100
        return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)

    n_bs1 = 4 if small else 16
    bs1_examples = [(i.cpu(), lab.cpu()) for i, _, lab in zip(*fixed_batch(n_bs1), strict=True)]
    t_bs1 = timed(lambda: bs1_sq_norms(model, bs1_examples, device), device, 1, 1 if small else 2) / n_bs1
    res["bs1_loop_bf16"] = {"examples_per_s": 1 / t_bs1, "tokens_per_s": T / t_bs1}

    throughput = []
    for B in (2, 4) if small else (8, 32, 64):
        row: dict = {"batch_size": B, "seq_len": T}
        try:
            b = fixed_batch(B)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t_norm = timed(lambda b=b: per_example_sq_norms(model, *b), device, warmup, iters)
            if device.type == "cuda":
                row["norms_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            t_floor = timed(lambda b=b: floor_step(model, b), device, warmup, iters)
            if device.type == "cuda":
                row["floor_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            row.update(
                norms_examples_per_s=B / t_norm,
                norms_tokens_per_s=B * T / t_norm,
                floor_examples_per_s=B / t_floor,
                floor_tokens_per_s=B * T / t_floor,
                norms_speedup_vs_bs1=(B / t_norm) * t_bs1,
                overhead_vs_floor=t_norm / t_floor,
            )
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"OOM: {e}"[:300]
            torch.cuda.empty_cache()
        throughput.append(row)
    res["throughput_bf16"] = throughput
    res["wall_s"] = time.perf_counter() - t_start

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
