"""Baseline scorers: random, length, IFD, full (pure numpy, no Ray)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from gradfilter_ray.scoring import baselines
from gradfilter_ray.scoring.selection import top_k_mask


def test_random_scores_depend_only_on_id_and_seed():
    rng = np.random.default_rng(0)
    ids = rng.choice(10**12, size=500, replace=False).astype(np.int64)
    scores = baselines.random_scores(ids, seed=7)
    assert scores.dtype == np.float64 and scores.shape == (500,)
    perm = rng.permutation(500)
    np.testing.assert_array_equal(baselines.random_scores(ids[perm], seed=7), scores[perm])
    # A subset (another shard, rows filtered out) keeps each row's score.
    np.testing.assert_array_equal(baselines.random_scores(ids[::3], seed=7), scores[::3])
    np.testing.assert_array_equal(baselines.random_scores(ids, seed=7), scores)
    other = baselines.random_scores(ids, seed=8)
    assert (other != scores).mean() > 0.99
    everyone = np.ones(500, bool)
    assert (top_k_mask(other, ids, everyone, 50) != top_k_mask(scores, ids, everyone, 50)).any()


def test_random_scores_roughly_uniform_in_unit_interval():
    ids = np.arange(10_000, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = baselines.random_scores(ids, seed=0)
        negative = baselines.random_scores(np.array([-1, -(2**63), 2**63 - 1]), seed=-5)
    assert ((scores >= 0.0) & (scores < 1.0)).all()
    assert 0.45 < scores.mean() < 0.55
    # Each decile holds about a tenth of the ids (sequential ids must not cluster).
    counts = np.histogram(scores, bins=10, range=(0.0, 1.0))[0]
    assert counts.min() > 850 and counts.max() < 1150
    assert ((negative >= 0.0) & (negative < 1.0)).all() and len(set(negative.tolist())) == 3


def test_length_scores_rank_longest_first():
    n = np.array([3, 10, 0, 7])
    scores = baselines.length_scores(n)
    assert scores.dtype == np.float64
    np.testing.assert_array_equal(scores, [3.0, 10.0, 0.0, 7.0])
    mask = top_k_mask(scores, np.arange(4, dtype=np.int64), np.ones(4, bool), 2)
    assert mask.tolist() == [False, True, False, True]


def test_ifd_hand_case():
    ifd, eligible, reason = baselines.ifd_scores(np.array([1.0, 0.5]), np.array([2.0, 0.75]))
    # exp(1.0) / exp(2.0) = exp(-1); exp(0.5) / exp(0.75) = exp(-0.25)
    np.testing.assert_allclose(ifd, [math.exp(-1.0), math.exp(-0.25)], rtol=1e-15)
    assert eligible.tolist() == [True, True] and reason.tolist() == [None, None]


def test_ifd_at_or_above_one_is_excluded():
    cond = np.array([2.0, 3.0, 1.0, 800.0])
    uncond = np.array([2.0, 1.0, 1.0 + 1e-17, 0.0])
    ifd, eligible, reason = baselines.ifd_scores(cond, uncond)
    # Row 0: exactly exp(0) = 1; row 1: exp(2) > 1; row 2: exp(-1e-17) rounds to 1.0; row 3: exp(800) overflows.
    assert reason.tolist() == ["ifd_ge_1"] * 4
    assert not eligible.any() and np.isnan(ifd).all()


def test_ifd_non_finite_and_no_response_tokens():
    cond = np.array([np.nan, 1.0, np.inf, 1.0, 1.0])
    uncond = np.array([2.0, -np.inf, 2.0, 2.0, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ifd, eligible, reason = baselines.ifd_scores(cond, uncond, n_response_tokens=np.array([4, 4, 4, 0, 4]))
    assert reason.tolist() == ["non_finite", "non_finite", "non_finite", "no_response_tokens", None]
    assert eligible.tolist() == [False, False, False, False, True]
    assert np.isnan(ifd[:4]).all() and ifd[4] == pytest.approx(math.exp(-1.0), rel=1e-15)
    _, _, reason = baselines.ifd_scores(np.array([np.nan]), np.array([1.0]), np.array([0]))
    assert reason.tolist() == ["no_response_tokens"]
    with pytest.raises(ValueError):
        baselines.ifd_scores(np.ones(3), np.ones(2))
