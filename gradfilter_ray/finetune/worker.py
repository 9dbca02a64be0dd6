"""The Ray Train worker of the finetune stage: DeepSpeed on this rank's share of one subset.

Tokens: each rank tokenises its contiguous share of the subset once and writes it beside the trainer's
checkpoints; every rank then reads all shares (`subset_tokens`), once they are checked to be this world's (shares of
another world size are tokenised again). Checkpoints (`finetune.checkpoint`: none, epoch or
steps): every rank writes its own shard straight into the trainer's storage (`checkpoints`), and Ray Train
registers the folder without copying it; a restarted worker group resumes from the latest, or from the first step
when there is none. The final model: rank 0 writes it from the consolidated state straight to
its folder ``output_dir/finetune/{subset}-{key}/``; nothing passes through the driver.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from gradfilter_ray.config import FinetuneConfig, build
from gradfilter_ray.faults import fault_point
from gradfilter_ray.storage import Location
from gradfilter_ray.units import DONE_MARKER, unit_finished

LOSS_CSV = "train_loss.csv"
MODEL_DIR = "model"
SUMMARY = "train_summary.json"
TOKENS_DIR = "tokens"  # under the trainer's storage folder: removed with it once the subset is done


def _write_loss_csv(path: Path, losses: list[list[float]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["step", "loss"])
        writer.writerows((int(step), f"{loss:.8g}") for step, loss in losses)


@contextmanager
def final_folder(out: Location) -> Iterator[Path]:
    """A folder to write a subset's final files into, which becomes `out` when the block ends. On a local or shared
    mount it is a sibling of `out`, renamed into place (a 7B model is written once, never staged and copied); on an
    object store it is a local temporary folder, uploaded."""
    if out.is_local:
        staging = Path(f"{out.parent().path}/.{out.name}.writing")
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while writing
        staging.mkdir(parents=True)
        yield staging
        out.delete()
        os.replace(staging, out.path)
        return
    with tempfile.TemporaryDirectory(prefix="gfr-final-") as tmp:
        yield Path(tmp)
        out.put(Path(tmp))


def shares_found(tokens_at: Location) -> dict[int, int]:
    """The shares in a trainer's tokens folder: rank -> the subset rows its share was tokenised from."""
    import pyarrow.parquet as pq

    from gradfilter_ray.finetune.subset_tokens import rows_in_share, share_rank

    found = {}
    for name in tokens_at.children():
        rank = share_rank(name)
        if rank is not None:
            where = tokens_at / name
            found[rank] = rows_in_share(pq.read_schema(where.path, filesystem=where.filesystem))
    return found


def shared_subset_rows(
    tokenizer, rows_at: Location, tokens_at: Location, finetune: FinetuneConfig, rank: int, world: int
):
    """This rank tokenises its share (unless a restarted trainer already wrote it), then reads every share. Shares
    that are not this world's (`subset_tokens.shares_mismatch`) are removed and every rank tokenises its share again;
    still not this world's after that, it raises."""
    import pyarrow.parquet as pq
    import torch

    from gradfilter_ray.data.tokenized import TEXT_COLUMNS
    from gradfilter_ray.finetune.loop import SubsetRows, tokenize_subset
    from gradfilter_ray.finetune.subset_tokens import (
        rows_from_tables,
        rows_to_table,
        share_bounds,
        share_file,
        shares_mismatch,
    )
    from gradfilter_ray.parquet_stream import parquet_files, read_row_range, row_counts, write_whole

    files = parquet_files(rows_at)
    n_rows = sum(row_counts(files))

    def tokenise_share() -> None:
        with files[0].open_input() as handle:
            present = set(pq.ParquetFile(handle).schema_arrow.names)
        start, stop = share_bounds(n_rows, world, rank)
        columns = [c for c in TEXT_COLUMNS if c in present]  # conversation, tools: absent in older runs
        share = tokenize_subset(tokenizer, read_row_range(rows_at, start, stop, columns), finetune)
        table = rows_to_table(share.input_ids, share.labels_at, share.rows_in, share.rows_no_response_tokens)
        write_whole(tokens_at / share_file(rank), table)

    def every_rank_here() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    if not (tokens_at / share_file(rank)).exists():
        tokenise_share()
    every_rank_here()
    # Every rank lists the same folder, complete after the barrier, and so takes the same branch.
    stale = shares_mismatch(shares_found(tokens_at), n_rows, world)
    if stale is not None:
        every_rank_here()  # every rank has listed the stale shares before they go
        if rank == 0:
            tokens_at.delete()
        every_rank_here()
        tokenise_share()
        every_rank_here()
        still = shares_mismatch(shares_found(tokens_at), n_rows, world)
        if still is not None:
            raise RuntimeError(f"{tokens_at}: {still}, tokenised again after finding {stale}")
    tables = []
    for r in range(world):
        where = tokens_at / share_file(r)
        tables.append(pq.read_table(where.path, filesystem=where.filesystem))
    packed, labels_at, rows_in, dropped = rows_from_tables(tables)
    return SubsetRows(packed, labels_at, rows_in, dropped)


def _optimizer(finetune: FinetuneConfig, params, cpu_adam: bool):
    import torch

    if cpu_adam:  # vectorised, multithreaded (OMP_NUM_THREADS = the worker's CPUs): the offloaded step's cost
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=finetune.learning_rate, weight_decay=finetune.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=finetune.learning_rate, weight_decay=finetune.weight_decay)


def cpu_adam_prebuilt() -> bool:
    """Whether DeepSpeed's CPU Adam op was compiled at install time (DS_BUILD_CPU_ADAM=1, as cluster/Dockerfile
    does): then it loads at once; otherwise it would JIT-compile on every fresh node first."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get("cpu_adam"))


def finetune_worker(config: dict) -> None:
    """Ray Train worker: DeepSpeed on this worker's share of one subset."""
    threads = str(config["torch_threads"])
    os.environ["OMP_NUM_THREADS"] = threads  # for processes this worker starts; torch.set_num_threads below sizes ours
    import torch

    if not torch.cuda.is_available():  # DeepSpeed otherwise warns, in every worker, that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    from ray.train import CheckpointUploadMode

    from gradfilter_ray.finetune.checkpoints import (
        DS_TAG,
        CheckpointWrites,
        checkpoint_name,
        read_state,
        write_checkpoint,
    )
    from gradfilter_ray.finetune.ds_config import (
        checkpoint_due,
        deepspeed_config,
        lr_factor,
        plan_training,
        use_cpu_adam,
    )
    from gradfilter_ray.finetune.loop import train_steps
    from gradfilter_ray.finetune.model import build_trainable, save_merged
    from gradfilter_ray.models import load_tokenizer, pick_device

    # The CPU accelerator otherwise JIT-builds a shared-memory allreduce op (minutes) that gloo never uses.
    getattr(deepspeed.ops, "__compatible_ops__", {})["deepspeed_shm_comm"] = False
    finetune: FinetuneConfig = build(FinetuneConfig, config["finetune"], "finetune")
    torch.set_num_threads(config["torch_threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # CUDA when this process can see one (Ray sets CUDA_VISIBLE_DEVICES to its GPUs), not merely because Ray
    # assigned GPU ids: on a cluster of fake GPUs (tests) the workers train on CPU.
    device = pick_device(finetune.gpus_per_worker)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Ray Train has set up torch.distributed; this makes DeepSpeed's comm layer use that group (ZeRO-3's model
    # construction asks it for the world size before deepspeed.initialize runs).
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    out: Location = config["out"]
    train_state: Location = config["train_state"]
    if unit_finished(out, config["key"]):
        return  # finished before a restart
    checkpoint = ray.train.get_checkpoint()

    tokenizer = load_tokenizer(finetune.model)
    if finetune.template == "chat" and finetune.chat_template:
        tokenizer.chat_template = finetune.chat_template  # saved with the model: evaluation and users answer in it
    rows = shared_subset_rows(tokenizer, config["rows"], train_state / TOKENS_DIR, finetune, rank, world)
    if len(rows) == 0:
        raise ValueError(
            f"{out.name}: none of its {rows.rows_in} rows keeps a response token at finetune.max_length="
            f"{finetune.max_length} (the prompt fills it): raise finetune.max_length"
        )
    plan = plan_training(len(rows), finetune, world)
    cpu_adam = use_cpu_adam(finetune, cpu_adam_prebuilt())
    ds_config = deepspeed_config(finetune, plan, bf16=dtype == torch.bfloat16, cpu_adam=cpu_adam)
    model = build_trainable(finetune, dtype, ds_config)
    optimizer = _optimizer(finetune, [p for p in model.parameters() if p.requires_grad], cpu_adam)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.warmup_steps, plan.total_steps)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    start_step, losses, writes = 0, [], CheckpointWrites()
    if checkpoint is not None:
        with checkpoint.as_directory() as saved:  # a local or shared folder is used in place, not copied
            engine.load_checkpoint(saved, tag=DS_TAG)
            start_step, losses, writes = read_state(Path(saved))

    def report_checkpoint(steps_done: int) -> None:
        where = train_state / checkpoint_name(steps_done)
        write_checkpoint(engine, where, rank, steps_done, losses, writes, device)
        metrics = {"step": steps_done, "loss": losses[-1][1]}
        if rank == 0:  # the folder is complete (every rank has written): register it where it lies
            saved = ray.train.Checkpoint(path=where.path, filesystem=where.filesystem)
            ray.train.report(metrics, checkpoint=saved, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        else:
            ray.train.report(metrics)

    def on_step(step: int, loss: float) -> bool:
        losses.append([step + 1, loss])
        if checkpoint_due(step + 1, plan, finetune.checkpoint, finetune.checkpoint_every_steps):
            report_checkpoint(step + 1)
        # Where a real run fails between steps (tests fail a worker here to see what the restart resumes from).
        fault_point("finetune.step", rank=rank, step=step + 1, loss=loss, pid=os.getpid())
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
    with final_folder(out) as tmp:
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
            "optimizer": "deepspeed_cpu_adam" if cpu_adam else "torch_adamw",
            **writes.as_dict(),  # every checkpoint of this subset, resumed runs included
        }
        (Path(tmp) / SUMMARY).write_text(json.dumps(summary, indent=2))
    (out / DONE_MARKER).write_text(config["key"])
    ray.train.report({"step": plan.total_steps, "finished": 1})
