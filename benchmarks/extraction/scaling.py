"""(s) the extraction loop over all 2M adapters at growing corpus sizes, each size in a fresh process: throughput
and peak memory (VmHWM) should stay flat."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from extraction.common import (
    MAX_LENGTH,
    REPO,
    SOURCE_SCHEMA,
    cpu_ticks,
    load_tokenizer_for,
    log,
    make_config,
    small_spec,
    synthetic_rows,
    tokenize,
)
from gradfilter_ray.config import ProxyConfig

BENCH = REPO / "benchmarks" / "bench_extract.py"  # the child runs as `bench_extract.py --scaling-child JOB`

# ---------------------------------------------------------------------------------------------------------------
# (s) scaling, each size in a fresh process


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def scaling_child(spec_file: str) -> None:
    """Stream a `tokens/` Parquet file through one ShardExtractor (all 2M adapters) into a ParquetWriter; print one
    JSON line."""
    from gradfilter_ray.gradients.stage import TOKEN_COLUMNS, ShardExtractor, adapter_locations
    from gradfilter_ray.rundir import RunDir

    job = json.loads(Path(spec_file).read_text())
    spec = small_spec(Path(job["tokenizer"]), job["vocab"])
    cfg = make_config(Path(job["root"]), spec, job["batch_size"], job["bucket_rows"])
    ens, grads = cfg.ensemble, cfg.gradients
    adapters = adapter_locations(RunDir(job["root"]), ens.early_epoch, ens.late_epoch)
    extractor = ShardExtractor(dataclasses.asdict(cfg.proxy), dataclasses.asdict(grads), ens.members, adapters)
    source = pq.ParquetFile(job["tokens"])
    columns = TOKEN_COLUMNS
    warmup = next(source.iter_batches(batch_size=64, columns=columns))
    extractor.extract_rows(pa.Table.from_batches([warmup]))
    rss_setup = vm_kib("VmRSS")
    rows = tokens = 0
    writer = None
    c0, w0 = cpu_ticks(), time.perf_counter()
    trace = []  # (rows done, VmRSS MiB): a plateau is flat memory, a slope is a leak
    for k, batch in enumerate(source.iter_batches(batch_size=grads.shard_rows, columns=columns)):
        out = extractor.extract_rows(pa.Table.from_batches([batch]))
        writer = writer or pq.ParquetWriter(job["out"], out.schema)
        writer.write_table(out)
        rows += out.num_rows
        tokens += int(np.sum(out["n_tokens"].to_numpy()))
        if k % 2 == 1:
            trace.append((rows, round(vm_kib("VmRSS") / 1024, 1)))
    writer.close()
    wall, cpu = time.perf_counter() - w0, cpu_ticks() - c0
    # VmHWM, not ru_maxrss: Linux carries the forking parent's high-water mark into ru_maxrss across exec.
    result = {"rows": rows, "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "rss_setup_kib": rss_setup}
    result["rss_trace_mib"] = trace
    print(json.dumps({**result, "peak_rss_kib": vm_kib("VmHWM")}))


def scaling(root: Path, tokenizer_dir: Path, vocab: int, sizes: list[int], batch_size: int, bucket_rows: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gfr-scale-"))
    out: dict = {"sizes": {}}
    try:
        spec = small_spec(tokenizer_dir, vocab)
        tokenizer, proxy = load_tokenizer_for(spec), ProxyConfig(model=spec, max_length=MAX_LENGTH)
        for n in sizes:
            data = work / f"tokens{n}.parquet"
            # The rows tokenised as the `tokens` stage does, in row groups of 8k rows: the reader streams, never
            # holding the corpus (100k rows stay out of RAM).
            writer = None
            for begin in range(0, n, 8192):
                rows = synthetic_rows(min(8192, n - begin), seed=begin, start_id=begin)
                table = tokenize(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA), tokenizer, proxy)
                writer = writer or pq.ParquetWriter(data, table.schema)
                writer.write_table(table)
            writer.close()
            job = {
                "root": str(root),
                "tokenizer": str(tokenizer_dir),
                "vocab": vocab,
                "batch_size": batch_size,
                "bucket_rows": bucket_rows,
                "tokens": str(data),
                "out": str(work / f"grads{n}.parquet"),
            }
            job_file = work / f"job{n}.json"
            job_file.write_text(json.dumps(job))
            log(f"  scaling: {n} rows in a fresh process ...")
            proc = subprocess.run(
                [sys.executable, str(BENCH), "--scaling-child", str(job_file)],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"scaling child for {n} rows failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            written = pq.read_table(job["out"], columns=["id", "sq_norm_late"])
            ids = np.sort(written["id"].to_numpy())
            norms = np.asarray(written["sq_norm_late"].combine_chunks().flatten())
            res["exactly_once"] = bool(len(ids) == n and np.array_equal(ids, np.arange(n)))
            res["finite_norms"] = bool(np.all(np.isfinite(norms)))
            res["examples_per_s_wall"] = res["rows"] / res["wall_s"]
            res["examples_per_s_cpu"] = res["rows"] / res["cpu_s"]
            res["mean_tokens_per_row"] = res["tokens"] / res["rows"]
            res["rss_growth_kib"] = res["peak_rss_kib"] - res["rss_setup_kib"]
            out["sizes"][str(n)] = res
            data.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, large = out["sizes"][str(sizes[0])], out["sizes"][str(sizes[-1])]
    out["ratios"] = {
        "scaling_ratio_wall": large["examples_per_s_wall"] / small["examples_per_s_wall"],
        "scaling_ratio_cpu": large["examples_per_s_cpu"] / small["examples_per_s_cpu"],
        "peak_rss_ratio": large["peak_rss_kib"] / small["peak_rss_kib"],
    }
    return out
