"""Run as a script by tests/test_finetune_placement.py: a local Ray of two nodes with 8 fake GPUs each
(ray.cluster_utils.Cluster; Ray schedules fake GPUs like real ones, torch.cuda stays unavailable) and the finetune
stage's own scheduling (`stage.fit_side_by_side`: its width, trainers, scaling and placement) for the shipped 7B
config, with a probe in place of the DeepSpeed worker. Prints one JSON line: where every worker of every subset
ran, and when."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import ray
from placement_probe import meet, seen_here, set_meeting_deadline
from ray.cluster_utils import Cluster

from gradfilter_ray.config import load
from gradfilter_ray.finetune.stage import Subset, fit_side_by_side, trainer_name
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.scoring.scorers import Selection

SUBSETS = ["gsnr_0.1", "random_0.1"]


def probe_finetune_worker(config: dict) -> None:
    """Stands in for finetune_worker: records where it was placed, holds its GPU until all workers have started,
    then marks the subset done as rank 0 of the real worker does."""
    import ray.train

    from gradfilter_ray.units import DONE_MARKER

    started = time.time()
    ctx = ray.train.get_context()
    facts = seen_here("finetune")
    facts["rank"] = ctx.get_world_rank()
    facts["subset"] = config["name"]
    root = config["out"].parent().parent()
    # Hold the GPU until every worker of every subset has started (placement_probe.meet): subsets placed side by
    # side all meet here whatever the machine's load; subsets run one after another never would.
    (root / "started" / f"{facts['subset']}-{facts['rank']}").write_text("")
    meet(lambda: len((root / "started").children()), len(SUBSETS) * ctx.get_world_size())
    facts["span"] = [started, time.time()]
    (root / "placement" / f"{facts['subset']}-{facts['rank']}.json").write_text(json.dumps(facts))
    if facts["rank"] == 0:
        (config["out"] / DONE_MARKER).write_text(config["key"])


def main(config_path: str) -> None:
    folder = tempfile.mkdtemp(prefix="ft-placement-")
    # Fake GPUs cannot run NCCL: the one override of the shipped config.
    cfg = load(config_path, [f"output_dir={folder}/out", "finetune.backend=gloo"])
    node = {"num_cpus": 8, "num_gpus": 8}
    set_meeting_deadline()
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        ray.init(address=cluster.address, logging_level="ERROR")
        lines = []
        key = "0123456789abcdef"
        todo = [Subset(Selection.parse(s), key, trainer_name(cfg, key, s)) for s in SUBSETS]
        fit_side_by_side(cfg, RunDir(cfg.output_dir), todo, lines.append, train_fn=probe_finetune_worker)
    finally:
        ray.shutdown()
        cluster.shutdown()
    placed = [json.loads(p.read_text()) for p in sorted(Path(folder, "out", "placement").glob("*.json"))]
    print(json.dumps({"placed": placed, "log": lines}))


if __name__ == "__main__":
    main(sys.argv[1])
