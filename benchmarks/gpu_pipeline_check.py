"""GPU path of the ensemble loop and the extraction actor, without Ray (the device machine has no Ray).

Checks that the stages take CUDA + bf16 when a GPU is assigned: a member trains on CUDA under bf16 autocast and
its loss falls; `NormExtractor` (the extraction stage's Ray Data actor class, called in-process on `tokens/`-style
rows) produces bf16 CUDA norms close to an fp32 CPU run of the same adapters, and its throughput. Writes
DIR/gpu_pipeline_check.json.
Usage: python3 benchmarks/gpu_pipeline_check.py --out DIR [--device cpu --small]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from gradfilter_ray.config import EnsembleConfig, GradientsConfig, ModelSpec, ProxyConfig  # noqa: E402
from gradfilter_ray.data.tokenized import tokenize_table  # noqa: E402
from gradfilter_ray.ensemble.loop import TokenRows, train_member  # noqa: E402
from gradfilter_ray.gradients.stage import NormExtractor, adapter_name  # noqa: E402
from gradfilter_ray.lora import attach_lora, save_adapter  # noqa: E402
from gradfilter_ray.models import load_causal_lm, load_tokenizer  # noqa: E402
from gradfilter_ray.storage import open_location  # noqa: E402


def gpt2_spec(small: bool) -> ModelSpec:
    size = {"n_layer": 2, "n_embd": 64, "n_head": 2} if small else {"n_layer": 12, "n_embd": 768, "n_head": 12}
    return ModelSpec(build_from_config={"model_type": "gpt2", "n_positions": 1024, **size}, tokenizer="bundled:gpt2")


def alpaca_rows(n: int) -> pa.Table:
    rows = json.loads((REPO / "gradfilter_ray/assets/data/alpaca_sample_1k.json").read_text())
    rows = [r for r in rows if r["output"].strip()][:n]
    return pa.table(
        {
            "id": list(range(len(rows))),
            "instruction": [r["instruction"] for r in rows],
            "input": [r["input"] for r in rows],
            "output": [r["output"] for r in rows],
        }
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    results: dict = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    spec = gpt2_spec(args.small)
    proxy = ProxyConfig(model=spec, max_length=256)
    ens = EnsembleConfig(members=2, epochs=2, lora_rank=8, lora_alpha=16, learning_rate=2e-3, batch_size=16)
    table = alpaca_rows(64 if args.small else 512)
    tokenizer = load_tokenizer(spec)
    tokens = tokenize_table(table, tokenizer, proxy)
    rows = TokenRows.from_columns(
        tokens["id"].to_pylist(), tokens["input_ids"].to_numpy(zero_copy_only=False), tokens["label_start"].to_pylist()
    )

    # 1. ensemble member loop on the device (bf16 autocast on CUDA), saving early/late adapters
    adapters = {}  # adapter name -> its folder, as the stage passes them
    workdir = Path(tempfile.mkdtemp())
    for member in range(ens.members):
        model = attach_lora(load_causal_lm(spec, torch.float32, device), ens, seed=10 + member)
        epoch_losses = {}

        def on_epoch_end(epoch, model, optimizer, losses, member=member, epoch_losses=epoch_losses):
            epoch_losses[epoch] = float(np.mean(losses))
            folder = workdir / f"m{member}_e{epoch}"
            save_adapter(model, folder)
            checkpoint = "early" if epoch == 1 else "late"
            adapters[adapter_name(member, checkpoint)] = open_location(str(folder))

        started = time.perf_counter()
        train_member(model, rows, ens, 10 + member, device, tokenizer.pad_token_id, on_epoch_end)
        results[f"member{member}_train"] = {"epoch_mean_loss": epoch_losses, "seconds": time.perf_counter() - started}
    results["ensemble_rows"] = len(rows)
    results["ensemble_epochs"] = ens.epochs
    results["loss_falls"] = all(
        results[f"member{m}_train"]["epoch_mean_loss"][2] < results[f"member{m}_train"]["epoch_mean_loss"][1]
        for m in range(ens.members)
    )

    # 2. the extraction actor class on the device vs fp32 on CPU
    def extract(dev: str, precision: str, n: int) -> tuple[pa.Table, float]:
        grads = GradientsConfig(
            batch_size=32, gpus_per_actor=1.0 if dev == "cuda" else 0.0, precision=precision, cpus_per_actor=4
        )
        actor = NormExtractor(asdict(proxy), asdict(grads), ens.members, adapters)
        actor(tokens.slice(0, 8))  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = actor(tokens.slice(0, n))
        if dev == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - started

    n_check = 16 if args.small else 32
    reference, ref_seconds = extract("cpu", "float32", n_check)
    if device.type == "cuda":
        bf16, _ = extract("cuda", "auto", n_check)
        fp32_gpu, _ = extract("cuda", "float32", n_check)
        for name, out in (("bf16", bf16), ("fp32_cuda", fp32_gpu)):
            a = np.array(out["sq_norm_late"].to_pylist())
            b = np.array(reference["sq_norm_late"].to_pylist())
            ok = b > 0
            rel = np.abs(a[ok] - b[ok]) / b[ok]
            results[f"extractor_{name}_vs_cpu_fp32"] = {
                "max_rel": float(rel.max()),
                "median_rel": float(np.median(rel)),
            }
    # Throughput of the whole table on the device, as the stage runs it (bf16 on CUDA, fp32 on CPU): the input
    # of benchmarks/sizing.py.
    full, seconds = extract(device.type, "auto", len(table))
    n_tokens = int(np.sum(full["n_tokens"].to_numpy()))
    results["extractor_throughput"] = {
        "precision": "bfloat16" if device.type == "cuda" else "float32",
        "examples": full.num_rows,
        "adapters": len(adapters),
        "seconds": seconds,
        "examples_per_s": full.num_rows / seconds,
        "norms_per_s": full.num_rows * len(adapters) / seconds,
        "tokens_per_s": n_tokens / seconds,
        **({"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20} if device.type == "cuda" else {}),
    }
    results["extractor_cpu_fp32_seconds"] = ref_seconds
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_pipeline_check.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
