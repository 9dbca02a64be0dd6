"""How many subsets fit side by side on a cluster (pure: the nodes' resources in, a count out)."""

from __future__ import annotations

from gradfilter_ray.config import Config
from gradfilter_ray.resources import Request, subset_trainers


def subset_demand(trainers: Request) -> tuple[str, float]:
    """The resource that limits one subset's trainer (`resources.subset_trainers`), and how much of it it takes."""
    if trainers.use_gpu:
        return "GPU", trainers.count * trainers.gpus
    return "CPU", trainers.count * trainers.cpus


def subsets_side_by_side(cfg: Config, nodes: list[dict[str, float]]) -> int:
    """Trainers that fit at once on nodes with these resources: under STRICT_PACK a subset needs one node that
    holds all its workers, so each node counts on its own; otherwise the cluster's total counts. 0 when none fits
    now (an autoscaler may still add a node); `finetune.parallel_subsets` overrides."""
    if cfg.finetune.parallel_subsets is not None:
        return cfg.finetune.parallel_subsets
    trainers = subset_trainers(cfg)
    resource, need = subset_demand(trainers)
    if trainers.placement == "STRICT_PACK":
        return sum(int(node.get(resource, 0) // need) for node in nodes)
    return int(sum(node.get(resource, 0) for node in nodes) // need)
