"""Fine-tuning's resumable checkpoints: bytes a parameter per ZeRO stage, the in-place route against staging and
copying, and the bytes each shipped config's checkpoint policy writes per subset.

Three parts, in one run:
1. **Measured: bytes a parameter.** A LLaMA-shaped model built from a `LlamaConfig` through the stage's own cores
   (`FinetuneConfig` with `ModelSpec(build_from_config=...)`, `model.build_trainable`, `ds_config.deepspeed_config`,
   torch AdamW, `deepspeed.initialize` in one process on CPU over gloo), two optimiser steps, then ONE checkpoint
   for each of ZeRO-2 and ZeRO-3 in fp32 and bf16: the files' total size / the parameter count.
2. **Measured: staging route vs in-place route** on the bf16 ZeRO-2 engine (the stage of the shipped 7B configs,
   the 1M-row template among them: the one shipped config that writes checkpoints). Staging:
   `engine.save_checkpoint(<temp dir>)`, then the folder copied into storage with `pyarrow.fs.copy_files` (what Ray
   Train's upload runs, 64 MiB chunks), then the temp dir removed. In place: `checkpoints.save_shards(engine,
   Location(storage))`, which writes straight into the storage folder on a local or shared mount. Bytes written =
   the sizes of the files each route created (staging: temp + storage; in place: storage), cross-checked with this
   process's `wchar` (/proc/self/io: bytes passed to write calls, every thread included). Wall and CPU seconds (all
   threads: pyarrow copies on threads of its own), the order alternating over the repeats; median ratios (CPU time
   is the steadier figure when another tenant is busy). All folders lie under one temp dir on the same disk and are
   removed after each repeat. Nothing is fsynced (as in the stage), so the seconds are mostly page-cache copies:
   `os.sync()` runs, untimed, before each route so that one route's writeback does not land in the other's time,
   and once more, timed, after it (`sync_after_s`). The block-layer counters (`write_bytes`,
   `cancelled_write_bytes`) show how much of the staged copy was deleted before the kernel wrote it back (at
   ~0.7 GB: all of it; at tens of GB a node the kernel's background writeback is expected to send much of it to
   disk before the copy ends).
3. **Computed: bytes per subset** for the shipped configs. For each fine-tuned subset (scorer x ratio of
   `finetune.stage.selections`; rows = floor(ratio x the dataset's rows) as selection takes them) `plan_training`
   gives the steps, and checkpoints are counted under three policies: the config's shipped `finetune.checkpoint`
   (`ds_config.checkpoint_steps`; `none` writes no resumable checkpoint at all), `epoch` (what the 7B and 13B
   Alpaca configs would write had they not chosen `none`), and a baseline of every 50 steps and each epoch's end,
   the last step included, staged and copied. Bytes a checkpoint = the measured bf16 bytes a parameter of the
   config's own `zero_stage` x the target's parameter count (LLaMA-2 7B / 13B). In place = count x bytes (a shared
   mount, as the shipped configs' output_dir is; on an object store each rank still stages its own shard before
   uploading it: `bytes_shipped_object_store` = x 2); the baseline = count x bytes x 2 (staged, then copied). One
   process (world size 1) was measured: 8 ranks split the same state into 8 shards plus a small model-states file
   each.

Results: benchmarks/results/checkpoint_bytes.json (checkpoint_bytes.quick.json with --quick).
Usage: python benchmarks/bench_checkpoint_bytes.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script from anywhere: the package from this checkout

from gradfilter_ray.config import FinetuneConfig, ModelSpec  # noqa: E402
from gradfilter_ray.finetune.ds_config import TrainPlan, plan_training  # noqa: E402
from gradfilter_ray.finetune.ds_config import checkpoint_steps as ds_checkpoint_steps  # noqa: E402

TOKENIZER = "bundled:stories260K"  # never loaded: build_from_config needs one named
BASELINE_EVERY_STEPS = 50  # the baseline policy's fixed interval, with epoch ends and the last step
# LLaMA-2 parameter counts (the models' safetensors indexes)
TARGET_PARAMS = {"meta-llama/Llama-2-7b-hf": 6_738_415_616, "meta-llama/Llama-2-13b-hf": 13_015_864_320}
SHIPPED = {  # config file -> rows of its dataset
    "alpaca_llama2_7b.yaml": 52_002,
    "alpaca_llama2_13b.yaml": 52_002,
    "million_template.yaml": 1_000_000,
}
TB = 1e12

# ~50M parameters (a ~0.7 GB bf16 ZeRO-3 checkpoint): LLaMA-2's vocabulary and head layout, fewer and narrower layers
FULL_SHAPE = {
    "hidden_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "intermediate_size": 1376,
    "vocab_size": 32000,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
QUICK_SHAPE = {  # ~1.8M parameters
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 344,
    "vocab_size": 4096,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
SEQ_LEN = 64
MICRO_BATCH = 2
TRAIN_STEPS = 2


# ---------------------------------------------------------------- part 3: checkpoints per subset (pure arithmetic)


def baseline_checkpoint_due(steps_done: int, plan: TrainPlan, every_steps: int) -> bool:
    """The baseline policy: each epoch's end and every `every_steps`, the last step included."""
    return steps_done % plan.steps_per_epoch == 0 or bool(every_steps and steps_done % every_steps == 0)


def checkpoint_steps(n_rows: int, finetune: FinetuneConfig, baseline_every: int = BASELINE_EVERY_STEPS) -> dict:
    """A subset's optimiser steps and the steps after which each policy writes a checkpoint: the baseline (epoch
    ends and every `baseline_every`, the last step included), `epoch`, and the config's own `finetune.checkpoint`
    (the stage's `checkpoint_due`)."""
    plan = plan_training(n_rows, finetune, finetune.num_workers)
    return {
        "rows": n_rows,
        "global_batch": plan.global_batch,
        "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": plan.total_steps,
        "baseline_steps": [
            s for s in range(1, plan.total_steps + 1) if baseline_checkpoint_due(s, plan, baseline_every)
        ],
        "epoch_steps": ds_checkpoint_steps(plan, "epoch"),
        "shipped_steps": ds_checkpoint_steps(plan, finetune.checkpoint, finetune.checkpoint_every_steps),
    }


def subset_bytes(counts: dict, bytes_per_checkpoint: float) -> dict:
    """Bytes written for one subset: baseline = checkpoints x bytes x 2 (staged on a node, then copied to storage);
    epoch and shipped = checkpoints x bytes (each rank writes its shard in place on a local or shared mount). On an
    object store the in-place route also stages each rank's shard before uploading it: x 2 there
    (`bytes_shipped_object_store`). `baseline_over_shipped` is None when the shipped policy writes nothing."""
    baseline = len(counts["baseline_steps"]) * bytes_per_checkpoint * 2
    epoch = len(counts["epoch_steps"]) * bytes_per_checkpoint
    shipped = len(counts["shipped_steps"]) * bytes_per_checkpoint
    return {
        "checkpoints_baseline": len(counts["baseline_steps"]),
        "checkpoints_epoch": len(counts["epoch_steps"]),
        "checkpoints_shipped": len(counts["shipped_steps"]),
        "bytes_baseline": baseline,
        "bytes_epoch": epoch,
        "bytes_shipped": shipped,
        "bytes_shipped_object_store": shipped * 2,
        "baseline_over_shipped": baseline / shipped if shipped else None,
    }


SUMMED = ("checkpoints_baseline", "checkpoints_epoch", "checkpoints_shipped", "bytes_baseline", "bytes_epoch")


def shipped_subsets(bytes_per_param: dict[int, float]) -> list[dict]:
    """Every shipped config's fine-tuned subsets with their checkpoint counts and bytes written; a checkpoint's
    bytes from `bytes_per_param[zero_stage]` of the config's own stage."""
    from gradfilter_ray.config import load
    from gradfilter_ray.finetune.stage import selections
    from gradfilter_ray.scoring.scorers import FULL
    from gradfilter_ray.scoring.selection import k_for_ratio

    out = []
    for name, dataset_rows in SHIPPED.items():
        cfg = load(REPO / "jobs" / "configs" / name)
        model, stage = cfg.finetune.model.name_or_path, cfg.finetune.zero_stage
        per_checkpoint = bytes_per_param[stage] * TARGET_PARAMS[model]
        subsets = []
        for sel in selections(cfg):
            rows = dataset_rows if sel.scorer == FULL else k_for_ratio(sel.ratio, dataset_rows)
            counts = checkpoint_steps(rows, cfg.finetune)
            subsets.append(
                {"subset": sel.name, "selection_ratio": sel.ratio, **counts, **subset_bytes(counts, per_checkpoint)}
            )
        total = {"subsets": len(subsets), **{k: sum(s[k] for s in subsets) for k in SUMMED}}
        shipped = sum(s["bytes_shipped"] for s in subsets)
        total |= {
            "bytes_shipped": shipped,
            "bytes_shipped_object_store": shipped * 2,
            "baseline_over_shipped": total["bytes_baseline"] / shipped if shipped else None,
        }
        out.append(
            {
                "config": name.removesuffix(".yaml"),
                "model": model,
                "params": TARGET_PARAMS[model],
                "zero_stage": stage,
                "bytes_per_param": bytes_per_param[stage],
                "bytes_per_checkpoint": per_checkpoint,
                "checkpoint_every_steps_baseline": BASELINE_EVERY_STEPS,
                "checkpoint_shipped": cfg.finetune.checkpoint,
                "checkpoint_every_steps_shipped": cfg.finetune.checkpoint_every_steps,
                "subsets": subsets,
                "total": total,
            }
        )
    return out


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _shipped_ratio(x: float | None) -> str:
    return "- (no checkpoints)" if x is None else f"{x:.2f}x"


def subsets_markdown(configs: list[dict]) -> str:
    """One row per ratio (its subsets, one per scorer, have the same size), then each config's total."""
    lines = [
        "| config (ZeRO, a checkpoint) | subset | rows | steps (per epoch) | checkpoints: every-50 / epoch / shipped "
        "| TB written: every-50 staged / epoch / shipped | every-50 staged / shipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        policy = c["checkpoint_shipped"]
        if policy == "steps":
            policy = f"steps every {c['checkpoint_every_steps_shipped']}"
        head = f"{c['config']} (ZeRO-{c['zero_stage']}, {c['bytes_per_checkpoint'] / 1e9:.1f} GB; {policy})"
        groups: dict[float, list[dict]] = {}
        for s in c["subsets"]:
            groups.setdefault(s["selection_ratio"], []).append(s)
        for group in groups.values():
            s = group[0]
            scorers = "/".join(g["subset"].rsplit("_", 1)[0] for g in group)
            label = s["subset"] if len(group) == 1 else f"{{{scorers}}}_{s['selection_ratio']:g} (each)"
            lines.append(
                f"| {head} | {label} | {s['rows']:,} | {s['total_steps']:,} ({s['steps_per_epoch']:,}) "
                f"| {s['checkpoints_baseline']} / {s['checkpoints_epoch']} / {s['checkpoints_shipped']} "
                f"| {s['bytes_baseline'] / TB:.2f} / {s['bytes_epoch'] / TB:.2f} / {s['bytes_shipped'] / TB:.2f} "
                f"| {_shipped_ratio(s['baseline_over_shipped'])} |"
            )
        t = c["total"]
        lines.append(
            f"| **{c['config']}** | **all {t['subsets']} subsets** | | "
            f"| {t['checkpoints_baseline']} / {t['checkpoints_epoch']} / {t['checkpoints_shipped']} "
            f"| **{t['bytes_baseline'] / TB:.2f} / {t['bytes_epoch'] / TB:.2f} / {t['bytes_shipped'] / TB:.2f}** "
            f"| **{_shipped_ratio(t['baseline_over_shipped'])}** |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- parts 1 and 2: measured on a DeepSpeed engine


def folder_bytes(folder: Path) -> int:
    """The bytes of a folder as the finetune stage counts a checkpoint's (`checkpoints.folder_bytes`)."""
    from gradfilter_ray.finetune import checkpoints
    from gradfilter_ray.storage import open_location

    return checkpoints.folder_bytes(open_location(str(folder)))


IO_KEYS = ("wchar", "write_bytes", "cancelled_write_bytes")


def io_counters() -> dict[str, int]:
    """This process's I/O counters (all its threads): `wchar` bytes passed to write calls; `write_bytes` bytes it
    sent towards the block device (page-cache pages it dirtied); `cancelled_write_bytes` dirty bytes dropped
    before writeback because their file was deleted or truncated."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(fields.get(k, 0)) for k in IO_KEYS}


def io_since(before: dict[str, int]) -> dict[str, int]:
    now = io_counters()
    return {k: now[k] - before[k] for k in IO_KEYS}


def timed_sync() -> float:
    """Seconds for os.sync() (the whole machine's dirty pages: on a shared machine this is noisy)."""
    started = time.perf_counter()
    os.sync()
    return time.perf_counter() - started


def finetune_config(shape: dict, stage: int) -> FinetuneConfig:
    return FinetuneConfig(
        model=ModelSpec(build_from_config={"model_type": "llama", **shape}, tokenizer=TOKENIZER),
        max_length=SEQ_LEN,
        method="full",
        zero_stage=stage,
        offload_optimizer=False,
        learning_rate=1e-4,
        epochs=1,
        effective_batch_size=MICRO_BATCH,  # accumulation 1: each engine.step() is an optimiser step
        micro_batch_size=MICRO_BATCH,
        warmup_ratio=0.0,
        num_workers=1,
        gpus_per_worker=0.0,
        gradient_checkpointing=False,
    )


def init_deepspeed():
    """DeepSpeed in one process over gloo, as tests/ds_bf16_probe.py runs it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}
    os.environ.update({**env, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    import warnings

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its per-engine INFO lines would bury the report
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # skips a minutes-long JIT build of a shared-memory op gloo never uses (FIELD-NOTES)
    getattr(deepspeed.ops, "__compatible_ops__", {})["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def build_engine(deepspeed, shape: dict, stage: int, bf16: bool):
    """The stage's path: plan, ZeRO config, trainable model, torch AdamW, deepspeed.initialize; then
    TRAIN_STEPS optimiser steps on random tokens so the optimiser holds its state."""
    import torch

    from gradfilter_ray.finetune.ds_config import deepspeed_config
    from gradfilter_ray.finetune.model import build_trainable

    finetune = finetune_config(shape, stage)
    plan = plan_training(MICRO_BATCH * TRAIN_STEPS, finetune, 1)
    ds_config = deepspeed_config(finetune, plan, bf16=bf16)
    model = build_trainable(finetune, torch.bfloat16 if bf16 else torch.float32, ds_config)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=finetune.learning_rate)
    started = time.perf_counter()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    init_s = time.perf_counter() - started
    gen = torch.Generator().manual_seed(0)
    losses = []
    started = time.perf_counter()
    for _ in range(TRAIN_STEPS):
        ids = torch.randint(3, shape["vocab_size"], (MICRO_BATCH, SEQ_LEN), generator=gen)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - started
    return engine, n_params, {"init_s": round(init_s, 2), "train_s": round(train_s, 2), "losses": losses}


def release(engine) -> None:
    destroy = getattr(engine, "destroy", None)
    if destroy is not None:
        destroy()
    del engine
    gc.collect()


def one_checkpoint(engine, n_params: int, folder: Path) -> dict:
    """One checkpoint the stage's way (into `folder` in place): files, bytes, bytes a parameter."""
    from gradfilter_ray.finetune.checkpoints import save_shards
    from gradfilter_ray.storage import open_location

    os.sync()
    started = time.perf_counter()
    staged = save_shards(engine, open_location(str(folder)))
    seconds = time.perf_counter() - started
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
    total = sum(files.values())
    shutil.rmtree(folder)
    return {
        "bytes": total,
        "bytes_per_param": total / n_params,
        "staged_bytes": staged,
        "seconds": round(seconds, 3),
        "files": files,
    }


def route_result(staged: int, storage: Path, io0: dict, cpu0: float, started: float, **phases: float) -> dict:
    """A route's measurement once its last write returned: wall and CPU seconds since `started`, then the sync
    after it, the I/O counters since `io0`, the bytes staged and stored, and the route's own phases."""
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu0
    sync_s = timed_sync()
    io = io_since(io0)
    stored = folder_bytes(storage)
    return {
        "staged_bytes": staged,
        "storage_bytes": stored,
        "bytes_written": staged + stored,
        **io,
        "seconds": seconds,
        "cpu_s": cpu_s,
        "sync_after_s": sync_s,
        **phases,
    }


def staging_route(engine, staging: Path, storage: Path) -> dict:
    """Staging: the rank saves into a node-local temp dir, Ray Train copies the folder to storage, the temp dir
    goes."""
    import pyarrow.fs as pafs

    from gradfilter_ray.finetune.checkpoints import DS_TAG

    os.sync()
    io0, c0, t0 = io_counters(), time.process_time(), time.perf_counter()
    engine.save_checkpoint(str(staging), tag=DS_TAG)  # DeepSpeed's own save (save_latest on)
    t1 = time.perf_counter()
    staged = folder_bytes(staging)
    local = pafs.LocalFileSystem()
    local.create_dir(str(storage), recursive=True)
    pafs.copy_files(str(staging), str(storage), destination_filesystem=local, chunk_size=64 * 1024 * 1024)
    t2 = time.perf_counter()
    shutil.rmtree(staging)
    t3 = time.perf_counter()
    return route_result(staged, storage, io0, c0, t0, save_s=t1 - t0, copy_s=t2 - t1, remove_staged_s=t3 - t2)


def in_place_route(engine, storage: Path) -> dict:
    """In place: the rank writes its shard straight into the storage folder (a local or shared mount)."""
    from gradfilter_ray.finetune.checkpoints import save_shards
    from gradfilter_ray.storage import open_location

    os.sync()
    io0, c0, t0 = io_counters(), time.process_time(), time.perf_counter()
    staged = save_shards(engine, open_location(str(storage)))
    return route_result(staged, storage, io0, c0, t0, save_s=time.perf_counter() - t0)


def compare_routes(engine, root: Path, repeats: int) -> dict:
    runs = []
    for i in range(repeats):
        where = root / f"repeat-{i}"
        order = ("staging", "in_place") if i % 2 == 0 else ("in_place", "staging")
        got = {}
        for route in order:
            if route == "staging":
                got[route] = staging_route(engine, where / "node-temp", where / "storage-staged" / "checkpoint")
            else:
                got[route] = in_place_route(engine, where / "storage-in-place" / "checkpoint")
        shutil.rmtree(where)
        runs.append({"order": list(order), **got})
        st, ip = got["staging"], got["in_place"]
        print(
            f"  repeat {i} ({'/'.join(order)}): staging {st['bytes_written'] / 1e6:,.0f} MB in {st['seconds']:.2f} s "
            f"(save {st['save_s']:.2f} + copy {st['copy_s']:.2f} + rm {st['remove_staged_s']:.2f}, then sync "
            f"{st['sync_after_s']:.2f}); CPU {st['cpu_s']:.2f} s; in place {ip['bytes_written'] / 1e6:,.0f} MB in "
            f"{ip['seconds']:.2f} s, CPU {ip['cpu_s']:.2f} s (then sync {ip['sync_after_s']:.2f})",
            flush=True,
        )

    def med(route: str, key: str) -> float:
        return statistics.median(r[route][key] for r in runs)

    def ratio(key: str) -> float | None:
        if any(r["in_place"][key] == 0 for r in runs):
            return None  # e.g. write_bytes where the filesystem does not account them
        return statistics.median(r["staging"][key] / r["in_place"][key] for r in runs)

    return {
        "repeats": runs,
        "median": {
            route: {
                k: med(route, k) for k in ("bytes_written", *IO_KEYS, "seconds", "cpu_s", "save_s", "sync_after_s")
            }
            for route in ("staging", "in_place")
        },
        "bytes_ratio_median": ratio("bytes_written"),
        "wchar_ratio_median": ratio("wchar"),
        "write_bytes_ratio_median": ratio("write_bytes"),
        "seconds_ratio_median": ratio("seconds"),
        "cpu_ratio_median": ratio("cpu_s"),
        "seconds_with_sync_ratio_median": statistics.median(
            (r["staging"]["seconds"] + r["staging"]["sync_after_s"])
            / (r["in_place"]["seconds"] + r["in_place"]["sync_after_s"])
            for r in runs
        ),
    }


def measure(shape: dict, repeats: int, root: Path) -> dict:
    deepspeed = init_deepspeed()
    stages = {}
    routes = None
    for stage in (2, 3):
        for bf16 in (False, True):
            label = f"zero{stage}_{'bf16' if bf16 else 'fp32'}"
            engine, n_params, train = build_engine(deepspeed, shape, stage, bf16)
            ckpt = one_checkpoint(engine, n_params, root / label)
            stages[label] = {"params": n_params, **train, **ckpt}
            print(
                f"{label}: {n_params:,} params, {ckpt['bytes'] / 1e6:,.1f} MB = {ckpt['bytes_per_param']:.3f} "
                f"bytes/param ({ckpt['seconds']:.2f} s; init {train['init_s']} s, {TRAIN_STEPS} steps "
                f"{train['train_s']} s)",
                flush=True,
            )
            if stage == 2 and bf16:  # the engine of the one shipped config that checkpoints (bf16 on GPUs)
                print(f"staging route vs in-place route on {label}, {repeats} repeats:", flush=True)
                routes = {"engine": label, **compare_routes(engine, root / "routes", repeats)}
            release(engine)
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return {"stages": stages, "routes": routes}


def machine() -> dict:
    import deepspeed
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~2M-parameter model (smoke run)")
    ap.add_argument("--repeats", type=int, default=7, help="staging/in-place route repeats, order alternating")
    args = ap.parse_args()
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gfr-bench-ckpt-") as tmp:
        measured = measure(shape, args.repeats, Path(tmp))
    per_param = {stage: measured["stages"][f"zero{stage}_bf16"]["bytes_per_param"] for stage in (2, 3)}
    configs = shipped_subsets(per_param)
    table = subsets_markdown(configs)
    routes = measured["routes"]
    print(
        f"\nstaging / in-place route (median of {args.repeats}): bytes written {routes['bytes_ratio_median']:.2f}x "
        f"(wchar {routes['wchar_ratio_median']:.2f}x, "
        f"block-layer write_bytes {_ratio(routes['write_bytes_ratio_median'])}), "
        f"wall seconds {routes['seconds_ratio_median']:.2f}x "
        f"({routes['seconds_with_sync_ratio_median']:.2f}x counting the os.sync() after each), "
        f"CPU seconds (all threads) {routes['cpu_ratio_median']:.2f}x"
    )
    print(
        f"\nPer subset, computed from the policies x the measured bf16 bytes/param of each config's ZeRO stage "
        f"(ZeRO-2 {per_param[2]:.3f}, ZeRO-3 {per_param[3]:.3f}); TB = 1e12 bytes; every-50 staged = every "
        f"{BASELINE_EVERY_STEPS} steps + epoch ends incl. the last step, staged + copied (x2); epoch and shipped "
        "(the config's finetune.checkpoint) = checkpoint_due, in place (x1):\n"
    )
    print(table)
    print(
        "\nOn an object store the in-place route stages each rank's shard too (x2): all subsets, shipped TB there: "
        + ", ".join(f"{c['config']} {c['total']['bytes_shipped_object_store'] / TB:.2f}" for c in configs)
    )
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": args.quick,
        "machine": machine(),
        "model_shape": {"model_type": "llama", **shape},
        "seq_len": SEQ_LEN,
        "micro_batch": MICRO_BATCH,
        "train_steps": TRAIN_STEPS,
        "measured": {
            "bytes_per_param": {k: v["bytes_per_param"] for k, v in measured["stages"].items()},
            "stages": measured["stages"],
            "routes": routes,
        },
        "computed": {
            "bytes_per_param_used": {f"zero{k}": v for k, v in per_param.items()},
            "bytes_per_param_from": "zero2_bf16 / zero3_bf16 (measured above), by each config's zero_stage",
            "baseline_policy": (
                f"after step s when s % steps_per_epoch == 0 or s % {BASELINE_EVERY_STEPS} == 0 (last included)"
            ),
            "epoch_policy": "ds_config.checkpoint_steps(plan, 'epoch')",
            "shipped_policy": (
                "ds_config.checkpoint_steps(plan, finetune.checkpoint, finetune.checkpoint_every_steps); "
                "none writes no resumable checkpoint"
            ),
            "baseline_bytes": "checkpoints x bytes x 2 (staged on the node, then copied to storage)",
            "epoch_bytes": "checkpoints x bytes x 1 (each rank writes its shard in place: local or shared mount)",
            "shipped_bytes": "checkpoints x bytes x 1 (each rank writes its shard in place: local or shared mount)",
            "shipped_bytes_object_store": "checkpoints x bytes x 2 (each rank stages its own shard, then uploads it)",
            "configs": configs,
            "markdown": table,
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("checkpoint_bytes.quick.json" if args.quick else "checkpoint_bytes.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
