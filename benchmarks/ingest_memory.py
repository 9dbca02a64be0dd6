"""Ingest at scale: peak memory of the driver and of the finalize task, and rows/s, before and after the bounded
ingest (`gradfilter_ray.data.dedup`, small Ray Data blocks, an unfused write), on synthetic Alpaca-style JSON Lines.

Each size gets one corpus (10 files, ~5 % exact duplicates, some across files and with different extra keys, ~2 %
bad rows, many of them identical to each other), generated under a temp dir and deleted afterwards. Each variant
runs in a fresh subprocess: a local Ray (`address="local"`, its own short temp dir), then the data stage's own
function (`data.stage.run`) on a fresh run directory, as the CLI runs it. Measured there:
  - the driver's peak RSS (VmHWM of the subprocess) and its RSS sampled along the run (the timeline tells the Ray
    Data pass from the finish);
  - the finalize task's peak RSS: the task's function is wrapped so that it resets its worker's high-water mark
    (`/proc/self/clear_refs`) when it starts and reports VmHWM when it ends. Ray reuses worker processes, so this
    counts what the worker held on entry (reported too) from the Ray Data tasks it ran before;
  - the same finish run again alone, in a fresh process without Ray, on the same normalized input: its own memory;
  - the peak RSS of every Ray worker (sampled from /proc every 0.25 s), with its RSS split into anonymous, file and
    shared (object-store pages) memory;
  - rows/s = rows in / stage wall time (ray.init not included).
Variants: "before" runs the previous Ray Data pass and finish (`write_normalized_before`, `split_kept_rejected_before`
below, kept verbatim as the reference, with memory marks between the finish's phases); "after" runs today's code.
The two variants' outputs must be identical (counts, every column of `data/` and `rejects.parquet` by id), and the
counts must match what the generator planted; otherwise the benchmark exits 2.

Not a `bench_*` file: `run_all.py` does not run it (~6 min on 2 cores). Results:
benchmarks/results/ingest_memory.json (ingest_memory.quick.json with --quick).
Usage: python benchmarks/ingest_memory.py [--sizes 100000 1000000 3000000] [--variants before after] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without `pip install -e .`
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

RESULTS = REPO / "benchmarks" / "results" / "ingest_memory.json"
QUICK_RESULTS = RESULTS.with_name("ingest_memory.quick.json")  # a quick look never replaces the full measurement
FILES = 10
POOL = 4096  # distinct sentences the rows are built from
DUPLICATE_EVERY = 20  # global row g with g % 20 == 7 copies the content of a good row
BAD_EVERY = 50  # g % 50 == 13: a bad row, one of BAD_LINES (identical bad rows must not be deduplicated)
BAD_LINES = {
    "invalid_json": b'{"instruction": "broken", "output": ',
    "missing_output": b'{"instruction": "no output"}',
    "empty_instruction": b'{"instruction": "  ", "output": "x"}',
    "wrong_type": b'{"instruction": "typed", "output": 3.5}',
}


# ----- the corpus -------------------------------------------------------------------------------------------------


def sentence_pool(seed: int = 0) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(2000)]
    return [" ".join(rng.choice(words, rng.integers(6, 16))).capitalize() + "." for _ in range(POOL)]


def row_content(g: int, pool: list[str]) -> tuple[str, str, str]:
    instruction = f"{pool[g % POOL]} Task {g}."
    input_ = pool[(g * 7) % POOL] if g % 3 == 0 else ""
    output = f"{pool[(g * 13) % POOL]} {pool[(g * 31) % POOL]} {pool[(g * 101) % POOL]} Answer {g}."
    return instruction, input_, output


def original_of(g: int, rows: int) -> int:
    """The good row whose content duplicate row g copies: class 1 rows (g % 20 == 1) are never bad nor copies."""
    o = (g * 7919 + 3) % rows
    o = o - o % DUPLICATE_EVERY + 1
    return o if o < rows else 1


def make_corpus(folder: Path, rows: int) -> dict:
    """FILES JSON Lines files holding `rows` rows; returns the counts ingest must report."""
    pool = sentence_pool()
    bad_kinds = list(BAD_LINES)
    planted: Counter[str] = Counter()
    folder.mkdir(parents=True)
    per_file = -(-rows // FILES)
    for f in range(FILES):
        lines = []
        for g in range(f * per_file, min(rows, (f + 1) * per_file)):
            if g % BAD_EVERY == 13:
                kind = bad_kinds[(g // BAD_EVERY) % len(bad_kinds)]
                lines.append(BAD_LINES[kind].decode())
                planted[kind] += 1
                continue
            if g % DUPLICATE_EVERY == 7 and rows > DUPLICATE_EVERY:
                instruction, input_, output = row_content(original_of(g, rows), pool)
                extra = {"category": "copy"}
                planted["duplicate"] += 1
            else:
                instruction, input_, output = row_content(g, pool)
                extra = {"category": "gen"}
            lines.append(json.dumps({"instruction": instruction, "input": input_, "output": output, **extra}))
        (folder / f"part-{f:02d}.jsonl").write_text("\n".join(lines) + "\n")
    rejected = sum(planted.values())
    return {"rows_in": rows, "rows_kept": rows - rejected, "rows_rejected": rejected, "rejects_by_reason": planted}


# ----- the "before" reference: ingest's finish and Ray Data pass as they were before gradfilter_ray/data/dedup.py --
# Kept verbatim (the memory marks between phases are the only addition) so that one run measures both.


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: on Linux that carries the forking parent's high-water mark."""
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0), so a reused worker reports this task's peak."""
    Path("/proc/self/clear_refs").write_text("5")


PHASE_MARKS: list[tuple[str, float, float]] = []  # (phase, RSS, peak) in the task's process, "before" only


def _mark(phase: str) -> None:
    PHASE_MARKS.append((phase, round(rss_mib(), 1), round(peak_rss_mib(), 1)))


def duplicate_twins_before(ids, hashes, eligible) -> dict[int, int]:
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.table({"id": ids[eligible], "h": hashes.filter(pa.array(eligible))})
    firsts = table.group_by("h").aggregate([("id", "min"), ("id", "count")])
    firsts = firsts.filter(pc.greater(firsts["id_count"], 1))
    if firsts.num_rows == 0:
        return {}
    joined = table.join(firsts.select(["h", "id_min"]), keys="h", join_type="inner")
    dup = pc.not_equal(joined["id"], joined["id_min"])
    joined = joined.filter(dup)
    return dict(zip(joined["id"].to_pylist(), joined["id_min"].to_pylist()))


def split_kept_rejected_before(normalized, data_out, rejects_out, dedup: bool) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from gradfilter_ray.data.finalize import ROWS_PER_OUTPUT_FILE, _RollingWriter  # the writer is unchanged
    from gradfilter_ray.data.formats import CANONICAL_COLUMNS, DUPLICATE, NORMALIZED_SCHEMA, REJECT_COLUMNS

    _mark("start")
    dataset = pads.dataset(
        normalized.path, format="parquet", schema=NORMALIZED_SCHEMA, filesystem=normalized.filesystem
    )
    keys = dataset.to_table(columns=["id", "content_hash", "reason"])
    _mark("keys to_table")
    ids = keys["id"].to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise AssertionError("ingest produced duplicate row ids: this is a bug")
    twins = {}
    if dedup:
        eligible = keys["reason"].is_null().to_numpy(zero_copy_only=False)
        twins = duplicate_twins_before(ids, keys["content_hash"].combine_chunks(), eligible)
    del keys
    _mark("twins dict")

    kept_schema = pa.schema([NORMALIZED_SCHEMA.field(c) for c in CANONICAL_COLUMNS])
    reject_schema = pa.schema([NORMALIZED_SCHEMA.field(c) for c in REJECT_COLUMNS])
    kept_writer = _RollingWriter(data_out, kept_schema, ROWS_PER_OUTPUT_FILE)
    rejects_out.parent().make_dir()
    reject_writer = pq.ParquetWriter(rejects_out.path, reject_schema, filesystem=rejects_out.filesystem)
    reasons: Counter[str] = Counter()
    rows_in = rows_kept = 0
    twin_ids = pa.array(list(twins), pa.int64())
    _mark("twin id array")
    try:
        for batch in dataset.to_batches(batch_size=8192):
            table = pa.Table.from_batches([batch])
            rows_in += table.num_rows
            is_dup = pc.is_in(table["id"], value_set=twin_ids) if twins else pa.repeat(False, table.num_rows)
            ok = pc.and_(table["reason"].is_null(), pc.invert(is_dup))
            kept = table.filter(ok).select(CANONICAL_COLUMNS)
            kept_writer.write(kept)
            rows_kept += kept.num_rows

            rejected = table.filter(pc.invert(ok))
            if rejected.num_rows:
                dup_mask = pc.is_in(rejected["id"], value_set=twin_ids) if twins else None
                if dup_mask is not None and pc.any(dup_mask).as_py():
                    reason = pc.if_else(dup_mask, pa.scalar(DUPLICATE), rejected["reason"])
                    detail = pa.array(
                        [
                            f"duplicate of id {twins[i]}" if d else old
                            for i, d, old in zip(
                                rejected["id"].to_pylist(), dup_mask.to_pylist(), rejected["detail"].to_pylist()
                            )
                        ],
                        pa.string(),
                    )
                    rejected = rejected.set_column(rejected.schema.get_field_index("reason"), "reason", reason)
                    rejected = rejected.set_column(rejected.schema.get_field_index("detail"), "detail", detail)
                reasons.update(rejected["reason"].to_pylist())
                reject_writer.write_table(rejected.select(REJECT_COLUMNS).cast(reject_schema))
    finally:
        kept_writer.close()
        reject_writer.close()
    _mark("streamed and written")
    if kept_writer.files == 0:
        empty = data_out / "part-00000.parquet"
        pq.write_table(kept_schema.empty_table(), empty.path, filesystem=empty.filesystem)
    rows_rejected = sum(reasons.values())
    if rows_in != rows_kept + rows_rejected:
        raise AssertionError(f"row accounting broken: {rows_in} in != {rows_kept} kept + {rows_rejected} rejected")
    return {
        "rows_in": rows_in,
        "rows_kept": rows_kept,
        "rows_rejected": rows_rejected,
        "rejects_by_reason": dict(sorted(reasons.items())),
    }


def write_normalized_before(cfg, normalized) -> tuple[int, list[dict]]:
    import dataclasses

    import ray
    import ray.data

    from gradfilter_ray.data.formats import normalize_batch
    from gradfilter_ray.data.ingest import checksum, read_source_files
    from gradfilter_ray.data.sources import list_sources
    from gradfilter_ray.runtime import IO_REMOTE_ARGS

    files = list_sources(cfg.path, cfg.format)
    checksum_task = ray.remote(checksum).options(**IO_REMOTE_ARGS)
    inputs = ray.get([checksum_task.remote(f, cfg.path) for f in files])
    ds = ray.data.from_items([dataclasses.asdict(f) for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(
        read_source_files,
        fn_kwargs={"filesystem_uri": cfg.path, "limit": cfg.limit},
        batch_size=1,
        batch_format="pyarrow",
    )
    ds = ds.map_batches(normalize_batch, fn_kwargs={"max_chars": cfg.max_field_chars}, batch_format="pyarrow")
    ds.write_parquet(normalized.path, filesystem=normalized.filesystem)
    return len(files), inputs


# ----- one run, in a fresh subprocess -----------------------------------------------------------------------------


def measured_task(split, variant: str):
    """`split` wrapped to report the peak RSS of the process that runs it (a reused Ray worker: its RSS on entry is
    reported too), then to run the same finish again alone in a fresh process on the same input (`--alone`)."""
    script = str(Path(__file__).resolve())

    def task(normalized, data_out, rejects_out, dedup):
        PHASE_MARKS.clear()
        reset_peak_rss()
        entry, started = rss_mib(), time.perf_counter()
        counts = split(normalized, data_out, rejects_out, dedup)
        task = {
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "entry_rss_mib": round(entry, 1),
            "wall_s": round(time.perf_counter() - started, 2),
            "phases": list(PHASE_MARKS),
        }
        alone = normalized.parent() / "alone"  # inside the stage's scratch folder: removed with it
        proc = subprocess.run(
            [sys.executable, script, "--alone", normalized.path, alone.path, variant, str(dedup)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"finish alone failed: {proc.stderr[-2000:]}")
        task["alone"] = json.loads(proc.stdout.strip().splitlines()[-1])
        if task["alone"].pop("counts") != counts:
            raise AssertionError("the finish alone counted other rows than the finish in the stage")
        return {**counts, "task": task}

    return task


def alone(normalized: str, out: str, variant: str, dedup: str) -> None:
    """The finish by itself in this fresh process (no Ray): one JSON line with its peak RSS and time."""
    from gradfilter_ray.data import finalize
    from gradfilter_ray.storage import open_location

    split = split_kept_rejected_before if variant == "before" else finalize.split_kept_rejected
    root = open_location(out)
    entry, started = rss_mib(), time.perf_counter()
    counts = split(open_location(normalized), root / "data", root / "rejects.parquet", dedup == "True")
    wall = time.perf_counter() - started
    print(
        json.dumps(
            {
                "peak_rss_mib": round(peak_rss_mib(), 1),
                "entry_rss_mib": round(entry, 1),
                "wall_s": round(wall, 2),
                "counts": counts,
            }
        )
    )


def descendants(root: int) -> list[int]:
    """Every process started under `root` (a local Ray's GCS, raylet and workers are children of its driver)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found


MEMORY_FIELDS = ("VmHWM", "RssAnon", "RssFile", "RssShmem")


def process_memory(pid: int) -> tuple[str, dict[str, float]] | None:
    """(process title, {VmHWM and today's RSS split into anonymous, file and shared memory, in MiB}) of another
    process; None once it is gone. A worker's RSS also counts the object-store pages it has touched (shared)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        fields = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in MEMORY_FIELDS:
                fields[key] = int(line.split()[1]) / 1024
    except (OSError, IndexError):
        return None
    return (os.path.basename(title.split()[0]) if title else "?"), fields


class RssSampler(threading.Thread):
    """The driver's RSS every `every` seconds, with named moments (the Ray Data pass ending, the finish ending),
    and the peak RSS of every process under the driver (Ray's workers: titles like `ray::MapBatches(...)`)."""

    def __init__(self, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.every, self.t0, self.samples, self.moments = every, time.perf_counter(), [], {}
        self.peaks: dict[int, dict] = {}
        self.stopped = threading.Event()

    def now(self) -> float:
        return round(time.perf_counter() - self.t0, 2)

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.samples.append((self.now(), round(rss_mib(), 1)))
            for pid in descendants(os.getpid()):
                seen = process_memory(pid)
                if seen:
                    title, fields = seen
                    peak = self.peaks.setdefault(pid, {"titles": [], "peak_rss_mib": 0.0})
                    if title not in peak["titles"]:
                        peak["titles"].append(title)
                    peak["peak_rss_mib"] = max(peak["peak_rss_mib"], round(fields.get("VmHWM", 0.0), 1))
                    for key in MEMORY_FIELDS[1:]:
                        peak[f"max_{key}_mib"] = max(peak.get(f"max_{key}_mib", 0.0), round(fields.get(key, 0.0), 1))

    def worker_peaks(self) -> dict:
        """The highest peak RSS among Ray's worker processes, and every process's peak with its titles."""
        workers = [p for p in self.peaks.values() if any(t.startswith("ray::") for t in p["titles"])]
        return {
            "max_worker_peak_rss_mib": max((p["peak_rss_mib"] for p in workers), default=0.0),
            "top_processes": sorted(self.peaks.values(), key=lambda p: -p["peak_rss_mib"])[:6],
        }

    def moment(self, name: str) -> None:
        self.moments[name] = (self.now(), round(rss_mib(), 1), round(peak_rss_mib(), 1))


def child(corpus: str, out: str, variant: str) -> None:
    """Run the data stage once (local Ray); print one JSON line with counts, timings and peak RSS."""
    ray_tmp = tempfile.mkdtemp(prefix="gfr-im-", dir="/tmp")  # short: Ray's socket paths must fit in 108 bytes
    import ray

    from gradfilter_ray.config import Config, DataConfig, RayConfig
    from gradfilter_ray.data import finalize, ingest, stage
    from gradfilter_ray.rundir import RunDir
    from gradfilter_ray.runtime import configure_data_context

    sampler = RssSampler()
    sampler.start()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, logging_level="WARNING")
    configure_data_context(RayConfig(progress_bars=False))
    sampler.moment("ray_init")
    split = split_kept_rejected_before if variant == "before" else finalize.split_kept_rejected
    ingest.split_kept_rejected = measured_task(split, variant)
    write_normalized = write_normalized_before if variant == "before" else ingest.write_normalized

    def write_normalized_marked(*args):
        result = write_normalized(*args)
        sampler.moment("normalized_written")
        return result

    ingest.write_normalized = write_normalized_marked
    try:
        cfg = Config(output_dir=out, data=DataConfig(path=corpus))
        started = time.perf_counter()
        counts = stage.run(cfg, RunDir(out), "bench")
        wall = time.perf_counter() - started
        sampler.moment("finished")
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    sampler.stopped.set()
    task = counts.pop("task")
    print(
        json.dumps(
            {
                "counts": counts,
                "stage_wall_s": round(wall, 2),
                "rows_per_s": round(counts["rows_in"] / wall),
                "driver_peak_rss_mib": round(peak_rss_mib(), 1),
                "driver_moments": sampler.moments,
                "driver_rss_samples": sampler.samples[:: max(1, len(sampler.samples) // 60)],
                "task": task,
                "ray_processes": sampler.worker_peaks(),
            }
        )
    )


# ----- checking the outputs ---------------------------------------------------------------------------------------


def same_outputs(a: Path, b: Path) -> list[str]:
    """Column by column (sorted by id), `data/` and `rejects.parquet` of two runs: the differences found."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    problems = []
    for rel in ("data", "rejects.parquet"):
        ids_a = pq.read_table(a / rel, columns=["id"])["id"]
        ids_b = pq.read_table(b / rel, columns=["id"])["id"]
        order_a, order_b = pc.sort_indices(ids_a), pc.sort_indices(ids_b)
        if not ids_a.take(order_a).equals(ids_b.take(order_b)):
            problems.append(f"{rel}: different ids")
            continue
        for column in pq.read_schema(a / rel if rel != "data" else next((a / rel).glob("*.parquet"))).names:
            col_a = pq.read_table(a / rel, columns=[column])[column].take(order_a)
            col_b = pq.read_table(b / rel, columns=[column])[column].take(order_b)
            if not col_a.equals(col_b):
                problems.append(f"{rel}: column {column} differs")
    return problems


def run_variant(corpus: Path, out: Path, variant: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(corpus), str(out), variant], capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{variant} run failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(run: dict) -> dict:
    """The headline numbers of one run (MiB, s, rows/s)."""
    return {
        "rows_per_s": run["rows_per_s"],
        "stage_wall_s": run["stage_wall_s"],
        "driver_peak": run["driver_peak_rss_mib"],
        "task_peak": run["task"]["peak_rss_mib"],
        "task_entry": run["task"]["entry_rss_mib"],
        "task_wall_s": run["task"]["wall_s"],
        "alone_peak": run["task"]["alone"]["peak_rss_mib"],
        "alone_wall_s": run["task"]["alone"]["wall_s"],
        "ray_worker_peak": run["ray_processes"]["max_worker_peak_rss_mib"],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 3_000_000])
    ap.add_argument("--variants", nargs="+", default=["before", "after"], choices=["before", "after"])
    ap.add_argument("--quick", action="store_true", help="10k and 100k rows")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--alone", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    if args.alone:
        alone(*args.alone)
        return 0
    sizes = sorted([10_000, 100_000] if args.quick else args.sizes)
    began = time.perf_counter()
    runs: dict = {}
    failures = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="gfr-ingest-mem-") as tmp:
            started = time.perf_counter()
            planted = make_corpus(Path(tmp) / "corpus", n)
            print(f"{n:>9} rows: corpus written in {time.perf_counter() - started:.0f} s", flush=True)
            runs[n] = {}
            for variant in args.variants:
                run = runs[n][variant] = run_variant(Path(tmp) / "corpus", Path(tmp) / variant, variant)
                counts = run["counts"]
                if (counts["rows_in"], counts["rows_kept"], counts["rejects_by_reason"]) != (
                    planted["rows_in"],
                    planted["rows_kept"],
                    dict(sorted(planted["rejects_by_reason"].items())),
                ):
                    failures.append(f"{n} {variant}: counts {counts} != planted {dict(planted)}")
                s = run["summary"] = summary(run)
                print(
                    f"{n:>9} rows, {variant:>6}: {s['stage_wall_s']:.1f} s ({s['rows_per_s']:,} rows/s); peak RSS: "
                    f"driver {s['driver_peak']:.0f} MiB, finalize task {s['task_peak']:.0f} MiB (entry "
                    f"{s['task_entry']:.0f}, {s['task_wall_s']:.1f} s), finalize alone {s['alone_peak']:.0f} MiB "
                    f"({s['alone_wall_s']:.1f} s), busiest Ray worker {s['ray_worker_peak']:.0f} MiB",
                    flush=True,
                )
            if set(args.variants) == {"before", "after"}:
                if runs[n]["before"]["counts"] != runs[n]["after"]["counts"]:
                    failures.append(f"{n}: counts differ between before and after")
                failures += [f"{n}: {p}" for p in same_outputs(Path(tmp) / "before", Path(tmp) / "after")]
    if failures:
        print("\n".join(["OUTPUTS DIFFER:", *failures]))
        return 2
    small, large = sizes[0], sizes[-1]
    ratios = {
        variant: {
            key: round(runs[large][variant]["summary"][key] / runs[small][variant]["summary"][key], 2)
            for key in ("driver_peak", "task_peak", "alone_peak", "ray_worker_peak")
        }
        for variant in args.variants
    }
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "corpus": {"files": FILES, "duplicate_share": 1 / DUPLICATE_EVERY, "bad_share": 1 / BAD_EVERY},
        "summary": {n: {variant: runs[n][variant]["summary"] for variant in runs[n]} for n in sizes},
        f"peak_rss_ratio_{large}_vs_{small}": ratios,
        "target": "peak RSS at the largest size <= 1.2 x at the smallest, for the driver and the finalize task",
        "outputs_identical_before_after": set(args.variants) == {"before", "after"},
        "total_s": round(time.perf_counter() - began),
        "runs": runs,
    }
    out_file = QUICK_RESULTS if args.quick else RESULTS
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    for variant, r in ratios.items():
        print(
            f"{variant}: peak RSS {large:,} / {small:,} rows: driver {r['driver_peak']:.2f}x, finalize task "
            f"{r['task_peak']:.2f}x, finalize alone {r['alone_peak']:.2f}x, busiest Ray worker "
            f"{r['ray_worker_peak']:.2f}x"
        )
    print(f"total {result['total_s']} s; results in {out_file.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
