"""Exact top-k selection, ratios, and the streaming two-pass selection (pure numpy, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from gradfilter_ray.scoring.selection import (
    TopKBoundary,
    k_for_ratio,
    mask_from_threshold,
    threshold_for_top_k,
    top_k_mask,
)


def _reference(scores, ids, eligible, k):
    """Sort-based top k: ascending (-score, id) over eligible rows."""
    rows = sorted((-s, i) for s, i, e in zip(scores.tolist(), ids.tolist(), eligible.tolist()) if e)
    chosen = {i for _, i in rows[:k]}
    return np.array([i in chosen for i in ids.tolist()])


def _random_case(seed, n=400, decimals=1):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=n), decimals)  # heavy ties
    ids = rng.choice(10 * n, size=n, replace=False).astype(np.int64)  # unique, not in row order
    eligible = rng.random(n) < 0.8
    scores[~eligible & (rng.random(n) < 0.5)] = np.nan  # ineligible rows may carry NaN
    return scores, ids, eligible


@pytest.mark.parametrize("seed", range(4))
def test_top_k_matches_sort_reference_with_heavy_ties(seed):
    scores, ids, eligible = _random_case(seed)
    n_eligible = int(eligible.sum())
    for k in [0, 1, 2, 7, 50, 123, n_eligible - 1, n_eligible, n_eligible + 5]:
        mask = top_k_mask(scores, ids, eligible, k)
        np.testing.assert_array_equal(mask, _reference(scores, ids, eligible, k), err_msg=f"k={k}")
        assert mask.sum() == min(k, n_eligible)
        assert not (mask & ~eligible).any()


def test_ties_across_the_threshold_take_smaller_ids():
    scores = np.array([1.0, 2.0, 1.0, 1.0, 3.0, 1.0])
    ids = np.array([50, 9, 20, 40, 8, 30], dtype=np.int64)
    eligible = np.ones(6, bool)
    # Top 2 are scores 3 and 2; then the ids tied at 1.0 in order 20, 30, 40, 50.
    assert top_k_mask(scores, ids, eligible, 3).tolist() == [False, True, True, False, True, False]
    assert top_k_mask(scores, ids, eligible, 4).tolist() == [False, True, True, False, True, True]
    assert top_k_mask(np.zeros(4), np.array([3, 1, 2, 0]), np.ones(4, bool), 2).tolist() == [False, True, False, True]


def test_edge_cases():
    scores = np.array([0.5, np.nan, 0.7, -np.inf, np.inf])
    ids = np.arange(5, dtype=np.int64)
    eligible = np.array([True, False, True, True, True])
    assert not top_k_mask(scores, ids, eligible, 0).any()
    assert top_k_mask(scores, ids, eligible, 4).tolist() == eligible.tolist()
    assert top_k_mask(scores, ids, eligible, 100).tolist() == eligible.tolist()
    assert top_k_mask(scores, ids, eligible, 1).tolist() == [False, False, False, False, True]
    assert top_k_mask(scores, ids, eligible, 3).tolist() == [True, False, True, False, True]
    assert not top_k_mask(scores, ids, np.zeros(5, bool), 3).any()
    assert top_k_mask(np.empty(0), np.empty(0, np.int64), np.empty(0, bool), 2).shape == (0,)
    with pytest.raises(ValueError, match="NaN"):
        top_k_mask(scores, ids, np.ones(5, bool), 2)
    with pytest.raises(ValueError, match="k must be"):
        top_k_mask(scores, ids, eligible, -1)
    with pytest.raises(ValueError, match="shape"):
        top_k_mask(scores, ids[:4], eligible, 1)


def test_k_for_ratio():
    assert [k_for_ratio(r, 1000) for r in (0.05, 0.10, 0.15)] == [50, 100, 150]
    assert k_for_ratio(0.1, 30) == 3
    assert k_for_ratio(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in binary floating point
    assert k_for_ratio(0.07, 100) == 7
    assert k_for_ratio(0.15, 19) == 2  # 2.85: floor, not round
    assert k_for_ratio(1.0, 7) == 7 and k_for_ratio(0.0, 7) == 0 and k_for_ratio(0.5, 0) == 0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            k_for_ratio(bad, 10)
    with pytest.raises(ValueError):
        k_for_ratio(0.5, -1)


def test_nested_ratios():
    scores, ids, eligible = _random_case(11, n=1000)
    n_eligible = int(eligible.sum())
    masks = [top_k_mask(scores, ids, eligible, k_for_ratio(r, n_eligible)) for r in (0.05, 0.10, 0.15)]
    for small, large in zip(masks, masks[1:]):
        assert not (small & ~large).any()
        assert small.sum() < large.sum()


def _chunks(n, sizes):
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == n
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("seed", range(3))
def test_streaming_two_pass_equals_in_memory(seed):
    scores, ids, eligible = _random_case(100 + seed, n=600)
    n_eligible = int(eligible.sum())
    chunkings = [[600], [1] * 600, [100] * 6, [7, 250, 0, 13, 330], [599, 1]]
    for k in [1, 5, 60, 200, n_eligible - 1, n_eligible, n_eligible + 3]:
        expected = top_k_mask(scores, ids, eligible, k)
        np.testing.assert_array_equal(expected, _reference(scores, ids, eligible, k))
        for sizes in chunkings:
            parts = _chunks(600, sizes)
            threshold, max_tied_id = threshold_for_top_k(
                (scores[p] for p in parts), (ids[p] for p in parts), k, (eligible[p] for p in parts)
            )
            got = np.concatenate(
                [mask_from_threshold(scores[p], ids[p], eligible[p], threshold, max_tied_id) for p in parts]
            )
            np.testing.assert_array_equal(got, expected, err_msg=f"k={k} sizes={sizes[:5]}")


def test_streaming_edge_cases():
    scores = np.array([0.3, 0.3, 0.1, 0.3])
    ids = np.array([4, 2, 3, 1], dtype=np.int64)
    all_rows = np.ones(4, bool)
    assert threshold_for_top_k([scores], [ids], 0) == (float("inf"), None)
    assert not mask_from_threshold(scores, ids, all_rows, float("inf"), None).any()
    threshold, max_id = threshold_for_top_k([scores[:2], scores[2:]], [ids[:2], ids[2:]], 2)
    assert (threshold, max_id) == (0.3, 2)
    assert mask_from_threshold(scores, ids, all_rows, threshold, max_id).tolist() == [False, True, False, True]
    threshold, max_id = threshold_for_top_k([scores], [ids], 9)
    assert threshold == float("-inf")
    assert mask_from_threshold(scores, ids, all_rows, threshold, max_id).tolist() == [True] * 4
    with pytest.raises(ValueError, match="NaN"):
        threshold_for_top_k([np.array([np.nan])], [np.array([0])], 1)
    with pytest.raises(ValueError):
        threshold_for_top_k([scores, scores], [ids], 1)
    with pytest.raises(ValueError, match="eligible_chunks"):
        threshold_for_top_k([scores, scores], [ids, ids + 10], 1, [all_rows])


@pytest.mark.parametrize("seed", range(3))
def test_one_boundary_at_the_largest_k_serves_every_smaller_k(seed):
    scores, ids, eligible = _random_case(200 + seed, n=500)
    n_eligible = int(eligible.sum())
    k_max = n_eligible // 2
    boundary = TopKBoundary(k_max)
    for p in _chunks(500, [60] * 8 + [20]):
        boundary.update(scores[p], ids[p], eligible[p])
    for k in [0, 1, 2, 17, 100, k_max - 1, k_max]:
        got = mask_from_threshold(scores, ids, eligible, *boundary.boundary_for(k))
        np.testing.assert_array_equal(got, _reference(scores, ids, eligible, k), err_msg=f"k={k}")
    with pytest.raises(ValueError):
        boundary.boundary_for(k_max + 1)
