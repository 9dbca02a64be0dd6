"""The shipped 7B config asks for, and gets, the GPU placement it should: on a local Ray with 8 fake GPUs (Ray
schedules them like real ones, ../shared/FIELD-NOTES.md) the 5 ensemble members get one GPU each, on gloo, and the
extraction starts one actor per GPU, 8 actors on 8 distinct GPUs, every shard processed. Probe workers stand in for
the models (the resource requests are the stages' own: ensemble.stage.scaling_config / torch_config and
gradients.stage.extraction_dataset)."""

from __future__ import annotations

import probes
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def placed():
    return probes.result("gpu_placement")  # tests/placement_probe.py on the shipped 7B config, 64 CPUs


def test_ensemble_members_get_one_gpu_each_and_talk_gloo(placed):
    members = [p for p in placed["placed"] if p["role"] == "ensemble"]
    assert sorted(p["rank"] for p in members) == list(range(5))
    gpus = [p["gpu_ids"] for p in members]
    assert all(len(g) == 1 for g in gpus), gpus
    assert len({g[0] for g in gpus}) == 5  # five distinct GPUs: none shared, none idle-while-another-is-shared
    assert {p["backend"] for p in members} == {"gloo"}
    assert {p["device"] for p in members} == {"cpu"}  # fake GPUs: nothing picked CUDA because GPUs were assigned


def test_extraction_runs_one_actor_per_gpu_over_all_eight(placed):
    actors = [p for p in placed["placed"] if p["role"] == "extraction"]
    assert len(actors) == 8, actors
    assert sorted(g for p in actors for g in p["gpu_ids"]) == [str(i) for i in range(8)]
    assert all(p["cuda_visible_devices"] == p["gpu_ids"][0] for p in actors)  # each sees only its own GPU
    assert placed["shards_done"] == list(range(16))
