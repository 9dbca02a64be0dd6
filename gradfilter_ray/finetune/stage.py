"""Finetune stage (Ray shell): one Ray Train TorchTrainer per subset, whose workers run DeepSpeed.

For each selection (scorer x ratio, plus the whole dataset `full` when asked) the workers read the rows from
``selection/{name}.parquet`` (output_dir must be reachable from every node), tokenise them with the target's
tokenizer and train with `loop.train_steps`. A resumable DeepSpeed checkpoint goes through ``ray.train.report``
every ``checkpoint_every_steps`` steps and at each epoch's end, never after the last step (`ds_config.checkpoint_due`;
their count and rank 0's bytes land in the subset's summary); a re-run of fit() with the same name resumes from
the latest one, and a failed worker group is restarted from it (FailureConfig). Rank 0 writes the consolidated
model (``model/``, safetensors), ``train_loss.csv`` and ``train_summary.json`` straight to
``output_dir/finetune/{subset}/`` (no copy through the driver) and, last, a ``_done`` marker holding the stage key:
a subset with that marker is finished, so a crash loses at most the subset in flight.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from gradfilter_ray.config import Config, FinetuneConfig, build
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import sigint_restored
from gradfilter_ray.scoring.scorers import FULL, Selection
from gradfilter_ray.storage import Location

DS_TAG = "ds"
STATE_FILE = "trainer_state.json"
LOSS_CSV = "train_loss.csv"
MODEL_DIR = "model"
SUMMARY = "train_summary.json"
DONE_MARKER = "_done"  # written after a subset's last file; holds the stage key it was trained under


def run_finished(out: Location, key: str) -> bool:
    marker = out / DONE_MARKER
    return marker.exists() and marker.read_text().strip() == key


def selections(cfg: Config) -> list[Selection]:
    """The runs to fine-tune: each scorer at each ratio, then the whole dataset when finetune.full is on."""
    ratios = cfg.finetune.ratios if cfg.finetune.ratios is not None else cfg.selection.ratios
    runs = [Selection(scorer, r) for scorer in cfg.finetune.scorers for r in ratios]
    return runs + ([Selection.full()] if cfg.finetune.full else [])


def _write_loss_csv(path: Path, losses: list[list[float]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["step", "loss"])
        writer.writerows((int(step), f"{loss:.8g}") for step, loss in losses)


def finetune_worker(config: dict) -> None:
    """Ray Train worker: DeepSpeed on this worker's share of one subset."""
    import torch

    if not torch.cuda.is_available():  # DeepSpeed otherwise warns, in every worker, that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import ray.train.torch

    from gradfilter_ray.finetune.ds_config import checkpoint_due, deepspeed_config, lr_factor, plan_training
    from gradfilter_ray.finetune.loop import tokenize_subset, train_steps
    from gradfilter_ray.finetune.model import build_trainable, save_merged
    from gradfilter_ray.models import load_tokenizer
    from gradfilter_ray.parquet_stream import read_columns

    # The CPU accelerator otherwise JIT-builds a shared-memory allreduce op (minutes) that gloo never uses.
    getattr(deepspeed.ops, "__compatible_ops__", {})["deepspeed_shm_comm"] = False
    finetune: FinetuneConfig = build(FinetuneConfig, config["finetune"], "finetune")
    torch.set_num_threads(config["torch_threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Ray Train has set up torch.distributed; this makes DeepSpeed's comm layer use that group (ZeRO-3's model
    # construction asks it for the world size before deepspeed.initialize runs).
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    out: Location = config["out"]
    if run_finished(out, config["key"]):
        return  # finished before a restart
    checkpoint = ray.train.get_checkpoint()

    tokenizer = load_tokenizer(finetune.model)
    rows_at = config["rows"]  # a Location: this worker may be on any node
    table = read_columns(rows_at, ["instruction", "input", "output"])
    rows = tokenize_subset(tokenizer, table, finetune.max_length)
    plan = plan_training(len(rows), finetune, world)
    ds_config = deepspeed_config(finetune, plan, bf16=dtype == torch.bfloat16)
    model = build_trainable(finetune, dtype, ds_config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=finetune.learning_rate, weight_decay=finetune.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.warmup_steps, plan.total_steps)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    start_step, losses = 0, []
    written = {"checkpoints": 0, "checkpoint_bytes_rank0": 0}  # carried across resumes in the state file
    if checkpoint is not None:
        with checkpoint.as_directory() as saved:
            engine.load_checkpoint(saved, tag=DS_TAG)
            state = json.loads((Path(saved) / STATE_FILE).read_text())
        start_step, losses = state["next_step"], state["losses"]
        written = state.get("written", written)

    def report_checkpoint(step: int) -> None:
        with tempfile.TemporaryDirectory(prefix=f"gfr-ds{rank}-") as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            if rank == 0:
                written["checkpoints"] += 1
                written["checkpoint_bytes_rank0"] += sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
                state = {"next_step": step + 1, "losses": losses, "written": written}
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
            ray.train.report(
                {"step": step + 1, "loss": losses[-1][1]}, checkpoint=ray.train.Checkpoint.from_directory(tmp)
            )

    def on_step(step: int, loss: float) -> bool:
        losses.append([step + 1, loss])
        if checkpoint_due(step + 1, plan, finetune.checkpoint_every_steps):
            report_checkpoint(step)
        # Stopping early, as a preemption would (tests): the next fit() resumes from the last checkpoint.
        return bool(config.get("stop_after_steps")) and step + 1 >= config["stop_after_steps"]

    finished = train_steps(
        engine, rows, plan, finetune.seed, rank, tokenizer.pad_token_id, device, start_step, on_step
    )
    if not finished:
        return

    if finetune.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        ray.train.report({"step": plan.total_steps, "finished": 1})
        return
    with tempfile.TemporaryDirectory(prefix="gfr-final-") as tmp:
        save_merged(finetune, {k: v.to("cpu") for k, v in state_dict.items()}, dtype, Path(tmp) / MODEL_DIR)
        tokenizer.save_pretrained(Path(tmp) / MODEL_DIR)  # so evaluation and users load the folder alone
        _write_loss_csv(Path(tmp) / LOSS_CSV, losses)
        summary = {
            "rows_in": rows.rows_in,
            "rows_trained": len(rows),
            "rows_no_response_tokens": rows.rows_no_response_tokens,
            **{k: v for k, v in asdict(plan).items() if k != "n_examples"},
            "global_batch": plan.global_batch,
            "total_steps": plan.total_steps,
            "first_loss": losses[0][1] if losses else None,
            "last_loss": losses[-1][1] if losses else None,
            "precision": str(dtype).removeprefix("torch."),
            "zero_stage": finetune.zero_stage,
            "method": finetune.method,
            **written,  # checkpoint writes of this subset (rank 0's share of the bytes), resumed runs included
        }
        (Path(tmp) / SUMMARY).write_text(json.dumps(summary, indent=2))
        out.put(Path(tmp))
    (out / DONE_MARKER).write_text(config["key"])
    ray.train.report({"step": plan.total_steps, "finished": 1})


def trainer_name(key: str, name: str) -> str:
    return f"finetune-{key}-{name}"


def training_rows(run: RunDir, selection: Selection) -> Location:
    """What a run trains on: its selection's rows, or for `full` the whole dataset."""
    return run.data if selection.scorer == FULL else run.selection / f"{selection.name}.parquet"


def build_trainer(cfg: Config, run: RunDir, key: str, selection: Selection, stop_after_steps: int | None = None):
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.finetune
    use_gpu = t.gpus_per_worker > 0
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if use_gpu else {})}
    storage = run.finetune_train_state
    return TorchTrainer(
        finetune_worker,
        train_loop_config={
            "finetune": asdict(t),
            "rows": training_rows(run, selection),
            "out": run.finetune / selection.name,
            "key": key,
            "torch_threads": max(1, int(t.cpus_per_worker)),
            "stop_after_steps": stop_after_steps,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=trainer_name(key, selection.name),
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        ),
    )


def _row_count(where: Location) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(where.path, format="parquet", filesystem=where.filesystem).count_rows()


def run(cfg: Config, run: RunDir, key: str) -> dict:
    runs, skipped = {}, {}
    for selection in selections(cfg):
        rows = training_rows(run, selection)
        if not rows.exists():
            raise FileNotFoundError(f"{rows} does not exist: is '{selection.scorer}' among scoring.scorers?")
        if _row_count(rows) == 0:
            skipped[selection.name] = "empty selection"
            continue
        out = run.finetune / selection.name
        if not run_finished(out, key):
            out.delete()  # left by a run under another key, or cut short
            with sigint_restored():
                result = build_trainer(cfg, run, key, selection).fit()
            if result.error is not None:
                raise result.error
            if not run_finished(out, key):
                raise RuntimeError(f"fine-tuning {selection.name} ended without writing its model to {out}")
            (run.finetune_train_state / trainer_name(key, selection.name)).delete()
        runs[selection.name] = json.loads((out / SUMMARY).read_text())
    for stale in set(run.finetune.children()) - set(runs) - {"summary.json"}:
        (run.finetune / stale).delete()  # runs of an earlier config: not this stage's output
    (run.finetune / "summary.json").write_text(json.dumps({"runs": runs, "skipped": skipped}, indent=2))
    return {
        "runs": len(runs),
        "skipped": skipped,
        "steps": {s: r["total_steps"] for s, r in runs.items()},
        "last_loss": {s: r["last_loss"] for s, r in runs.items()},
    }
