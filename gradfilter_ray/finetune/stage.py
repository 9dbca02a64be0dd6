"""Finetune stage (Ray shell): one Ray Train TorchTrainer per subset, whose workers run DeepSpeed
(`worker.finetune_worker`); subsets side by side, as many at once as the cluster holds.

Every subset is a unit with a key of its own (`keys.subset_key`: the training fields and a digest of its rows), so a
config change trains exactly the subsets it changes: adding a ratio trains that ratio's subsets, and a subset whose
rows and recipe are the same as another config's is that config's, reused. For each selection (scorer x ratio, plus
the whole dataset `full` when asked) a trainer reads the rows from ``selection/{name}.parquet`` (``data/`` for
`full`; output_dir must be reachable from every node) and writes ``finetune/{name}-{key}/``. Each trainer's fit()
runs in a Ray task of its own, so up to `placement.subsets_side_by_side` trainers train at once, each on its own
GPUs (STRICT_PACK: one node per subset by default); the others wait for a free slot. Under ``finetune.checkpoint``
(`ds_config.checkpoint_due`) every rank writes its part of a resumable DeepSpeed checkpoint straight into the
trainer's storage (``.ray_train_finetune/finetune-{key}-{shape}-{name}/``) at each epoch's end (epoch) or every
``checkpoint_every_steps`` steps (steps), never after the last step; their steps, bytes and seconds land in the
subset's summary. A re-run resumes a subset from its latest checkpoint, and a failed worker group is restarted from
it (FailureConfig); with ``none`` both start the subset again from its first step. The trainer's folder is named by
the subset's key and the shape its state depends on (`keys.trainer_name`: workers, ZeRO stage, optimiser placement),
so a re-run at another shape starts the subset from its first step in a trainer of its own. Rank 0 writes the
consolidated model (``model/``, safetensors), ``train_loss.csv`` and ``train_summary.json`` straight to the subset's
folder (no copy through the driver) and, last, a ``_done`` marker holding the subset's key: a subset with that
marker is finished, so a crash loses at most the subsets in flight. Other configs' subsets and trainer folders are
never touched here (`RunDir.add_references` records this config's, for `gc`); ``finetune/summary.json`` is this
config's view: each of its subsets' folder and training summary. Forced (`run(..., force=True)`), every subset of
this config is trained again from its first step, its folder and trainer deleted first, finished or not.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pyarrow.parquet as pq

from gradfilter_ray.config import Config
from gradfilter_ray.console import say
from gradfilter_ray.finetune.keys import digest_columns, rows_digest, subset_key, trainer_name
from gradfilter_ray.finetune.placement import subset_demand, subsets_side_by_side
from gradfilter_ray.finetune.worker import SUMMARY, finetune_worker
from gradfilter_ray.parquet_stream import parquet_files, row_counts, stream_batches
from gradfilter_ray.resources import subset_trainers
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import at_most_in_flight, run_as_task, sigint_restored, train_logging
from gradfilter_ray.scoring.scorers import FULL, Selection
from gradfilter_ray.storage import Location
from gradfilter_ray.units import unit_finished, unit_name


def selections(cfg: Config) -> list[Selection]:
    """The runs to fine-tune: each scorer at each ratio, then the whole dataset when finetune.full is on."""
    ratios = cfg.finetune.ratios if cfg.finetune.ratios is not None else cfg.selection.ratios
    runs = [Selection(scorer, r) for scorer in cfg.finetune.scorers for r in ratios]
    return runs + ([Selection.full()] if cfg.finetune.full else [])


def training_rows(run: RunDir, selection: Selection) -> Location:
    """What a run trains on: its selection's rows, or for `full` the whole dataset."""
    return run.data if selection.scorer == FULL else run.selection / f"{selection.name}.parquet"


@dataclass(frozen=True)
class Subset:
    """One fine-tuned subset: its selection, its key (`keys.subset_key`) and its Ray Train run under
    `.ray_train_finetune/` (`keys.trainer_name`)."""

    selection: Selection
    key: str
    trainer: str

    @property
    def name(self) -> str:
        return self.selection.name

    @property
    def folder(self) -> str:
        """Its folder under `finetune/`."""
        return unit_name(self.name, self.key)


def digest_rows(rows: Location) -> str:
    """The digest of a subset's rows (`keys.RowsDigest`), read batch by batch in the order the training reads them."""
    files = parquet_files(rows)
    with files[0].open_input() as handle:
        present = set(pq.ParquetFile(handle).schema_arrow.names)
    return rows_digest(stream_batches(rows, [c for c in digest_columns() if c in present]))


def plan_subsets(cfg: Config, run: RunDir) -> tuple[list[Subset], dict[str, str]]:
    """This config's subsets with their keys, and the selections skipped (with why): it reads every subset's rows
    once (a Ray task runs it, next to the data)."""
    subsets, skipped = [], {}
    for selection in selections(cfg):
        rows = training_rows(run, selection)
        if sum(row_counts(parquet_files(rows))) == 0:
            skipped[selection.name] = "empty selection"
            continue
        key = subset_key(cfg, digest_rows(rows))
        subsets.append(Subset(selection, key, trainer_name(cfg, key, selection.name)))
    return subsets, skipped


def scaling_config(cfg: Config):
    """One subset's workers as `resources.subset_trainers` asks for them: their count, CPUs and GPUs each, and the
    placement strategy of the group."""
    import ray.train

    trainers = subset_trainers(cfg)
    return ray.train.ScalingConfig(
        num_workers=trainers.count,
        use_gpu=trainers.use_gpu,
        resources_per_worker=trainers.ray_resources(),
        placement_strategy=trainers.placement,
    )


def torch_config(cfg: Config):
    from ray.train.torch import TorchConfig

    backend = cfg.finetune.backend
    return TorchConfig(backend=None if backend == "auto" else backend)  # None: NCCL with GPUs, gloo without


def build_trainer(
    cfg: Config,
    run: RunDir,
    subset: Subset,
    stop_after_steps: int | None = None,
    train_fn=finetune_worker,
):
    """The subset's trainer; `train_fn` is the worker loop (tests pass a probe that records its placement)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.finetune
    storage = run.finetune_train_state
    return TorchTrainer(
        train_fn,
        train_loop_config={
            "finetune": asdict(t),
            "name": subset.name,
            "rows": training_rows(run, subset.selection),
            "out": run.finetune / subset.folder,
            "train_state": storage / subset.trainer,
            "key": subset.key,
            "torch_threads": max(1, int(t.cpus_per_worker)),
            "stop_after_steps": stop_after_steps,
        },
        scaling_config=scaling_config(cfg),
        torch_config=torch_config(cfg),
        run_config=ray.train.RunConfig(
            name=subset.trainer,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            logging_config=train_logging(cfg.ray),
        ),
    )


def fit_subset(cfg: Config, run: RunDir, subset: Subset, train_fn=finetune_worker) -> str:
    """Train one subset to its `_done` marker (in a Ray task: one per subset in flight), then drop its trainer's
    storage (checkpoints, shared tokens); returns the subset's name."""
    out = run.finetune / subset.folder
    out.delete()  # this subset's own folder, cut short before its marker
    with sigint_restored():
        result = build_trainer(cfg, run, subset, train_fn=train_fn).fit()
    if result.error is not None:
        raise result.error
    if not unit_finished(out, subset.key):
        raise RuntimeError(f"fine-tuning {subset.name} ended without writing its model to {out}")
    (run.finetune_train_state / subset.trainer).delete()
    return subset.name


def subsets_to_train(run: RunDir, subsets: list[Subset], force: bool = False) -> list[Subset]:
    """The subsets to train: those no finished folder holds; forced, every one, its folder and trainer deleted first
    (so it starts from its first step)."""
    if not force:
        return [s for s in subsets if not unit_finished(run.finetune / s.folder, s.key)]
    for subset in subsets:
        (run.finetune / subset.folder).delete()
        (run.finetune_train_state / subset.trainer).delete()
    return list(subsets)


def side_by_side_width(cfg: Config, log=say) -> int:
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    width = subsets_side_by_side(cfg, nodes)
    if width == 0:
        trainers = subset_trainers(cfg)
        resource, need = subset_demand(trainers)
        log(
            f"[finetune] no node holds a subset's {need:g} {resource} now ({trainers.placement}): "
            "one subset at a time, waiting for the autoscaler to add a node"
        )
    return max(1, width)


def fit_side_by_side(cfg: Config, run: RunDir, todo: list[Subset], log=say, train_fn=finetune_worker):
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
        lambda subset: launch.remote(cfg, run, subset, train_fn),
        lambda _, name: log(f"[finetune] {name} done"),
    )


def run(cfg: Config, run: RunDir, key: str, log=say, train_fn=finetune_worker, force: bool = False) -> dict:
    """Train this config's subsets that no finished folder holds yet (`force`: every one of them, from its first
    step); write this config's view (`finetune/summary.json`). `train_fn`: the worker loop (tests wrap it to count
    the subsets trained)."""
    for selection in selections(cfg):
        rows = training_rows(run, selection)
        if not rows.exists():
            raise FileNotFoundError(f"{rows} does not exist: is '{selection.scorer}' among scoring.scorers?")
    subsets, skipped = run_as_task(plan_subsets, cfg, run)
    units = {s.name: f"{run.finetune.name}/{s.folder}" for s in subsets}
    trainers = [f"{run.finetune_train_state.name}/{s.trainer}" for s in subsets]
    run.add_references("finetune", key, [*units.values(), *trainers])  # before training: a subset cut short counts
    if force:  # the folders it deletes are recorded above: a forced run cut short leaves none unreferenced
        log(f"[finetune] forced: {len(subsets)} subset(s) trained again from their first step")
    todo = subsets_to_train(run, subsets, force)
    reused = [s.name for s in subsets if s not in todo]
    if reused:
        log(f"[finetune] {len(reused)} subset(s) already trained under the same key: {', '.join(reused)}")
    if todo:
        if cfg.finetune.checkpoint == "none" and cfg.finetune.max_failures > 0:
            log(
                f"[finetune] checkpoint: none: a failed worker group restarts its subset from the first step (up to "
                f"{cfg.finetune.max_failures} time(s))"
            )
        fit_side_by_side(cfg, run, todo, log, train_fn)
    trained = {s.name: json.loads((run.finetune / s.folder / SUMMARY).read_text()) for s in subsets}
    view = {s.name: {"folder": units[s.name], "key": s.key, "train": trained[s.name]} for s in subsets}
    (run.finetune / "summary.json").write_text(json.dumps({"runs": view, "skipped": skipped}, indent=2))
    return {
        "runs": len(subsets),
        "units": units,
        "trained": [s.name for s in todo],
        "reused": reused,
        "skipped": skipped,
        "steps": {name: r["total_steps"] for name, r in trained.items()},
        "last_loss": {name: r["last_loss"] for name, r in trained.items()},
    }
