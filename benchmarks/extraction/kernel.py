"""(a) the batched norm kernel vs a batch-size-1 autograd loop, and (b) vs a plain batched forward + backward (the
floor), also with all 2M adapters loaded and the kernel called per adapter as the extraction does.

Run on its own (`python benchmarks/extraction/kernel.py [--repeats N] [--threads N]`), it measures (a) and (b) on the
real-vocabulary proxy only and writes benchmarks/results/extraction_kernel.json.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run on its own: make `extraction.*` and the repo importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

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


def has_chunked_head() -> bool:
    """Whether the kernel puts only each row's own labelled positions through the LM head (gradients.head_loss)."""
    try:
        import gradfilter_ray.gradients.head_loss  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_losses(model: Any, batch: dict) -> Any:
    """The kernel's per-example losses, for the floor: the chunked LM head on each row's own labelled positions when
    the project has it, else the logits window."""
    if has_chunked_head():
        from gradfilter_ray.gradients.head_loss import response_losses

        return response_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"], 2048)[0]
    from gradfilter_ray.losses import per_example_losses

    extra, labels = logits_window(batch["labels"])
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **extra
    ).logits
    return per_example_losses(logits, labels)[0]


def head_positions(labels: Any) -> int:
    """Positions a batch puts through the LM head: its labelled positions, or B x the logits window."""
    if has_chunked_head():
        return int((labels[:, 1:] != -100).sum())
    return int(logits_window(labels)[1].numel())


def kernel_vs_loop(
    spec: ModelSpec,
    rows: list[dict],
    batch_sizes: list[int],
    repeats: int,
    label: str,
    other_kernels: dict[str, Callable] | None = None,
) -> dict:
    """`other_kernels`: name -> a kernel with per_example_sq_norms's signature, checked and timed alongside at every
    batch size as f"{name}_b{bs}" (e.g. a previous version, for a same-run comparison)."""
    import torch
    import torch.nn.functional as F

    from gradfilter_ray.data.prompt import collate_rows, label_start, tokenize_batch
    from gradfilter_ray.gradients.norms import per_example_sq_norms
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

    def kernel(bs_batches, fn: Callable = per_example_sq_norms) -> np.ndarray:
        sq = np.zeros(len(examples))
        for idx, batch in bs_batches:
            sq[idx] = fn(model, **batch)[0].numpy()
        return sq

    def floor(bs_batches) -> None:
        # Same batched forward and backward of the summed per-example losses, without hooks or per-example work.
        with torch.enable_grad():
            for _, batch in bs_batches:
                torch.autograd.grad(kernel_losses(model, batch).sum(), params)

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
        for name, fn in (other_kernels or {}).items():
            fns[f"{name}_b{bs}"] = lambda p=prepared, fn=fn: kernel(p, fn)
        fns[f"floor_b{bs}"] = lambda p=prepared: floor(p)

    # Correctness before any timing: one pass of the reference, of the timed loop and of each kernel batch size.
    reference = bs1_loop(window=False)
    errors = {"bs1_loop": float(np.max(np.abs(fns["bs1_loop"]() - reference) / reference))}
    for bs in batch_sizes:
        for name in ["kernel", *(other_kernels or {})]:
            got = fns[f"{name}_b{bs}"]()
            errors[f"{name}_b{bs}"] = float(np.max(np.abs(got - reference) / reference))
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
        # Positions that go through the LM head: per single example its own response (HF's logits_to_keep window),
        # per batch only its rows' labelled positions (chunked head) or, before that, B x the window from the batch's
        # earliest response token; with a 50257-wide head this is most of the work.
        "chunked_head": has_chunked_head(),
        "lm_head_positions": {
            "bs1": int(sum(logits_window(labels)[1].shape[1] for _, labels in singles)),
            **{f"b{bs}": sum(head_positions(b["labels"]) for _, b in batches(bs)) for bs in batch_sizes},
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
                    torch.autograd.grad(kernel_losses(model, batch).sum(), params[name])

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


# ---------------------------------------------------------------------------------------------------------------
# On its own: (a) and (b) with the real vocabulary


def main() -> None:
    import argparse
    import json
    import os
    import time
    import warnings

    import torch

    from extraction.common import ALPACA, RESULTS, log, real_spec
    from extraction.memory import before_per_example_sq_norms

    ap = argparse.ArgumentParser(description="the batched kernel vs the batch-size-1 loop, GPT-2 vocabulary")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=32)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    rows = json.loads(ALPACA.read_text())[: args.rows]
    started, load = time.perf_counter(), list(os.getloadavg())
    log(f"kernel vs bs1 loop vs floor, vocab 50257, {len(rows)} Alpaca rows, batch 16, {args.repeats} repeats ...")
    res = kernel_vs_loop(
        real_spec(),
        rows,
        [16],
        args.repeats,
        "tiny GPT-2, vocab 50257 (GPT-2 BPE), Alpaca rows",
        other_kernels={"before": before_per_example_sq_norms},  # the pre-change kernel, same run
    )
    tm = res.get("timings", {})
    if "before_b16" in tm:
        res["ratios"]["before_b16"] = {
            "speedup_vs_bs1_wall": tm["bs1_loop"]["wall_s"] / tm["before_b16"]["wall_s"],
            "speedup_vs_bs1_cpu": tm["bs1_loop"]["cpu_s"] / tm["before_b16"]["cpu_s"],
        }
    res.update(
        benchmark="extraction_kernel",
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        torch_threads=args.threads,
        loadavg_start=load,
        loadavg_end=list(os.getloadavg()),
        total_wall_s=time.perf_counter() - started,
    )
    out = RESULTS / "extraction_kernel.json"
    out.write_text(json.dumps(res, indent=2))
    if not res["correctness"]["ok"]:
        log(f"CORRECTNESS FAILURE: {json.dumps(res['correctness'])}")
        sys.exit(2)
    r, heads, tm = res["ratios"]["b16"], res["lm_head_positions"], res["timings"]
    before = res["ratios"]["before_b16"]
    log(
        f"  pre-change kernel b16 {tm['before_b16']['wall_s']:.2f} s: speedup vs bs1 "
        f"{before['speedup_vs_bs1_wall']:.2f}x (CPU {before['speedup_vs_bs1_cpu']:.2f}x)"
    )
    log(
        f"  bs1 loop {tm['bs1_loop']['wall_s']:.2f} s, kernel b16 {tm['kernel_b16']['wall_s']:.2f} s, "
        f"floor b16 {tm['floor_b16']['wall_s']:.2f} s (wall; CPU {tm['bs1_loop']['cpu_s']:.2f} / "
        f"{tm['kernel_b16']['cpu_s']:.2f} / {tm['floor_b16']['cpu_s']:.2f} s)"
    )
    log(
        f"  speedup vs bs1 {r['speedup_vs_bs1_wall']:.2f}x (CPU {r['speedup_vs_bs1_cpu']:.2f}x), overhead vs floor "
        f"{r['overhead_vs_floor_wall']:.2f}x (CPU {r['overhead_vs_floor_cpu']:.2f}x); LM-head positions b16 / bs1 "
        f"{heads['b16'] / heads['bs1']:.2f}x; max rel err {max(res['correctness']['max_rel_err'].values()):.1e}"
    )
    log(f"  wrote {out}")


if __name__ == "__main__":
    main()
