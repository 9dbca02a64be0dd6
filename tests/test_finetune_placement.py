"""The shipped 7B config fine-tunes subsets side by side on disjoint GPUs: on a local Ray of two nodes with 8 fake
GPUs each (../shared/FIELD-NOTES.md), the finetune stage's own scheduler trains two subsets at once, each on the 8
GPUs of one node (STRICT_PACK: no collective over TCP). Probe workers stand in for DeepSpeed
(tests/finetune_placement_probe.py); the resource requests are the stage's own. That no more than the width run at
once is tested on plain tasks (test_runtime.py)."""

from __future__ import annotations

import probes
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def placed():
    return probes.result("finetune_placement")  # tests/finetune_placement_probe.py on the shipped 7B config


def by_subset(placed) -> dict[str, list[dict]]:
    subsets: dict[str, list[dict]] = {}
    for p in placed["placed"]:
        subsets.setdefault(p["subset"], []).append(p)
    return subsets


def test_each_subset_trains_on_the_eight_gpus_of_one_node(placed):
    subsets = by_subset(placed)
    assert sorted(subsets) == ["gsnr_0.1", "random_0.1"]
    for name, workers in subsets.items():
        assert sorted(w["rank"] for w in workers) == list(range(8)), name
        assert len({w["node"] for w in workers}) == 1, name  # one node: NVLink, not TCP
        gpus = [g for w in workers for g in w["gpu_ids"]]
        assert len(gpus) == 8 and len(set(gpus)) == 8, name  # one GPU each, none shared
        assert {w["device"] for w in workers} == {"cpu"}  # fake GPUs: nothing picked CUDA because GPUs were assigned


def test_two_subsets_run_side_by_side_on_different_nodes(placed):
    spans = {}
    for name, workers in by_subset(placed).items():
        spans[name] = (min(w["span"][0] for w in workers), max(w["span"][1] for w in workers), workers[0]["node"])
    first, second = sorted(spans.values())
    assert second[0] < first[1]  # they overlap in time ...
    assert first[2] != second[2]  # ... on the two nodes
    assert any("2 subset(s) to train, 2 side by side" in line for line in placed["log"])
