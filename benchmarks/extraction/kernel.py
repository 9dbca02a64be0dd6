"""(a) the batched norm kernel vs a batch-size-1 autograd loop, and (b) vs a plain batched forward + backward (the
floor), also with all 2M adapters loaded and the kernel called per adapter as the extraction does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from extraction.common import EARLY, LATE, MEMBERS, NORM_RTOL, interleaved, random_lora
from gradfilter_ray.config import ModelSpec

# ---------------------------------------------------------------------------------------------------------------
# (a) and (b): kernel vs batch-size-1 loop vs floor


def logits_window(labels: Any) -> tuple[dict, Any]:
    """The kernel's forward, for the floor and the timed loop: when the project's kernel skips the LM head on the
    prompt (losses.scored_window + HF's logits_to_keep), the baselines do the same work, else full logits."""
    try:
        from gradfilter_ray.losses import scored_window
    except ImportError:
        return {}, labels
    window = scored_window(labels)
    return {"logits_to_keep": window}, labels[:, -window:]


def kernel_skips_prompt_logits() -> bool:
    import gradfilter_ray.losses

    return hasattr(gradfilter_ray.losses, "scored_window")


def kernel_vs_loop(spec: ModelSpec, rows: list[dict], batch_sizes: list[int], repeats: int, label: str) -> dict:
    import torch
    import torch.nn.functional as F

    from gradfilter_ray.data.prompt import collate_rows, label_start, tokenize_batch
    from gradfilter_ray.gradients.norms import per_example_sq_norms
    from gradfilter_ray.losses import per_example_losses
    from gradfilter_ray.models import load_tokenizer

    tok = load_tokenizer(spec)
    examples = tokenize_batch(
        tok, [r["instruction"] for r in rows], [r["input"] for r in rows], [r["output"] for r in rows], 128
    )
    examples = [e for e in examples if e.n_response_tokens > 0]  # a 0 reference norm has no relative error
    lengths = np.array([len(e.input_ids) for e in examples])
    model = random_lora(spec, seed=7)
    params = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    for p in params:
        p.requires_grad_(True)
    order = np.argsort(lengths, kind="stable")

    def batches(bs: int) -> list[tuple[np.ndarray, dict]]:
        out = []
        for begin in range(0, len(order), bs):
            idx = order[begin : begin + bs]
            out.append(
                (
                    idx,
                    collate_rows(
                        [examples[i].input_ids for i in idx], [label_start(examples[i]) for i in idx], tok.pad_token_id
                    ),
                )
            )
        return out

    singles = [
        (torch.tensor([e.input_ids]), torch.tensor([e.labels]))  # unpadded, no attention mask needed
        for e in examples
    ]

    def kernel(bs_batches) -> np.ndarray:
        sq = np.zeros(len(examples))
        for idx, batch in bs_batches:
            sq[idx] = per_example_sq_norms(model, **batch)[0].numpy()
        return sq

    def floor(bs_batches) -> None:
        # Same batched forward and backward of the summed per-example losses, without hooks or per-example work.
        with torch.enable_grad():
            for _, batch in bs_batches:
                extra, labels = logits_window(batch["labels"])
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **extra
                ).logits
                losses, _ = per_example_losses(logits, labels)
                torch.autograd.grad(losses.sum(), params)

    def bs1_loop(window: bool) -> np.ndarray:
        # One unpadded example at a time, mean CE over its response, autograd over all LoRA params. window=False is
        # the reference definition (all logits); window=True skips the prompt's logits like the kernel does.
        out = np.zeros(len(examples))
        with torch.enable_grad():
            for i, (ids, labels) in enumerate(singles):
                extra, labels = logits_window(labels) if window else ({}, labels)
                logits = model(input_ids=ids, use_cache=False, **extra).logits[0]
                loss = F.cross_entropy(logits[:-1].float(), labels[0, 1:], ignore_index=-100)
                grads = torch.autograd.grad(loss, params)
                out[i] = sum(float(g.double().pow(2).sum()) for g in grads)
        return out

    fns: dict[str, Callable[[], Any]] = {"bs1_loop": lambda: bs1_loop(window=True)}
    for bs in batch_sizes:
        prepared = batches(bs)
        fns[f"kernel_b{bs}"] = lambda p=prepared: kernel(p)
        fns[f"floor_b{bs}"] = lambda p=prepared: floor(p)

    # Correctness before any timing: one pass of the reference, of the timed loop and of each kernel batch size.
    reference = bs1_loop(window=False)
    errors = {"bs1_loop": float(np.max(np.abs(fns["bs1_loop"]() - reference) / reference))}
    for bs in batch_sizes:
        got = fns[f"kernel_b{bs}"]()
        errors[f"kernel_b{bs}"] = float(np.max(np.abs(got - reference) / reference))
    worst = max(errors.values())
    correctness = {
        "n_examples": len(examples),
        "max_rel_err": errors,
        "tolerance": NORM_RTOL,
        "ok": bool(worst <= NORM_RTOL and np.all(reference > 0)),
        "min_ref_sq_norm": float(reference.min()),
    }
    if not correctness["ok"]:
        return {"label": label, "correctness": correctness}

    for bs in batch_sizes:  # the correctness pass warmed the kernels and the loop up; warm the floors too
        fns[f"floor_b{bs}"]()
    timings = interleaved(fns, repeats)
    n = len(examples)
    return {
        "label": label,
        "prompt_logits_skipped": kernel_skips_prompt_logits(),
        "n_examples": n,
        "tokens": int(lengths.sum()),
        "mean_tokens_per_row": float(lengths.mean()),
        "padded_tokens": {str(bs): int(sum(b["input_ids"].numel() for _, b in batches(bs))) for bs in batch_sizes},
        # Positions that go through the LM head: per batch B x window (from the batch's earliest response token),
        # per single example only its own response; with a 50257-wide head this is most of the work.
        "lm_head_positions": {
            "bs1": int(sum(logits_window(labels)[1].shape[1] for _, labels in singles)),
            **{
                f"b{bs}": int(sum(logits_window(b["labels"])[1].numel() for _, b in batches(bs))) for bs in batch_sizes
            },
        },
        "correctness": correctness,
        "timings": timings,
        "ratios": {
            f"b{bs}": {
                "speedup_vs_bs1_wall": timings["bs1_loop"]["wall_s"] / timings[f"kernel_b{bs}"]["wall_s"],
                "speedup_vs_bs1_cpu": timings["bs1_loop"]["cpu_s"] / timings[f"kernel_b{bs}"]["cpu_s"],
                "overhead_vs_floor_wall": timings[f"kernel_b{bs}"]["wall_s"] / timings[f"floor_b{bs}"]["wall_s"],
                "overhead_vs_floor_cpu": timings[f"kernel_b{bs}"]["cpu_s"] / timings[f"floor_b{bs}"]["cpu_s"],
            }
            for bs in batch_sizes
        },
    }


def multi_adapter_overhead(spec: ModelSpec, root: Path, rows: list[dict], batch_size: int, repeats: int) -> dict:
    """The stage's setting: one model holding all 2M adapters and the kernel called once per adapter per batch
    (each call activates its adapter and restores the previous one), vs a floor that activates each adapter once
    and runs the plain forward + backward."""
    import torch

    from gradfilter_ray.data.prompt import collate_rows, label_start, tokenize_batch
    from gradfilter_ray.gradients.extract import adapter_name
    from gradfilter_ray.gradients.norms import per_example_sq_norms
    from gradfilter_ray.lora import load_adapters
    from gradfilter_ray.losses import per_example_losses
    from gradfilter_ray.models import load_causal_lm, load_tokenizer
    from gradfilter_ray.rundir import RunDir

    rundir = RunDir(str(root))
    folders = {
        adapter_name(m, c): Path(rundir.member_epoch(m, e))
        for m in range(MEMBERS)
        for c, e in (("early", EARLY), ("late", LATE))
    }
    model = load_adapters(load_causal_lm(spec), folders)
    tok = load_tokenizer(spec)
    examples = tokenize_batch(
        tok, [r["instruction"] for r in rows], [r["input"] for r in rows], [r["output"] for r in rows], 128
    )
    order = np.argsort([len(e.input_ids) for e in examples], kind="stable")
    prepared = [
        collate_rows([examples[i].input_ids for i in idx], [label_start(examples[i]) for i in idx], tok.pad_token_id)
        for idx in (order[b : b + batch_size] for b in range(0, len(order), batch_size))
    ]
    params = {
        name: [p for n, p in model.named_parameters() if f"lora_A.{name}." in n or f"lora_B.{name}." in n]
        for name in folders
    }

    def kernel() -> None:
        for batch in prepared:
            for name in folders:
                per_example_sq_norms(model, **batch, adapter_name=name)

    def floor() -> None:
        with torch.enable_grad():
            for batch in prepared:
                for name in folders:
                    model.set_adapter(name)
                    for p in params[name]:
                        p.requires_grad_(True)
                    extra, labels = logits_window(batch["labels"])
                    logits = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **extra
                    ).logits
                    losses, _ = per_example_losses(logits, labels)
                    torch.autograd.grad(losses.sum(), params[name])

    fns = {
        f"kernel_b{batch_size}_{len(folders)}adapters": kernel,
        f"floor_b{batch_size}_{len(folders)}adapters": floor,
    }
    for fn in fns.values():
        fn()
    timings = interleaved(fns, repeats)
    k, f = (timings[name] for name in fns)
    return {
        "n_examples": len(examples),
        "adapters": len(folders),
        "batch_size": batch_size,
        "timings": timings,
        "ratios": {
            "overhead_vs_floor_wall": k["wall_s"] / f["wall_s"],
            "overhead_vs_floor_cpu": k["cpu_s"] / f["cpu_s"],
        },
    }
