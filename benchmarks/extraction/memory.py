"""Peak memory of one extraction batch (the norm kernel for one adapter, loss included) at a fixed token budget,
for the bounded-memory kernel ("after", gradients.norms.per_example_sq_norms) and the kernel it replaced ("before",
copied below), side by side in one run.

The budget is 8,192 tokens, cut as (B, T) = (64, 128), (32, 256), (16, 512), (8, 1024), on a GPT-2-shaped
random-init proxy: 2 layers, n_embd 768, 12 heads, n_positions 1024, the real 50,257-token vocabulary, fp32, rank-8
LoRA on c_attn/c_proj (mlp.c_proj too) with random lora_B. Each row's response starts at a random point in the middle
half of the row, as an instruction's answer does; no padding, so every shape holds exactly 8,192 real tokens.

Every measurement runs in a fresh process (`--child`): build the proxy, run one tiny batch of the same kernel (lazy
initialisation, the head-path probe), reset the peak-RSS counter (writing 5 to /proc/self/clear_refs sets VmHWM to
the current RSS), read VmRSS, run the batch, read VmHWM. The peak above the footprint is VmHWM - VmRSS. Targets: the
after-kernel's peak per token varies by at most 15% across shapes ((max - min) / min), and is at least 2x lower than
the before-kernel's at every shape. Correctness first: both kernels' norms and losses must agree (fp32, 1e-4).

Usage: python benchmarks/extraction/memory.py [--quick] [--threads N]
Writes benchmarks/results/extraction_memory.json (extraction_memory.quick.json with --quick: two shapes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/, for `extraction.*`
sys.path.insert(0, str(HERE.parents[2]))  # the repo, runnable without `pip install -e .`
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from extraction.common import RESULTS, log  # noqa: E402

BUDGET = 8192
SHAPES = [(64, 128), (32, 256), (16, 512), (8, 1024)]
PROXY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}
SPREAD_TARGET = 0.15
RATIO_TARGET = 2.0
RTOL = 1e-4
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------------------
# The pre-change kernel, kept for comparison: gradients/norms.py's per_example_sq_norms and losses.py's
# per_example_losses / scored_window as they were before the bounded-memory kernel (git 973fd57). It calls
# autograd.grad on every captured LoRA output at once and only then reduces, and upcasts the [B, window, vocab]
# logits, the window starting at the batch's earliest labelled token.


def before_per_example_losses(logits, labels):
    import torch
    import torch.nn.functional as F

    batch = labels.shape[0]
    target = labels[:, 1:].to(logits.device)
    n_tokens = (target != -100).sum(dim=1)
    shifted = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    token_loss = F.cross_entropy(shifted.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none")
    losses = token_loss.view(batch, -1).sum(dim=1) / n_tokens.clamp(min=1).to(token_loss.dtype)
    return losses, n_tokens


def before_scored_window(labels) -> int:
    import torch

    scored = (labels[:, 1:] != -100).any(dim=0)
    if not bool(scored.any()):
        return 1
    first = int(torch.nonzero(scored)[0]) + 1
    return labels.shape[1] - first + 1


@contextlib.contextmanager
def before_scoring_state(model, adapter_name: str, params) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    prev_active = list(model.active_adapters)
    try:
        model.eval()
        if prev_active != [adapter_name]:
            model.set_adapter(adapter_name)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        if list(model.active_adapters) != prev_active:
            model.set_adapter(prev_active[0])
        for p, rg in flags:
            p.requires_grad_(rg)
        for m, tr in modes:
            m.training = tr


def before_per_example_sq(x, g, with_bias: bool, acc):
    import torch

    x, g = x.to(acc), g.to(acc)
    sq = torch.bmm(g.transpose(1, 2), x).pow(2).sum(dim=(1, 2))
    if with_bias:
        sq = sq + g.sum(dim=1).pow(2).sum(dim=1)
    return sq


def before_per_example_sq_norms(model, input_ids, attention_mask, labels, adapter_name=None):
    import torch

    from gradfilter_ray.lora import lora_layers, resolve_adapter

    name = resolve_adapter(model, adapter_name)
    layers = lora_layers(model, name)
    lins = [lin for _, m in layers for lin in (m.lora_A[name], m.lora_B[name])]
    params = [p for lin in lins for p in lin.parameters()]
    B = input_ids.shape[0]
    acc = torch.promote_types(params[0].dtype, torch.float32)
    captured = {lin: [] for lin in lins}

    def hook(mod, inputs, out):
        captured[mod].append((inputs[0], out))

    handles = []
    try:
        with before_scoring_state(model, name, params), torch.inference_mode(False), torch.enable_grad():
            handles = [lin.register_forward_hook(hook) for lin in lins]
            window = before_scored_window(labels)
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=window
            ).logits
            for h in handles:
                h.remove()
            handles = []
            losses, n_tok = before_per_example_losses(logits, labels[:, -window:])
            outs = [o for calls in captured.values() for _, o in calls]
            grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
            keep = attention_mask.to(logits.device).bool()[:, :, None]
            sq = torch.zeros(B, dtype=acc, device=logits.device)
            k = 0
            for lin, calls in captured.items():
                xs, gs = [], []
                for x, o in calls:
                    g = grads[k] if grads[k] is not None else torch.zeros_like(o)
                    k += 1
                    x, g = x.reshape(B, -1, x.shape[-1]), g.reshape(B, -1, g.shape[-1])
                    if x.shape[1] == keep.shape[1]:
                        x, g = x.masked_fill(~keep, 0), g.masked_fill(~keep, 0)
                    xs.append(x)
                    gs.append(g)
                x, g = (xs[0], gs[0]) if len(xs) == 1 else (torch.cat(xs, 1), torch.cat(gs, 1))
                sq += before_per_example_sq(x, g, lin.bias is not None, acc)
        return sq.detach().to("cpu", torch.float64), losses.detach().to("cpu", torch.float64), n_tok.to("cpu")
    finally:
        for h in handles:
            h.remove()
        captured.clear()


# ---------------------------------------------------------------------------------------------------------------
# One measurement (child process)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def make_batch(batch: int, length: int, vocab: int, seed: int) -> dict:
    """Random tokens, no padding; each row's labels start at a random point of its middle half."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=gen)
    starts = torch.randint(length // 4, 3 * length // 4, (batch,), generator=gen)
    labels = input_ids.masked_fill(torch.arange(length)[None, :] < starts[:, None], -100)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def child(job: dict) -> dict:
    import gc

    import torch

    from extraction.common import random_lora
    from gradfilter_ray.config import ModelSpec
    from gradfilter_ray.gradients.norms import per_example_sq_norms

    torch.set_num_threads(job["threads"])
    kernel = per_example_sq_norms if job["kernel"] == "after" else before_per_example_sq_norms
    model = random_lora(ModelSpec(build_from_config=PROXY, tokenizer="bundled:gpt2"), seed=7)
    vocab = PROXY["vocab_size"]
    kernel(model, **make_batch(2, 16, vocab, seed=1))  # warm-up: lazy init, the head-path probe
    batch = make_batch(job["batch"], job["length"], vocab, seed=job["batch"])
    gc.collect()
    hwm_load = status_kib("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss = status_kib("VmRSS")
    hwm_reset = status_kib("VmHWM")
    start = time.perf_counter()
    sq, losses, n_tokens = kernel(model, **batch)
    seconds = time.perf_counter() - start
    hwm = status_kib("VmHWM")
    return {
        "rss_before_mib": rss / 1024,
        "hwm_after_load_mib": hwm_load / 1024,
        "hwm_reset_ok": hwm_reset <= rss + 1024,
        "hwm_after_mib": hwm / 1024,
        "peak_above_footprint_mib": (hwm - rss) / 1024,
        "seconds": seconds,
        "scored_positions": int(n_tokens.sum()),
        "sq_norms": sq.tolist(),
        "losses": losses.tolist(),
    }


def measure(kernel: str, batch: int, length: int, threads: int) -> dict:
    job = {"kernel": kernel, "batch": batch, "length": length, "threads": threads}
    proc = subprocess.run(
        [sys.executable, str(HERE), "--child", json.dumps(job)], capture_output=True, text=True, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {job} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------------------------
# Driver


def max_rel_err(got: list[float], want: list[float]) -> float:
    return max(abs(g - w) / max(abs(w), 1e-30) for g, w in zip(got, want))


def machine(threads: int) -> dict:
    import platform

    import torch
    import transformers

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "nproc": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loadavg_start": list(os.getloadavg()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each child")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    shapes = [SHAPES[0], SHAPES[-1]] if args.quick else SHAPES
    out_file = RESULTS / ("extraction_memory.quick.json" if args.quick else "extraction_memory.json")
    res: dict = {
        "benchmark": "extraction_memory",
        "mode": "quick" if args.quick else "default",
        "machine": machine(args.threads),
        "setup": {
            "proxy": {**PROXY, "dtype": "float32", "lora": "r=8, alpha=16, c_attn + c_proj, random lora_B"},
            "tokens_per_batch": BUDGET,
            "labels": "each row's response starts uniformly in its middle half; no padding",
            "after": "gradfilter_ray.gradients.norms.per_example_sq_norms, loss_chunk_tokens=2048 (default)",
            "before": "the pre-change kernel, copied into this file",
            "measure": "VmHWM - VmRSS around one call, in a fresh process, after a tiny warm-up call",
        },
        "shapes": [],
    }
    t0 = time.perf_counter()
    for batch, length in shapes:
        row = {"batch": batch, "length": length, "tokens": batch * length}
        for kernel in ("before", "after"):
            log(f"{kernel:>6} kernel, B={batch:<3} T={length:<5} ...")
            row[kernel] = measure(kernel, batch, length, args.threads)
            m = row[kernel]
            m["peak_kib_per_token"] = m["peak_above_footprint_mib"] * 1024 / row["tokens"]
            log(f"        peak {m['peak_above_footprint_mib']:8.0f} MiB above the footprint, {m['seconds']:.1f} s")
        row["scored_positions"] = row["after"]["scored_positions"]
        row["before_over_after"] = row["before"]["peak_above_footprint_mib"] / row["after"]["peak_above_footprint_mib"]
        row["max_rel_err"] = {
            "sq_norms": max_rel_err(row["after"]["sq_norms"], row["before"]["sq_norms"]),
            "losses": max_rel_err(row["after"]["losses"], row["before"]["losses"]),
        }
        for kernel in ("before", "after"):
            del row[kernel]["sq_norms"], row[kernel]["losses"]
        res["shapes"].append(row)

    summary = {}
    for kernel in ("before", "after"):
        peaks = [r[kernel]["peak_above_footprint_mib"] for r in res["shapes"]]
        summary[kernel] = {
            "peak_mib": [round(p, 1) for p in peaks],
            "peak_kib_per_token": [round(p * 1024 / BUDGET, 1) for p in peaks],
            "spread": (max(peaks) - min(peaks)) / min(peaks),
        }
    ratios = [r["before_over_after"] for r in res["shapes"]]
    worst_err = max(max(r["max_rel_err"].values()) for r in res["shapes"])
    summary["before_over_after"] = [round(x, 2) for x in ratios]
    summary["correct"] = worst_err <= RTOL
    summary["max_rel_err"] = worst_err
    summary["hwm_reset_ok"] = all(r[k]["hwm_reset_ok"] for r in res["shapes"] for k in ("before", "after"))
    summary["targets"] = {
        "spread_after": {"target": f"<= {SPREAD_TARGET}", "value": summary["after"]["spread"]},
        "before_over_after": {"target": f">= {RATIO_TARGET} at every shape", "value": min(ratios)},
        "met": {
            "spread": summary["after"]["spread"] <= SPREAD_TARGET,
            "ratio": min(ratios) >= RATIO_TARGET,
        },
    }
    res["summary"] = summary
    res["total_wall_s"] = time.perf_counter() - t0
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["status"] = "ok" if summary["correct"] else "correctness check failed: after vs before kernel"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(res, indent=2))

    log("")
    log(f"one extraction batch of {BUDGET} tokens, peak MiB above the process footprint (fresh process each)")
    log(f"  {'B x T':<12}{'before':>10}{'after':>10}{'before/after':>14}{'after KiB/token':>17}{'max rel err':>13}")
    for r in res["shapes"]:
        log(
            f"  {r['batch']:>3} x {r['length']:<6}{r['before']['peak_above_footprint_mib']:>10.0f}"
            f"{r['after']['peak_above_footprint_mib']:>10.0f}{r['before_over_after']:>13.2f}x"
            f"{r['after']['peak_kib_per_token']:>17.1f}{max(r['max_rel_err'].values()):>13.1e}"
        )
    log(
        f"  spread across shapes: before {summary['before']['spread']:.1%}, after {summary['after']['spread']:.1%} "
        f"(target <= {SPREAD_TARGET:.0%}: {'met' if summary['targets']['met']['spread'] else 'MISSED'}); "
        f"before/after >= {RATIO_TARGET:g}x: {'met' if summary['targets']['met']['ratio'] else 'MISSED'}"
    )
    log(f"  wrote {out_file} in {res['total_wall_s']:.0f} s")
    if not summary["correct"]:
        log(f"CORRECTNESS FAILURE: after vs before kernel, max rel err {worst_err:.2e} > {RTOL:g}")
        sys.exit(2)


if __name__ == "__main__":
    main()
