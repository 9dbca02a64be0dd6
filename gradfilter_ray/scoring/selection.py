"""Exact top-k selection by score, without sorting the dataset.

Order: higher score first; equal scores: the SMALLER id first. Ids are assumed unique, so the order is total and
the selected set is unique. Only eligible rows compete; an eligible row with a NaN score is an error (ineligible
rows must be marked so upstream, never ranked). +-inf scores are ordered like any other value.

Two ways to select: ``top_k_mask`` on in-memory arrays, or for data that does not fit, a first streaming pass
``TopKBoundary`` / ``threshold_for_top_k`` (O(k + chunk) memory) and a filtering pass ``mask_from_threshold`` per
chunk. The second pass must see bit-identical float64 scores to the first (scores compared with ==).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from gradfilter_ray.scoring.scorers import Selection, check_scorer

__all__ = [
    "Selections",
    "TopKBoundary",
    "k_for_ratio",
    "mask_from_threshold",
    "selection_plan",
    "threshold_for_top_k",
    "top_k_mask",
]

# floor() slack for ratio * n: covers float rounding (0.29 * 100 = 28.999999999999996) while being far below the
# distance to the next integer for any dataset size this project handles (< 1e-3 up to 1e9 rows).
_RATIO_REL_EPS = 1e-12


def k_for_ratio(ratio: float, n_eligible: int) -> int:
    """Rows to keep: floor(ratio * n_eligible), with a relative 1e-12 slack so 0.1 * 30 gives 3 and 0.29 * 100
    gives 29 despite binary floating point. ``ratio`` in [0, 1], ``n_eligible`` >= 0; result in [0, n_eligible]."""
    if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if n_eligible < 0:
        raise ValueError(f"n_eligible must be >= 0, got {n_eligible}")
    x = ratio * n_eligible
    return min(int(n_eligible), math.floor(x + x * _RATIO_REL_EPS))


def _check(scores: np.ndarray, ids: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(ids)
    eligible = np.asarray(eligible, dtype=bool)
    if scores.ndim != 1 or ids.shape != scores.shape or eligible.shape != scores.shape:
        raise ValueError(
            f"scores, ids, eligible must share one [N] shape: {scores.shape} {ids.shape} {eligible.shape}"
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    if np.isnan(scores[eligible]).any():
        raise ValueError("an eligible row has a NaN score; mark it ineligible upstream")
    return scores, ids.astype(np.int64, copy=False), eligible


def _top_k_positions(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Positions of the top k rows (score desc, id asc) among all given rows; 0 < k < len(scores), no NaN."""
    n = scores.shape[0]
    threshold = np.partition(scores, n - k)[n - k]  # the k-th largest score
    above = np.flatnonzero(scores > threshold)
    tied = np.flatnonzero(scores == threshold)
    need = k - above.shape[0]  # >= 1: the threshold itself is among the top k
    if need < tied.shape[0]:
        # Only the tied subset is partitioned, by id: its `need` smallest ids win.
        tied = tied[np.argpartition(ids[tied], need - 1)[:need]]
    return np.concatenate([above, tied])


def top_k_mask(scores: np.ndarray, ids: np.ndarray, eligible: np.ndarray, k: int) -> np.ndarray:
    """Bool [N]: the k eligible rows with the highest scores (ties: smaller id first); all eligible rows if fewer.

    ``scores`` float64 [N] (NaN allowed only on ineligible rows, else ValueError); ``ids`` int64 [N], unique;
    ``eligible`` bool [N]; ``k`` >= 0. Cost O(N) on average (np.partition), plus a partition of the rows tied at
    the threshold by id.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    scores, ids, eligible = _check(scores, ids, eligible)
    pool = np.flatnonzero(eligible)
    if k >= pool.shape[0]:
        return eligible.copy()
    mask = np.zeros(scores.shape[0], dtype=bool)
    if k > 0:
        mask[pool[_top_k_positions(scores[pool], ids[pool], k)]] = True
    return mask


class TopKBoundary:
    """First pass of streaming top-k, fed one chunk at a time: the boundary ``(threshold, max_tied_id)`` of the
    top k over everything fed. Keeps at most k candidates plus one chunk in memory, so several boundaries (one
    per scorer and ratio) can be computed in one read of the data. A row is in the top k iff it is eligible and
    ``score > threshold or (score == threshold and id <= max_tied_id)`` (see ``mask_from_threshold``).
    Edge cases: k == 0 gives ``(inf, None)`` (None admits no tied row, so nothing is selected); fewer than k
    eligible rows gives ``(-inf, max int64)``, admitting every eligible row.
    """

    def __init__(self, k: int):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = k
        self._scores = np.empty(0, dtype=np.float64)
        self._ids = np.empty(0, dtype=np.int64)

    def update(self, scores: np.ndarray, ids: np.ndarray, eligible: np.ndarray | None = None) -> None:
        """One chunk: parallel float64 / int64 / bool [n_c] arrays (``eligible`` None: every row eligible)."""
        if eligible is None:
            eligible = np.ones(len(scores), dtype=bool)
        scores, ids, keep = _check(scores, ids, eligible)
        if self.k == 0:
            return
        if self._scores.shape[0] == self.k:
            # Rows that rank below the current k-th candidate can never enter the top k: drop them before merging.
            thr = self._scores.min()
            tied_max = self._ids[self._scores == thr].max()
            keep = keep & ((scores > thr) | ((scores == thr) & (ids < tied_max)))
        self._scores = np.concatenate([self._scores, scores[keep]])
        self._ids = np.concatenate([self._ids, ids[keep]])
        if self._scores.shape[0] > self.k:
            top = _top_k_positions(self._scores, self._ids, self.k)
            self._scores, self._ids = self._scores[top], self._ids[top]

    def result(self) -> tuple[float, int | None]:
        return self.boundary_for(self.k)

    def boundary_for(self, k: int) -> tuple[float, int | None]:
        """The boundary of the top k for any k <= the k this was built with: top-k sets of one score are nested,
        so one pass with the largest k serves every smaller one (several ratios of one scorer)."""
        if not 0 <= k <= self.k:
            raise ValueError(f"k must be in [0, {self.k}], got {k}")
        if k == 0:
            return math.inf, None
        if self._scores.shape[0] < k:
            return -math.inf, int(np.iinfo(np.int64).max)
        order = np.lexsort((self._ids, -self._scores))  # score descending, then id ascending
        last = order[k - 1]
        return float(self._scores[last]), int(self._ids[last])


def threshold_for_top_k(
    score_chunks: Iterable[np.ndarray],
    id_chunks: Iterable[np.ndarray],
    k: int,
    eligible_chunks: Iterable[np.ndarray] | None = None,
) -> tuple[float, int | None]:
    """``TopKBoundary`` over parallel iterables of chunks (``eligible_chunks`` None: every row eligible)."""
    boundary = TopKBoundary(k)
    eligible_iter = iter(eligible_chunks) if eligible_chunks is not None else None
    for chunk_scores, chunk_ids in zip(score_chunks, id_chunks, strict=True):
        chunk_eligible = None
        if eligible_iter is not None and (chunk_eligible := next(eligible_iter, None)) is None:
            raise ValueError("eligible_chunks has fewer chunks than score_chunks")
        boundary.update(chunk_scores, chunk_ids, chunk_eligible)
    return boundary.result()


def mask_from_threshold(
    scores: np.ndarray, ids: np.ndarray, eligible: np.ndarray, threshold: float, max_tied_id: int | None
) -> np.ndarray:
    """Second pass of streaming top-k, bool [n_c] for one chunk: eligible and (score > threshold or
    (score == threshold and id <= max_tied_id)); ``max_tied_id`` None admits no row at the threshold."""
    scores, ids, eligible = _check(scores, ids, eligible)
    at_threshold = scores == threshold
    if max_tied_id is None:
        at_threshold[:] = False
    else:
        at_threshold &= ids <= max_tied_id
    return eligible & ((scores > threshold) | at_threshold)


def selection_plan(scorers: list[str], ratios: list[float], n_base: int) -> dict[str, dict[str, int]]:
    """scorer -> {selection name: k}. Every scorer selects the same k (a share of the rows that have a response
    token), so subsets compare at equal size; a scorer whose own pool is smaller (IFD drops IFD >= 1) selects its
    whole pool."""
    return {
        check_scorer(scorer): {Selection(scorer, r).name: k_for_ratio(r, n_base) for r in ratios} for scorer in scorers
    }


class Selections:
    """Every selection's ids in compact form: per scorer, the sorted ids of its largest selection and, per id, the
    smallest k that still holds it (top-k sets of one score are nested), so memory is ~16 bytes per row of each
    scorer's largest subset."""

    def __init__(self) -> None:
        self._nested: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # scorer -> (sorted ids, rank of each id)
        self._ks: dict[str, tuple[str, int]] = {}  # selection name -> (scorer, k)

    def add_ranked(self, scorer: str, ids: np.ndarray, scores: np.ndarray, ks: dict[str, int]) -> None:
        """`ids`/`scores`: the scorer's largest selection, any order; `ks`: selection name -> k."""
        ranks = np.empty(ids.shape[0], dtype=np.int64)
        ranks[np.lexsort((ids, -scores))] = np.arange(ids.shape[0])
        by_id = np.argsort(ids, kind="stable")
        self._nested[scorer] = (ids[by_id], ranks[by_id])
        self._ks.update({name: (scorer, k) for name, k in ks.items()})

    def names(self) -> list[str]:
        return list(self._ks)

    def mask(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Bool [len(ids)]: which of these corpus ids the selection holds (a binary search per id)."""
        scorer, k = self._ks[name]
        sorted_ids, ranks = self._nested[scorer]
        if sorted_ids.shape[0] == 0:
            return np.zeros(ids.shape[0], dtype=bool)
        pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.shape[0] - 1)
        return (sorted_ids[pos] == ids) & (ranks[pos] < k)
