"""Finetune stage (Ray shell): one Ray Train TorchTrainer per subset, whose workers run DeepSpeed.

For each subset (scorer x ratio, plus `full` when asked) the workers read the selected rows from
``selected/{name}.parquet`` (output_dir must be reachable from every node), tokenise them with the target's
tokenizer and train with `loop.train_steps`. A resumable DeepSpeed checkpoint goes through ``ray.train.report``
every ``checkpoint_every_steps`` steps and at each epoch's end; a re-run of fit() with the same name resumes from
the latest one, and a failed worker group is restarted from it (FailureConfig). The last report carries the
consolidated model (``model/``, safetensors) and ``train_loss.csv``. A finished subset is kept under
``output_dir/.finetune_done/`` until the stage commits, so a crash loses at most the subset in flight (with an
object-store output_dir the holding area is uploaded too, and removed only once the stage is published).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path

from gradfilter_ray.config import Config, TargetConfig, build
from gradfilter_ray.rundir import RunDir

DS_TAG = "ds"
STATE_FILE = "trainer_state.json"
LOSS_CSV = "train_loss.csv"
MODEL_DIR = "model"
SUMMARY = "train_summary.json"
HELD_MARKER = ".held-complete"  # written after the last file of a subset uploaded to an object store


def subset_names(cfg: Config) -> list[str]:
    ratios = cfg.target.ratios if cfg.target.ratios is not None else cfg.selection.ratios
    from gradfilter_ray.scoring.stage import selection_name

    names = []
    for scorer in cfg.target.subsets:
        names += ["full"] if scorer == "full" else [selection_name(scorer, r) for r in ratios]
    return names


def _write_loss_csv(path: Path, losses: list[list[float]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "loss"])
        writer.writerows((int(step), f"{loss:.8g}") for step, loss in losses)


def finetune_worker(config: dict) -> None:
    """Ray Train worker: DeepSpeed on this worker's share of one subset."""
    import deepspeed
    import pyarrow.parquet as pq
    import ray.train
    import ray.train.torch
    import torch

    from gradfilter_ray.models import load_tokenizer
    from gradfilter_ray.target.ds_config import deepspeed_config, lr_factor, plan_training
    from gradfilter_ray.target.loop import tokenize_subset, train_steps
    from gradfilter_ray.target.model import build_trainable, save_merged

    # The CPU accelerator otherwise JIT-builds a shared-memory allreduce op (minutes) that gloo never uses.
    getattr(deepspeed.ops, "__compatible_ops__", {})["deepspeed_shm_comm"] = False
    target: TargetConfig = build(TargetConfig, config["target"], "target")
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

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as saved:
            if (Path(saved) / MODEL_DIR).exists():
                return  # finished before a restart: the driver takes the model from this checkpoint

    tokenizer = load_tokenizer(target.model)
    subset = config["subset"]  # a RunDir.shared location: this worker may be on any node
    table = pq.read_table(subset.path, filesystem=subset.filesystem, columns=["instruction", "input", "output"])
    rows = tokenize_subset(tokenizer, table, target.max_length)
    plan = plan_training(len(rows), target, world)
    ds_config = deepspeed_config(target, plan, bf16=dtype == torch.bfloat16)
    model = build_trainable(target, dtype, ds_config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=target.learning_rate, weight_decay=target.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.warmup_steps, plan.total_steps)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    start_step, losses = 0, []
    if checkpoint is not None:
        with checkpoint.as_directory() as saved:
            engine.load_checkpoint(saved, tag=DS_TAG)
            state = json.loads((Path(saved) / STATE_FILE).read_text())
        start_step, losses = state["next_step"], state["losses"]

    def report_checkpoint(step: int) -> None:
        with tempfile.TemporaryDirectory(prefix=f"gfr-ds{rank}-") as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            if rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps({"next_step": step + 1, "losses": losses}))
            ray.train.report(
                {"step": step + 1, "loss": losses[-1][1]}, checkpoint=ray.train.Checkpoint.from_directory(tmp)
            )

    def on_step(step: int, loss: float) -> bool:
        losses.append([step + 1, loss])
        every = target.checkpoint_every_steps
        if (step + 1) % plan.steps_per_epoch == 0 or (every and (step + 1) % every == 0):
            report_checkpoint(step)
        # Stopping early, as a preemption would (tests): the next fit() resumes from the last checkpoint.
        return bool(config.get("stop_after_steps")) and step + 1 >= config["stop_after_steps"]

    finished = train_steps(engine, rows, plan, target.seed, rank, tokenizer.pad_token_id, device, start_step, on_step)
    if not finished:
        return

    if target.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        ray.train.report({"step": plan.total_steps, "finished": 1})
        return
    with tempfile.TemporaryDirectory(prefix="gfr-final-") as tmp:
        save_merged(target, {k: v.to("cpu") for k, v in state_dict.items()}, dtype, Path(tmp) / MODEL_DIR)
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
            "zero_stage": target.zero_stage,
            "method": target.method,
        }
        (Path(tmp) / SUMMARY).write_text(json.dumps(summary, indent=2))
        ray.train.report(
            {"step": plan.total_steps, "finished": 1}, checkpoint=ray.train.Checkpoint.from_directory(tmp)
        )


def trainer_name(cfg: Config, subset: str) -> str:
    from gradfilter_ray.pipeline import stage_key

    return f"finetune-{stage_key('finetune', cfg)}-{subset}"


def build_trainer(cfg: Config, rundir: RunDir, subset: str, stop_after_steps: int | None = None):
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.target
    use_gpu = t.gpus_per_worker > 0
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if use_gpu else {})}
    storage = rundir.shared(rundir.finetune_train_state.name)
    return TorchTrainer(
        finetune_worker,
        train_loop_config={
            "target": asdict(t),
            "subset": rundir.shared(f"{rundir.selected.name}/{subset}.parquet"),
            "torch_threads": max(1, int(t.cpus_per_worker)),
            "stop_after_steps": stop_after_steps,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=trainer_name(cfg, subset),
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        ),
    )


def _finish_subset(result, done_dir: Path) -> dict:
    """Copy the final checkpoint's model and curve into the crash-safe holding area (atomic rename)."""
    tmp = done_dir.with_name(f".{done_dir.name}.{uuid.uuid4().hex}")
    with result.checkpoint.as_directory() as saved:
        if not (Path(saved) / MODEL_DIR).exists():
            raise RuntimeError(f"the last checkpoint of {done_dir.name} holds no model: training did not finish")
        shutil.copytree(
            Path(saved), tmp, ignore=shutil.ignore_patterns(DS_TAG, STATE_FILE, "latest", "zero_to_fp32.py")
        )
    os.replace(tmp, done_dir)
    return json.loads((done_dir / SUMMARY).read_text())


def hold(rundir: RunDir, done_dir: Path) -> None:
    """On an object store, keep a finished subset there as well, so that a new driver does not train it again.
    Uploads are not atomic: a marker written after the last file says the copy is whole."""
    if rundir.store is None:
        return
    rel = done_dir.relative_to(rundir.root).as_posix()
    rundir.store.upload(done_dir, rel)
    rundir.store.write_text(f"{rel}/{HELD_MARKER}", "complete\n")


def fetch_held(rundir: RunDir, done_dir: Path) -> bool:
    """Bring a subset that an earlier driver finished (and held in the object store) into the local holding area."""
    if rundir.store is None or (done_dir / SUMMARY).exists():
        return False
    rel = done_dir.relative_to(rundir.root).as_posix()
    if not rundir.store.exists(f"{rel}/{HELD_MARKER}"):
        return False
    tmp = done_dir.with_name(f".{done_dir.name}.{uuid.uuid4().hex}")
    rundir.store.download(rel, tmp)
    (tmp / HELD_MARKER).unlink()
    shutil.rmtree(done_dir, ignore_errors=True)
    os.replace(tmp, done_dir)  # whole or absent: a download cut short is never taken for a finished subset
    return True


def run(cfg: Config, rundir: RunDir, staged: Path) -> tuple[list[str], dict]:
    import pyarrow.parquet as pq

    from gradfilter_ray.pipeline import stage_key

    holding = rundir.finetune_done / stage_key("finetune", cfg)
    holding.mkdir(parents=True, exist_ok=True)
    runs, skipped = {}, {}
    for subset in subset_names(cfg):
        path = rundir.selected / f"{subset}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: is '{subset}' among scoring.scorers x selection.ratios?")
        if pq.ParquetFile(path).metadata.num_rows == 0:
            skipped[subset] = "empty selection"
            continue
        done_dir = holding / subset
        if not (done_dir / SUMMARY).exists() and not fetch_held(rundir, done_dir):
            result = build_trainer(cfg, rundir, subset).fit()
            if result.error is not None:
                raise result.error
            _finish_subset(result, done_dir)
            hold(rundir, done_dir)
            rundir.remove_shared(f"{rundir.finetune_train_state.name}/{trainer_name(cfg, subset)}")
        runs[subset] = json.loads((done_dir / SUMMARY).read_text())
    out = staged / "finetune"
    out.mkdir(parents=True)
    for subset in runs:
        os.replace(holding / subset, out / subset)  # a rename: commit follows at once
    shutil.rmtree(rundir.finetune_done, ignore_errors=True)
    rundir.on_finish(lambda: rundir.remove_shared(rundir.finetune_done.name))  # the store's copy: once published
    (out / "summary.json").write_text(json.dumps({"runs": runs, "skipped": skipped}, indent=2))
    return ["finetune"], {
        "runs": len(runs),
        "skipped": skipped,
        "steps": {s: r["total_steps"] for s, r in runs.items()},
        "last_loss": {s: r["last_loss"] for s, r in runs.items()},
    }
