"""(c) the Ray Data extraction stage (gradients.stage.run) vs the same ShardExtractor in a bare in-process loop over
the same shards, with the stage's time split at the moment its first shard reaches the actor."""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from extraction.common import RAY_RTOL, TreeCPU, cpu_ticks, summarize
from gradfilter_ray.config import Config

# ---------------------------------------------------------------------------------------------------------------
# (c) Ray Data stage vs bare loop


def bare_extract(cfg: Config, root: Path, out_file: Path, limit: int | None = None) -> None:
    """What the stage computes, in-process: the same reads, the same ShardExtractor, the same row windows."""
    from gradfilter_ray.gradients.shards import plan_shards
    from gradfilter_ray.gradients.stage import TOKEN_COLUMNS, ShardExtractor, adapter_locations
    from gradfilter_ray.rundir import RunDir

    rundir = RunDir(str(root))
    ens, grads = cfg.ensemble, cfg.gradients
    adapters = adapter_locations(rundir, ens.early_epoch, ens.late_epoch)
    extractor = ShardExtractor(dataclasses.asdict(cfg.proxy), dataclasses.asdict(grads), ens.members, adapters)
    table = pq.read_table(rundir.tokens, columns=TOKEN_COLUMNS)
    if limit is not None:
        table = table.slice(0, limit)
    shards = plan_shards([("tokens", table.num_rows)], grads.shard_rows, grads.num_actors)  # as the stage cuts them
    parts = [extractor.extract_rows(table.slice(s.first_row, s.rows)) for s in shards]
    pq.write_table(pa.concat_tables(parts), out_file)


def compare_outputs(a: pa.Table, b: pa.Table) -> dict:
    """Same ids; every other column equal (floats within RAY_RTOL relative, NaN == NaN; ints exactly)."""
    a, b = a.sort_by("id"), b.sort_by("id")
    same_ids = a.num_rows == b.num_rows and a["id"].equals(b["id"]) and a.schema.names == b.schema.names
    worst, mismatched = 0.0, []
    if same_ids:
        for col in a.schema.names:
            x, y = a[col].combine_chunks(), b[col].combine_chunks()
            if pa.types.is_list(x.type):
                x, y = x.flatten(), y.flatten()
            x, y = np.asarray(x.to_numpy(zero_copy_only=False)), np.asarray(y.to_numpy(zero_copy_only=False))
            if x.dtype.kind == "f":
                both_nan = np.isnan(x) & np.isnan(y)
                rel = np.abs(x - y) / np.maximum(np.abs(y), 1e-30)
                rel = np.where(both_nan, 0.0, np.nan_to_num(rel, nan=np.inf))
                worst = max(worst, float(rel.max(initial=0.0)))
            elif not np.array_equal(x, y):
                mismatched.append(col)
    return {
        "same_ids": bool(same_ids),
        "rows": a.num_rows,
        "columns": a.schema.names,
        "max_rel_diff": worst,
        "mismatched_columns": mismatched,
        "tolerance": RAY_RTOL,
        "ok": bool(same_ids and not mismatched and worst <= RAY_RTOL),
    }


def wait_for_actor_exit(timeout: float = 20.0) -> None:
    """Ray Data tears its actor pool down asynchronously; let it go before the next timed run so the two don't
    share the CPU."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = TreeCPU()
        probe._scan()
        if not any("MapWorker" in name for name in probe.names.values()):
            return
        time.sleep(0.25)


def timed_extractor_class(log_path: str) -> type:
    """ShardExtractor that appends a JSON line when constructed and per shard (times only; outputs untouched).

    Defined in a function so Ray's cloudpickle ships it by value: the workers need not import this script."""
    from gradfilter_ray.gradients.stage import ShardExtractor

    class TimedShardExtractor(ShardExtractor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            start, cpu = time.time(), time.process_time()
            super().__init__(*args, **kwargs)
            event = {"event": "init", "start": start, "end": time.time(), "cpu_s": time.process_time() - cpu}
            with open(log_path, "a") as f:
                f.write(json.dumps(event) + "\n")

        def extract(self, shard) -> dict:
            start, cpu = time.time(), time.process_time()
            out = super().extract(shard)
            event = {"event": "call", "rows": out["rows"], "start": start, "end": time.time()}
            event["cpu_s"] = time.process_time() - cpu
            with open(log_path, "a") as f:
                f.write(json.dumps(event) + "\n")
            return out

    return TimedShardExtractor


def timed_ray_stage(cfg: Config, root: Path, log_path: Path) -> tuple[float, TreeCPU, pa.Table, dict, dict | None]:
    """One run of the real stage. Its actor class is swapped for the timing subclass for the duration of the call,
    to split the run into start-up (until the first batch enters the actor), time in the UDF, and the rest."""
    from gradfilter_ray import pipeline
    from gradfilter_ray.gradients import stage
    from gradfilter_ray.rundir import RunDir

    rundir = RunDir(str(root))
    key = pipeline.stage_key("gradients", cfg)
    log_path.write_text("")
    original = getattr(stage, "ShardExtractor", None)
    try:
        if original is not None:
            stage.ShardExtractor = timed_extractor_class(str(log_path))
        # keep_outputs left False: the previous timed run's gradients/ is removed first (the pipeline keeps it), so
        # every timed run computes every shard
        rundir.begin_stage("gradients", key, pipeline.STAGES["gradients"].writes)
        with TreeCPU() as tc:
            began = time.time()
            w0 = time.perf_counter()
            counts = stage.run(cfg, rundir, key, log=lambda line: None)
            wall = time.perf_counter() - w0
            ended = time.time()
        table = pq.read_table(rundir.at(counts["units"]["gradients"]))  # the record is not written here
    finally:
        if original is not None:
            stage.ShardExtractor = original
    wait_for_actor_exit()
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    inits = [e for e in events if e["event"] == "init"]
    calls = [e for e in events if e["event"] == "call"]
    phases = None
    if inits and calls:  # else the stage no longer builds its actor from stage.ShardExtractor: no breakdown
        first = min(c["start"] for c in calls)
        phases = {
            "until_first_batch_s": first - began,
            "actor_init_wall_s": sum(e["end"] - e["start"] for e in inits),
            "actor_init_cpu_s": sum(e["cpu_s"] for e in inits),
            "udf_wall_s": sum(c["end"] - c["start"] for c in calls),
            "udf_cpu_s": sum(c["cpu_s"] for c in calls),
            "after_first_batch_s": ended - first,
            "udf_calls": len(calls),
        }
    return wall, tc, table, counts, phases


def timed_bare(cfg: Config, root: Path, out_file: Path) -> tuple[float, float]:
    c0, w0 = cpu_ticks(), time.perf_counter()
    bare_extract(cfg, root, out_file)
    return time.perf_counter() - w0, cpu_ticks() - c0


def ray_vs_bare(cfg: Config, root: Path, n_rows: int, repeats: int) -> dict:
    """`repeats` interleaved (bare loop, Ray stage) pairs on the same run directory, inside one local Ray."""
    import ray

    from gradfilter_ray.runtime import configure_data_context

    scratch = Path(tempfile.mkdtemp(prefix="gfr-bare-"))
    ray_tmp = tempfile.mkdtemp(prefix="gfr-", dir="/tmp")  # Ray's socket paths must stay short
    result: dict = {"rows": n_rows, "batch_size": cfg.gradients.batch_size}
    walls: dict[str, list[float]] = {"ray": [], "bare": []}
    cpus: dict[str, list[float]] = {"ray": [], "bare": []}
    phases: list[dict] = []
    outputs: dict[str, pa.Table] = {}
    try:
        # Warm-up of the in-process path on one window; Ray's actor always starts cold and that is part of its cost.
        bare_extract(cfg, root, scratch / "warmup.parquet", limit=cfg.gradients.shard_rows)
        with TreeCPU() as tc:
            w0 = time.perf_counter()
            ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, logging_level="WARNING")
            startup_wall = time.perf_counter() - w0
        configure_data_context(cfg.ray)
        result["startup"] = {"wall_s": startup_wall, "cpu_s": tc.seconds}
        for k in range(repeats):
            wall, cpu = timed_bare(cfg, root, scratch / f"bare{k}.parquet")
            walls["bare"].append(wall)
            cpus["bare"].append(cpu)
            wall, tc, table, counts, phase = timed_ray_stage(cfg, root, scratch / "udf.jsonl")
            walls["ray"].append(wall)
            cpus["ray"].append(tc.seconds)
            if phase is not None:
                phases.append(phase)
            if k == 0:
                outputs["ray"] = table
                result["stage_counts"] = counts
                result["ray_cpu_by_process_s"] = tc.by_process
        outputs["bare"] = pq.read_table(scratch / "bare0.parquet")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    result["correctness"] = compare_outputs(outputs["ray"], outputs["bare"])
    bare, stage_t = summarize(walls["bare"], cpus["bare"]), summarize(walls["ray"], cpus["ray"])
    start = result["startup"]
    result.update(bare=bare, ray_stage=stage_t)
    ratios: dict[str, float] = {}
    for m in ("wall", "cpu"):
        ray_time = start[f"{m}_s"] + stage_t[f"{m}_s"]
        result[f"ray_time_{m}_s"] = ray_time
        ratios[f"ray_efficiency_{m}"] = ray_time / bare[f"{m}_s"]
        ratios[f"ray_minus_startup_over_bare_{m}"] = stage_t[f"{m}_s"] / bare[f"{m}_s"]
    if len(phases) == repeats:
        result["phases"] = {key: statistics.median(p[key] for p in phases) for key in phases[0]}
        result["phases_runs"] = phases
        ph = result["phases"]
        # Start-up read as everything before the first batch reaches the actor (ray.init, then per run: worker
        # processes, file listing, the actor's imports and construction).
        ratios["after_first_batch_over_bare_wall"] = ph["after_first_batch_s"] / bare["wall_s"]
        ratios["udf_over_bare_wall"] = ph["udf_wall_s"] / bare["wall_s"]
        ratios["udf_over_bare_cpu"] = ph["udf_cpu_s"] / bare["cpu_s"]
    result["ratios"] = ratios
    return result
