"""Ensemble stage (Ray shell): each member is a unit of its own, trained by one Ray Train worker; no gradient
all-reduce.

A member's folder is named by its key (`units.ensemble_members`: ``ensemble/member_seed{seed}-{key}/``, the key
hashing the proxy, the ensemble fields that change its training, its own seed and the `tokens` stage's key), so
configs that share members share their folders: adding a member trains only the new one, and a shifted
`ensemble.seed` reuses the members whose seeds overlap. A member is finished when its folder holds the `_done` marker,
written after its last epoch. The stage records the folders this config uses and its trainer's state with
`RunDir.add_references` before it trains, then trains the unfinished members only: one TorchTrainer, named after them
(``ensemble-<hash of their folder names>``), whose worker of rank r trains the r-th of them (its seed and folder come
in the loop config; nothing else depends on the rank). With every member finished it trains nothing and only
rewrites ``ensemble/summary.json``. Forced (`--force`), it retrains every member of this config from scratch: their
folders and their trainer's state are removed (after they are recorded) and one trainer, named after all of them,
trains them. It never removes another config's members or trainers.

Every worker receives the whole tokenised corpus (``output_dir/tokens/``, written once by the `tokens` stage, read as
is: ``DataConfig(datasets_to_split=[])``), attaches a LoRA adapter seeded with its member's seed to the frozen proxy
and runs `loop.train_member`. After each epoch it writes ``<member folder>/epoch_{e}/`` (adapter safetensors, loss
curve, the epoch's padding efficiency) straight to ``output_dir/ensemble/`` and, with its optimiser state, into the
checkpoint it reports. A re-run of the same unfinished members resumes from the latest checkpoint (Ray Train's
storage under ``output_dir/.ray_train``) and first writes the epochs it restored; a failed worker group is restarted
from it (``FailureConfig``). The workers call `faults.fault_point` at "ensemble.start" (after any restore) and
"ensemble.epoch_end" (after reporting an epoch's checkpoint); it does nothing unless a test configures a handler.

The stage's manifest record maps each member's name in this config to its folder (``units``: 'member_0' ->
'ensemble/member_seed42-<key>'): readers find the adapters through it (`RunDir.member_folders`). Each member reports
its rows done to a `progress.ProgressBoard`, and the driver shows one progress line for the members in training
(rows done of their total, rate, ETA). Members never communicate: their process group is gloo even on GPUs, so
members sharing a GPU cannot meet in an NCCL collective.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np

from gradfilter_ray.config import Config, EnsembleConfig, ProxyConfig, build, section_hash
from gradfilter_ray.driver_claim import pid_alive
from gradfilter_ray.ensemble.batching import PaddingStats
from gradfilter_ray.faults import fault_point
from gradfilter_ray.progress import board_progress
from gradfilter_ray.resources import member_trainers
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import IO_REMOTE_ARGS, sigint_restored, train_logging
from gradfilter_ray.storage import Location
from gradfilter_ray.units import MEMBER_DONE, Member, ensemble_members

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


def member_workdir(seed: int) -> Path:
    """A private folder for this worker under ``$TMPDIR/gfr-member-work/``, named after its pid and its member's seed.
    A worker that dies (crash, OOM kill, preemption) cannot remove its own: each new worker removes those whose process
    is gone."""
    root = Path(tempfile.gettempdir()) / WORK_ROOT
    root.mkdir(exist_ok=True)
    for stale in root.iterdir():
        pid = stale.name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-seed{seed}-", dir=root))


def train_member_worker(config: dict) -> None:
    """Ray Train worker: the member `config["members"][rank]` (its seed and folder name)."""
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
    member = Member(**config["members"][rank])
    member_seed = member.seed
    device = ray.train.torch.get_device()

    rows = _collect_rows(ray.train.get_dataset_shard("train"))
    pad_id = load_tokenizer(proxy.model).pad_token_id
    model = attach_lora(load_causal_lm(proxy.model, torch.float32, device), ens, seed=member_seed)

    workdir = member_workdir(member_seed)
    member_dir = workdir / member.folder
    published: Location = config["ensemble_out"] / member.folder
    start_epoch, optimizer_state = 1, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as saved:
            shutil.copytree(Path(saved) / member.folder, member_dir)
        state = torch.load(member_dir / TRAIN_STATE, weights_only=True, map_location=device)
        last = state["epoch"]
        weights = load_file(str(member_dir / f"epoch_{last}" / "adapter_model.safetensors"), device=str(device))
        set_peft_model_state_dict(model, weights)
        start_epoch, optimizer_state = last + 1, state["optimizer"]
        for epoch in range(1, start_epoch):  # the stage removed the unfinished member's folder before training
            (published / f"epoch_{epoch}").put(member_dir / f"epoch_{epoch}")
    else:
        member_dir.mkdir(parents=True)
    fault_point("ensemble.start", rank=rank, seed=member_seed, start_epoch=start_epoch, pid=os.getpid())
    last_published = [start_epoch - 1]

    padding = {}  # epoch -> PaddingStats, from train_member before the epoch's first step

    def on_epoch_end(epoch, model, optimizer, losses):
        epoch_dir = member_dir / f"epoch_{epoch}"
        save_adapter(model, epoch_dir)
        _write_loss_curve(epoch_dir / LOSS_CSV, losses)
        _write_padding(epoch_dir / PADDING_JSON, ens.batching, padding[epoch])
        (published / f"epoch_{epoch}").put(epoch_dir)
        last_published[0] = epoch
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
            member_seed,
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
    if last_published[0] == ens.epochs:  # written last: the member's every epoch is in place
        # `trained` tells one training of this member from another (a forced retrain): the extraction keys its
        # shards by it, so norms of replaced adapters are never mixed with new ones.
        trained = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        marker = {"folder": member.folder, "seed": member_seed, "epochs": ens.epochs, "trained": trained}
        (published / MEMBER_DONE).write_text(json.dumps(marker))
    shutil.rmtree(workdir, ignore_errors=True)


def token_dataset(run: RunDir, columns: list[str] = TOKEN_COLUMNS):
    """`tokens/` (the `tokens` stage's output; these columns) as a Ray Dataset, materialised before training: its
    read tasks must not compete with the members for CPUs."""
    import ray.data

    tokens = run.tokens
    ds = ray.data.read_parquet(tokens.path, filesystem=tokens.filesystem, **IO_REMOTE_ARGS)
    ds = ds.select_columns(columns).materialize()
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


def _summary(
    ensemble_dir: Location, ens: EnsembleConfig, members: list[Member], trained: set[str], counts: dict, adapter: dict
) -> dict:
    """This config's view of the ensemble: its members in member order (folder, seed, whether this run trained it or
    reused it, per-epoch losses and padding), the adapter's facts and the stage's row counts."""
    facts = {}
    for member in members:
        curves, padding = {}, {}
        for e in range(1, ens.epochs + 1):
            epoch_dir = ensemble_dir / member.folder / f"epoch_{e}"
            text = (epoch_dir / LOSS_CSV).read_text()
            curves[e] = [float(r["loss"]) for r in csv.DictReader(io.StringIO(text))]
            padding[e] = _padding_efficiency(epoch_dir)
        facts[member.index] = {
            "folder": member.folder,
            "seed": member.seed,
            "trained_now": member.folder in trained,
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
        "padding_efficiency": mean_padding_efficiency(facts),
        "trained_now": [m.index for m in members if m.folder in trained],
        "reused": [m.index for m in members if m.folder not in trained],
        "members": facts,
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


def trainer_name(todo: list[Member]) -> str:
    """The trainer of exactly these members: a re-run of the same unfinished members resumes from its checkpoints."""
    return f"ensemble-{section_hash('ensemble-trainer', [m.folder for m in todo])}"


def is_finished(ensemble_dir: Location, member: Member) -> bool:
    return (ensemble_dir / member.folder / MEMBER_DONE).exists()


def scaling_config(cfg: Config, workers: int):
    """`resources.member_trainers` for `workers` members (those in training): one worker each, with the CPUs and
    (fractional) GPUs the config gives a member."""
    import ray.train

    request = member_trainers(cfg).with_count(workers)
    return ray.train.ScalingConfig(
        num_workers=request.count, use_gpu=request.use_gpu, resources_per_worker=request.ray_resources()
    )


def torch_config():
    """gloo, never NCCL: members share no gradients, and with several members on one GPU an NCCL collective (Ray
    Train's own set-up, a stray barrier) can deadlock; TorchTrainer would pick NCCL whenever GPUs are used."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="gloo")


def build_trainer(
    cfg: Config, run: RunDir, todo: list[Member], ds, stop_after_epoch: int | None = None, progress_board=None
):
    """The TorchTrainer of the members `todo` (worker r trains todo[r]); the same name and storage for the same
    members always, so fit() resumes where it stopped. `progress_board`: a `progress.ProgressBoard` actor the members
    report their rows done to."""
    import ray.train
    from ray.train.torch import TorchTrainer

    ens = cfg.ensemble
    storage = run.ensemble_train_state
    name = trainer_name(todo)
    trainer = TorchTrainer(
        train_member_worker,
        train_loop_config={
            "ensemble": asdict(ens),
            "proxy": asdict(cfg.proxy),
            "members": [asdict(m) for m in todo],
            "torch_threads": max(1, int(ens.cpus_per_member)),
            "stop_after_epoch": stop_after_epoch,
            "ensemble_out": run.ensemble,
            "train_dir": storage / name,  # this trainer's Ray Train run folder
            "progress_board": progress_board,
        },
        scaling_config=scaling_config(cfg, len(todo)),
        torch_config=torch_config(),
        run_config=ray.train.RunConfig(
            name=name,
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


def token_counts(ds) -> dict:
    """How many rows the `tokens/` dataset holds and how many of them have response tokens to train on."""
    stats = ds.select_columns(["n_response_tokens"]).to_pandas()["n_response_tokens"].to_numpy()
    return {
        "rows_in": int(len(stats)),
        "rows_trained": int((stats > 0).sum()),
        "rows_no_response_tokens": int((stats == 0).sum()),
    }


def run(cfg: Config, run: RunDir, key: str, force: bool = False) -> dict:
    ens = cfg.ensemble
    members = ensemble_members(cfg, run.stage_record("tokens")["key"])
    todo = list(members) if force else [m for m in members if not is_finished(run.ensemble, m)]
    units = {m.unit: f"{run.ensemble.name}/{m.folder}" for m in members}  # paths relative to the run directory
    trainer_state = [f"{run.ensemble_train_state.name}/{trainer_name(todo)}"] if todo else []
    run.add_references("ensemble", key, [*units.values(), *trainer_state])  # before training: an interrupted one too
    ds = token_dataset(run) if todo else token_dataset(run, ["n_response_tokens"])
    counts = token_counts(ds)
    if counts["rows_trained"] == 0:
        raise RuntimeError("no row has a response token left after tokenisation: raise proxy.max_length")

    if todo:
        if force:  # trained from scratch, not resumed from an earlier trainer of the same members
            (run.ensemble_train_state / trainer_name(todo)).delete()
        for member in todo:  # an unfinished member's leftovers: its trainer's checkpoint restores what it had done
            (run.ensemble / member.folder).delete()
        with sigint_restored(), board_progress(f"[ensemble] {len(todo)} members trained") as board:
            result = build_trainer(cfg, run, todo, ds, progress_board=board).fit()
        if result.error is not None:
            raise result.error
        unfinished = [m.folder for m in todo if not is_finished(run.ensemble, m)]
        if unfinished:
            raise RuntimeError(f"the ensemble's trainer ended without finishing members {unfinished}")
        (run.ensemble_train_state / trainer_name(todo)).delete()  # checkpoints only serve to resume these members
    trained = {m.folder for m in todo}
    summary = _summary(run.ensemble, ens, members, trained, counts, adapter_facts(cfg))
    (run.ensemble / "summary.json").write_text(json.dumps(summary, indent=2))
    return {
        **counts,
        "members": ens.members,
        "epochs": ens.epochs,
        "members_trained": len(todo),
        "members_reused": len(members) - len(todo),
        "units": units,
        "adapter_parameters": summary["adapter_parameters"],
        "adapted_modules": summary["adapted_modules"],
        "batching": ens.batching,
        "padding_efficiency": summary["padding_efficiency"],
        "padding_efficiency_per_member": {m: facts["padding_efficiency"] for m, facts in summary["members"].items()},
    }
