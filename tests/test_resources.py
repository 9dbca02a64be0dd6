"""Each stage's resource request is declared once (gradfilter_ray/resources.py): the Request the stage table shows
(`run --dry-run`, the "[stage] running (...)" line) is the one its Ray shell asks Ray for. The shells' own Ray
objects (Ray Train ScalingConfigs, Ray Data actor-pool arguments, a task's options) are built here without a Ray
cluster and compared with the table's Request and with the config's fields, for whole GPUs, shares of one and none."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from gradfilter_ray import pipeline, resources
from gradfilter_ray.config import load
from gradfilter_ray.ensemble import stage as ensemble_stage
from gradfilter_ray.evaluation import hf_engine
from gradfilter_ray.finetune import stage as finetune_stage
from gradfilter_ray.finetune.placement import subset_demand
from gradfilter_ray.gradients import stage as gradients_stage
from gradfilter_ray.runtime import run_as_task

SEVEN_B = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "alpaca_llama2_7b.yaml"
CASES = {
    "whole GPUs": [],
    "shares of a GPU": [
        "ensemble.cpus_per_member=0.25",
        "ensemble.gpus_per_member=0.2",
        "gradients.cpus_per_actor=2",
        "gradients.gpus_per_actor=0.5",
        "finetune.gpus_per_worker=0.5",
        "finetune.placement_strategy=PACK",
        "finetune.parallel_subsets=2",
        "evaluation.gpus_per_actor=0.25",
        "evaluation.num_actors=3",
    ],
    "no GPU": [
        "ensemble.gpus_per_member=0",
        "gradients.gpus_per_actor=0",
        "finetune.gpus_per_worker=0",
        "evaluation.gpus_per_actor=0",
    ],
}


@pytest.fixture(params=list(CASES), scope="module")
def cfg(request):
    return load(SEVEN_B, CASES[request.param])


def shown(cfg, stage: str) -> resources.Request:
    """The Request the stage table shows for `stage`."""
    return pipeline.STAGES[stage].resources(cfg)


def per_worker(cpus: float, gpus: float) -> dict:
    """What Ray should get per worker for these config values: a GPU key only when GPUs are asked for."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}


def test_the_table_points_at_the_resource_functions_and_shows_them(cfg):
    expected = {
        "data": resources.data_tasks,
        "tokens": resources.data_tasks,
        "ensemble": resources.member_trainers,
        "gradients": resources.extraction_actors,
        "scoring": resources.one_task,
        "selection": resources.one_task,
        "audit": resources.audit_tasks,
        "report": resources.one_task,
        "finetune": resources.subset_trainers,
        "evaluation": resources.evaluation_actors,
    }
    assert {name: stage.resources for name, stage in pipeline.STAGES.items()} == expected
    plan = pipeline.plan(cfg, list(pipeline.STAGES))
    for name in pipeline.STAGES:
        assert any(line.startswith(name + " ") and line.endswith(f"  {shown(cfg, name)}") for line in plan), name


def test_ensemble_workers_ask_for_what_the_table_shows(cfg):
    e, request = cfg.ensemble, shown(cfg, "ensemble")
    assert (request.count, request.cpus, request.gpus) == (e.members, e.cpus_per_member, e.gpus_per_member)
    assert str(request) == f"{e.members} Ray Train workers x ({e.cpus_per_member} CPU, {e.gpus_per_member} GPU)"
    for workers in (e.members, 2):  # the shell asks for one worker per member still to train
        scaling = ensemble_stage.scaling_config(cfg, workers)
        assert scaling.num_workers == workers
        assert scaling.use_gpu == request.use_gpu == (e.gpus_per_member > 0)
        assert scaling.resources_per_worker == request.ray_resources()
        assert request.ray_resources() == per_worker(e.cpus_per_member, e.gpus_per_member)


def test_extraction_actors_ask_for_what_the_table_shows(cfg):
    g, request = cfg.gradients, shown(cfg, "gradients")
    assert str(request) == f"{g.num_actors} Ray Data actors x ({g.cpus_per_actor} CPU, {g.gpus_per_actor} GPU)"
    for actors in (request.count, 3):  # fewer when fewer shards are left
        args = gradients_stage.actor_pool_args(cfg, actors)
        assert (args["compute"].min_size, args["compute"].max_size) == (actors, actors)
        assert args["compute"].max_tasks_in_flight_per_actor == 1
        asked = {k: v for k, v in args.items() if k != "compute"}
        expected = {"num_cpus": g.cpus_per_actor, **({"num_gpus": g.gpus_per_actor} if g.gpus_per_actor > 0 else {})}
        assert asked == request.remote_args() == expected


def test_subset_trainers_ask_for_what_the_table_shows(cfg):
    t, request = cfg.finetune, shown(cfg, "finetune")
    assert str(request).startswith(
        f"per subset {t.num_workers} Ray Train workers x ({t.cpus_per_worker} CPU, {t.gpus_per_worker} GPU), "
        f"{t.placement_strategy}, ZeRO-{t.zero_stage}; subsets side by side: "
    )
    scaling = finetune_stage.scaling_config(cfg)
    assert (scaling.num_workers, scaling.placement_strategy) == (request.count, request.placement)
    assert (request.count, request.placement) == (t.num_workers, t.placement_strategy)
    assert scaling.use_gpu == request.use_gpu == (t.gpus_per_worker > 0)
    assert scaling.resources_per_worker == request.ray_resources() == per_worker(t.cpus_per_worker, t.gpus_per_worker)
    # subsets side by side are counted in the resource one subset's group takes in all
    if t.gpus_per_worker > 0:
        assert subset_demand(request) == ("GPU", t.num_workers * t.gpus_per_worker)
    else:
        assert subset_demand(request) == ("CPU", t.num_workers * t.cpus_per_worker)


def test_evaluation_actors_ask_for_what_the_table_shows(cfg):
    e, request = cfg.evaluation, shown(cfg, "evaluation")
    assert request.count == e.num_actors  # None: as many as the cluster holds, counted by the shell
    many = f"{e.num_actors} Ray Data actors" if e.num_actors else "Ray Data actors (as many as the cluster holds)"
    each = f"({e.cpus_per_actor} CPU, {e.gpus_per_actor} GPU)"
    assert str(request) == f"{many} x {each} shared over the runs, engine {e.engine}"
    args = hf_engine.actor_pool_args(request.with_count(2))  # one run's share of the actors
    assert (args["compute"].min_size, args["compute"].max_size) == (2, 2)
    asked = {k: v for k, v in args.items() if k != "compute"}
    expected = {"num_cpus": e.cpus_per_actor, **({"num_gpus": e.gpus_per_actor} if e.gpus_per_actor > 0 else {})}
    assert asked == request.remote_args() == expected


def test_single_tasks_ask_for_what_the_table_shows(cfg):
    default = inspect.signature(run_as_task).parameters["request"].default
    for name in ("scoring", "selection", "report"):
        assert shown(cfg, name) == default
        assert str(shown(cfg, name)) == "1 Ray task"
    assert default.remote_args() == {"num_cpus": 1}
    assert str(shown(cfg, "data")) == "Ray Data tasks + 1 Ray task"
    assert f"({shown(cfg, 'ensemble')})" in str(shown(cfg, "audit"))  # the audit's inner ensemble, as the table shows


def test_the_seven_b_plan_reads_as_the_design_notes_quote_it():
    cfg = load(SEVEN_B)
    assert str(shown(cfg, "ensemble")) == "5 Ray Train workers x (4.0 CPU, 1.0 GPU)"
    assert str(shown(cfg, "gradients")) == "8 Ray Data actors x (4.0 CPU, 1.0 GPU)"
    assert str(shown(cfg, "finetune")) == (
        "per subset 8 Ray Train workers x (1.0 CPU, 1.0 GPU), STRICT_PACK, ZeRO-2; subsets side by side: "
        "as many as the cluster holds"
    )
