"""Run as a script by tests/test_gpu_placement.py: a local Ray with 8 fake GPUs (`num_gpus=8` schedules like real
ones; torch.cuda stays unavailable) and the ensemble's and the extraction's own resource requests for a shipped
config, with probe workers in place of the models. Prints one JSON line: what each worker asked for and got."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import ray

from gradfilter_ray.config import load
from gradfilter_ray.ensemble.stage import scaling_config, torch_config
from gradfilter_ray.gradients.shards import plan_shards
from gradfilter_ray.gradients.stage import extraction_dataset

SEEN_ENV = "GFR_PLACEMENT_DIR"
GPUS = 8
# The probes' actors and workers wait for each other before they take work (a probe runs at the suite's background
# priority, where one can take seconds to start): everything started at once meets; a pool that starts fewer, or
# pools started one after another, never would. One deadline for the whole probe, set before its Ray starts (every
# worker inherits it), so pools started one after another do not each wait it out.
MEET_S = 240
MEET_BY_ENV = "GFR_PROBE_MEET_BY"


def set_meeting_deadline() -> None:
    os.environ[MEET_BY_ENV] = str(time.time() + MEET_S)


def meet(started: Callable[[], int], everyone: int) -> None:
    """Wait until `started()` counts `everyone` or the probe's meeting deadline has passed."""
    deadline = float(os.environ[MEET_BY_ENV])
    while started() < everyone and time.time() < deadline:
        time.sleep(0.2)


def seen_here(role: str) -> dict:
    import torch

    from gradfilter_ray.models import pick_device

    return {
        "role": role,
        "pid": os.getpid(),
        "node": ray.get_runtime_context().get_node_id(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": str(pick_device(1)),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
    }


class ProbeExtractor:
    """Stands in for ShardExtractor: records where it was placed, then passes shards through."""

    def __init__(self, folder: str) -> None:
        self.facts = seen_here("extraction")
        self.folder = Path(folder)
        (self.folder / f"extraction-{os.getpid()}.json").write_text(json.dumps(self.facts))

    def __call__(self, shards: pa.Table) -> pa.Table:
        # every actor the pool starts is up before any shard is taken: the first ones cannot finish the 16 shards
        # while the last are still starting
        meet(lambda: len(list(self.folder.glob("extraction-*.json"))), GPUS)
        time.sleep(0.2)
        return pa.table({"index": shards["index"], "pid": [self.facts["pid"]] * shards.num_rows})


def probe_member(config: dict) -> None:
    import ray.train

    facts = seen_here("ensemble")
    facts["rank"] = ray.train.get_context().get_world_rank()
    Path(config["folder"], f"ensemble-{facts['rank']}.json").write_text(json.dumps(facts))


def main(config_path: str, num_cpus: int) -> None:
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    folder = tempfile.mkdtemp(prefix="placement-")
    cfg = load(config_path, [f"output_dir={folder}/out"])
    set_meeting_deadline()
    ray.init(address="local", num_cpus=num_cpus, num_gpus=GPUS, include_dashboard=False, logging_level="ERROR")
    try:
        shards = plan_shards([("tokens.parquet", 16 * 4096)], 4096)
        done = list(extraction_dataset(cfg, shards, ProbeExtractor, folder=folder).iter_rows())
        trainer = TorchTrainer(
            probe_member,
            train_loop_config={"folder": folder},
            scaling_config=scaling_config(cfg, cfg.ensemble.members),
            torch_config=torch_config(),
            run_config=RunConfig(name="placement", storage_path=f"{folder}/train"),
        )
        trainer.fit()
    finally:
        ray.shutdown()
    placed = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    print(json.dumps({"placed": placed, "shards_done": sorted(int(r["index"]) for r in done)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
