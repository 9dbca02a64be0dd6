"""How many subsets fit side by side on a cluster (pure: the nodes' resources in, a count out)."""

from __future__ import annotations

from gradfilter_ray.config import FinetuneConfig


def subset_demand(finetune: FinetuneConfig) -> tuple[str, float]:
    """The resource that limits one subset's trainer, and how much of it the trainer takes."""
    if finetune.gpus_per_worker > 0:
        return "GPU", finetune.num_workers * finetune.gpus_per_worker
    return "CPU", finetune.num_workers * finetune.cpus_per_worker


def subsets_side_by_side(finetune: FinetuneConfig, nodes: list[dict[str, float]]) -> int:
    """Trainers that fit at once on nodes with these resources: under STRICT_PACK a subset needs one node that
    holds all its workers, so each node counts on its own; otherwise the cluster's total counts. 0 when none fits
    now (an autoscaler may still add a node); `parallel_subsets` overrides."""
    if finetune.parallel_subsets is not None:
        return finetune.parallel_subsets
    resource, need = subset_demand(finetune)
    if finetune.placement_strategy == "STRICT_PACK":
        return sum(int(node.get(resource, 0) // need) for node in nodes)
    return int(sum(node.get(resource, 0) for node in nodes) // need)
