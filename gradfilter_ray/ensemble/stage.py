"""Ensemble stage (Ray shell): one Ray Train TorchTrainer, one worker per member, no gradient all-reduce.

Every worker receives the whole tokenised corpus (``output_dir/tokens/``, written once by the `tokens` stage, read as
is: ``DataConfig(datasets_to_split=[])``), attaches a LoRA adapter seeded with ``seed + rank`` to the frozen proxy
and runs `loop.train_member`. After each epoch each worker writes ``member_{rank}/epoch_{e}/`` (adapter
safetensors, loss curve, the epoch's padding efficiency) straight to ``output_dir/ensemble/`` and, with its optimiser
state, into the checkpoint it reports. A re-run with the same config resumes from the latest checkpoint (Ray Train's
storage under ``output_dir/.ray_train``) and first writes the epochs it restored; a failed worker group is restarted
from it (``FailureConfig``). The workers call `faults.fault_point` at "ensemble.start" (after any restore) and
"ensemble.epoch_end" (after reporting an epoch's checkpoint); it does nothing unless a test configures a handler.

Each member reports its rows done to a `progress.ProgressBoard`, and the driver shows one progress line for the
whole ensemble (rows done of this run's total over all members, rate, ETA).
Members never communicate: their process group is gloo even on GPUs, so members sharing a GPU cannot meet in an NCCL
collective.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from gradfilter_ray.config import Config, EnsembleConfig, ProxyConfig, build
from gradfilter_ray.driver_claim import pid_alive
from gradfilter_ray.ensemble.batching import PaddingStats
from gradfilter_ray.faults import fault_point
from gradfilter_ray.progress import board_progress
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import IO_REMOTE_ARGS, sigint_restored, train_logging
from gradfilter_ray.storage import Location

TRAIN_STATE = "train_state.pt"
LOSS_CSV = "train_loss.csv"
PADDING_JSON = "padding.json"
WORK_ROOT = "gfr-member-work"
# Ray Train V2 writes this file into its run folder (the "ensemble.epoch_end" fault point's `train_dir`) when the
# controller registers a checkpoint: a fault handler polls it to know the epoch is safely recorded.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
TOKEN_COLUMNS = ["id", "input_ids", "loss_spans", "n_response_tokens"]


def _collect_rows(shard):
    from gradfilter_ray.ensemble.loop import TokenRows

    ids, input_ids, spans = [], [], []
    for batch in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
        trainable = batch.filter(np.asarray(batch["n_response_tokens"]) > 0)
        ids.extend(trainable["id"].to_pylist())
        input_ids.extend(trainable["input_ids"].to_numpy(zero_copy_only=False))
        spans.extend(trainable["loss_spans"].to_numpy(zero_copy_only=False))
    return TokenRows.from_columns(ids, input_ids, spans)


def _write_loss_curve(path: Path, losses: list[float]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["step", "loss"])
        writer.writerows((i + 1, f"{loss:.8g}") for i, loss in enumerate(losses))


def _write_padding(path: Path, batching: str, padding: PaddingStats) -> None:
    facts = {
        "batching": batching,
        "real_tokens": padding.real_tokens,
        "computed_tokens": padding.computed_tokens,
        "padding_efficiency": round(padding.efficiency, 4),
    }
    path.write_text(json.dumps(facts, indent=2))


def member_workdir(rank: int) -> Path:
    """A private folder for this worker under ``$TMPDIR/gfr-member-work/``, named after its pid. A worker that dies
    (crash, OOM kill, preemption) cannot remove its own: each new worker removes those whose process is gone."""
    root = Path(tempfile.gettempdir()) / WORK_ROOT
    root.mkdir(exist_ok=True)
    for stale in root.iterdir():
        pid = stale.name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-member{rank}-", dir=root))


def train_member_worker(config: dict) -> None:
    """Ray Train worker: one ensemble member (rank = member index)."""
    import ray.train
    import ray.train.torch
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from gradfilter_ray.ensemble.loop import train_member
    from gradfilter_ray.lora import attach_lora, save_adapter
    from gradfilter_ray.models import load_causal_lm, load_tokenizer
    from gradfilter_ray.progress import BoardReporter

    ens: EnsembleConfig = build(EnsembleConfig, config["ensemble"], "ensemble")
    proxy: ProxyConfig = build(ProxyConfig, config["proxy"], "proxy")
    torch.set_num_threads(config["torch_threads"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    member_seed = ens.seed + rank

    rows = _collect_rows(ray.train.get_dataset_shard("train"))
    pad_id = load_tokenizer(proxy.model).pad_token_id
    model = attach_lora(load_causal_lm(proxy.model, torch.float32, device), ens, seed=member_seed)

    workdir = member_workdir(rank)
    member_dir = workdir / f"member_{rank}"
    published: Location = config["ensemble_out"] / f"member_{rank}"
    start_epoch, optimizer_state = 1, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as saved:
            shutil.copytree(Path(saved) / f"member_{rank}", member_dir)
        state = torch.load(member_dir / TRAIN_STATE, weights_only=True, map_location=device)
        last = state["epoch"]
        weights = load_file(str(member_dir / f"epoch_{last}" / "adapter_model.safetensors"), device=str(device))
        set_peft_model_state_dict(model, weights)
        start_epoch, optimizer_state = last + 1, state["optimizer"]
        for epoch in range(1, start_epoch):  # the stage removed its old outputs when it began
            (published / f"epoch_{epoch}").put(member_dir / f"epoch_{epoch}")
    else:
        member_dir.mkdir(parents=True)
    fault_point("ensemble.start", rank=rank, start_epoch=start_epoch, pid=os.getpid())

    padding = {}  # epoch -> PaddingStats, from train_member before the epoch's first step

    def on_epoch_end(epoch, model, optimizer, losses):
        epoch_dir = member_dir / f"epoch_{epoch}"
        save_adapter(model, epoch_dir)
        _write_loss_curve(epoch_dir / LOSS_CSV, losses)
        _write_padding(epoch_dir / PADDING_JSON, ens.batching, padding[epoch])
        (published / f"epoch_{epoch}").put(epoch_dir)
        torch.save({"epoch": epoch, "optimizer": optimizer.state_dict()}, member_dir / TRAIN_STATE)
        with tempfile.TemporaryDirectory(prefix="ckpt-", dir=workdir) as tmp:  # reaped with workdir after a crash
            shutil.copytree(member_dir, Path(tmp) / member_dir.name)
            ray.train.report(
                {"epoch": epoch, "mean_loss": float(np.mean(losses)) if losses else float("nan")},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )
        fault_point("ensemble.epoch_end", rank=rank, epoch=epoch, pid=os.getpid(), train_dir=str(config["train_dir"]))

    if start_epoch <= ens.epochs:
        progress = BoardReporter(
            config.get("progress_board"),
            rank,
            total=len(rows) * ens.epochs,
            already_done=len(rows) * (start_epoch - 1),
        )
        train_member(
            model,
            rows,
            ens,
            member_seed,
            device,
            pad_id,
            on_epoch_end,
            start_epoch,
            optimizer_state,
            stop_after_epoch=config.get("stop_after_epoch"),
            on_epoch_planned=padding.__setitem__,
            on_rows_done=progress.advance,
        )
    shutil.rmtree(workdir, ignore_errors=True)


def token_dataset(run: RunDir):
    """`tokens/` (the `tokens` stage's output) as a Ray Dataset, materialised before training: its read tasks must
    not compete with the members for CPUs."""
    import ray.data

    tokens = run.tokens
    ds = ray.data.read_parquet(tokens.path, filesystem=tokens.filesystem, **IO_REMOTE_ARGS)
    ds = ds.select_columns(TOKEN_COLUMNS).materialize()
    # Every member's pass over its copy would otherwise print a progress bar of its own, relayed as log lines.
    ds.context.enable_progress_bars = False
    return ds


def _padding_efficiency(epoch_dir: Location) -> float | None:
    """The epoch's padding efficiency; None for an epoch restored from a checkpoint of a version that did not record
    it (the summary should not fail a finished stage over a statistic)."""
    path = epoch_dir / PADDING_JSON
    return json.loads(path.read_text())["padding_efficiency"] if path.exists() else None


def mean_padding_efficiency(members: dict) -> float | None:
    """Mean over every member's every recorded epoch (all train on the same rows: equal weights are right)."""
    values = [v for member in members.values() for v in member["padding_efficiency"].values() if v is not None]
    return round(float(np.mean(values)), 4) if values else None


def _summary(ensemble_dir: Location, ens: EnsembleConfig, counts: dict, adapter: dict) -> dict:
    members = {}
    for m in range(ens.members):
        curves, padding = {}, {}
        for e in range(1, ens.epochs + 1):
            epoch_dir = ensemble_dir / f"member_{m}" / f"epoch_{e}"
            text = (epoch_dir / LOSS_CSV).read_text()
            curves[e] = [float(r["loss"]) for r in csv.DictReader(io.StringIO(text))]
            padding[e] = _padding_efficiency(epoch_dir)
        members[m] = {
            "seed": ens.seed + m,
            "first_step_loss": curves[1][0] if curves[1] else None,
            "epoch_mean_loss": {e: float(np.mean(c)) if c else None for e, c in curves.items()},
            "padding_efficiency": padding,
        }
    return {
        **counts,
        **adapter,
        "early_epoch": ens.early_epoch,
        "late_epoch": ens.late_epoch,
        "batching": ens.batching,
        "padding_efficiency": mean_padding_efficiency(members),
        "members": members,
    }


def adapter_facts(cfg: Config) -> dict:
    """Which modules the adapter covers and how many parameters it has (built on the proxy, no training)."""
    import torch

    from gradfilter_ray.lora import adapted_module_names, attach_lora, lora_parameter_count
    from gradfilter_ray.models import load_causal_lm

    model = attach_lora(load_causal_lm(cfg.proxy.model, torch.float32, "cpu"), cfg.ensemble, seed=0)
    names = adapted_module_names(model)
    return {
        "adapter_parameters": lora_parameter_count(model),
        "adapted_modules": len(names),
        "adapted_module_suffixes": sorted({n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in names}),
    }


def trainer_name(key: str) -> str:
    return f"ensemble-{key}"


def scaling_config(cfg: Config):
    """One worker per member, each with the CPUs and (fractional) GPUs the config gives a member."""
    import ray.train

    ens = cfg.ensemble
    use_gpu = ens.gpus_per_member > 0
    resources = {"CPU": ens.cpus_per_member, **({"GPU": ens.gpus_per_member} if use_gpu else {})}
    return ray.train.ScalingConfig(num_workers=ens.members, use_gpu=use_gpu, resources_per_worker=resources)


def torch_config():
    """gloo, never NCCL: members share no gradients, and with several members on one GPU an NCCL collective (Ray
    Train's own set-up, a stray barrier) can deadlock; TorchTrainer would pick NCCL whenever GPUs are used."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="gloo")


def build_trainer(cfg: Config, run: RunDir, key: str, ds, stop_after_epoch: int | None = None, progress_board=None):
    """The TorchTrainer for this config; the same name and storage always, so fit() resumes where it stopped.
    `progress_board`: a `progress.ProgressBoard` actor the members report their rows done to."""
    import ray.train
    from ray.train.torch import TorchTrainer

    ens = cfg.ensemble
    storage = run.ensemble_train_state
    trainer = TorchTrainer(
        train_member_worker,
        train_loop_config={
            "ensemble": asdict(ens),
            "proxy": asdict(cfg.proxy),
            "torch_threads": max(1, int(ens.cpus_per_member)),
            "stop_after_epoch": stop_after_epoch,
            "ensemble_out": run.ensemble,
            "train_dir": storage / trainer_name(key),  # this trainer's Ray Train run folder
            "progress_board": progress_board,
        },
        scaling_config=scaling_config(cfg),
        torch_config=torch_config(),
        run_config=ray.train.RunConfig(
            name=trainer_name(key),
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=ens.max_failures),
            logging_config=train_logging(cfg.ray),
        ),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    return trainer


def run(cfg: Config, run: RunDir, key: str) -> dict:
    ens = cfg.ensemble
    ds = token_dataset(run)
    stats = ds.select_columns(["n_response_tokens"]).to_pandas()["n_response_tokens"].to_numpy()
    counts = {
        "rows_in": int(len(stats)),
        "rows_trained": int((stats > 0).sum()),
        "rows_no_response_tokens": int((stats == 0).sum()),
    }
    if counts["rows_trained"] == 0:
        raise RuntimeError("no row has a response token left after tokenisation: raise proxy.max_length")

    dropped = run.drop_other_trainers(run.ensemble_train_state, trainer_name(key))
    with sigint_restored(), board_progress(f"[ensemble] {ens.members} members trained") as board:
        result = build_trainer(cfg, run, key, ds, progress_board=board).fit()
    if result.error is not None:
        raise result.error
    summary = _summary(run.ensemble, ens, counts, adapter_facts(cfg))
    (run.ensemble / "summary.json").write_text(json.dumps(summary, indent=2))
    (run.ensemble_train_state / trainer_name(key)).delete()
    return {
        **counts,
        "members": ens.members,
        "epochs": ens.epochs,
        "adapter_parameters": summary["adapter_parameters"],
        "adapted_modules": summary["adapted_modules"],
        "batching": ens.batching,
        "padding_efficiency": summary["padding_efficiency"],
        "trainers_of_other_configs_removed": len(dropped),
        "padding_efficiency_per_member": {m: facts["padding_efficiency"] for m, facts in summary["members"].items()},
    }
