"""Ensemble members as units (no Ray): each member's folder is keyed by exactly what changes its training, so a
config change keeps the members it does not touch, and members of overlapping seeds are shared between configs."""

from pathlib import Path

import pytest

from gradfilter_ray.config import load
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.storage import StorageError
from gradfilter_ray.units import UNIT_NAME, ensemble_members, member_names

TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny_gpt2.yaml"
TOKENS_KEY = "0123456789abcdef"


def names(*overrides, tokens_key=TOKENS_KEY):
    cfg = load(TINY, ["output_dir=/tmp/unused", "ensemble.members=2", *overrides])
    return member_names(cfg, tokens_key)


def test_member_folders_are_named_by_seed_and_key_in_member_order():
    cfg = load(TINY, ["output_dir=/tmp/unused", "ensemble.members=3", "ensemble.seed=7"])
    members = ensemble_members(cfg, TOKENS_KEY)
    assert [(m.index, m.seed, m.unit) for m in members] == [(0, 7, "member_0"), (1, 8, "member_1"), (2, 9, "member_2")]
    for member in members:
        parsed = UNIT_NAME.fullmatch(member.folder)
        assert parsed and parsed["name"] == f"member_seed{member.seed}"
    assert len({m.folder for m in members}) == 3  # each seed its own key


@pytest.mark.parametrize(
    "override",
    [
        "ensemble.cpus_per_member=0.25",
        "ensemble.max_failures=5",
        "ensemble.gpus_per_member=0.5",  # with precision float32 (below): the same dtype on a GPU
    ],
)
def test_fields_that_do_not_change_training_keep_every_member(override):
    base = names("ensemble.precision=float32")
    assert names("ensemble.precision=float32", override) == base


def test_more_members_keep_the_first_ones_and_a_shifted_seed_reuses_the_overlap():
    two, three = names(), names("ensemble.members=3")
    assert three[:2] == two and three[2] not in two
    shifted = names("ensemble.seed=43")  # one above the default 42: members of seeds 43 and 44
    assert shifted[0] == two[1] and shifted[1] == three[2]


@pytest.mark.parametrize(
    "override",
    [
        "ensemble.lora_rank=8",
        "ensemble.epochs=3",
        "ensemble.learning_rate=0.01",
        "ensemble.batching=length_grouped",
        "proxy.max_length=64",
        "ensemble.gpus_per_member=0.5",  # precision auto: bf16 on a GPU, fp32 on CPU
    ],
)
def test_fields_that_change_training_change_every_member(override):
    base = names()
    changed = names(override)
    assert not set(changed) & set(base), override


def test_the_tokens_a_member_trains_on_key_it():
    assert not set(names(tokens_key="fedcba9876543210")) & set(names())


def test_readers_find_member_folders_through_the_ensemble_record(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(StorageError, match="maps no members"):
        run.member_epoch(0, 1)
    units = {f"member_{m}": f"ensemble/member_seed{40 + m}-{m:016x}" for m in range(11)}
    run.record_stage("ensemble", {"status": "done", "key": "k", "units": units})
    reread = RunDir(str(tmp_path / "run"))  # the manifest sorts its keys: member_10 before member_2
    assert [f.path for f in reread.member_folders()] == [reread.at(units[f"member_{m}"]).path for m in range(11)]
    assert reread.member_epoch(10, 2).path == reread.at("ensemble/member_seed50-000000000000000a/epoch_2").path
