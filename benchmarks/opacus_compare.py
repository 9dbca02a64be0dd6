"""Our per-example gradient-norm kernel side by side with Opacus, on the same LoRA model and rows, on CPU.

Every method computes, for each of B rows, the squared norm of the gradient of that row's loss over all LoRA A/B
parameters; the loss is the project's (gradfilter_ray/losses.py): the mean token cross-entropy over the row's own
response tokens, with no batch mean. Methods:

  ours                  gradients.norms.per_example_sq_norms (one batched forward + backward, chunked LM head)
  opacus_hooks_logits   Opacus grad_sample_mode "hooks" (GradSampleHooks): per-sample gradients of every LoRA
                        weight, then their squared norms; the loss from the model's full [B, T, vocab] logits, as a
                        plain Opacus training loop writes it
  opacus_hooks          the same hooks, the loss through our chunked LM head (gradients.head_loss.response_losses),
                        so that only the per-sample gradient machinery differs from ours
  opacus_functorch      grad_sample_mode "functorch" (force_functorch=True), chunked head
  opacus_ghost          grad_sample_mode "ghost" (GradSampleHooksFastGradientClipping, use_ghost_clipping=True):
                        the per-sample norms of its first (norm) backward pass, no per-sample gradient formed;
                        chunked head
  opacus_ew             grad_sample_mode "ew" (GradSampleModuleExpandedWeights around the backbone), chunked head
  bs1_loop              the reference: one row at a time, its loss, torch.autograd.grad over the LoRA parameters,
                        sum of squares (HF's logits_to_keep skips the prompt's logits)

Opacus gets loss_reduction="sum" over the per-example losses, so its per-sample gradient of row i is exactly the
gradient of loss_i. Its hooks record activations only of modules in training mode: the model stays in eval mode
(no dropout, as our kernel measures) and only the LoRA Linear modules get training=True, which nn.Linear ignores.

Each (model, method) runs in a fresh subprocess that builds the model, attaches the method's hooks, records its RSS,
resets the peak (VmHWM, via /proc/self/clear_refs), runs one warm-up call (whose norms are checked) and one timed
call; "peak above model" = VmHWM - the RSS before the warm-up, so methods never share a high-water mark. Rounds
interleave the methods (round 1: every method, round 2: every method, ...) so a burst of load from other tenants
hits all alike; the median over rounds is reported. A method Opacus cannot run is reported with its error.

Gate: every batched method that runs must match the batch-size-1 loop to 1e-5 relative in fp32 (Opacus's ghost
norms to 1e-4, see RTOL), else the results file records the failure and it exits 2.

Usage: python benchmarks/opacus_compare.py [--quick] [--rounds N] [--threads N] [--batch B] [--tokens T]
Writes benchmarks/results/opacus_compare.json (opacus_compare.quick.json with --quick; only the tiny model).
Needs `pip install opacus` (benchmarks/requirements-bench.txt).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without `pip install -e .`
RESULTS = REPO / "benchmarks" / "results"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {
    "gpt2": {
        "label": "GPT-2 shape, 2 layers, d=768, 12 heads, vocab 50,257 (built from config, GPT-2 tokenizer)",
        "build_from_config": {
            "model_type": "gpt2",
            "n_layer": 2,
            "n_embd": 768,
            "n_head": 12,
            "vocab_size": 50257,
            "n_positions": 1024,
        },
        "tokenizer": "bundled:gpt2",
    },
    "demo": {
        "label": "stories260K (the demo's proxy: pretrained LLaMA, 5 layers, d=64, vocab 512)",
        "name_or_path": "bundled:stories260K",
    },
}
METHODS = [
    "ours",
    "opacus_hooks_logits",
    "opacus_hooks",
    "opacus_functorch",
    "opacus_ghost",
    "opacus_ew",
    "bs1_loop",
]
REFERENCE = "bs1_loop"
NORM_RTOL = 1e-5
# Ghost norms are sqrt(sum_{t,s} (g_t . g_s)(x_t . x_s)) summed in fp32 over T^2 terms that partly cancel: a few
# 1e-6 from the loop is its rounding, not a wrong setup.
RTOL = {"opacus_ghost": 1e-4}
LORA_B_STD = 0.05  # lora_B after some training is non-zero; at B = 0 every lora_A gradient vanishes
LORA = {"rank": 8, "alpha": 16}


def log(msg: str) -> None:
    print(msg, flush=True)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Child: one (model, method) in its own process


def build(model_key: str, batch: int, tokens: int, seed: int = 0):
    """The LoRA model (rank 8, alpha 16, the project's default targets, lora_B ~ N(0, LORA_B_STD^2)) and B rows of
    random token ids, every position real, the loss on the second half of each row."""
    import torch

    from gradfilter_ray.config import EnsembleConfig, ModelSpec
    from gradfilter_ray.lora import attach_lora
    from gradfilter_ray.losses import IGNORE_INDEX
    from gradfilter_ray.models import load_causal_lm

    spec = {k: v for k, v in MODELS[model_key].items() if k != "label"}
    base = load_causal_lm(ModelSpec(**spec))
    model = attach_lora(base, EnsembleConfig(lora_rank=LORA["rank"], lora_alpha=LORA["alpha"]), seed=seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_B_STD)
    model.eval()
    vocab = base.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed + 1))
    labels = input_ids.clone()
    labels[:, : tokens // 2] = IGNORE_INDEX
    data = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return model, data


def lora_params(model) -> list:
    return [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]


def lora_linears(model) -> list:
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return [lin for m in layers for lin in (*m.lora_A.values(), *m.lora_B.values())]


def prepare(model, method: str):
    """(step, teardown): step() -> [B] float64 squared norms for the batch; set up once, outside the timing."""
    import torch

    from gradfilter_ray.gradients.head_loss import head_path, response_losses
    from gradfilter_ray.gradients.norms import per_example_sq_norms
    from gradfilter_ray.losses import per_example_losses, scored_window

    params = lora_params(model)
    if method == "ours":
        return lambda d: per_example_sq_norms(model, **d)[0], None

    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    if method == "bs1_loop":

        def loop(d):
            out = torch.zeros(d["input_ids"].shape[0], dtype=torch.float64)
            for i in range(out.shape[0]):
                ids, labels = d["input_ids"][i : i + 1], d["labels"][i : i + 1]
                window = scored_window(labels)
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=window).logits
                loss = per_example_losses(logits, labels[:, -window:])[0][0]
                grads = torch.autograd.grad(loss, params)
                out[i] = sum(float(g.double().pow(2).sum()) for g in grads)
            return out

        return loop, None

    head_path(model)  # its one-time probe runs the model: before the hooks go on, as our kernel does it
    for lin in lora_linears(model):
        lin.train()  # Opacus records activations of training-mode modules only; nn.Linear does not read the flag

    def chunked(d):
        return response_losses(model, d["input_ids"], d["attention_mask"], d["labels"], 2048)[0]

    def full_logits(d):
        logits = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"], use_cache=False).logits
        return per_example_losses(logits, d["labels"])[0]

    def grad_sample_norms(loss_fn, sampled=params):
        def step(d):
            loss_fn(d).sum().backward()
            sq = torch.zeros(d["input_ids"].shape[0], dtype=torch.float64)
            for p in sampled:
                sq += p.grad_sample.double().pow(2).flatten(1).sum(1)
                p.grad_sample = None
                p.grad = None
            return sq

        return step

    if method in ("opacus_hooks_logits", "opacus_hooks", "opacus_functorch"):
        from opacus.grad_sample import GradSampleHooks

        hooks = GradSampleHooks(model, loss_reduction="sum", force_functorch=method == "opacus_functorch")
        return grad_sample_norms(full_logits if method == "opacus_hooks_logits" else chunked), hooks.remove_hooks

    if method == "opacus_ghost":
        from opacus.grad_sample import GradSampleHooksFastGradientClipping

        hooks = GradSampleHooksFastGradientClipping(
            model, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True
        )
        ghost_types = set(hooks.NORM_SAMPLERS)
        not_ghost = sorted({type(lin).__name__ for lin in lora_linears(model) if type(lin) not in ghost_types})
        if not_ghost:
            raise RuntimeError(f"LoRA modules without an Opacus norm sampler (not ghost-clipped): {not_ghost}")

        def ghost(d):
            chunked(d).sum().backward()  # Opacus's first (norm) pass; its clipped second pass adds nothing to norms
            sq = torch.zeros(d["input_ids"].shape[0], dtype=torch.float64)
            for p in params:
                sq += p._norm_sample.double().pow(2)
                p.grad = None
            return sq

        return ghost, hooks.remove_hooks

    if method == "opacus_ew":
        from opacus.grad_sample import GradSampleModuleExpandedWeights
        from opacus.utils.module_utils import trainable_parameters

        path = head_path(model)
        if path is None:
            raise RuntimeError("no plain backbone + Linear head for the chunked loss")
        wrapped = GradSampleModuleExpandedWeights(path.backbone, loss_reduction="sum")
        ew_params = [p for _, p in trainable_parameters(path.backbone)]
        assert len(ew_params) == len(params)

        def ew_losses(d):
            from gradfilter_ray.losses import per_example_losses_from_hidden

            hidden = wrapped(d["input_ids"], attention_mask=d["attention_mask"], use_cache=False).last_hidden_state
            return per_example_losses_from_hidden(hidden, d["labels"], path.head.weight, path.head.bias, 2048)[0]

        return grad_sample_norms(ew_losses, ew_params), None
    raise ValueError(f"unknown method {method!r}")


def child(spec_json: str) -> None:
    job = json.loads(spec_json)
    out = Path(job["out"])
    result: dict = {"model": job["model"], "method": job["method"]}
    try:
        import torch

        torch.set_num_threads(job["threads"])
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        if job["method"].startswith("opacus"):
            import opacus  # noqa: F401 - imported before the baseline: its import is not the method's memory

        model, data = build(job["model"], job["batch"], job["tokens"])
        step, _teardown = prepare(model, job["method"])
        gc.collect()
        base_kib = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
        c0, w0 = time.process_time(), time.perf_counter()
        sq = step(data)  # warm-up: one-time costs (kernel selection, allocator growth) land here
        warm = (time.perf_counter() - w0, time.process_time() - c0)
        c0, w0 = time.process_time(), time.perf_counter()
        step(data)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        result.update(
            {
                "sq_norms": [float(x) for x in sq],
                "wall_s": wall,
                "cpu_s": cpu,
                "warmup_wall_s": warm[0],
                "warmup_cpu_s": warm[1],
                "rss_model_mib": base_kib / 1024,
                "peak_above_model_mib": (_status_kib("VmHWM") - base_kib) / 1024,
                "model_params": sum(p.numel() for p in model.parameters()),
                "lora_params": sum(p.numel() for p in lora_params(model)),
            }
        )
    except Exception as exc:  # noqa: BLE001 - a method Opacus cannot run is a result, reported with its error
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc(limit=6)
    out.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# Parent: rounds of fresh subprocesses, checks, report


def run_child(job: dict, work: Path) -> dict:
    out = work / f"{job['model']}-{job['method']}-{job['round']}.json"
    job = {**job, "out": str(out)}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)], cwd=REPO, capture_output=True, text=True
    )
    if not out.exists():
        return {"error": f"child exited {proc.returncode} without a result", "stderr": proc.stderr[-3000:]}
    return json.loads(out.read_text())


def machine_info(threads: int) -> dict:
    import opacus
    from extraction.report import machine_info as common  # beside this file

    return common(threads) | {"opacus": opacus.__version__}


def summarize(model_key: str, runs: dict[str, list[dict]]) -> dict:
    import numpy as np

    methods: dict[str, dict] = {}
    ref = np.array(runs[REFERENCE][0]["sq_norms"]) if "sq_norms" in runs[REFERENCE][0] else None
    for method, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            methods[method] = {"error": rs[0]["error"], "traceback": rs[0].get("traceback", "")}
            continue
        sq = np.array(ok[0]["sq_norms"])
        rounds_agree = all(np.array_equal(np.array(r["sq_norms"]), sq) for r in ok)
        entry = {
            "wall_s": statistics.median(r["wall_s"] for r in ok),
            "cpu_s": statistics.median(r["cpu_s"] for r in ok),
            "peak_above_model_mib": statistics.median(r["peak_above_model_mib"] for r in ok),
            "wall_runs_s": [round(r["wall_s"], 3) for r in ok],
            "peak_runs_mib": [round(r["peak_above_model_mib"], 1) for r in ok],
            "warmup_wall_runs_s": [round(r["warmup_wall_s"], 3) for r in ok],
            "rss_model_mib": ok[0]["rss_model_mib"],
            "norms_identical_across_rounds": bool(rounds_agree),
            "sq_norms": sq.tolist(),
        }
        if ref is not None:
            entry["max_rel_diff_vs_loop"] = float(np.max(np.abs(sq - ref) / ref))
        methods[method] = entry
    ours = methods.get("ours", {})
    for method, entry in methods.items():
        if method.startswith("opacus") and "wall_s" in entry and "wall_s" in ours:
            entry["ours_over_this"] = {
                "wall": ours["wall_s"] / entry["wall_s"],
                "cpu": ours["cpu_s"] / entry["cpu_s"],
                "peak": ours["peak_above_model_mib"] / max(entry["peak_above_model_mib"], 1e-9),
            }
    first = next(r for rs in runs.values() for r in rs if "model_params" in r)
    return {
        "label": MODELS[model_key]["label"],
        "model_params": first["model_params"],
        "lora_params": first["lora_params"],
        "methods": methods,
    }


def table(results: dict) -> str:
    """Markdown: times as wall / CPU seconds; ratios in CPU time, which on a shared machine is the closer estimate
    of what one uncontended thread takes (both ratios are in the results file)."""
    rows = [
        "| model | method | s, wall / CPU | peak GiB above model | worst rel diff vs loop | ours / this: CPU; peak |",
        "|---|---|---|---|---|---|",
    ]
    for model_key, res in results["models"].items():
        for method in METHODS:
            e = res["methods"].get(method)
            if e is None:
                continue
            if "error" in e:
                rows.append(f"| {model_key} | {method} | - | - | - | does not run: {e['error'][:160]} |")
                continue
            diff = "reference" if method == REFERENCE else f"{e['max_rel_diff_vs_loop']:.1e}"
            ratio = e.get("ours_over_this")
            ratio_s = f"{ratio['cpu']:.2f}x; {ratio['peak']:.2f}x" if ratio else "-"
            rows.append(
                f"| {model_key} | {method} | {e['wall_s']:.2f} / {e['cpu_s']:.2f} | "
                f"{e['peak_above_model_mib'] / 1024:.2f} | {diff} | {ratio_s} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny demo model only, one round")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds, each method once a round (3)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every child")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    if REFERENCE not in args.methods:
        ap.error(f"--methods must include the reference {REFERENCE}")

    rounds = args.rounds or (1 if args.quick else 3)
    models = ["demo"] if args.quick else ["gpt2", "demo"]
    out_file = RESULTS / ("opacus_compare.quick.json" if args.quick else "opacus_compare.json")
    t0 = time.perf_counter()
    results: dict = {
        "benchmark": "opacus_compare",
        "mode": "quick" if args.quick else "default",
        "machine": machine_info(args.threads),
        "setup": {
            "batch": args.batch,
            "tokens": args.tokens,
            "rows": "random token ids (seeded), every position real; loss on the second half of each row",
            "loss": "per example: mean cross-entropy over its own response tokens; Opacus loss_reduction='sum'",
            "lora": f"r={LORA['rank']}, alpha={LORA['alpha']}, the project's default targets (gpt2: c_attn, c_proj "
            f"incl. mlp.c_proj; llama: q/k/v/o_proj), lora_B ~ N(0, {LORA_B_STD}^2), fp32, eval mode",
            "timing": "per (model, method, round) a fresh subprocess: build, one warm-up call, one timed call; "
            f"{rounds} interleaved rounds, median",
            "memory": "VmHWM after the warm-up and the timed call minus VmRSS before them (VmHWM reset by "
            "/proc/self/clear_refs); the model, its hooks and the inputs are in the baseline",
            "tolerance": {"default": NORM_RTOL, **RTOL},
        },
        "models": {},
    }
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gfr-opacus-") as tmp:
        work = Path(tmp)
        for model_key in models:
            runs: dict[str, list[dict]] = {m: [] for m in args.methods}
            for r in range(rounds):
                for method in args.methods:
                    if runs[method] and "error" in runs[method][0]:
                        continue  # it cannot run: once is enough to report why
                    job = {
                        "model": model_key,
                        "method": method,
                        "round": r,
                        "threads": args.threads,
                        "batch": args.batch,
                        "tokens": args.tokens,
                    }
                    res = run_child(job, work)
                    runs[method].append(res)
                    shown = res.get("error") or (
                        f"{res['wall_s']:.2f} s (warm-up {res['warmup_wall_s']:.2f} s), "
                        f"peak +{res['peak_above_model_mib']:.0f} MiB"
                    )
                    log(f"[{model_key} round {r + 1}/{rounds}] {method}: {shown}")
            if "error" in runs[REFERENCE][0]:
                raise SystemExit(f"the reference loop failed on {model_key}: {runs[REFERENCE][0]['error']}")
            res = summarize(model_key, runs)
            results["models"][model_key] = res
            for method, e in res["methods"].items():
                if "max_rel_diff_vs_loop" in e and not e["max_rel_diff_vs_loop"] <= RTOL.get(method, NORM_RTOL):
                    failed.append(f"{model_key}/{method}: {e['max_rel_diff_vs_loop']:.2e}")
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["total_wall_s"] = time.perf_counter() - t0
    results["table_md"] = table(results)
    results["status"] = "ok" if not failed else f"correctness check failed: {failed}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(results, indent=2))
    log("\n" + results["table_md"])
    log(f"\nresults written to {out_file.relative_to(REPO)} ({results['total_wall_s']:.0f} s)")
    if failed:
        log(f"CORRECTNESS FAILURE: batched norms differ from the batch-size-1 loop beyond tolerance: {failed}")
        raise SystemExit(2)


if __name__ == "__main__":
    main()
