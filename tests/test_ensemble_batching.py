"""Length-grouped batches (every row once, seeded per (member seed, epoch), sorted windows), padding efficiency, the
loop's progress and padding callbacks, the stage's summary of them, and the ensemble trainer's set-up (gloo, the
resources the config asks for) without starting Ray."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gradfilter_ray.config import EnsembleConfig, ModelSpec, load
from gradfilter_ray.ensemble import stage as ensemble_stage
from gradfilter_ray.ensemble.batching import (
    epoch_batches,
    epoch_order,
    length_grouped_batches,
    padding_stats,
    random_batches,
    window_batches,
)
from gradfilter_ray.ensemble.loop import TokenRows, train_member
from gradfilter_ray.lora import attach_lora
from gradfilter_ray.models import load_causal_lm
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.units import ensemble_members

TINY_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny_gpt2.yaml"
GROUPED = EnsembleConfig(batch_size=8, length_group_batches=4, batching="length_grouped")
RANDOM = replace(GROUPED, batching="random")


def skewed_lengths(n=1003, seed=0):
    """Alpaca-like: mostly short rows, a long tail (n not a multiple of the batch size or the window)."""
    return np.clip(np.random.default_rng(seed).lognormal(4.5, 0.7, n).astype(np.int64), 4, 512)


class Unshuffled:
    """An rng whose batch order is the windows' own, to look at the windows before the shuffle."""

    @staticmethod
    def permutation(n):
        return np.arange(n)


@pytest.mark.parametrize("cfg", [GROUPED, RANDOM], ids=["length_grouped", "random"])
def test_every_row_once_per_epoch_in_full_batches_but_the_last(cfg):
    lengths = skewed_lengths()
    for epoch in (1, 2):
        batches = epoch_batches(lengths, cfg, 42, epoch)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
        sizes = sorted(len(b) for b in batches)
        assert sizes[1:] == [8] * (len(batches) - 1) and sizes[0] == len(lengths) % 8
        assert len(batches) == int(np.ceil(len(lengths) / 8))


def test_batches_are_a_function_of_member_seed_and_epoch():
    lengths = skewed_lengths()

    def plan(seed, epoch):
        return [b.tolist() for b in epoch_batches(lengths, GROUPED, seed, epoch)]

    assert plan(42, 1) == plan(42, 1)
    assert plan(42, 1) != plan(42, 2) and plan(42, 1) != plan(43, 1)


def test_random_is_the_permutation_cut_in_order():
    lengths, bs = skewed_lengths(), RANDOM.batch_size
    order = epoch_order(len(lengths), 7, 3)
    expected = [order[start : start + bs] for start in range(0, len(order), bs)]  # the loop before grouping
    got = epoch_batches(lengths, RANDOM, 7, 3)
    assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_windows_hold_the_permutations_rows_sorted_by_length_ties_in_order():
    lengths = np.random.default_rng(1).integers(1, 6, 100)  # many ties
    order, bs, window_batches = epoch_order(100, 5, 1), 4, 3
    batches = length_grouped_batches(order, lengths, bs, window_batches, Unshuffled())
    window = bs * window_batches
    for w, start in enumerate(range(0, 100, window)):
        rows = np.concatenate(batches[w * window_batches : (w + 1) * window_batches])
        expected = order[start : start + window]
        assert sorted(rows.tolist()) == sorted(expected.tolist())
        assert np.all(np.diff(lengths[rows]) >= 0)
        for length in set(lengths[rows].tolist()):  # stable: equal lengths keep the permutation's order
            tied = rows[lengths[rows] == length]
            assert tied.tolist() == [r for r in expected.tolist() if lengths[r] == length]


def test_grouped_batches_come_in_a_shuffled_order():
    lengths = skewed_lengths()
    order = epoch_order(len(lengths), 42, 1)
    unshuffled = length_grouped_batches(order, lengths, 8, 4, Unshuffled())
    shuffled = epoch_batches(lengths, GROUPED, 42, 1)
    key = sorted(tuple(b.tolist()) for b in unshuffled)
    assert sorted(tuple(b.tolist()) for b in shuffled) == key
    assert [b.tolist() for b in shuffled] != [b.tolist() for b in unshuffled]


def test_padding_efficiency_against_a_hand_count():
    stats = padding_stats(np.array([3, 5, 2, 7, 4]), [np.array([0, 1]), np.array([2, 3, 4])])
    # real 3+5+2+7+4 = 21; computed 2 rows x 5 + 3 rows x 7 = 31
    assert (stats.real_tokens, stats.computed_tokens) == (21, 31)
    assert stats.efficiency == pytest.approx(21 / 31)
    assert padding_stats(np.array([4, 4]), [np.array([0, 1])]).efficiency == 1.0


def test_grouping_beats_random_batches_on_skewed_lengths():
    lengths = skewed_lengths(4000)
    for epoch in (1, 2):
        grouped = padding_stats(lengths, epoch_batches(lengths, replace(GROUPED, length_group_batches=64), 3, epoch))
        rand = padding_stats(lengths, epoch_batches(lengths, RANDOM, 3, epoch))
        assert grouped.real_tokens == rand.real_tokens == int(lengths.sum())
        assert grouped.efficiency >= 0.9 > rand.efficiency
    # a one-batch window only sorts within the random batches: the same rows share a batch, the same padding
    one_batch_window = epoch_batches(lengths, replace(GROUPED, length_group_batches=1), 3, 1)
    assert padding_stats(lengths, one_batch_window) == padding_stats(
        lengths, random_batches(epoch_order(4000, 3, 1), 8)
    )


def test_train_member_reports_each_epochs_padding_and_every_row_done():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 20, 13)
    rows = TokenRows.from_columns(
        np.arange(13), [rng.integers(1, 97, n).astype(np.int32) for n in lengths], lengths // 2
    )
    cfg = EnsembleConfig(epochs=2, lora_rank=2, lora_alpha=4, batch_size=4, length_group_batches=2)
    model = attach_lora(
        load_causal_lm(
            ModelSpec(
                build_from_config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 97},
                tokenizer="bundled:gpt2",
            )
        ),
        cfg,
        seed=1,
    )
    planned, done, ended = {}, [], []
    train_member(
        model,
        rows,
        cfg,
        9,
        torch.device("cpu"),
        0,
        lambda e, m, o, losses: ended.append((e, len(losses))),
        on_epoch_planned=planned.__setitem__,
        on_rows_done=done.append,
    )
    assert ended == [(1, 4), (2, 4)] and list(planned) == [1, 2]
    for epoch, stats in planned.items():
        assert stats == padding_stats(rows.lengths(), epoch_batches(rows.lengths(), cfg, 9, epoch))
    assert sum(done) == 2 * 13 and sorted(done)[0] == 13 % 4


def _write_member_epoch(folder: Path, losses, efficiency):
    folder.mkdir(parents=True)
    (folder / ensemble_stage.LOSS_CSV).write_text(
        "step,loss\n" + "".join(f"{i + 1},{v}\n" for i, v in enumerate(losses))
    )
    if efficiency is not None:
        (folder / ensemble_stage.PADDING_JSON).write_text(json.dumps({"padding_efficiency": efficiency}))


def test_summary_holds_each_members_padding_and_their_mean(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    cfg = load(TINY_CONFIG, [f"output_dir={tmp_path / 'run'}", "ensemble.members=2", "ensemble.epochs=2"])
    ens = cfg.ensemble
    assert ens.batching == "random"  # the paper's uniformly shuffled batches unless a config opts in
    members = ensemble_members(cfg, "tokens-key")
    values = {(0, 1): 0.9, (0, 2): 0.8, (1, 1): 0.7, (1, 2): None}  # None: restored from an older checkpoint
    for (m, e), value in values.items():
        _write_member_epoch(Path(run.ensemble.path) / members[m].folder / f"epoch_{e}", [1.0, 0.5], value)
    trained = {members[1].folder}
    summary = ensemble_stage._summary(run.ensemble, ens, members, trained, {"rows_in": 3}, {"adapter_parameters": 1})
    assert summary["members"][0]["padding_efficiency"] == {1: 0.9, 2: 0.8}
    assert summary["members"][1]["padding_efficiency"] == {1: 0.7, 2: None}
    assert summary["padding_efficiency"] == pytest.approx(0.8) and summary["batching"] == "random"
    assert [summary["members"][m]["folder"] for m in (0, 1)] == [m.folder for m in members]
    assert [summary["members"][m]["seed"] for m in (0, 1)] == [ens.seed, ens.seed + 1]
    assert [summary["members"][m]["trained_now"] for m in (0, 1)] == [False, True]
    assert summary["trained_now"] == [1] and summary["reused"] == [0]


@pytest.mark.parametrize("gpus", [0.0, 0.2])
def test_trainer_uses_gloo_and_the_configured_resources_per_member(tmp_path, gpus):
    cfg = load(
        TINY_CONFIG,
        [f"output_dir={tmp_path / 'run'}", "ensemble.members=5", "ensemble.cpus_per_member=0.25"]
        + [f"ensemble.gpus_per_member={gpus}"],
    )
    members = ensemble_members(cfg, "tokens-key")
    trainer = ensemble_stage.build_trainer(cfg, RunDir(str(tmp_path / "run")), members, ds=None)
    assert trainer.backend_config.backend == "gloo"  # never NCCL, even with GPUs
    scaling = trainer.scaling_config
    assert scaling.num_workers == 5 and scaling.use_gpu == (gpus > 0)
    assert scaling.resources_per_worker == ({"CPU": 0.25, "GPU": 0.2} if gpus else {"CPU": 0.25})
    # one worker per member still to train, worker r given the r-th of them (seed and folder) and nothing else
    todo = [members[1], members[4]]
    trainer = ensemble_stage.build_trainer(cfg, RunDir(str(tmp_path / "run")), todo, ds=None)
    assert trainer.scaling_config.num_workers == 2
    assert trainer.train_loop_config["members"] == [
        {"index": 1, "seed": cfg.ensemble.seed + 1, "folder": members[1].folder},
        {"index": 4, "seed": cfg.ensemble.seed + 4, "folder": members[4].folder},
    ]
    assert trainer.run_config.name == ensemble_stage.trainer_name(todo) != ensemble_stage.trainer_name(members)


def test_a_window_never_holds_more_than_a_quarter_of_the_epoch_so_members_batch_differently():
    wide = replace(GROUPED, length_group_batches=64)
    assert window_batches(100, wide) == 3  # 13 batches: a quarter is 3
    assert window_batches(10_000, wide) == 64 and window_batches(5, wide) == 1
    lengths = skewed_lengths(400)
    members = [{tuple(sorted(b.tolist())) for b in epoch_batches(lengths, wide, seed, 1)} for seed in (42, 43)]
    shared = len(members[0] & members[1]) / len(members[0])
    assert shared < 0.2  # with one window per epoch every member would get the same batches up to ties
    random = padding_stats(lengths, epoch_batches(lengths, replace(wide, batching="random"), 42, 1))
    assert padding_stats(lengths, epoch_batches(lengths, wide, 42, 1)).efficiency > random.efficiency + 0.1
