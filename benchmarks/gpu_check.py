"""`make gpu-check`: the ensemble, extraction and target fine-tuning cores on one GPU at the shapes that matter.

The GPU machine has torch (CUDA), transformers, peft and pyarrow but no Ray, DeepSpeed or network, so this drives
the Ray-free cores directly (the Ray shells are proven on CPU by the test suite): `ensemble.loop.train_member` with
length-grouped batches under bf16 autocast, `gradients.extract.extract_block` with a token budget, the norm kernel
`gradients.norms.per_example_sq_norms`. The proxy is GPT-2 124M-shaped (12 layers, d=768, the real 50,257 vocab),
random-init from its config; rows are synthetic token ids at up to 512 tokens plus a few at 1,024.

It measures, and writes to OUT/gpu_check.json (which `benchmarks/sizing.py` reads):
- ensemble: each member's examples/s, peak memory, padding efficiency, first and last loss;
- extraction: examples/s over all 2M adapters, peak memory, padding efficiency, OOM splits;
- memory per token: the kernel's peak above the resident model at several token budgets (what to set
  `gradients.tokens_per_batch` to for a given GPU);
- accuracy: bf16 and fp32 batched norms against an independent fp64 batch-size-1 autograd loop (the plain
  per-example gradient, no hooks), including rows of 1,024 tokens;
- speed: the batched kernel against a batch-size-1 loop of the same kernel;
- target (benchmarks/gpu_check_target.py): a TinyLlama-1.1B-shaped random-init LLaMA fine-tuned with DeepSpeed
  ZeRO-3 in bf16 through the finetune stage's cores (one process, world size 1): tokens/s and samples/s per GPU,
  step time, peak memory, first/last loss; one resumable checkpoint (bytes, bytes/parameter, seconds); the final
  save as the stage writes it (seconds, bytes); then the saved folder loaded as evaluation loads it and
  `generate_answers` at batches 8, 16 and 32 (new tokens/s). `benchmarks/sizing.py` scales these to 7B and 13B.
It exits 1 when a correctness threshold fails (a failing step is recorded in the JSON with its error, and the other
steps still run). `--smoke` runs the same steps on CPU with tiny models in well under a minute (CI runs it, so the
script cannot rot between GPU runs).

DeepSpeed reaches the GPU machine as a carried folder: `make gpu-carry` here builds `.gpu_carry/` (DeepSpeed copied
from the venv, plus the pure-Python packages it needs that the machine lacks, and pydantic-core built for its
Python, GPU_PY_VERSION=3.12), and `make gpu-check` puts that folder on PYTHONPATH. The device-tool call:

    run(command="make gpu-check", carry=[".gpu_carry"], timeout_s=600)

    python3 benchmarks/gpu_check.py --out benchmarks/results          # on the GPU (make gpu-check)
    python3 benchmarks/gpu_check.py --smoke --out /tmp/gpu-check      # CPU smoke
    python3 benchmarks/gpu_check.py --steps target --out /tmp/t       # one step alone (a re-run after a failure)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gpu_check_target import GPU_TARGET, SMOKE_TARGET, target  # noqa: E402 (beside this file)

from gradfilter_ray.config import EnsembleConfig, ModelSpec  # noqa: E402
from gradfilter_ray.data.prompt import collate_rows  # noqa: E402
from gradfilter_ray.ensemble.loop import TokenRows, train_member  # noqa: E402
from gradfilter_ray.gradients.extract import adapter_name, extract_block  # noqa: E402
from gradfilter_ray.gradients.norms import per_example_sq_norms  # noqa: E402
from gradfilter_ray.lora import attach_lora, load_adapters, save_adapter  # noqa: E402
from gradfilter_ray.models import load_causal_lm  # noqa: E402

# bf16 norms carry bf16's ~3 significant digits through 12 layers; fp32 must agree with fp64 closely.
MAX_REL_ERR = {"float32": 1e-3, "bfloat16": 0.25}
MEDIAN_REL_ERR = {"float32": 1e-4, "bfloat16": 0.05}


@dataclass(frozen=True)
class Shape:
    """What one check runs: model size, rows and budgets (the GPU shape, or the CPU smoke shape)."""

    model: dict
    rows: int
    long_rows: int
    max_len: int
    long_len: int
    members: int
    epochs: int
    member_batch: int
    tokens_per_batch: int
    budgets: tuple[int, ...]
    reference_rows: int
    speed_rows: int


GPU = Shape(
    model={"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},  # GPT-2 124M, vocab 50,257
    rows=2000,
    long_rows=16,
    max_len=512,
    long_len=1024,
    members=2,
    epochs=2,
    member_batch=16,
    tokens_per_batch=65_536,
    budgets=(16_384, 32_768, 65_536),
    reference_rows=24,
    speed_rows=64,
)
SMOKE = Shape(
    model={"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256, "vocab_size": 512},
    rows=24,
    long_rows=2,
    max_len=64,
    long_len=128,
    members=2,
    epochs=2,
    member_batch=8,
    tokens_per_batch=1_024,
    budgets=(512, 1_024),
    reference_rows=8,
    speed_rows=8,
)


def spec(shape: Shape) -> ModelSpec:
    return ModelSpec(build_from_config={"model_type": "gpt2", **shape.model}, tokenizer="bundled:gpt2")


def synthetic_rows(shape: Shape, vocab: int, seed: int = 0) -> TokenRows:
    """Token-id rows: most between half and all of max_len, a few at long_len; the response starts between a
    quarter and three quarters of the row."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate(
        [rng.integers(shape.max_len // 2, shape.max_len + 1, shape.rows), np.full(shape.long_rows, shape.long_len)]
    )
    ids = [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]
    starts = np.array([rng.integers(n // 4, 3 * n // 4) for n in lengths])
    return TokenRows.from_columns(np.arange(len(lengths)), ids, starts)


def token_table(rows: TokenRows) -> pa.Table:
    """`tokens/`-shaped rows for extract_block (the unconditioned IFD pass gets the response alone)."""
    response = [ids[s:] for ids, s in zip(rows.input_ids, rows.labels_at)]
    return pa.table(
        {
            "id": pa.array(rows.ids, pa.int64()),
            "input_ids": pa.array([x.tolist() for x in rows.input_ids], pa.list_(pa.int32())),
            "label_start": pa.array(rows.labels_at, pa.int32()),
            "response_input_ids": pa.array([x.tolist() for x in response], pa.list_(pa.int32())),
            "response_label_start": pa.array(np.zeros(len(response)), pa.int32()),
        }
    )


class Memory:
    """Peak device memory of a step, above what was allocated when it started (CUDA), or the process's peak RSS
    growth (CPU, coarse: the smoke run only checks the plumbing)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Memory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _rss_peak()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = _rss_peak() - self.base
        self.seconds = time.perf_counter() - self.started


def _rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def train_ensemble(shape: Shape, rows: TokenRows, device: torch.device, folder: Path) -> list[dict]:
    """Each member trains alone (as it does on its own GPU), length-grouped, bf16 autocast on CUDA; its early and
    late adapters land in `folder`."""
    ens = EnsembleConfig(members=shape.members, epochs=shape.epochs, batch_size=shape.member_batch, lora_dropout=0.0)
    results = []
    for m in range(shape.members):
        model = attach_lora(load_causal_lm(spec(shape), torch.float32, device), ens, seed=ens.seed + m)
        losses: dict[int, list[float]] = {}
        padding: list[float] = []

        def on_epoch_end(epoch, model, optimizer, step_losses, m=m, losses=losses):
            losses[epoch] = step_losses
            checkpoint = "early" if epoch == ens.early_epoch else "late"
            save_adapter(model, folder / adapter_name(m, checkpoint))

        with Memory(device) as mem:
            train_member(
                model, rows, ens, ens.seed + m, device, 0, on_epoch_end,
                on_epoch_planned=lambda epoch, stats, padding=padding: padding.append(stats.efficiency),
            )  # fmt: skip
        first, last = losses[1][0], losses[ens.epochs][-1]
        results.append(
            {
                "member": m,
                "rows": len(rows),
                "epochs": ens.epochs,
                "seconds": round(mem.seconds, 3),
                "examples_per_s": round(len(rows) * ens.epochs / mem.seconds, 1),
                "peak_bytes": int(mem.peak),
                "padding_efficiency": round(float(np.mean(padding)), 4),
                "first_loss": first,
                "last_loss": last,
                "finite": bool(np.isfinite(losses[1]).all() and np.isfinite(losses[ens.epochs]).all()),
            }
        )
        del model
    return results


def extraction(shape: Shape, rows: TokenRows, folders: dict[str, Path], device: torch.device, dtype) -> dict:
    model = load_adapters(load_causal_lm(spec(shape), dtype, device), folders)
    table = token_table(rows)
    stats: dict = {}
    with Memory(device) as mem:
        out = extract_block(
            model, table, members=shape.members, batch_size=512, tokens_per_batch=shape.tokens_per_batch,
            loss_chunk_tokens=2048, device=device, pad_id=0, stats=stats,
        )  # fmt: skip
    norms = np.array(out["sq_norm_late"].to_pylist())
    return {
        "rows": len(rows),
        "adapters": len(folders),
        "dtype": str(dtype).replace("torch.", ""),
        "tokens_per_batch": shape.tokens_per_batch,
        "seconds": round(mem.seconds, 3),
        "examples_per_s": round(len(rows) / mem.seconds, 2),
        "norms_per_s": round(len(rows) * len(folders) / mem.seconds, 1),
        "peak_bytes": int(mem.peak),
        "stats": {k: int(v) for k, v in stats.items()},
        "all_finite": bool(np.isfinite(norms).all()),
    }


def device_batch(rows: TokenRows, picked, device) -> dict:
    batch = collate_rows([rows.input_ids[i] for i in picked], rows.labels_at[picked], 0)
    return {k: v.to(device) for k, v in batch.items()}


def memory_per_token(shape: Shape, rows: TokenRows, folders: dict[str, Path], device, dtype) -> dict:
    """The kernel's peak above the resident model for one adapter, at each token budget (rows of max_len)."""
    model = load_adapters(load_causal_lm(spec(shape), dtype, device), folders)
    name = adapter_name(0, "late")
    full = [i for i in range(len(rows)) if len(rows.input_ids[i]) >= shape.max_len // 2]
    points = []
    for budget in shape.budgets:
        picked = full[: max(1, budget // shape.max_len)]
        batch = device_batch(rows, picked, device)
        tokens = batch["input_ids"].numel()
        per_example_sq_norms(model, **batch, adapter_name=name)  # warm-up (allocator, kernels)
        with Memory(device) as mem:
            per_example_sq_norms(model, **batch, adapter_name=name)
        points.append({"budget": budget, "tokens": tokens, "peak_bytes": int(mem.peak), "seconds": mem.seconds})
    per_token = [p["peak_bytes"] / p["tokens"] for p in points]
    return {"points": points, "bytes_per_token": max(per_token), "spread": max(per_token) / max(min(per_token), 1)}


def reference_norms(model, rows: TokenRows, picked, device, name: str) -> np.ndarray:
    """The plain per-example gradient, one row at a time: the mean response-token cross-entropy over full logits,
    torch.autograd.grad w.r.t. the adapter's LoRA parameters, the squared norm summed. No hooks, no windowing."""
    model.set_adapter(name)
    params = [p for n, p in model.named_parameters() if "lora_" in n and f".{name}." in n]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    out = []
    try:
        for i in picked:
            batch = device_batch(rows, [i], device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            target = batch["labels"][0, 1:]
            keep = target != -100
            loss = F.cross_entropy(logits[0, :-1][keep].double(), target[keep])
            grads = torch.autograd.grad(loss, params)
            out.append(float(sum(g.double().pow(2).sum() for g in grads)))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return np.array(out)


def accuracy(shape: Shape, rows: TokenRows, folders: dict[str, Path], device) -> dict:
    """Batched norms in bf16 (GPU) / fp32 vs the fp64 batch-size-1 reference, long rows included."""
    n = len(rows)
    picked = list(range(shape.reference_rows - 2)) + [n - 2, n - 1]  # the last rows are the long ones
    name = adapter_name(0, "late")
    ref_model = load_adapters(load_causal_lm(spec(shape), torch.float64, device), folders)
    reference = reference_norms(ref_model, rows, picked, device, name)
    del ref_model
    result = {"rows": len(picked), "longest": int(max(len(rows.input_ids[i]) for i in picked))}
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        model = load_adapters(load_causal_lm(spec(shape), dtype, device), folders)
        got, _, _ = per_example_sq_norms(model, **device_batch(rows, picked, device), adapter_name=name)
        rel = np.abs(got.numpy() - reference) / np.abs(reference)
        key = str(dtype).replace("torch.", "")
        result[key] = {
            "median_rel_err": float(np.median(rel)),
            "max_rel_err": float(rel.max()),
            "pass": bool(np.median(rel) <= MEDIAN_REL_ERR[key] and rel.max() <= MAX_REL_ERR[key]),
        }
        del model
    return result


def batched_vs_loop(shape: Shape, rows: TokenRows, folders: dict[str, Path], device, dtype) -> dict:
    model = load_adapters(load_causal_lm(spec(shape), dtype, device), folders)
    name = adapter_name(0, "late")
    picked = list(range(shape.speed_rows))
    batch = device_batch(rows, picked, device)
    per_example_sq_norms(model, **batch, adapter_name=name)  # warm-up
    with Memory(device) as batched:
        per_example_sq_norms(model, **batch, adapter_name=name)
    singles = [device_batch(rows, [i], device) for i in picked]
    per_example_sq_norms(model, **singles[0], adapter_name=name)
    with Memory(device) as loop:
        for single in singles:
            per_example_sq_norms(model, **single, adapter_name=name)
    return {
        "rows": len(picked),
        "batched_s": round(batched.seconds, 4),
        "loop_s": round(loop.seconds, 4),
        "speedup": round(loop.seconds / batched.seconds, 2),
    }


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), cuda=torch.version.cuda)
    return facts


STEPS = ("ensemble", "extraction", "memory_per_token", "accuracy", "batched_vs_loop", "target")


def guarded(step):
    """A step's failure (an import missing, a kernel raising, DeepSpeed's collectives failing) is recorded, not
    raised, so one GPU run still brings back every other step's numbers."""
    try:
        return step()
    except Exception as e:  # noqa: BLE001 (any failure is the finding)
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}


def write_report(report: dict, path: Path, started: float) -> dict:
    """Write the report as it stands (whole, through a temporary file: a kill mid-write leaves the previous one);
    its checks."""
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["checks"] = checks_of(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(report, indent=2))
    os.replace(partial, path)
    return report["checks"]


def checks_of(report: dict) -> dict:
    checks = {}
    for name in ("ensemble", "extraction", "memory_per_token", "accuracy", "batched_vs_loop"):
        if isinstance(report.get(name), dict) and "error" in report[name]:
            checks[f"{name}_ran"] = False
    if isinstance(report.get("ensemble"), list):
        checks["ensemble_finite"] = all(m["finite"] for m in report["ensemble"])
    if "extraction" in report and "error" not in report["extraction"]:
        checks["extraction_finite"] = report["extraction"]["all_finite"]
    if "accuracy" in report and "error" not in report["accuracy"]:
        checks.update({f"accuracy_{k}": v["pass"] for k, v in report["accuracy"].items() if isinstance(v, dict)})
    if "target" in report:
        checks["target_ran"] = "error" not in report["target"]
        checks.update({f"target_{k}": v for k, v in report["target"].get("checks", {}).items()})
    return checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # On a lent GPU machine only what lands under $OUT comes back: that is the default there.
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model: checks the script itself")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    args = ap.parse_args()
    wanted = args.steps.split(",")
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:
        ap.error(f"unknown steps {unknown}")
    if {"extraction", "memory_per_token", "accuracy", "batched_vs_loop"} & set(wanted) and "ensemble" not in wanted:
        ap.error("the extraction steps read the ensemble's adapters: include 'ensemble'")
    shape = SMOKE if args.smoke else GPU
    target_shape = SMOKE_TARGET if args.smoke else GPU_TARGET
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        # Tiny matrices gain nothing from a second thread, and on a shared, loaded CPU OpenMP's spinning threads made
        # one smoke run 10x slower (seen: 16 ms per 64x128 matmul). Timings here only check the plumbing.
        torch.set_num_threads(1)
    torch.manual_seed(0)
    started = time.perf_counter()
    out = Path(args.out) / ("gpu_check.smoke.json" if args.smoke else "gpu_check.json")
    report: dict = {
        "mode": "smoke" if args.smoke else "gpu",
        "environment": environment(device),
        "shape": vars(shape),
        "target_shape": asdict(target_shape),
    }
    rows = synthetic_rows(shape, vocab=shape.model.get("vocab_size", 50257))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        folders_root = Path(tmp) / "adapters"
        folders_root.mkdir()
        steps = {
            "ensemble": lambda: train_ensemble(shape, rows, device, folders_root),
            "extraction": lambda: extraction(shape, rows, folders, device, dtype),
            "memory_per_token": lambda: memory_per_token(shape, rows, folders, device, dtype),
            "accuracy": lambda: accuracy(shape, rows, folders, device),
            "batched_vs_loop": lambda: batched_vs_loop(shape, rows, folders, device, dtype),
            "target": lambda: target(target_shape, device, Path(tmp) / "target"),
        }
        folders: dict[str, Path] = {}
        for name in (s for s in STEPS if s in wanted):
            t0 = time.perf_counter()
            if name != "ensemble" and name != "target" and not folders:
                report[name] = {"error": "skipped: the ensemble step trained no adapters"}
            else:
                report[name] = guarded(steps[name])
            if name == "ensemble":
                folders = {p.name: p for p in sorted(folders_root.iterdir())}
            print(f"[gpu-check] {name} done in {time.perf_counter() - t0:.1f}s: {json.dumps(report[name])[:400]}")
            write_report(report, out, started)  # after every step: a later crash keeps what came before
            if device.type == "cuda":
                torch.cuda.empty_cache()
    checks = write_report(report, out, started)
    print(f"[gpu-check] {'PASS' if all(checks.values()) else 'FAIL'} {checks} in {report['seconds']}s -> {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
