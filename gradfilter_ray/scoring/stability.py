"""How stable each ensemble-based selection is: leave-one-out over the ensemble's members (pure numpy: no Ray, no I/O).

Leave-one-out scores: for an ensemble scorer s (one of ``scorers.GSNR_SCORERS``) and member j (j = 0..M-1),
``loo[i, j]`` is s recomputed by ``gsnr.components`` from row i's early and late squared norms with member j's left
out (M-1 members). A row ineligible for the full score is NaN in every entry; a non-finite leave-one-out value is
NaN too (the row cannot be selected in that leave-one-out selection). With M < 3 the M-1 = 1 remaining member has
no variance, so leave-one-out is undefined: every entry is NaN (``UNDEFINED``).

Stability of a selection (scorer, ratio, k): the M leave-one-out selections are the exact top k of each
``loo[:, j]`` (same k and tie rule as the full selection: score descending, smaller id first). A selection is
summarized by the mean over j of the Jaccard overlap |F & L_j| / |F | L_j| of the full selection F with leave-one-out
selection L_j, and per row of F by how many of the M leave-one-out selections also hold it (0..M). Low overlap means
the selection hinges on single members: the ensemble needs more members.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradfilter_ray.scoring import gsnr
from gradfilter_ray.scoring.scorers import GSNR_SCORERS

__all__ = [
    "MIN_MEMBERS",
    "UNDEFINED",
    "loo_column",
    "loo_scores",
    "ranked_ids",
    "selection_stability",
    "undefined",
]

MIN_MEMBERS = 3  # leave-one-out keeps M-1 members; the variance over members needs at least 2 of them
UNDEFINED = "undefined for M < 3"


def loo_column(scorer: str) -> str:
    """The scores table's column of a scorer's leave-one-out values (list<float64> of length M per row)."""
    return f"{scorer}_loo"


def _check_scorers(scorers: Sequence[str]) -> None:
    bad = [s for s in scorers if s not in GSNR_SCORERS]
    if bad:
        raise ValueError(f"leave-one-out is defined for the ensemble scorers {list(GSNR_SCORERS)} only, got {bad}")


def loo_scores(
    sq_early: np.ndarray,
    sq_late: np.ndarray,
    n_response_tokens: np.ndarray,
    eligible: np.ndarray,
    eps: float,
    scorers: Sequence[str],
) -> dict[str, np.ndarray]:
    """scorer -> float64 [N, M]: column j is the scorer's value with member j left out (see the module docstring).

    Args: ``sq_early``, ``sq_late`` float [N, M] squared norms per member; ``n_response_tokens`` int [N];
    ``eligible`` bool [N], the full score's eligibility (``gsnr.score_table``'s ``eligible``); ``eps`` as in
    ``gsnr.components``; ``scorers`` a subset of ``GSNR_SCORERS``. M < 3 gives all NaN.
    """
    _check_scorers(scorers)
    sq_early, sq_late = np.asarray(sq_early, dtype=np.float64), np.asarray(sq_late, dtype=np.float64)
    eligible = np.asarray(eligible, dtype=bool)
    if sq_early.ndim != 2 or sq_early.shape != sq_late.shape:
        raise ValueError(f"sq_early and sq_late must both be [N, M], got {sq_early.shape} and {sq_late.shape}")
    n, m = sq_early.shape
    if eligible.shape != (n,):
        raise ValueError(f"eligible must be [{n}], got {eligible.shape}")
    out = {s: np.full((n, m), np.nan) for s in scorers}
    if m < MIN_MEMBERS or not scorers:
        return out
    for j in range(m):
        keep = np.arange(m) != j
        cols = gsnr.components(sq_early[:, keep], sq_late[:, keep], n_response_tokens, eps)
        for s in scorers:
            value = cols[s]
            out[s][:, j] = np.where(eligible & np.isfinite(value), value, np.nan)
    return out


def ranked_ids(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Candidate rows' ids (all eligible: no NaN) in selection order: score descending, then smaller id first. The
    top k of any k up to their count is the first k (top-k sets are nested), so one ranking serves every ratio."""
    return np.asarray(ids)[np.lexsort((ids, -np.asarray(values, dtype=np.float64)))]


def undefined(members: int | None, reason: str = UNDEFINED) -> dict:
    """The stability record of a selection whose leave-one-out selections are not defined."""
    return {
        "members": members,
        "mean_jaccard": None,
        "jaccard_per_member": [],
        "rows_in_all_loo": None,
        "share_in_all_loo": None,
        "reason": reason,
    }


def selection_stability(full: np.ndarray, loo: Sequence[np.ndarray]) -> tuple[dict, np.ndarray, np.ndarray]:
    """One selection's stability from its ids (``full``) and its M leave-one-out selections' ids (``loo``).

    Returns ``(record, ids, counts)``: ``record`` as written to ``selection/stability.json`` (members, mean_jaccard,
    jaccard_per_member, rows_in_all_loo, share_in_all_loo; ``undefined`` when M < 3); ``ids`` the full selection's
    ids sorted ascending and ``counts`` int64, aligned with them: in how many leave-one-out selections each row is
    (0..M; all 0 when M < 3).
    """
    members = len(loo)
    ids = np.sort(np.asarray(full, dtype=np.int64))
    if ids.shape[0] > 1 and not (ids[1:] > ids[:-1]).all():
        raise ValueError("a selection's ids must be unique")
    counts = np.zeros(ids.shape[0], dtype=np.int64)
    if members < MIN_MEMBERS:
        return undefined(members), ids, counts
    per_member = []
    for chosen in loo:
        chosen = np.sort(np.asarray(chosen, dtype=np.int64))
        # ids are unique within each selection: the overlap by binary search, the union from the two sizes
        pos = np.minimum(np.searchsorted(chosen, ids), max(chosen.shape[0] - 1, 0))
        hit = (chosen[pos] == ids) if chosen.shape[0] else np.zeros(ids.shape[0], dtype=bool)
        counts += hit
        overlap = int(hit.sum())
        union = ids.shape[0] + chosen.shape[0] - overlap
        per_member.append(overlap / union if union else 1.0)  # both empty: identical, as report.jaccard
    in_all = int((counts == members).sum())
    record = {
        "members": members,
        "mean_jaccard": float(np.mean(per_member)),
        "jaccard_per_member": per_member,
        "rows_in_all_loo": in_all,
        "share_in_all_loo": in_all / ids.shape[0] if ids.shape[0] else None,
    }
    return record, ids, counts
