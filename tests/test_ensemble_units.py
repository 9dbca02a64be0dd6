"""Ensemble members as units (no Ray): each member's folder is keyed by exactly what changes its training, so a
config change keeps the members it does not touch, and members of overlapping seeds are shared between configs; the
extraction's shards are keyed by each member's `_done` marker and what `tokens/` holds, not when it was written;
readers find this config's members and extraction through the stage records."""

from pathlib import Path

import pytest

from gradfilter_ray.config import load
from gradfilter_ray.gradients.stage import shard_commit_key
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


@pytest.mark.parametrize(
    "overrides",
    [["ensemble.late_epoch=3"], ["ensemble.early_epoch=2", "ensemble.late_epoch=3"]],
)
def test_the_epochs_the_extraction_reads_keep_every_member(overrides):
    base = names("ensemble.epochs=3")  # every epoch is saved: which ones the extraction reads trains nothing again
    assert names("ensemble.epochs=3", *overrides) == base


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


def test_shards_are_keyed_by_what_tokens_holds_and_each_members_training_not_by_when_tokens_ran():
    tokens = {"status": "done", "key": TOKENS_KEY, "outputs": ["tokens"], "rows": 24, "tokens": 1800}
    timed = {**tokens, "started": "2025-01-01T00:00:00Z", "finished": "2025-01-01T00:00:09Z", "seconds": 9.0}
    again = {**tokens, "started": "2025-01-02T10:00:00Z", "finished": "2025-01-02T10:00:07Z", "seconds": 7.0}
    markers = ['{"seed": 42, "trained": "20250101T000010Z-aaaa"}', '{"seed": 43, "trained": "20250101T000010Z-bbbb"}']
    key = shard_commit_key("stagekey", timed, markers)
    assert key.startswith("stagekey-") and shard_commit_key("stagekey", again, markers) == key
    retrained = [markers[0], '{"seed": 43, "trained": "20250103T000000Z-cccc"}']
    assert shard_commit_key("stagekey", timed, retrained) != key
    assert shard_commit_key("stagekey", {**timed, "rows": 23}, markers) != key
    assert shard_commit_key("otherkey", timed, markers) != key


def test_readers_find_this_configs_extraction_through_the_gradients_record(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    top, keyed = run.at("gradients"), run.at("gradients/0123456789abcdef")
    assert run.gradients.path == top.path  # no record, nothing there: gradients written there directly
    (top / "part-0.parquet").write_bytes(b"x")
    run.record_stage("gradients", {"status": "done", "key": "k"})  # done without a map: the parts at the top
    assert run.gradients.path == top.path
    (keyed / "part-0.parquet").write_bytes(b"x")  # a config's own folder beside them: read whole, it would mix in
    with pytest.raises(StorageError, match="run `gradients`"):
        _ = run.gradients
    run.record_stage("gradients", {"status": "done", "key": "k", "units": {"gradients": "gradients/0123456789abcdef"}})
    assert run.gradients.path == keyed.path
