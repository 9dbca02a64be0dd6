"""G-SNR components, ablation columns and guards (pure numpy, no Ray)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from gradfilter_ray.scoring import gsnr, scorers
from gradfilter_ray.scoring.scorers import GSNR_SCORERS, SCORERS, Selection, check_scorer
from gradfilter_ray.scoring.selection import top_k_mask


def _losses(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, m), 2.0), np.full((n, m), 1.5)


def _table(sq_early, sq_late, n_tok=None, eps=1e-8, loss_early=None, loss_late=None):
    sq_early, sq_late = np.asarray(sq_early, float), np.asarray(sq_late, float)
    le, ll = _losses(*sq_early.shape)
    return gsnr.score_table(
        sq_early,
        sq_late,
        le if loss_early is None else loss_early,
        ll if loss_late is None else loss_late,
        np.full(sq_early.shape[0], 10) if n_tok is None else np.asarray(n_tok),
        eps,
    )


def test_hand_computed_three_rows_three_members():
    early = np.array([[4.0, 6.0, 8.0], [2.0, 2.0, 2.0], [10.0, 20.0, 30.0]])
    late = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [0.0, 0.0, 6.0]])
    eps = 0.25
    # Row 0: G_e = 18/3 = 6, G_l = 6/3 = 2, drop_abs = 4, drop_rel = 4/6 = 2/3,
    #        noise = ((1-2)^2 + (2-2)^2 + (3-2)^2) / 3 = 2/3, gsnr = (2/3) / (2/3 + 1/4) = (2/3) / (11/12) = 8/11,
    #        drop_over_var = 4 / (11/12) = 48/11, scale_free = (2/3) / ((2/3)/2^2 + 1/4) = (2/3) / (5/12) = 8/5.
    # Row 1: nothing changes: G_e = G_l = 2, every drop 0, noise 0, every ratio 0.
    # Row 2: G_e = 60/3 = 20, G_l = 6/3 = 2, drop_abs = 18, drop_rel = 18/20 = 0.9,
    #        noise = ((0-2)^2 + (0-2)^2 + (6-2)^2) / 3 = 24/3 = 8, gsnr = 0.9 / 8.25 = 6/55,
    #        drop_over_var = 18 / 8.25 = 24/11, scale_free = 0.9 / (8/2^2 + 1/4) = 0.9 / 2.25 = 0.4.
    expected = {
        "g_early": [6.0, 2.0, 20.0],
        "g_late": [2.0, 2.0, 2.0],
        "drop_abs": [4.0, 0.0, 18.0],
        "drop_rel": [2 / 3, 0.0, 0.9],
        "noise": [2 / 3, 0.0, 8.0],
        "gsnr": [8 / 11, 0.0, 6 / 55],
        "drop_over_var": [48 / 11, 0.0, 24 / 11],
        "scale_free": [8 / 5, 0.0, 0.4],
    }
    cols = gsnr.components(early, late, np.array([5, 5, 5]), eps)
    assert set(cols) == set(gsnr.SCORE_COLUMNS)
    for name, want in expected.items():
        np.testing.assert_allclose(cols[name], want, rtol=1e-12, atol=1e-12, err_msg=name)
        assert cols[name].dtype == np.float64
    table = _table(early, late, eps=eps)
    assert table["eligible"].all() and all(r is None for r in table["reason"])
    for name, want in expected.items():
        np.testing.assert_allclose(table[name], want, rtol=1e-12, atol=1e-12, err_msg=name)


def test_single_member_has_zero_noise():
    cols = gsnr.components(np.array([[4.0], [8.0]]), np.array([[1.0], [2.0]]), np.array([3, 3]), 0.5)
    np.testing.assert_array_equal(cols["noise"], [0.0, 0.0])
    np.testing.assert_allclose(cols["gsnr"], [0.75 / 0.5, 0.75 / 0.5], rtol=1e-12)
    np.testing.assert_allclose(cols["drop_over_var"], [3.0 / 0.5, 6.0 / 0.5], rtol=1e-12)


def test_eps_enters_the_denominator():
    early, late = np.array([[4.0, 6.0, 8.0]]), np.array([[1.0, 2.0, 3.0]])
    small = gsnr.components(early, late, np.array([1]), 1e-8)
    large = gsnr.components(early, late, np.array([1]), 1.0)
    np.testing.assert_allclose(small["gsnr"], (2 / 3) / (2 / 3 + 1e-8), rtol=1e-12)
    np.testing.assert_allclose(large["gsnr"], (2 / 3) / (2 / 3 + 1.0), rtol=1e-12)
    assert large["gsnr"][0] < small["gsnr"][0]
    for name in ("g_early", "g_late", "drop_abs", "drop_rel", "noise"):
        assert small[name][0] == large[name][0]
    with pytest.raises(ValueError, match="eps"):
        gsnr.components(early, late, np.array([1]), -1.0)


def _guard_rows():
    """Row 0 is a normal row; every other row trips one guard, with values that would otherwise score high."""
    early = np.array(
        [
            [4.0, 6.0, 8.0],  # fine
            [0.0, 0.0, 0.0],  # zero_early_norm
            [np.nan, 6.0, 8.0],  # non_finite (NaN)
            [4.0, np.inf, 8.0],  # non_finite (inf)
            [4.0, 6.0, 8.0],  # invalid_norm (negative late norm)
            [1e6, 1e6, 1e6],  # no_response_tokens
            [1e6, 1e6, 1e6],  # non_finite (loss)
            [1e6, 1e6, 1e6],  # non_finite (-inf norm)
        ]
    )
    late = np.array(
        [
            [1.0, 2.0, 3.0],
            [0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0],
            [1.0, 1.0, 1.0],
            [-1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [0.0, -np.inf, 0.0],
        ]
    )
    n_tok = np.array([5, 5, 5, 5, 5, 0, 5, 5])
    loss_early, loss_late = _losses(8, 3)
    loss_late[6, 1] = np.nan
    reasons = [
        None,
        "zero_early_norm",
        "non_finite",
        "non_finite",
        "invalid_norm",
        "no_response_tokens",
        "non_finite",
        "non_finite",
    ]
    return early, late, n_tok, loss_early, loss_late, reasons


def test_guards_give_reason_nan_scores_and_never_rank_first():
    early, late, n_tok, loss_early, loss_late, reasons = _guard_rows()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eligible, reason = gsnr.eligibility(early, late, loss_early, loss_late, n_tok)
        cols = gsnr.components(early, late, n_tok, 1e-8)
        table = gsnr.score_table(early, late, loss_early, loss_late, n_tok, 1e-8)
    assert list(reason) == reasons
    assert list(table["reason"]) == reasons
    np.testing.assert_array_equal(eligible, [r is None for r in reasons])
    np.testing.assert_array_equal(table["eligible"], eligible)
    ids = np.arange(8, dtype=np.int64)
    for name in gsnr.SCORE_COLUMNS:
        assert np.isnan(table[name][1:]).all(), name
        assert np.isfinite(table[name][0]), name
        # components only knows norms and token counts: the NaN-loss row is NaN-ed by score_table, not by it.
        assert np.isnan(np.delete(cols[name], [0, 6])).all(), name
    for scorer in GSNR_SCORERS:
        first = top_k_mask(table[scorer], ids, scorers.eligible(table[scorer]), 1)
        assert first.tolist() == [True] + [False] * 7, scorer


def test_reason_priority():
    early = np.array([[np.nan, 1.0], [np.nan, -1.0], [0.0, 0.0], [1.0, 1.0]])
    late = np.array([[1.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    loss_early, loss_late = _losses(4, 2)
    loss_early[3, 0] = np.inf
    _, reason = gsnr.eligibility(early, late, loss_early, loss_late, np.array([0, 3, 3, 0]))
    assert list(reason) == ["no_response_tokens", "non_finite", "invalid_norm", "no_response_tokens"]


def test_non_finite_score_from_overflow_and_zero_eps():
    early = np.array([[1e308, 1e308], [4.0, 4.0], [4.0, 4.0], [4.0, 8.0]])
    late = np.array([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0], [1.0, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = _table(early, late, eps=0.0)
    # Row 0: G_e overflows to inf. Rows 1, 2: zero noise with eps = 0 divides by zero. Row 3 has noise 1: fine.
    assert list(table["reason"]) == ["non_finite_score"] * 3 + [None]
    np.testing.assert_array_equal(table["eligible"], [False, False, False, True])
    for name in gsnr.SCORE_COLUMNS:
        assert np.isnan(table[name][:3]).all() and np.isfinite(table[name][3]), name


def test_scale_free_when_late_norms_vanish():
    table = _table([[2.0, 4.0]], [[0.0, 0.0]], eps=0.5)
    assert table["eligible"][0]
    assert table["drop_rel"][0] == 1.0 and table["noise"][0] == 0.0
    assert table["scale_free"][0] == 1.0 / 0.5


def test_scaling_a_row_leaves_relative_scores_unchanged():
    rng = np.random.default_rng(3)
    early = rng.uniform(1.0, 5.0, size=(20, 5))
    late = rng.uniform(0.1, 1.0, size=(20, 5))
    c = 7.25
    base = gsnr.components(early, late, np.ones(20, int), 1e-3)
    scaled = gsnr.components(c * early, c * late, np.ones(20, int), 1e-3)
    for name in ("drop_rel", "scale_free"):
        np.testing.assert_allclose(scaled[name], base[name], rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(scaled["noise"], c**2 * base["noise"], rtol=1e-12)
    assert not np.allclose(scaled["gsnr"], base["gsnr"], rtol=1e-3)


def test_every_gsnr_scorer_is_a_column_and_selection_names_round_trip():
    assert set(GSNR_SCORERS) <= set(gsnr.SCORE_COLUMNS) and set(GSNR_SCORERS) <= set(SCORERS)
    with pytest.raises(ValueError) as info:
        check_scorer("snr")
    for name in SCORERS:
        assert name in str(info.value)
    for scorer in SCORERS:
        for ratio in (0.05, 0.1, 0.15, 1.0):
            selection = Selection(scorer, ratio)
            assert Selection.parse(selection.name) == selection
    assert Selection.parse("full") == Selection.full() and Selection.full().name == "full"
    for bad in ("snr_0.1", "gsnr_x", "gsnr", "gsnr_0.10"):
        with pytest.raises(ValueError):
            Selection.parse(bad)
    np.testing.assert_array_equal(scorers.eligible(np.array([1.0, np.nan, -np.inf])), [True, False, True])


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\[N, M\]"):
        gsnr.components(np.ones((2, 3)), np.ones((2, 2)), np.ones(2, int), 1e-8)
    with pytest.raises(ValueError, match="n_response_tokens"):
        gsnr.components(np.ones((2, 3)), np.ones((2, 3)), np.ones(3, int), 1e-8)
    with pytest.raises(ValueError, match="loss_late"):
        gsnr.eligibility(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3)), np.ones((3, 3)), np.ones(2, int))
