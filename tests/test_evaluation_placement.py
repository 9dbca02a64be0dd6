"""The shipped 7B config's evaluation uses every GPU: on a local Ray with 8 fake GPUs (Ray schedules them like real
ones, ../shared/FIELD-NOTES.md) three fine-tuned runs are evaluated at once by the stage's real actor pools, 8
actors on 8 distinct GPUs shared out 3/3/2, each seeing only its own GPU; the runs' actors work side by side; every
batch is the same block of sorted rows whatever the width, so the same model answers byte for byte alike on 3
actors and on 2 (tests/eval_placement_probe.py, tiny models on CPU)."""

from __future__ import annotations

import json

import probes
import pytest

pytestmark = pytest.mark.slow
BATCH = 16  # the shipped config's evaluation.batch_size


@pytest.fixture(scope="module")
def evaluated():
    return probes.result("eval_placement")  # tests/eval_placement_probe.py on the shipped 7B config, 8 CPUs


def actors_of(evaluated, run: str) -> list[dict]:
    return [p for p in evaluated["placed"] if p["run"] == run]


def test_eight_actors_on_eight_gpus_each_seeing_only_its_own(evaluated):
    placed = evaluated["placed"]
    assert len(placed) == 8, [(p["run"], p["gpu_ids"]) for p in placed]
    assert sorted(g for p in placed for g in p["gpu_ids"]) == [str(i) for i in range(8)]
    assert all(p["cuda_visible_devices"] == p["gpu_ids"][0] for p in placed)
    # fake GPUs: nothing picked CUDA because GPUs were assigned (an actor stopped while loading has no device)
    assert {p.get("device", "cpu") for p in placed} == {"cpu"} and any("device" in p for p in placed)
    assert {run: len(actors_of(evaluated, run)) for run in ("gsnr_0.1", "ifd_0.1", "random_0.1")} == {
        "gsnr_0.1": 3,
        "ifd_0.1": 3,
        "random_0.1": 2,
    }
    assert any("engine hf" in line for line in evaluated["log"]), evaluated["log"]  # no vllm here: auto chose hf


def test_the_runs_are_evaluated_at_the_same_time(evaluated):
    spans = {}
    for run in ("gsnr_0.1", "ifd_0.1", "random_0.1"):
        actors = actors_of(evaluated, run)
        ends = [b["end"] for a in actors for b in a["batches"]]
        assert ends, f"no batch of {run} was answered"
        spans[run] = (min(a["started"] for a in actors), max(ends))
    latest_start = max(start for start, _ in spans.values())
    earliest_end = min(end for _, end in spans.values())
    assert latest_start < earliest_end, spans  # one run after another would start each after the last one ended


def test_every_batch_is_an_aligned_block_of_the_sorted_rows(evaluated):
    rows = evaluated["rows"]
    for run in ("gsnr_0.1", "ifd_0.1", "random_0.1"):
        batches = [b["positions"] for a in actors_of(evaluated, run) for b in a["batches"]]
        expected = [list(range(s, min(s + BATCH, rows))) for s in range(0, rows, BATCH)]
        assert sorted(batches) == expected, run


def test_answers_depend_on_the_model_not_on_the_pool_width(evaluated):
    outputs = evaluated["outputs"]
    # gsnr_0.1 (3 actors) and random_0.1 (2 actors) hold the same model; ifd_0.1 a perturbed one
    assert outputs["gsnr_0.1"] == outputs["random_0.1"]
    assert outputs["gsnr_0.1"]["generations.jsonl"] != outputs["ifd_0.1"]["generations.jsonl"]
    generations = [json.loads(line) for line in outputs["gsnr_0.1"]["generations.jsonl"].splitlines()]
    assert len(generations) == 64 and json.loads(outputs["gsnr_0.1"]["heldout.json"])["examples"] == 32
