"""GPT-2's activation as one kernel: the selection it gives, and the time and memory of the MLP activation.

GPT-2 configs name `gelu_new`, tanh-GELU written as a Python formula (in transformers: several elementwise kernels and
the intermediate tensors autograd saves for them). `models.model_config` renames it to `gelu_pytorch_tanh`, the same
function in one kernel. Side by side in one run, with the same seeds and rows:

- selection: a GPT-2-shaped proxy built from its config (2 layers, d=64, the real 50,257 vocabulary, `gelu_new`),
  a 3-member ensemble trained for 2 epochs (`ensemble.loop.train_member`, the demo's ensemble settings) on 400 bundled
  Alpaca rows tokenised as the `tokens` stage does, every adapter's per-example norms (`gradients.extract
  .extract_block`), G-SNR (`scoring.gsnr.components`); once with the formula, once with the kernel. Reported: the
  largest relative difference of the squared norms and of G-SNR, and the overlap of the top 5/10/15% selections.
- activation alone: forward + backward of the activation on a [16, 512, 3072] float32 tensor (GPT-2 124M's MLP width),
  median of interleaved repeats, and the bytes autograd saves for backward (saved-tensor hooks).

    python benchmarks/gelu_kernel.py [--quick]    # writes benchmarks/results/gelu_kernel[.quick].json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ensemble_padding import GPT2, alpaca_rows  # noqa: E402 (beside this file)
from extraction.report import machine_info  # noqa: E402
from transformers.activations import GELUTanh, NewGELUActivation  # noqa: E402

from gradfilter_ray import models  # noqa: E402
from gradfilter_ray.config import ModelSpec, ProxyConfig, load  # noqa: E402
from gradfilter_ray.data.tokenized import tokenize_table  # noqa: E402
from gradfilter_ray.ensemble.loop import TokenRows, train_member  # noqa: E402
from gradfilter_ray.gradients.extract import adapter_name, extract_block  # noqa: E402
from gradfilter_ray.lora import attach_lora, load_adapters, save_adapter  # noqa: E402
from gradfilter_ray.scoring.gsnr import components  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
RATIOS = (0.05, 0.10, 0.15)


def tokens_of(rows: int, proxy: ProxyConfig):
    table = tokenize_table(alpaca_rows(rows), models.load_tokenizer(proxy.model), proxy)
    keep = np.flatnonzero(np.array(table["n_response_tokens"].to_pylist()) > 0)
    return table.take(keep)


def norms_with(activations: dict, proxy: ProxyConfig, tokens, members: int) -> dict[str, np.ndarray]:
    """The ensemble trained and every adapter's norms extracted, with `ONE_KERNEL_ACTIVATIONS = activations`."""
    saved = dict(models.ONE_KERNEL_ACTIVATIONS)
    models.ONE_KERNEL_ACTIVATIONS.clear()
    models.ONE_KERNEL_ACTIVATIONS.update(activations)
    try:
        ens = load(REPO / "jobs" / "configs" / "demo.yaml").ensemble
        rows = TokenRows.from_columns(
            tokens["id"].to_pylist(), tokens["input_ids"].to_pylist(), tokens["label_start"].to_pylist()
        )
        pad_id = models.load_tokenizer(proxy.model).pad_token_id
        with tempfile.TemporaryDirectory(prefix="gelu-kernel-") as tmp:
            for m in range(members):
                member = attach_lora(models.load_causal_lm(proxy.model), ens, seed=ens.seed + m)

                def on_epoch_end(epoch, model, optimizer, losses, m=m):
                    save_adapter(model, Path(tmp) / adapter_name(m, "early" if epoch == ens.early_epoch else "late"))

                train_member(member, rows, ens, ens.seed + m, torch.device("cpu"), pad_id, on_epoch_end)
            folders = {p.name: p for p in sorted(Path(tmp).iterdir())}
            model = load_adapters(models.load_causal_lm(proxy.model), folders)
        out = extract_block(
            model, tokens, members=members, device=torch.device("cpu"), pad_id=pad_id, batch_size=16,
            tokens_per_batch=8192,
        )  # fmt: skip
        act = type(model.get_base_model().transformer.h[0].mlp.act).__name__
        return {
            "activation": act,
            "sq_early": np.array(out["sq_norm_early"].to_pylist()),
            "sq_late": np.array(out["sq_norm_late"].to_pylist()),
            "n": np.array(out["n_response_tokens"].to_pylist()),
        }
    finally:
        models.ONE_KERNEL_ACTIVATIONS.clear()
        models.ONE_KERNEL_ACTIVATIONS.update(saved)


def top(scores: np.ndarray, ratio: float) -> set[int]:
    k = max(1, int(round(ratio * np.isfinite(scores).sum())))
    order = np.argsort(-np.where(np.isfinite(scores), scores, -np.inf), kind="stable")
    return set(order[:k].tolist())


def selection(rows: int, members: int) -> dict:
    proxy = ProxyConfig(model=ModelSpec(build_from_config=GPT2, tokenizer="bundled:gpt2", init_seed=0), max_length=512)
    tokens = tokens_of(rows, proxy)
    started = time.perf_counter()
    formula = norms_with({}, proxy, tokens, members)
    kernel = norms_with({"gelu_new": "gelu_pytorch_tanh"}, proxy, tokens, members)
    gsnr = {
        name: components(r["sq_early"], r["sq_late"], r["n"], eps=1e-8)["gsnr"]
        for name, r in (("f", formula), ("k", kernel))
    }
    rel = {
        key: float(np.max(np.abs(kernel[key] - formula[key]) / np.abs(formula[key])))
        for key in ("sq_early", "sq_late")
    }
    finite = np.isfinite(gsnr["f"]) & np.isfinite(gsnr["k"])
    return {
        "rows": len(tokens),
        "members": members,
        "activations": [formula["activation"], kernel["activation"]],
        "max_rel_diff_sq_norm": rel,
        "max_rel_diff_gsnr": float(np.max(np.abs(gsnr["k"][finite] - gsnr["f"][finite]) / np.abs(gsnr["f"][finite]))),
        "top_overlap": {
            f"{r:.2f}": len(top(gsnr["f"], r) & top(gsnr["k"], r)) / len(top(gsnr["f"], r)) for r in RATIOS
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def saved_bytes(act: torch.nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        act(x)
    return total


def activation_alone(shape: tuple[int, ...], repeats: int) -> dict:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    acts = {"gelu_new": NewGELUActivation(), "gelu_pytorch_tanh": GELUTanh()}
    times: dict[str, list[float]] = {name: [] for name in acts}
    for _ in range(repeats + 1):  # the first round warms up
        for name, act in acts.items():
            t0 = time.perf_counter()
            act(x).backward(grad)
            times[name].append(time.perf_counter() - t0)
            x.grad = None
    median = {name: float(np.median(t[1:])) for name, t in times.items()}
    saved = {name: saved_bytes(act, x) for name, act in acts.items()}
    return {
        "shape": list(shape),
        "seconds_fwd_bwd": median,
        "speedup": median["gelu_new"] / median["gelu_pytorch_tanh"],
        "saved_bytes": saved,
        "saved_ratio": saved["gelu_new"] / saved["gelu_pytorch_tanh"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="48 rows, 2 members, a small activation tensor")
    args = ap.parse_args()
    torch.set_num_threads(2)
    report = {
        "machine": machine_info(2),
        "activation_alone": activation_alone((2, 128, 768) if args.quick else (16, 512, 3072), 3 if args.quick else 7),
        "selection": selection(48 if args.quick else 400, 2 if args.quick else 3),
    }
    out = RESULTS / ("gelu_kernel.quick.json" if args.quick else "gelu_kernel.json")
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
