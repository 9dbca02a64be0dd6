"""Finetune stage (Ray shell): one Ray Train TorchTrainer per subset, whose workers run DeepSpeed
(`worker.finetune_worker`); subsets side by side, as many at once as the cluster holds.

For each selection (scorer x ratio, plus the whole dataset `full` when asked) a trainer reads the rows from
``selection/{name}.parquet`` (output_dir must be reachable from every node). Each trainer's fit() runs in a Ray
task of its own, so up to `placement.subsets_side_by_side` trainers train at once, each on its own GPUs
(STRICT_PACK: one node per subset by default); the others wait for a free slot. Under ``finetune.checkpoint``
(`ds_config.checkpoint_due`) every rank writes its part of a resumable DeepSpeed checkpoint straight into the
trainer's storage at each epoch's end (epoch) or every ``checkpoint_every_steps`` steps (steps), never after the
last step; their steps, bytes and seconds land in the subset's summary. A re-run with the same key resumes from the
latest one, and a failed worker group is restarted from it (FailureConfig); with ``none`` both start the subset
again from its first step. Rank 0 writes the consolidated model (``model/``, safetensors),
``train_loss.csv`` and ``train_summary.json`` straight to ``output_dir/finetune/{subset}/`` (no copy through the
driver) and, last, a ``_done`` marker holding the stage key: a subset with that marker is finished, so a crash
loses at most the subsets in flight.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from gradfilter_ray.config import Config
from gradfilter_ray.console import say
from gradfilter_ray.finetune.placement import subset_demand, subsets_side_by_side
from gradfilter_ray.finetune.worker import SUMMARY, finetune_worker, run_finished
from gradfilter_ray.parquet_stream import parquet_files, row_counts
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import at_most_in_flight, sigint_restored, train_logging
from gradfilter_ray.scoring.scorers import FULL, Selection
from gradfilter_ray.storage import Location


def selections(cfg: Config) -> list[Selection]:
    """The runs to fine-tune: each scorer at each ratio, then the whole dataset when finetune.full is on."""
    ratios = cfg.finetune.ratios if cfg.finetune.ratios is not None else cfg.selection.ratios
    runs = [Selection(scorer, r) for scorer in cfg.finetune.scorers for r in ratios]
    return runs + ([Selection.full()] if cfg.finetune.full else [])


def trainer_name(key: str, name: str) -> str:
    return f"finetune-{key}-{name}"


def training_rows(run: RunDir, selection: Selection) -> Location:
    """What a run trains on: its selection's rows, or for `full` the whole dataset."""
    return run.data if selection.scorer == FULL else run.selection / f"{selection.name}.parquet"


def scaling_config(cfg: Config):
    import ray.train

    t = cfg.finetune
    use_gpu = t.gpus_per_worker > 0
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if use_gpu else {})}
    return ray.train.ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=use_gpu,
        resources_per_worker=resources,
        placement_strategy=t.placement_strategy,
    )


def torch_config(cfg: Config):
    from ray.train.torch import TorchConfig

    backend = cfg.finetune.backend
    return TorchConfig(backend=None if backend == "auto" else backend)  # None: NCCL with GPUs, gloo without


def build_trainer(
    cfg: Config,
    run: RunDir,
    key: str,
    selection: Selection,
    stop_after_steps: int | None = None,
    train_fn=finetune_worker,
):
    """The subset's trainer; `train_fn` is the worker loop (tests pass a probe that records its placement)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.finetune
    storage = run.finetune_train_state
    name = trainer_name(key, selection.name)
    return TorchTrainer(
        train_fn,
        train_loop_config={
            "finetune": asdict(t),
            "rows": training_rows(run, selection),
            "out": run.finetune / selection.name,
            "train_state": storage / name,
            "key": key,
            "torch_threads": max(1, int(t.cpus_per_worker)),
            "stop_after_steps": stop_after_steps,
        },
        scaling_config=scaling_config(cfg),
        torch_config=torch_config(cfg),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            logging_config=train_logging(cfg.ray),
        ),
    )


def fit_subset(cfg: Config, run: RunDir, key: str, selection: Selection, train_fn=finetune_worker) -> str:
    """Train one subset to its `_done` marker (in a Ray task: one per subset in flight), then drop its trainer's
    storage (checkpoints, shared tokens); returns the subset's name."""
    out = run.finetune / selection.name
    out.delete()  # left by a run under another key, or cut short
    with sigint_restored():
        result = build_trainer(cfg, run, key, selection, train_fn=train_fn).fit()
    if result.error is not None:
        raise result.error
    if not run_finished(out, key):
        raise RuntimeError(f"fine-tuning {selection.name} ended without writing its model to {out}")
    (run.finetune_train_state / trainer_name(key, selection.name)).delete()
    return selection.name


def side_by_side_width(cfg: Config, log=say) -> int:
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    width = subsets_side_by_side(cfg.finetune, nodes)
    if width == 0:
        resource, need = subset_demand(cfg.finetune)
        log(
            f"[finetune] no node holds a subset's {need:g} {resource} now ({cfg.finetune.placement_strategy}): "
            "one subset at a time, waiting for the autoscaler to add a node"
        )
    return max(1, width)


def fit_side_by_side(cfg: Config, run: RunDir, key: str, todo: list[Selection], log=say, train_fn=finetune_worker):
    """Up to `side_by_side_width` subsets in flight at once, each trainer launched from its own zero-CPU task (a
    task holds no resources its trainer needs); after a failure the subsets in flight finish, no new one starts, and
    the failure stops the stage."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    width = side_by_side_width(cfg, log)
    # On the driver's node: a trainer's controller lives where its fit() runs, and a preempted GPU node must not
    # take a subset's controller down with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    launch = ray.remote(fit_subset).options(num_cpus=0, max_retries=0, scheduling_strategy=here)
    log(f"[finetune] {len(todo)} subset(s) to train, {min(width, len(todo))} side by side")
    at_most_in_flight(
        width,
        todo,
        lambda selection: launch.remote(cfg, run, key, selection, train_fn),
        lambda _, name: log(f"[finetune] {name} done"),
    )


def run(cfg: Config, run: RunDir, key: str, log=say) -> dict:
    skipped, todo, names = {}, [], []
    for selection in selections(cfg):
        rows = training_rows(run, selection)
        if not rows.exists():
            raise FileNotFoundError(f"{rows} does not exist: is '{selection.scorer}' among scoring.scorers?")
        if sum(row_counts(parquet_files(rows))) == 0:
            skipped[selection.name] = "empty selection"
            continue
        names.append(selection.name)
        if not run_finished(run.finetune / selection.name, key):
            todo.append(selection)
    dropped = run.drop_other_trainers(run.finetune_train_state, trainer_name(key, ""))
    if dropped:
        log(f"[finetune] removed {len(dropped)} trainer folder(s) of an earlier config: {', '.join(dropped)}")
    if todo:
        if cfg.finetune.checkpoint == "none" and cfg.finetune.max_failures > 0:
            log(
                f"[finetune] checkpoint: none: a failed worker group restarts its subset from the first step (up to "
                f"{cfg.finetune.max_failures} time(s))"
            )
        fit_side_by_side(cfg, run, key, todo, log)
    runs = {name: json.loads((run.finetune / name / SUMMARY).read_text()) for name in names}
    for stale in set(run.finetune.children()) - set(runs) - {"summary.json"}:
        (run.finetune / stale).delete()  # runs of an earlier config: not this stage's output
    (run.finetune / "summary.json").write_text(json.dumps({"runs": runs, "skipped": skipped}, indent=2))
    return {
        "runs": len(runs),
        "skipped": skipped,
        "trainers_of_other_configs_removed": len(dropped),
        "steps": {s: r["total_steps"] for s, r in runs.items()},
        "last_loss": {s: r["last_loss"] for s, r in runs.items()},
    }
