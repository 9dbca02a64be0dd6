"""Data stage (shell): the input corpus -> canonical `data/` and `rejects.parquet`, every row accounted for."""

from __future__ import annotations

from dataclasses import replace

from gradfilter_ray.bundled import resolve
from gradfilter_ray.config import Config
from gradfilter_ray.data.ingest import ingest
from gradfilter_ray.data.sources import SourceError
from gradfilter_ray.rundir import RunDir


def run(cfg: Config, run: RunDir, key: str) -> dict:
    data_cfg = replace(cfg.data, path=resolve(cfg.data.path))
    with run.scratch("data") as scratch:
        counts = ingest(data_cfg, run.data, run.rejects, scratch)
    run.update_manifest(inputs=counts.pop("inputs"))
    if counts["rows_in"] == 0:
        # The preflight refuses most empty inputs before Ray starts; a big file of blank lines shows it only here.
        raise SourceError(nothing_to_do(cfg.data.path, counts["files"]))
    return counts


def nothing_to_do(path: str, files: int) -> str:
    held = "holds" if files == 1 else f"({files} files) hold"
    return f"nothing to do: {path} {held} no rows"
