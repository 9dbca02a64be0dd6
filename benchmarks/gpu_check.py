"""The GPU check: the ensemble, extraction and target fine-tuning cores on one GPU at the shapes that matter, then
the sizing table from what it measured. One command does all of it: `python3 benchmarks/gpu_check.py`.

The GPU machine brings torch (CUDA), transformers, peft, pyarrow and accelerate (benchmarks/gpu_image.txt) but no
Ray, DeepSpeed or network. This drives the Ray-free cores directly (the Ray shells are proven on CPU by the test
suite); DeepSpeed and its requirements come from `.gpu_carry/` (built by benchmarks/gpu_carry.py, carried with the
working tree), which the check puts first on sys.path itself when the folder is there.

First a preflight, written into the JSON before anything runs: Python, torch and CUDA, the device, the carry, and
every import each step needs, each tried on its own. A step whose imports fail is skipped with the reason in the
JSON (`{"skipped": "missing: deepspeed (ModuleNotFoundError: ...)"}`); the rest still run. Then the steps, each
guarded (a failure is recorded with its traceback), the JSON rewritten after each one:
- ensemble: a GPT-2 124M-shaped random-init proxy (the real 50,257 vocab), each member's examples/s, peak memory,
  padding efficiency, first and last loss (`ensemble.loop.train_member`, shuffled batches, bf16 autocast);
- extraction: `gradients.extract.extract_block` over all 2M adapters with a token budget, in the shipped dtype
  (`gradients.precision`: fp32): examples/s, peak memory;
- memory per token: the norm kernel's peak above the resident model at several token budgets (shipped dtype);
- accuracy: fp32 and bf16 batched norms against an independent fp64 batch-size-1 autograd loop, rows of 1,024
  tokens included, on the proxy given GPT-2-like logits (near -100, see `realistic_logits`); bf16 both with the LM
  head's logits in fp32 (`head_dtype=torch.float32`) and in the model's dtype (None), the opt-in bf16 paths;
- batched vs loop: the batched kernel against a batch-size-1 loop, and its time on a bf16 model with each head
  dtype beside the shipped fp32 (what fp32 extraction costs on the device);
- target (benchmarks/gpu_check_target.py): a TinyLlama-1.1B-shaped LLaMA fine-tuned with DeepSpeed ZeRO-3 in bf16
  through the finetune stage's cores, one checkpoint, the final save, then generation from the saved folder.
Last, `benchmarks/sizing.py` turns the steps that succeeded into the sizing table (OUT/sizing.md, sizing.json),
rebuilt after every step so a run cut short still leaves one.

Exit status: 0 every requested step ran and passed; 1 a step failed or a check did not pass; 3 everything that ran
passed but a step was skipped (its imports failed): the verdict line and the JSON's "skipped" name them; 2 no CUDA
device outside --smoke, or bad arguments. `--smoke` runs the same steps on CPU with tiny models in seconds (the test
suite runs it, so the script cannot rot between GPU runs).

    run(command="python3 benchmarks/gpu_check.py", carry=[".gpu_carry"], timeout_s=480)   # the device tool
    python3 benchmarks/gpu_check.py                        # on the GPU machine: JSON and sizing into $OUT
    python3 benchmarks/gpu_check.py --smoke --out /tmp/g   # CPU smoke
    python3 benchmarks/gpu_check.py --steps target         # one step alone (a re-run after a failure)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CARRY = REPO / ".gpu_carry"


def use_carry(folder: Path = CARRY) -> str | None:
    """Put the carried packages first on sys.path, before anything else is imported: where the machine has its own
    older copy of one (typing-extensions), the carried one must win. A carry built for another Python stays off the
    path (its compiled modules would not load; the preflight says so)."""
    if not folder.is_dir() or _carry_python(folder) not in (None, _running_python()):
        return None
    path = str(folder)
    if path not in sys.path:
        sys.path.insert(0, path)
    return path


def _running_python() -> str:
    return ".".join(platform.python_version_tuple()[:2])


def _carry_python(folder: Path) -> str | None:
    manifest = folder / "manifest.json"
    return json.loads(manifest.read_text()).get("python") if manifest.is_file() else None


CARRIED = use_carry()
for _path in (HERE, REPO):  # the project and the sibling gpu_check_* modules, however this file is started
    if str(_path) not in sys.path:
        sys.path.insert(1 if CARRIED else 0, str(_path))

# bf16 norms carry bf16's ~3 significant digits through 12 layers; fp32 must agree with fp64 closely.
MAX_REL_ERR = {"float32": 1e-3, "bfloat16": 0.25}
MEDIAN_REL_ERR = {"float32": 1e-4, "bfloat16": 0.05}
# GPT-2 small's trained logits sit around -100 with a spread of a few nats; random init gives logits near 0, where
# bf16 rounding is 400x finer than at -100 and the cost of rounding the head's output cannot be seen.
REALISTIC_LOGITS = {"offset": -100.0, "spread": 4.0}


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
    extraction_rows: int  # the extraction step's rows (and the long ones): fp32 runs at a fraction of bf16's rate


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
    extraction_rows=384,
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
    extraction_rows=24,
)

STEPS = ("ensemble", "extraction", "memory_per_token", "accuracy", "batched_vs_loop", "target")
NEEDS_ADAPTERS = ("extraction", "memory_per_token", "accuracy", "batched_vs_loop")

# What each step imports, tried one by one in the preflight: the third-party packages, then the project modules
# whose own imports would fail the step (they catch what the short list misses).
PROXY_IMPORTS = (
    "numpy", "torch", "pyarrow", "yaml", "safetensors", "tokenizers", "transformers", "accelerate", "peft",
    "gradfilter_ray.models", "gradfilter_ray.lora", "gradfilter_ray.data.prompt", "gradfilter_ray.ensemble.loop",
)  # fmt: skip
EXTRACT_IMPORTS = (*PROXY_IMPORTS, "gradfilter_ray.gradients.extract", "gradfilter_ray.gradients.norms")
# DeepSpeed's own requirements that its import and ZeRO-3 path load (cpuinfo and ninja serve op builds only).
TARGET_IMPORTS = (
    *PROXY_IMPORTS, "msgpack", "einops", "hjson", "pydantic", "deepspeed",
    "gradfilter_ray.finetune.ds_config", "gradfilter_ray.finetune.loop", "gradfilter_ray.finetune.model",
    "gradfilter_ray.evaluation.generate", "gpu_check_ds", "gpu_check_generate",
)  # fmt: skip
STEP_IMPORTS = {
    "ensemble": PROXY_IMPORTS,
    "extraction": EXTRACT_IMPORTS,
    "memory_per_token": EXTRACT_IMPORTS,
    "accuracy": EXTRACT_IMPORTS,
    "batched_vs_loop": EXTRACT_IMPORTS,
    "target": TARGET_IMPORTS,
}


# ---------------------------------------------------------------------------------------------------- preflight


def say(line: str) -> None:
    print(line, flush=True)


def _version(name: str, module) -> str | None:
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    from importlib import metadata

    try:
        return metadata.version(metadata.packages_distributions().get(name, [name])[0])
    except Exception:  # noqa: BLE001 (a version is a courtesy)
        return None


def _origin(module) -> str:
    file = getattr(module, "__file__", None) or ""
    parts = Path(file).parts
    if CARRIED and file.startswith(CARRIED):
        return "carry"
    if "site-packages" in parts:  # before the repo: a venv may live inside it
        return str(Path(*parts[: parts.index("site-packages") + 1]))
    return "repo" if file.startswith(str(REPO)) else file


def check_import(name: str) -> dict:
    """Import one module; any exception is the finding (a broken install raises more than ImportError)."""
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:400], "seconds": round(time.perf_counter() - t0, 2)}
    entry = {"ok": True, "seconds": round(time.perf_counter() - t0, 2), "from": _origin(module)}
    if not name.startswith(("gradfilter_ray", "gpu_check")):
        entry["version"] = _version(name, module)
    return entry


def carry_facts() -> dict:
    if not CARRY.is_dir():
        return {"path": None}
    facts: dict = {"path": CARRIED}
    manifest = CARRY / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        facts.update(
            python=m.get("python"),
            mib=m.get("mib"),
            packages=[f"{e['name']} {e['version']}" for e in m.get("carried", [])],
        )
    if not CARRIED:
        facts["mismatch"] = (
            f"{CARRY} was built for Python {facts.get('python')}, this is {_running_python()}: left off sys.path "
            f"(rebuild it with gpu_carry.py --python-version {_running_python()})"
        )
    return facts


def device_facts(smoke: bool) -> dict:
    """torch, CUDA and the device, or why not."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return {"torch": None, "error": f"{type(e).__name__}: {e}"}
    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            gpu=props.name,
            gpu_memory_bytes=int(props.total_memory),
            capability=f"{props.major}.{props.minor}",
            device_count=torch.cuda.device_count(),
        )
    facts["device"] = "cpu" if smoke or not torch.cuda.is_available() else "cuda:0"
    return facts


def environment(pre: dict) -> dict:
    """The facts benchmarks/sizing.py reads (the device's name and memory), from the preflight."""
    dev, imports = pre["device"], pre["imports"]
    facts = {"python": pre["python"], "torch": dev.get("torch"), "device": dev.get("device")}
    facts |= {name: imports[name].get("version") for name in ("transformers", "peft", "deepspeed") if name in imports}
    facts |= {k: dev[k] for k in ("gpu", "gpu_memory_bytes", "cuda") if dev.get(k) is not None}
    return facts


def preflight(wanted: list[str], smoke: bool) -> dict:
    """Everything the run relies on, one line each, within seconds; the steps whose imports fail."""
    if smoke:
        # Chosen before DeepSpeed's import: it otherwise warns that it fell back to CPU (as the finetune worker does).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pre: dict = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform()}
    say(f"[preflight] python {pre['python']} ({sys.executable})")
    pre["carry"] = carry_facts()
    carry = pre["carry"]
    if "mismatch" in carry:
        say(f"[preflight] carry NOT USED: {carry['mismatch']}")
    elif carry["path"]:
        say(f"[preflight] carry {carry['path']} first on sys.path: {', '.join(carry.get('packages', []))}")
    else:
        say(f"[preflight] carry: no {CARRY.name}/ here (DeepSpeed must then be installed)")
    pre["device"] = device_facts(smoke)
    dev = pre["device"]
    if dev.get("torch"):
        say(f"[preflight] torch {dev['torch']}, CUDA {dev['cuda']} (available: {dev['cuda_available']})")
        if "gpu" in dev:
            say(f"[preflight] device {dev['gpu']}, {dev['gpu_memory_bytes'] / 2**30:.1f} GiB, sm {dev['capability']}")
        say(f"[preflight] runs on {dev['device']}")
    else:
        say(f"[preflight] torch MISSING: {dev['error']}")
    names = list(dict.fromkeys(n for step in wanted for n in STEP_IMPORTS[step]))
    pre["imports"] = {}
    for name in names:
        entry = pre["imports"][name] = check_import(name)
        if entry["ok"]:
            version = f" {entry['version']}" if entry.get("version") else ""
            say(f"[preflight] import {name}{version} ok ({entry['from']}, {entry['seconds']}s)")
        else:
            say(f"[preflight] import {name} FAILED: {entry['error']}")
    pre["skip"] = {}
    for step in wanted:
        bad = [f"{n} ({pre['imports'][n]['error']})" for n in STEP_IMPORTS[step] if not pre["imports"][n]["ok"]]
        if bad:
            pre["skip"][step] = "missing: " + "; ".join(bad)
            say(f"[preflight] {step} will be SKIPPED: {pre['skip'][step][:300]}")
    return pre


# ------------------------------------------------------------------------------------------------------- plan

# Sustained rates assumed for the planned durations (printed before a GPU run; the JSON then has the real ones
# beside them): a fraction of the lent H100's 798 TFLOP/s dense bf16 matmul (the device tool's notes) for a 124M /
# 1.1B model at these batch sizes; fp32 without TF32 and fp64 (the reference loop) far below; the disk, decoding
# steps and fixed costs (CUDA context, imports, DeepSpeed's init) guessed on the safe side.
ASSUMED = {
    "proxy_bf16_tflops": 100.0,
    "target_bf16_tflops": 150.0,
    "fp32_fp64_tflops": 20.0,
    "kernel_call_s": 0.05,  # one batch-size-1 call of the norm kernel (launch-bound on a GPU)
    "decode_step_s": 0.04,  # one generate step of the 1.1B model (22 layers, launch-bound)
    "disk_bytes_per_s": 1e9,
    "startup_s": 30.0,
    "deepspeed_init_s": 30.0,
}


def _proxy_flop_per_token(shape: Shape) -> float:
    """Forward FLOPs per token of the GPT-2-shaped proxy: 2 x (layer weights + LM head) + attention at the mean
    context."""
    d, layers = shape.model["n_embd"], shape.model["n_layer"]
    vocab = shape.model.get("vocab_size", 50257)
    return 2 * (12 * layers * d * d + d * vocab) + 4 * layers * d * 0.75 * shape.max_len


def _llama_params(llama: dict) -> int:
    h, heads = llama["hidden_size"], llama["num_attention_heads"]
    kv = llama.get("num_key_value_heads") or heads
    layer = 2 * h * h + 2 * h * kv * (h // heads) + 3 * h * llama["intermediate_size"]
    return llama["num_hidden_layers"] * layer + 2 * llama["vocab_size"] * h


def plan(shape: Shape, target_shape) -> dict:
    """Each step's FLOPs and planned seconds at the ASSUMED rates. LoRA training and the norm kernel cost a forward
    and a backward to the activations (2 forwards: the frozen weights get no gradient); padding adds ~10%."""
    a = ASSUMED
    fwd = _proxy_flop_per_token(shape)
    tokens = 1.1 * (shape.rows * 0.75 * shape.max_len + shape.long_rows * shape.long_len)
    extraction_tokens = 1.1 * (shape.extraction_rows * 0.75 * shape.max_len + shape.long_rows * shape.long_len)
    bf16 = a["proxy_bf16_tflops"] * 1e12
    flop = {
        "ensemble": shape.members * shape.epochs * tokens * 2 * fwd,
        # 2M adapters x (forward + backward) + the two IFD forwards (prompt + response, response alone)
        "extraction": extraction_tokens * (2 * shape.members * 2 * fwd + 1.5 * fwd),
        "memory_per_token": 2 * sum(shape.budgets) * 2 * fwd,
        "accuracy": shape.reference_rows * 0.75 * shape.max_len * 2 * fwd * 4,
        "batched_vs_loop": shape.speed_rows * 0.75 * shape.max_len * 2 * fwd * 6,
    }
    seconds = {step: f / bf16 for step, f in flop.items()}
    # Extraction and its memory step run in the shipped dtype (fp32, gradients.precision) at the fp32 rate; the
    # batched step adds a bf16 pass beside it.
    fp32 = a["fp32_fp64_tflops"] * 1e12
    seconds["extraction"] = flop["extraction"] / fp32
    seconds["memory_per_token"] = flop["memory_per_token"] / fp32
    seconds["batched_vs_loop"] = flop["batched_vs_loop"] * (5 / 6 / fp32 + 1 / 6 / bf16)
    # The fp64 reference and the fp32 pass run far below the bf16 rate; the loop is launch-bound.
    seconds["accuracy"] = flop["accuracy"] / 2 / (a["fp32_fp64_tflops"] * 1e12) + flop["accuracy"] / 2 / bf16
    seconds["batched_vs_loop"] += 2 * shape.speed_rows * a["kernel_call_s"]
    t = target_shape
    n = _llama_params(t.llama)
    train_tokens = t.epochs * t.rows * t.seq_len
    flop["target"] = 8 * n * train_tokens  # forward, backward, and the checkpointed forward again
    seconds["target"] = (
        a["deepspeed_init_s"]
        + flop["target"] / (a["target_bf16_tflops"] * 1e12)
        + 16 * n / a["disk_bytes_per_s"]  # the checkpoint (bf16 weights, fp32 master and two moments) and the save
        + sum(t.max_new_tokens * a["decode_step_s"] for _ in t.gen_batches)
    )
    steps = {s: {"tflop": round(flop[s] / 1e12, 1), "planned_s": round(seconds[s], 1)} for s in STEPS}
    total = a["startup_s"] + sum(seconds.values())
    return {"assumed": a, "steps": steps, "planned_total_s": round(total, 1)}


# ------------------------------------------------------------------------------------------------------- steps


def spec(shape: Shape, **model):
    from gradfilter_ray.config import ModelSpec

    return ModelSpec(build_from_config={"model_type": "gpt2", **shape.model, **model}, tokenizer="bundled:gpt2")


def synthetic_rows(shape: Shape, vocab: int, seed: int = 0):
    """Token-id rows: most between half and all of max_len, a few at long_len; the response starts between a
    quarter and three quarters of the row."""
    import numpy as np

    from gradfilter_ray.ensemble.loop import TokenRows

    rng = np.random.default_rng(seed)
    lengths = np.concatenate(
        [rng.integers(shape.max_len // 2, shape.max_len + 1, shape.rows), np.full(shape.long_rows, shape.long_len)]
    )
    ids = [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]
    starts = np.array([rng.integers(n // 4, 3 * n // 4) for n in lengths])
    return TokenRows.from_columns(np.arange(len(lengths)), ids, starts)


def token_table(rows):
    """`tokens/`-shaped rows for extract_block (the unconditioned IFD pass gets the response alone)."""
    import numpy as np
    import pyarrow as pa

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

    def __init__(self, device) -> None:
        self.device = device

    def __enter__(self) -> Memory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _rss_peak()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

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


def train_ensemble(shape: Shape, rows, device, folder: Path) -> list[dict]:
    """Each member trains alone (as it does on its own GPU), shuffled batches, bf16 autocast on CUDA; its early and
    late adapters land in `folder`."""
    import numpy as np
    import torch

    from gradfilter_ray.config import EnsembleConfig
    from gradfilter_ray.ensemble.loop import train_member
    from gradfilter_ray.gradients.extract import adapter_name
    from gradfilter_ray.lora import attach_lora, save_adapter
    from gradfilter_ray.models import load_causal_lm

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
                "mean_tokens": round(float(rows.lengths().mean()), 2),
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


def proxy_with_adapters(shape: Shape, folders: dict[str, Path], device, dtype):
    from gradfilter_ray.lora import load_adapters
    from gradfilter_ray.models import load_causal_lm

    return load_adapters(load_causal_lm(spec(shape), dtype, device), folders)


def extraction(shape: Shape, rows, folders: dict[str, Path], device, dtype) -> dict:
    import numpy as np
    import torch

    from gradfilter_ray.gradients.extract import extract_block

    model = proxy_with_adapters(shape, folders, device, dtype)
    table = token_table(rows)
    n = table.num_rows  # the first extraction_rows rows and the long ones (the last long_rows)
    table = table.take(np.r_[0 : min(shape.extraction_rows, n - shape.long_rows), n - shape.long_rows : n])
    stats: dict = {}
    with Memory(device) as mem:
        out = extract_block(
            model, table, members=shape.members, batch_size=512, tokens_per_batch=shape.tokens_per_batch,
            loss_chunk_tokens=2048, device=device, pad_id=0, head_dtype=torch.float32, stats=stats,
        )  # fmt: skip
    norms = np.array(out["sq_norm_late"].to_pylist())
    return {
        "rows": table.num_rows,
        "adapters": len(folders),
        "dtype": str(dtype).replace("torch.", ""),
        "head_dtype": "float32",
        "tokens_per_batch": shape.tokens_per_batch,
        "seconds": round(mem.seconds, 3),
        "examples_per_s": round(table.num_rows / mem.seconds, 2),
        "norms_per_s": round(table.num_rows * len(folders) / mem.seconds, 1),
        "peak_bytes": int(mem.peak),
        "stats": {k: int(v) for k, v in stats.items()},
        "all_finite": bool(np.isfinite(norms).all()),
    }


def device_batch(rows, picked, device) -> dict:
    from gradfilter_ray.data.prompt import collate_rows

    batch = collate_rows([rows.input_ids[i] for i in picked], rows.labels_at[picked], 0)
    return {k: v.to(device) for k, v in batch.items()}


def memory_per_token(shape: Shape, rows, folders: dict[str, Path], device, dtype) -> dict:
    """The kernel's peak above the resident model for one adapter, at each token budget (rows of max_len)."""
    from gradfilter_ray.gradients.extract import adapter_name
    from gradfilter_ray.gradients.norms import per_example_sq_norms

    model = proxy_with_adapters(shape, folders, device, dtype)
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


def realistic_logits(model, offset: float, spread: float, seed: int = 1) -> None:
    """Give a GPT-2-shaped model with an untied head logits like a trained GPT-2's: every token's logit is
    `offset` plus a zero-mean term with a standard deviation of about `spread`.

    The final layer norm's coordinate 0 is pinned (weight 0, bias `offset`), and the head's column 0 is all ones, so
    that coordinate adds exactly `offset` to every logit; the other columns are drawn with standard deviation
    spread / sqrt(d - 1) against the layer norm's unit-variance output. Done in fp32 before any cast, so every dtype
    gets the same weights (the cast's own rounding aside)."""
    import torch

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, norm = lm.get_output_embeddings(), lm.transformer.ln_f
    if head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr():
        raise ValueError("the head is tied to the input embeddings: build the proxy with tie_word_embeddings=False")
    vocab, d = head.weight.shape
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, d, generator=g) * (spread / math.sqrt(d - 1))
    weight[:, 0] = 1.0
    with torch.no_grad():
        head.weight.copy_(weight)
        norm.weight[0] = 0.0
        norm.bias[0] = offset


def accuracy_proxy(shape: Shape, folders: dict[str, Path], device, dtype):
    import torch

    from gradfilter_ray.lora import load_adapters
    from gradfilter_ray.models import load_causal_lm

    model = load_causal_lm(spec(shape, tie_word_embeddings=False), torch.float32, "cpu")
    realistic_logits(model, **REALISTIC_LOGITS)
    return load_adapters(model.to(device=device, dtype=dtype), folders)


def reference_norms(model, rows, picked, device, name: str) -> tuple:
    """The plain per-example gradient, one row at a time: the mean response-token cross-entropy over full logits,
    torch.autograd.grad w.r.t. the adapter's LoRA parameters, the squared norm summed. No hooks, no windowing.
    Also the scored positions' logit statistics (what the model's head produces)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    model.set_adapter(name)
    params = [p for n, p in model.named_parameters() if "lora_" in n and f".{name}." in n]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    out, means, stds, top_p = [], [], [], []
    try:
        for i in picked:
            batch = device_batch(rows, [i], device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            target = batch["labels"][0, 1:]
            keep = target != -100
            scored = logits[0, :-1][keep].double()
            loss = F.cross_entropy(scored, target[keep])
            grads = torch.autograd.grad(loss, params)
            out.append(float(sum(g.double().pow(2).sum() for g in grads)))
            with torch.no_grad():
                means.append(float(scored.mean()))
                stds.append(float(scored.std(dim=1).mean()))
                top_p.append(float(scored.softmax(dim=1).max(dim=1).values.mean()))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    stats = {"mean": float(np.mean(means)), "std_over_vocab": float(np.mean(stds)), "top_p": float(np.mean(top_p))}
    return np.array(out), stats


def _errors(got, reference, key: str, gated: bool = True) -> dict:
    import numpy as np

    rel = np.abs(got.numpy() - reference) / np.abs(reference)
    result = {"median_rel_err": float(np.median(rel)), "max_rel_err": float(rel.max())}
    passed = bool(np.median(rel) <= MEDIAN_REL_ERR[key] and rel.max() <= MAX_REL_ERR[key])
    return result | ({"pass": passed} if gated else {"within_bf16_thresholds": passed})


def accuracy(shape: Shape, rows, folders: dict[str, Path], device) -> dict:
    """Batched norms vs the fp64 batch-size-1 reference, long rows included, on the proxy with realistic logits:
    fp32 (gated: what extraction runs); bf16 with the head's logits in fp32 and in bf16 (the opt-ins, reported
    beside their thresholds without failing the check: the error bf16 adds, and the share head_dtype=torch.float32
    removes)."""
    import torch

    from gradfilter_ray.gradients.extract import adapter_name
    from gradfilter_ray.gradients.norms import per_example_sq_norms

    n = len(rows)
    picked = list(range(shape.reference_rows - 2)) + [n - 2, n - 1]  # the last rows are the long ones
    name = adapter_name(0, "late")
    ref_model = accuracy_proxy(shape, folders, device, torch.float64)
    reference, logit_stats = reference_norms(ref_model, rows, picked, device, name)
    del ref_model
    result = {
        "rows": len(picked),
        "longest": int(max(len(rows.input_ids[i]) for i in picked)),
        "logits": {"built": REALISTIC_LOGITS, "measured": logit_stats},
    }
    batch = device_batch(rows, picked, device)
    model = accuracy_proxy(shape, folders, device, torch.float32)
    got, _, _ = per_example_sq_norms(model, **batch, adapter_name=name, head_dtype=torch.float32)
    result["float32"] = _errors(got, reference, "float32")
    del model
    model = accuracy_proxy(shape, folders, device, torch.bfloat16)
    got, _, _ = per_example_sq_norms(model, **batch, adapter_name=name, head_dtype=torch.float32)
    result["bfloat16"] = {"head_dtype": "float32"} | _errors(got, reference, "bfloat16", gated=False)
    got, _, _ = per_example_sq_norms(model, **batch, adapter_name=name, head_dtype=None)
    rounded = result["bfloat16_head_in_model_dtype"] = {"head_dtype": "bfloat16"} | _errors(
        got, reference, "bfloat16", gated=False
    )
    # How much larger the median error is with the head's logits rounded to bf16 than with them in fp32.
    result["head_rounding_error_ratio"] = rounded["median_rel_err"] / max(result["bfloat16"]["median_rel_err"], 1e-30)
    del model
    return result


def batched_vs_loop(shape: Shape, rows, folders: dict[str, Path], device, dtype) -> dict:
    """The batched kernel in the shipped dtype against a batch-size-1 loop of it; then the batched kernel's time and
    peak on a bf16 model, with the head's logits in fp32 and in bf16 (the `gradients.precision: bfloat16` and
    `head_precision: model` opt-ins): what the shipped fp32 extraction costs on this device."""
    import torch

    from gradfilter_ray.gradients.extract import adapter_name
    from gradfilter_ray.gradients.norms import per_example_sq_norms

    name = adapter_name(0, "late")
    picked = list(range(shape.speed_rows))
    batch = device_batch(rows, picked, device)

    def timed(model, head_dtype) -> dict:
        per_example_sq_norms(model, **batch, adapter_name=name, head_dtype=head_dtype)  # warm-up
        with Memory(device) as mem:
            per_example_sq_norms(model, **batch, adapter_name=name, head_dtype=head_dtype)
        return {"seconds": round(mem.seconds, 4), "peak_bytes": int(mem.peak)}

    model = proxy_with_adapters(shape, folders, device, dtype)
    shipped = timed(model, torch.float32)
    singles = [device_batch(rows, [i], device) for i in picked]
    per_example_sq_norms(model, **singles[0], adapter_name=name)
    with Memory(device) as loop:
        for single in singles:
            per_example_sq_norms(model, **single, adapter_name=name)
    del model
    bf16_model = proxy_with_adapters(shape, folders, device, torch.bfloat16)
    opt_ins = {"bfloat16": timed(bf16_model, torch.float32), "bfloat16_head_bfloat16": timed(bf16_model, None)}
    batched_s = shipped["seconds"]
    return {
        "rows": len(picked),
        "tokens": int(batch["input_ids"].numel()),
        "dtype": str(dtype).replace("torch.", ""),
        "batched_s": batched_s,
        "batched_peak_bytes": shipped["peak_bytes"],
        "loop_s": round(loop.seconds, 4),
        "speedup": round(loop.seconds / batched_s, 2),
        "opt_ins": opt_ins,
        "time_over_bfloat16": round(batched_s / opt_ins["bfloat16"]["seconds"], 3),
        "time_over_bfloat16_head_bfloat16": round(batched_s / opt_ins["bfloat16_head_bfloat16"]["seconds"], 3),
    }


# ------------------------------------------------------------------------------------------------------ report


def guarded(step):
    """A step's failure (an import missing, a kernel raising, DeepSpeed's collectives failing) is recorded, not
    raised, so one GPU run still brings back every other step's numbers."""
    try:
        return step()
    except Exception as e:  # noqa: BLE001 (any failure is the finding)
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}


def failed(result) -> bool:
    return isinstance(result, dict) and "error" in result


def skipped(result) -> bool:
    return isinstance(result, dict) and "skipped" in result


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
    for name in STEPS:
        if failed(report.get(name)):
            checks[f"{name}_ran"] = False
    if isinstance(report.get("ensemble"), list):
        checks["ensemble_finite"] = all(m["finite"] for m in report["ensemble"])
    extraction = report.get("extraction")
    if isinstance(extraction, dict) and "all_finite" in extraction:
        checks["extraction_finite"] = extraction["all_finite"]
    acc = report.get("accuracy")
    if isinstance(acc, dict) and not failed(acc) and not skipped(acc):
        checks.update({f"accuracy_{k}": v["pass"] for k, v in acc.items() if isinstance(v, dict) and "pass" in v})
    target = report.get("target")
    if isinstance(target, dict) and not skipped(target):
        checks["target_ran"] = not failed(target)
        checks.update({f"target_{k}": v for k, v in target.get("checks", {}).items()})
    sizing = report.get("sizing")
    if isinstance(sizing, dict) and "built" in sizing:
        checks["sizing_built"] = sizing["built"]
    return checks


def verdict(report: dict, checks: dict) -> tuple[str, int]:
    skips = {k: v["skipped"] for k, v in report.items() if k in STEPS and skipped(v)}
    if not all(checks.values()):
        also = f", skipped {sorted(skips)}" if skips else ""
        return f"FAIL: {sorted(k for k, v in checks.items() if not v)}{also}", 1
    if skips:
        return f"PASSED WHAT RAN, SKIPPED {sorted(skips)}: " + "; ".join(f"{k}: {v}" for k, v in skips.items()), 3
    return "PASS", 0


def build_sizing(report: dict, out_dir: Path, quiet: bool = True) -> dict:
    """`benchmarks/sizing.py --check` on the steps that succeeded (a copy of the report without the failed or
    skipped ones), writing sizing.md and sizing.json beside the JSON."""
    usable = {k: v for k, v in report.items() if not (k in STEPS and (failed(v) or skipped(v)))}
    if not isinstance(usable.get("ensemble"), list) or "extraction" not in usable:
        return {"skipped": "sizing.py needs the ensemble and extraction steps' throughput"}
    with tempfile.TemporaryDirectory(prefix="gpu-sizing-") as tmp:
        check = Path(tmp) / "gpu_check.json"
        check.write_text(json.dumps(usable))
        done = subprocess.run(
            [sys.executable, str(HERE / "sizing.py"), "--check", str(check), "--out", str(out_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if done.returncode != 0:
        return {"built": False, "error": (done.stderr or done.stdout)[-2000:]}
    if not quiet:
        print(done.stdout, end="")
    return {"built": True, "steps": sorted(k for k in usable if k in STEPS), "files": ["sizing.md", "sizing.json"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # On a lent GPU machine only what lands under $OUT comes back: that is the default there.
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models: checks the script itself")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    args = ap.parse_args()
    wanted = args.steps.split(",")
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:
        ap.error(f"unknown steps {unknown}")
    if set(NEEDS_ADAPTERS) & set(wanted) and "ensemble" not in wanted:
        ap.error("the extraction steps read the ensemble's adapters: include 'ensemble'")
    wanted = [s for s in STEPS if s in wanted]
    if CARRIED:  # any child Python sees the carry too
        os.environ["PYTHONPATH"] = os.pathsep.join([CARRIED, *filter(None, [os.environ.get("PYTHONPATH")])])
    started = time.perf_counter()
    out_dir = Path(args.out)
    out = out_dir / ("gpu_check.smoke.json" if args.smoke else "gpu_check.json")
    report: dict = {"mode": "smoke" if args.smoke else "gpu", "steps_wanted": wanted}
    report["preflight"] = pre = preflight(wanted, args.smoke)
    report["environment"] = environment(pre)
    write_report(report, out, started)  # first thing: whatever happens next, the preflight comes back

    from gpu_check_target import GPU_TARGET, SMOKE_TARGET  # it imports the rest where it is used

    shape = SMOKE if args.smoke else GPU
    target_shape = SMOKE_TARGET if args.smoke else GPU_TARGET
    report.update(shape=asdict(shape), target_shape=asdict(target_shape))
    if not args.smoke:
        report["plan"] = plan(shape, target_shape)
        steps_plan = report["plan"]["steps"]
        say(f"[plan] {report['plan']['planned_total_s']:.0f}s in all at the assumed rates: " + ", ".join(
            f"{s} {steps_plan[s]['planned_s']:.0f}s" for s in wanted))  # fmt: skip
    dev = pre["device"]
    if not dev.get("torch") or (not args.smoke and dev["device"] != "cuda:0"):
        why = "no CUDA device: run with --smoke for the CPU check" if dev.get("torch") else "torch is not importable"
        report["verdict"] = f"NOT RUN: {why}"
        write_report(report, out, started)
        say(f"[gpu-check] {report['verdict']} -> {out}")
        return 2

    import torch

    from gradfilter_ray.config import GradientsConfig
    from gradfilter_ray.models import resolve_dtype

    device = torch.device(dev["device"])
    dtype = resolve_dtype(GradientsConfig().precision, device)  # what extraction ships with on this device
    if args.smoke:
        # Tiny matrices gain nothing from a second thread, and on a shared, loaded CPU OpenMP's spinning threads made
        # one smoke run 10x slower (seen: 16 ms per 64x128 matmul). Timings here only check the plumbing.
        torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        folders_root = Path(tmp) / "adapters"
        folders_root.mkdir()
        folders: dict[str, Path] = {}
        rows = None

        def proxy_rows():
            nonlocal rows
            if rows is None:
                rows = synthetic_rows(shape, vocab=shape.model.get("vocab_size", 50257))
            return rows

        def target():
            from gpu_check_target import target

            return target(target_shape, device, Path(tmp) / "target")

        steps = {
            "ensemble": lambda: train_ensemble(shape, proxy_rows(), device, folders_root),
            "extraction": lambda: extraction(shape, proxy_rows(), folders, device, dtype),
            "memory_per_token": lambda: memory_per_token(shape, proxy_rows(), folders, device, dtype),
            "accuracy": lambda: accuracy(shape, proxy_rows(), folders, device),
            "batched_vs_loop": lambda: batched_vs_loop(shape, proxy_rows(), folders, device, dtype),
            "target": target,
        }
        for name in wanted:
            t0 = time.perf_counter()
            if name in pre["skip"]:
                report[name] = {"skipped": pre["skip"][name]}
            elif name in NEEDS_ADAPTERS and not folders:
                report[name] = {"skipped": f"needs the ensemble step's adapters, and that step {_state(report)}"}
            else:
                report["in_flight"] = name  # a run killed mid-step says which step it was in
                write_report(report, out, started)
                report[name] = guarded(steps[name])
                report.pop("in_flight")
            if name == "ensemble" and isinstance(report[name], list):
                folders = {p.name: p for p in sorted(folders_root.iterdir())}
            report.setdefault("step_seconds", {})[name] = round(time.perf_counter() - t0, 1)
            line = guarded(lambda name=name: summary(name, report[name]))  # a summary's slip must not end the run
            say(f"[gpu-check] {name} {_state_of(report[name])} in {time.perf_counter() - t0:.1f}s: {line}")
            if not args.smoke:  # a GPU run cut short (the lease's limit) still leaves a table
                report["sizing"] = guarded(lambda: build_sizing(report, out_dir))
            write_report(report, out, started)  # after every step: a later crash keeps what came before
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report["sizing"] = build_sizing(report, out_dir, quiet=False)
    checks = write_report(report, out, started)
    report["verdict"], code = verdict(report, checks)
    write_report(report, out, started)
    if "skipped" in report["sizing"] or not report["sizing"].get("built"):
        say(f"[gpu-check] sizing table not built: {report['sizing'].get('skipped') or report['sizing'].get('error')}")
    say(f"[gpu-check] checks {checks}")
    say(f"[gpu-check] {report['verdict']} in {report['seconds']}s -> {out} (exit {code})")
    return code


def summary(name: str, result) -> str:
    """A step's key numbers on one line (the JSON has the rest)."""
    if failed(result) or skipped(result):
        return json.dumps({k: v for k, v in result.items() if k != "traceback"})[:400]
    gib = 2**30
    if name == "ensemble":
        return "; ".join(
            f"member {m['member']} {m['examples_per_s']} ex/s, peak {m['peak_bytes'] / gib:.2f} GiB, "
            f"padding eff {m['padding_efficiency']}, loss {m['first_loss']:.3f}->{m['last_loss']:.3f}"
            for m in result
        )
    if name == "extraction":
        return (
            f"{result['examples_per_s']} ex/s over {result['adapters']} adapters, {result['norms_per_s']} norms/s, "
            f"peak {result['peak_bytes'] / gib:.2f} GiB, finite {result['all_finite']}, {result['stats']}"
        )
    if name == "memory_per_token":
        return f"{result['bytes_per_token'] / 1024:.1f} KiB/token (spread {result['spread']:.2f})"
    if name == "accuracy":
        parts = [
            f"{k} median {v['median_rel_err']:.2e} max {v['max_rel_err']:.2e}"
            for k, v in result.items()
            if isinstance(v, dict) and "median_rel_err" in v
        ]
        logits = result["logits"]["measured"]
        return f"logits mean {logits['mean']:.2f} std {logits['std_over_vocab']:.2f}; " + "; ".join(parts)
    if name == "batched_vs_loop":
        return (
            f"batched {result['batched_s']}s vs loop {result['loop_s']}s ({result['speedup']}x); head fp32 "
            f"{result['opt_ins']['bfloat16']['seconds']}s in bf16 ({result['time_over_bfloat16']}x)"
        )
    if name == "target":
        train, gen = result["train"], result["generation"]["batches"]
        return (
            f"{result['model']['params']:,} params: {train['tokens_per_s']} tok/s, "
            f"{train['model_tflops_per_s']} TFLOP/s, step {train['step_s_median']}s, peak "
            f"{train['peak_bytes'] / gib:.1f} GiB, loss {train['first_loss']:.3f}->{train['last_loss']:.3f}; "
            f"checkpoint {result['checkpoint']['seconds']}s; save {result['final_save']['seconds']}s; generate "
            + ", ".join(f"b{b} {g['new_tokens_per_s']} tok/s" for b, g in gen.items())
            + f"; checks {result['checks']}"
        )
    return json.dumps(result)[:400]


def _state_of(result) -> str:
    return "SKIPPED" if skipped(result) else "FAILED" if failed(result) else "done"


def _state(report: dict) -> str:
    ens = report.get("ensemble")
    return "was skipped" if skipped(ens) else "failed" if failed(ens) else "did not run"


if __name__ == "__main__":
    raise SystemExit(main())
