"""Ingest stage entry point for the pipeline table."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gradfilter_ray.config import Config
from gradfilter_ray.data import ingest
from gradfilter_ray.models import resolve
from gradfilter_ray.rundir import RunDir


def run(cfg: Config, rundir: RunDir, staged: Path) -> tuple[list[str], dict]:
    data_cfg = replace(cfg.data, path=resolve(cfg.data.path))
    with rundir.worker_output(staged, "normalized") as normalized:
        files, inputs = ingest.write_normalized(data_cfg, normalized)
    counts = ingest.finalize(data_cfg, staged, files, inputs)
    inputs = counts.pop("inputs")
    rundir.update_manifest(inputs=inputs)
    return ["data", "rejects.parquet"], counts
