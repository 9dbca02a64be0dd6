"""Ensemble stage (Ray shell): one Ray Train TorchTrainer, one worker per member, no gradient all-reduce.

Every worker receives the whole tokenised corpus (``DataConfig(datasets_to_split=[])``), attaches a LoRA adapter
seeded with ``seed + rank`` to the frozen proxy and runs `loop.train_member`. After each epoch each worker writes
``member_{rank}/epoch_{e}/`` (adapter safetensors + loss curve) straight to ``output_dir/ensemble/`` and, with its
optimiser state, into the checkpoint it reports. A re-run with the same config resumes from the latest checkpoint
(Ray Train's storage under ``output_dir/.ray_train``) and first writes the epochs it restored; a failed worker group
is restarted from it (``FailureConfig``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from gradfilter_ray.config import Config, EnsembleConfig, ProxyConfig, build
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import IO_REMOTE_ARGS, sigint_restored
from gradfilter_ray.storage import Location

TRAIN_STATE = "train_state.pt"
LOSS_CSV = "train_loss.csv"
WORK_ROOT = "gfr-member-work"

# Test-only fault-injection hook, off unless GFR_TEST_ENSEMBLE_HOOK_DIR names a folder in the driver's environment
# (read by the driver, passed in train_loop_config: Ray workers do not see the driver's environment). Each worker
# then logs "rank start_epoch pid" to `starts.log` there; with GFR_TEST_CRASH_AFTER_EPOCH=e, rank 0 dies
# (os._exit) right after epoch e's checkpoint is registered by the controller, once (marker file `crashed`).
TEST_HOOK_ENV = "GFR_TEST_ENSEMBLE_HOOK_DIR"
TEST_CRASH_ENV = "GFR_TEST_CRASH_AFTER_EPOCH"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2 writes it when it registers a checkpoint


def _collect_rows(shard):
    from gradfilter_ray.ensemble.loop import TokenRows

    ids, input_ids, starts = [], [], []
    for batch in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
        trainable = batch.filter(np.asarray(batch["n_response_tokens"]) > 0)
        ids.extend(trainable["id"].to_pylist())
        input_ids.extend(trainable["input_ids"].to_numpy(zero_copy_only=False))
        starts.extend(trainable["label_start"].to_pylist())
    return TokenRows.from_columns(ids, input_ids, starts)


def _write_loss_curve(path: Path, losses: list[float]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["step", "loss"])
        writer.writerows((i + 1, f"{loss:.8g}") for i, loss in enumerate(losses))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def member_workdir(rank: int) -> Path:
    """A private folder for this worker under ``$TMPDIR/gfr-member-work/``, named after its pid. A worker that dies
    (crash, OOM kill, preemption) cannot remove its own: each new worker removes those whose process is gone."""
    root = Path(tempfile.gettempdir()) / WORK_ROOT
    root.mkdir(exist_ok=True)
    for stale in root.iterdir():
        pid = stale.name.split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
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
    from gradfilter_ray.ensemble.lora import attach_lora, save_adapter
    from gradfilter_ray.models import load_causal_lm, load_tokenizer

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
    hook = config.get("test_hook")
    if hook:
        with (Path(hook["dir"]) / "starts.log").open("a") as fh:
            fh.write(f"{rank} {start_epoch} {os.getpid()}\n")

    def on_epoch_end(epoch, model, optimizer, losses):
        epoch_dir = member_dir / f"epoch_{epoch}"
        save_adapter(model, epoch_dir)
        _write_loss_curve(epoch_dir / LOSS_CSV, losses)
        (published / f"epoch_{epoch}").put(epoch_dir)
        torch.save({"epoch": epoch, "optimizer": optimizer.state_dict()}, member_dir / TRAIN_STATE)
        with tempfile.TemporaryDirectory(prefix="ckpt-", dir=workdir) as tmp:  # reaped with workdir after a crash
            shutil.copytree(member_dir, Path(tmp) / member_dir.name)
            ray.train.report(
                {"epoch": epoch, "mean_loss": float(np.mean(losses)) if losses else float("nan")},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )
        if hook and rank == 0 and hook.get("crash_after_epoch") == epoch:
            _crash_once(hook, epoch)

    if start_epoch <= ens.epochs:
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
        )
    shutil.rmtree(workdir, ignore_errors=True)


def _registered_epoch(snapshot: Path) -> int:
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return 0
    return int(latest.get("metrics", {}).get("epoch", 0))


def _crash_once(hook: dict, epoch: int, wait_s: float = 120.0) -> None:
    """Test hook: once the controller has registered this epoch's checkpoint, kill this worker (only once)."""
    marker = Path(hook["dir"]) / "crashed"
    if marker.exists():
        return
    deadline = time.monotonic() + wait_s
    while _registered_epoch(Path(hook["snapshot"])) < epoch and time.monotonic() < deadline:
        time.sleep(0.1)
    marker.write_text(f"epoch {epoch} pid {os.getpid()}\n")
    os._exit(1)


def _test_hook(run: RunDir, key: str) -> dict | None:
    folder = os.environ.get(TEST_HOOK_ENV)
    if not folder:
        return None
    crash = os.environ.get(TEST_CRASH_ENV)
    # Fault tests run on a local run directory; the hook polls Ray Train's snapshot file there.
    snapshot = run.ensemble_train_state / trainer_name(key) / SNAPSHOT_FILE
    return {"dir": folder, "crash_after_epoch": int(crash) if crash else None, "snapshot": str(snapshot)}


def _tokenized_dataset(cfg: Config, run: RunDir):
    import ray.data

    from gradfilter_ray.data.tokenized import TokenizeRows

    ds = ray.data.read_parquet(run.data.path, filesystem=run.data.filesystem, **IO_REMOTE_ARGS)
    ds = ds.map_batches(
        TokenizeRows,
        fn_constructor_kwargs={"proxy": cfg.proxy},
        batch_size=1024,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    # Materialised before training: the tokeniser's actor must not compete with the members for CPUs.
    return ds.materialize()


def _summary(ensemble_dir: Location, ens: EnsembleConfig, counts: dict, adapter: dict) -> dict:
    members = {}
    for m in range(ens.members):
        curves = {}
        for e in range(1, ens.epochs + 1):
            text = (ensemble_dir / f"member_{m}" / f"epoch_{e}" / LOSS_CSV).read_text()
            curves[e] = [float(r["loss"]) for r in csv.DictReader(io.StringIO(text))]
        members[m] = {
            "seed": ens.seed + m,
            "first_step_loss": curves[1][0] if curves[1] else None,
            "epoch_mean_loss": {e: float(np.mean(c)) if c else None for e, c in curves.items()},
        }
    return {**counts, **adapter, "early_epoch": ens.early_epoch, "late_epoch": ens.late_epoch, "members": members}


def adapter_facts(cfg: Config) -> dict:
    """Which modules the adapter covers and how many parameters it has (built on the proxy, no training)."""
    import torch

    from gradfilter_ray.ensemble.lora import attach_lora
    from gradfilter_ray.gradients.norms import adapted_module_names, lora_parameter_count
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


def build_trainer(cfg: Config, run: RunDir, key: str, ds, stop_after_epoch: int | None = None):
    """The TorchTrainer for this config; the same name and storage always, so fit() resumes where it stopped."""
    import ray.train
    from ray.train.torch import TorchTrainer

    ens = cfg.ensemble
    use_gpu = ens.gpus_per_member > 0
    resources = {"CPU": ens.cpus_per_member, **({"GPU": ens.gpus_per_member} if use_gpu else {})}
    storage = run.ensemble_train_state
    trainer = TorchTrainer(
        train_member_worker,
        train_loop_config={
            "ensemble": asdict(ens),
            "proxy": asdict(cfg.proxy),
            "torch_threads": max(1, int(ens.cpus_per_member)),
            "stop_after_epoch": stop_after_epoch,
            "test_hook": _test_hook(run, key),
            "ensemble_out": run.ensemble,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=ens.members, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=trainer_name(key),
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=ens.max_failures),
        ),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    return trainer


def run(cfg: Config, run: RunDir, key: str) -> dict:
    ens = cfg.ensemble
    ds = _tokenized_dataset(cfg, run)
    stats = ds.select_columns(["n_response_tokens"]).to_pandas()["n_response_tokens"].to_numpy()
    counts = {
        "rows_in": int(len(stats)),
        "rows_trained": int((stats > 0).sum()),
        "rows_no_response_tokens": int((stats == 0).sum()),
    }
    if counts["rows_trained"] == 0:
        raise RuntimeError("no row has a response token left after tokenisation: raise proxy.max_length")

    with sigint_restored():
        result = build_trainer(cfg, run, key, ds).fit()
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
    }
