"""Extraction stage (Ray shell): `tokens/` through per-example LoRA gradient norms, committed shard by shard.

Each config's extraction is a unit of its own, in ``gradients/<stage key>/`` beside the other configs' (switching
between two configs extracts neither again); the stage records that folder in the manifest's references before any
work (`RunDir.add_references`, so only `gradfilter-ray gc` removes it) and maps it in its record (``units``:
'gradients' -> 'gradients/<stage key>'), through which `RunDir.gradients` finds it. Forced (`--force`), it
removes that folder (after recording it) and extracts every shard anew. It never touches another config's folder.

The driver cuts `tokens/` into shards (`shards.plan_shards`: row ranges of its files, a multiple of
`gradients.num_actors` of them, none over `gradients.shard_rows`; an interrupted run's recorded plan when there is
one), keeps the shards that run already committed for this stage key and these upstream outputs (`commit_key`),
removes everything else in this config's folder (shards of adapters retrained with the same config included), and
streams the remaining shard descriptors through a Ray Data actor pool, one shard in flight per actor. Each
`ShardExtractor` actor loads the frozen proxy once and all 2M adapters (M members x early/late, read by the actor
itself from the members' folders under ``output_dir/ensemble/``), reads its shard's rows itself, runs
`extract.extract_block` (the Ray-free core), writes ``part-{index}.parquet`` in the folder and then the shard's
marker. The driver only sees one small row per shard, which it turns into progress (rows done of total, rate, time
left). A Ray task finally checks that every row of `tokens/` came out of the folder exactly once. Each shard starts
at the fault point "gradients.shard" (a no-op unless a test configures a handler).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from gradfilter_ray.config import Config, GradientsConfig, ProxyConfig, build
from gradfilter_ray.console import say
from gradfilter_ray.faults import fault_point
from gradfilter_ray.gradients.shards import (
    MARKERS,
    PLAN,
    Shard,
    keep_and_clear,
    plan_record,
    plan_shards,
    recorded_plan,
)
from gradfilter_ray.parquet_stream import parquet_files, read_rows, row_counts, write_whole
from gradfilter_ray.progress import RowProgress
from gradfilter_ray.resources import extraction_actors
from gradfilter_ray.row_accounting import account_token_rows
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import run_as_task
from gradfilter_ray.storage import Location
from gradfilter_ray.units import MEMBER_DONE

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKEN_COLUMNS = ["id", "input_ids", "loss_spans", "response_input_ids", "response_label_start"]
SHARD_STATS = ("rows", "seconds", "batches", "oom_splits", "real_tokens", "padded_tokens")

# Fault tolerance of the actor pool is Ray Data's own (2.60 sets max_restarts=-1 and max_task_retries=-1 on actor
# pools): a killed actor (preemption, OOM kill) is restarted and the shard it held runs again on a live actor; its
# part and marker are whole-object writes, so a retry replaces them. The driver counts every planned shard back.


def adapter_locations(run: RunDir, early: int, late: int) -> dict[str, Location]:
    """adapter name -> its folder: member m's early and late epochs, in the member folders the manifest's `ensemble`
    record maps this config's members to (`RunDir.member_folders`)."""
    from gradfilter_ray.gradients.extract import adapter_name  # torch and peft: not at the CLI's start-up

    return {
        adapter_name(m, checkpoint): folder / f"epoch_{epoch}"
        for m, folder in enumerate(run.member_folders())
        for checkpoint, epoch in (("early", early), ("late", late))
    }


def memory_fraction(cfg: GradientsConfig) -> float | None:
    """The share of its GPU an actor's allocator may take: the configured cap, else its share of the GPU when
    actors share one (so one cannot starve the other), else no cap."""
    if cfg.gpu_memory_fraction is not None:
        return cfg.gpu_memory_fraction
    # A little under the exact share: each process's CUDA context lives outside the allocator's cap.
    return round(0.95 * cfg.gpus_per_actor, 4) if 0 < cfg.gpus_per_actor < 1 else None


class ShardExtractor:
    """Ray Data actor: shard descriptors -> each shard's GRADIENT_SCHEMA rows written and committed; one small row of
    facts per shard back to the driver."""

    def __init__(
        self,
        proxy: dict,
        gradients: dict,
        members: int,
        adapters: dict[str, Location],
        tokens: Location | None = None,
        out: Location | None = None,
        key: str = "",
    ) -> None:
        import torch

        from gradfilter_ray.lora import load_adapters
        from gradfilter_ray.models import load_causal_lm, load_tokenizer, pick_device, resolve_dtype

        self.proxy: ProxyConfig = build(ProxyConfig, proxy, "proxy")
        self.cfg: GradientsConfig = build(GradientsConfig, gradients, "gradients")
        self.members, self.tokens, self.out, self.key = members, tokens, out, key
        self.tokens_per_batch = self.cfg.tokens_per_batch  # lowered for good after an out-of-memory split
        self.device = pick_device(self.cfg.gpus_per_actor)
        fraction = memory_fraction(self.cfg)
        if self.device.type == "cuda" and fraction is not None:
            torch.cuda.set_per_process_memory_fraction(fraction, self.device)
        torch.set_num_threads(self.cfg.torch_threads or max(1, int(self.cfg.cpus_per_actor)))
        self.pad_id = load_tokenizer(self.proxy.model).pad_token_id  # padding is masked: any id would do
        base = load_causal_lm(self.proxy.model, resolve_dtype(self.cfg.precision, self.device), self.device)
        # The files are only needed while peft reads them: a Ray actor is killed without running finalizers, so a
        # folder kept for the actor's lifetime would be left behind in /tmp by every extraction.
        with tempfile.TemporaryDirectory(prefix="gfr-adapters-") as tmp:
            folders = {}
            for name, where in adapters.items():
                folders[name] = Path(tmp) / name
                for filename in ADAPTER_FILES:
                    (where / filename).get(folders[name] / filename)
            self.model = load_adapters(base, folders)

    def __call__(self, shards: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.extract(Shard(**spec)) for spec in shards.to_pylist()])

    def extract(self, shard: Shard) -> dict:
        """Extract one shard, write its part, then commit it with its marker; the facts the driver counts."""
        fault_point("gradients.shard", pid=os.getpid(), shard=shard.index, out=self.out.path if self.out else "")
        started = time.perf_counter()
        tokens = read_rows(self.tokens / shard.file, shard.first_row, shard.stop_row, TOKEN_COLUMNS)
        stats: dict = {}
        table = self.extract_rows(tokens, stats)
        if 0 < stats.get("tokens_per_batch", 0) < self.tokens_per_batch:
            self.tokens_per_batch = stats["tokens_per_batch"]  # later shards start where this one had to go
        write_whole(self.out / shard.part, table)
        facts = {
            "index": shard.index,
            "rows": table.num_rows,
            "seconds": round(time.perf_counter() - started, 3),
            **{k: int(stats.get(k, 0)) for k in SHARD_STATS[2:]},
            "tokens_per_batch": self.tokens_per_batch,
        }
        (self.out / shard.marker).write_text(json.dumps(shard.marker_record(self.key, **facts)))
        return facts

    def extract_rows(self, tokens: pa.Table, stats: dict | None = None) -> pa.Table:
        """`tokens/` rows -> their `gradients/` rows (no I/O: what the benchmarks time against the stage)."""
        import torch

        from gradfilter_ray.gradients.extract import extract_block

        return extract_block(
            self.model,
            tokens,
            members=self.members,
            batch_size=self.cfg.batch_size,
            tokens_per_batch=self.tokens_per_batch,
            loss_chunk_tokens=self.cfg.loss_chunk_tokens,
            head_dtype=None if self.cfg.head_precision == "model" else torch.float32,
            device=self.device,
            pad_id=self.pad_id,
            stats=stats,
        )


def token_files(tokens: Location) -> list[tuple[str, int]]:
    """(file relative to `tokens`, its rows) for each Parquet file of `tokens/`, in listing order."""
    files = parquet_files(tokens)
    return list(zip([file.path[len(tokens.path) + 1 :] for file in files], row_counts(files)))


def shard_plan(cfg: GradientsConfig, file_rows: list[tuple[str, int]], recorded: dict | None, key: str) -> list[Shard]:
    """The plan recorded for this key over these files (an interrupted run's, kept whatever the actor count now),
    else a new one for `num_actors` actors."""
    kept = recorded_plan(recorded, key, file_rows, cfg.shard_rows)
    return kept if kept is not None else plan_shards(file_rows, cfg.shard_rows, cfg.num_actors)


def read_plan(out: Location, files: list[str]) -> dict | None:
    if PLAN not in files:
        return None
    try:
        return json.loads((out / PLAN).read_text())
    except (OSError, ValueError):
        return None  # unreadable: planned anew


def committed_markers(out: Location, files: list[str]) -> dict[str, dict]:
    """marker path -> its record, for every readable marker among `files` (`out`'s files, relative to it)."""
    markers = {}
    for rel in files:
        if not rel.startswith(f"{MARKERS}/") or rel == PLAN:
            continue
        try:
            markers[rel] = json.loads((out / rel).read_text())
        except (OSError, ValueError):
            continue  # unreadable: not committed, removed with the other leftovers
    return markers


# A stage record's fields that say when it ran, not what it wrote.
TIMING_FIELDS = ("started", "finished", "seconds", "failed")


def commit_key(run: RunDir, stage_key: str) -> str:
    """What a shard's marker must name to be kept (`shard_commit_key` of this run's `tokens` record and members)."""
    members = [(folder / MEMBER_DONE).read_text() for folder in run.member_folders()]
    return shard_commit_key(stage_key, run.stage_record("tokens") or {}, members)


def shard_commit_key(stage_key: str, tokens_record: dict, member_markers: list[str]) -> str:
    """The stage key and the exact upstream outputs a shard was computed from: the `tokens` record without its timing
    (its key and counts say what `tokens/` holds, so tokenising the same rows again keeps every shard) and each
    member's `_done` marker, which names that training of the member, so shards of adapters retrained with the same
    config (`ensemble --force`) are recomputed, never mixed with new ones, while an ensemble run that reused every
    member changes nothing."""
    tokens = {k: v for k, v in tokens_record.items() if k not in TIMING_FIELDS}
    upstream = json.dumps([tokens, member_markers], sort_keys=True, default=str)
    return f"{stage_key}-{hashlib.sha256(upstream.encode()).hexdigest()[:12]}"


def actor_pool_args(cfg: Config, actors: int) -> dict:
    """How the extraction asks Ray for its actors: `resources.extraction_actors` for `actors` of them, each with
    (cpus_per_actor, gpus_per_actor), one shard in flight per actor."""
    import ray.data

    pool = extraction_actors(cfg).with_count(actors)
    return {
        # Ray Data queues 2 tasks per actor by default: the first actor to load its model would take a second shard
        # while another actor, still loading, ends up with none. An actor reads its own shard, so a queued
        # descriptor prefetches nothing.
        "compute": ray.data.ActorPoolStrategy(size=pool.count, max_tasks_in_flight_per_actor=1),
        **pool.remote_args(),
    }


def extraction_dataset(cfg: Config, todo: list[Shard], extractor: type, **constructor_kwargs):
    """The shard descriptors streamed through an actor pool of `extractor`s, one shard per call."""
    import ray.data

    ds = ray.data.from_items([asdict(s) for s in todo], override_num_blocks=len(todo))
    return ds.map_batches(
        extractor,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=1,
        batch_format="pyarrow",
        **actor_pool_args(cfg, min(extraction_actors(cfg).count, len(todo))),
    )


def run(cfg: Config, run: RunDir, key: str, log=say, force: bool = False) -> dict:
    ens, grads = cfg.ensemble, cfg.gradients
    adapters = adapter_locations(run, ens.early_epoch, ens.late_epoch)
    # This config's folder, written here directly: while the stage runs its record maps nothing yet.
    folder = run.gradients_unit(key)
    run.add_references("gradients", key, [folder])  # before the work: an interrupted extraction is referenced too
    tokens, out = run.tokens, run.at(folder)
    if force:  # every shard extracted anew, its plan included
        out.delete()
    commit = commit_key(run, key)
    out.make_dir()
    files = out.files()  # one listing serves the plan, the markers and the clean-up
    file_rows = token_files(tokens)
    shards = shard_plan(grads, file_rows, read_plan(out, files), commit)
    done, todo, stale = keep_and_clear(shards, committed_markers(out, files), files, commit)
    for rel in stale:
        (out / rel).delete()
    (out / PLAN).write_text(json.dumps(plan_record(commit, file_rows, shards)))
    total_rows = sum(s.rows for s in shards)
    progress = RowProgress(
        "[gradients] extracted",
        total_rows,
        already_done=sum(s.rows for s in done),
        emit=None if log is say else log,  # the console redraws it in place on a terminal
    )
    if done:
        log(f"[gradients] {len(done)}/{len(shards)} shards already committed, computing {len(todo)}")
    computed: list[dict] = []
    started = time.perf_counter()
    if todo:
        ds = extraction_dataset(
            cfg,
            todo,
            ShardExtractor,
            proxy=asdict(cfg.proxy),
            gradients=asdict(grads),
            members=ens.members,
            adapters=adapters,
            tokens=tokens,
            out=out,
            key=commit,
        )
        for facts in ds.iter_rows():
            computed.append(facts)
            progress.advance(int(facts["rows"]))
    seconds = time.perf_counter() - started
    if sorted(f["index"] for f in computed) != [s.index for s in todo]:
        raise RuntimeError(f"extraction returned shards {sorted(f['index'] for f in computed)}, not the planned ones")

    accounting = run_as_task(account_token_rows, tokens, out)
    rows_computed = sum(int(f["rows"]) for f in computed)
    real, padded = (sum(int(f[k]) for f in computed) for k in ("real_tokens", "padded_tokens"))
    return {
        "units": {"gradients": folder},
        "rows": accounting["rows"],
        "rows_no_response_tokens": accounting["rows_no_response_tokens"],
        "adapters": len(adapters),
        "shards": len(shards),
        "shards_resumed": len(done),
        "shards_computed": len(computed),
        "rows_computed": rows_computed,
        "batches": sum(int(f["batches"]) for f in computed),
        "oom_splits": sum(int(f["oom_splits"]) for f in computed),
        "tokens_per_batch_min": min((int(f["tokens_per_batch"]) for f in computed), default=grads.tokens_per_batch),
        "padding_efficiency": round(real / padded, 4) if padded else None,
        "seconds_streaming": round(seconds, 2),
        "examples_per_s": round(rows_computed / seconds, 2) if seconds > 0 else None,
        "tokens_per_s": round(real / seconds, 1) if seconds > 0 else None,
        "norms_per_s": round(rows_computed * len(adapters) / seconds, 2) if seconds > 0 else None,
    }
