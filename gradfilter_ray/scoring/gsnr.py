"""G-SNR (GradFiltering) and its ablations, from per-example squared LoRA-gradient norms of an ensemble of M proxies.

For example i and ensemble member m (m = 1..M), with g_{i,m}^e / g_{i,m}^l the gradient of example i's loss w.r.t.
member m's LoRA adapter after the early / late epoch:

- G_e(i)   = (1/M) sum_m ||g_{i,m}^e||^2             mean early squared gradient norm (``g_early``)
- G_l(i)   = (1/M) sum_m ||g_{i,m}^l||^2             mean late squared gradient norm (``g_late``)
- drop(i)  = (G_e(i) - G_l(i)) / G_e(i)              relative drop of the gradient magnitude (``drop_rel``)
- noise(i) = (1/M) sum_m (||g_{i,m}^l||^2 - G_l(i))^2   spread of the late squared norms over members (``noise``)
- G-SNR(i) = drop(i) / (noise(i) + eps)              high = consistently learned across members (``gsnr``)

Units: norms are squared gradient norms (loss units squared per parameter unit squared); ``drop_rel`` is unitless,
``noise`` has squared-norm units squared, so ``gsnr`` is not scale-free (``scale_free`` is the ablation that is).

Every column is computed by one code path (``components``); the ablation scorers are columns of the same table,
named as the scorers that rank by them (``scorers.py``).
Rows whose inputs make a score undefined are ineligible, carry a reason string and NaN in every column, and must
never be ranked (see ``eligibility`` and ``score_table``).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "NON_FINITE",
    "NON_FINITE_SCORE",
    "INVALID_NORM",
    "NO_RESPONSE_TOKENS",
    "SCORE_COLUMNS",
    "ZERO_EARLY_NORM",
    "components",
    "eligibility",
    "score_table",
]

# Ineligibility reasons, in priority order (a row gets the first that applies).
NO_RESPONSE_TOKENS = "no_response_tokens"
NON_FINITE = "non_finite"
INVALID_NORM = "invalid_norm"
ZERO_EARLY_NORM = "zero_early_norm"
NON_FINITE_SCORE = "non_finite_score"

SCORE_COLUMNS = ("g_early", "g_late", "drop_abs", "drop_rel", "noise", "gsnr", "drop_over_var", "scale_free")


def _check_norms(sq_early: np.ndarray, sq_late: np.ndarray, n_response_tokens: np.ndarray) -> None:
    if sq_early.ndim != 2 or sq_early.shape != sq_late.shape:
        raise ValueError(f"sq_early and sq_late must both be [N, M], got {sq_early.shape} and {sq_late.shape}")
    if sq_early.shape[1] < 1:
        raise ValueError("need at least one ensemble member (M >= 1)")
    if n_response_tokens.shape != (sq_early.shape[0],):
        raise ValueError(f"n_response_tokens must be [{sq_early.shape[0]}], got {n_response_tokens.shape}")


def _rows_finite(a: np.ndarray, n: int, name: str) -> np.ndarray:
    if a.shape[:1] != (n,):
        raise ValueError(f"{name} must have N={n} rows, got shape {a.shape}")
    return np.isfinite(a.reshape(n, -1)).all(axis=1)


def _assign(reason: np.ndarray, condition: np.ndarray, label: str) -> None:
    # Only rows still without a reason: the earlier (higher-priority) reason wins.
    reason[condition & np.equal(reason, None)] = label


def _reasons(
    sq_early: np.ndarray, sq_late: np.ndarray, n_response_tokens: np.ndarray, losses_finite: np.ndarray | None = None
) -> np.ndarray:
    """Reason per row (object [N], None where eligible), assigned in priority order."""
    n = sq_early.shape[0]
    finite = _rows_finite(sq_early, n, "sq_early") & _rows_finite(sq_late, n, "sq_late")
    if losses_finite is not None:
        finite &= losses_finite
    reason = np.full(n, None, dtype=object)
    # n <= 0: a negative count is as meaningless as zero, and no response tokens means no gradient to measure.
    _assign(reason, n_response_tokens <= 0, NO_RESPONSE_TOKENS)
    _assign(reason, ~finite, NON_FINITE)
    with np.errstate(all="ignore"):
        _assign(reason, (sq_early < 0).any(axis=1) | (sq_late < 0).any(axis=1), INVALID_NORM)
        _assign(reason, sq_early.mean(axis=1) == 0, ZERO_EARLY_NORM)
    return reason


def eligibility(
    sq_early: np.ndarray,
    sq_late: np.ndarray,
    loss_early: np.ndarray,
    loss_late: np.ndarray,
    n_response_tokens: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Which rows can be scored, before computing scores.

    Args: ``sq_early``, ``sq_late`` float [N, M] squared norms; ``loss_early``, ``loss_late`` float [N, M] (or [N])
    per-example mean token losses in nats; ``n_response_tokens`` int [N].
    Returns ``(eligible bool [N], reason object [N])``; reason is None for eligible rows, else the first that applies:
    ``"no_response_tokens"`` (n <= 0), ``"non_finite"`` (NaN/inf in the row's norms or losses), ``"invalid_norm"``
    (a negative squared norm), ``"zero_early_norm"`` (G_e == 0: the relative drop is undefined).
    Scores can still overflow on eligible rows; ``score_table`` adds ``"non_finite_score"`` for those.
    """
    sq_early, sq_late = np.asarray(sq_early, dtype=np.float64), np.asarray(sq_late, dtype=np.float64)
    n_response_tokens = np.asarray(n_response_tokens)
    _check_norms(sq_early, sq_late, n_response_tokens)
    n = sq_early.shape[0]
    losses_finite = _rows_finite(np.asarray(loss_early, np.float64), n, "loss_early")
    losses_finite &= _rows_finite(np.asarray(loss_late, np.float64), n, "loss_late")
    reason = _reasons(sq_early, sq_late, n_response_tokens, losses_finite)
    return np.equal(reason, None), reason


def components(
    sq_early: np.ndarray, sq_late: np.ndarray, n_response_tokens: np.ndarray, eps: float
) -> dict[str, np.ndarray]:
    """Every G-SNR component and ablation column, float64 [N] each (see the module docstring for definitions).

    Args: ``sq_early``, ``sq_late`` float [N, M] squared gradient norms per member; ``n_response_tokens`` int [N];
    ``eps`` >= 0 added to the variance in denominators.
    Columns: ``g_early``, ``g_late``, ``drop_abs`` = G_e - G_l, ``drop_rel`` = drop_abs / G_e, ``noise`` = population
    variance (ddof=0) over members of the late squared norms, so M=1 gives noise 0 and gsnr = drop_rel / eps,
    ``gsnr`` = drop_rel / (noise + eps), ``drop_over_var`` = drop_abs / (noise + eps),
    ``scale_free`` = drop_rel / (noise / G_l^2 + eps), where noise / G_l^2 is taken as 0 when G_l == 0 (all late
    norms are then 0, so the variance is 0 too).
    Rows ineligible by their norms or token counts (see ``eligibility``) are NaN in every column, without warnings.
    Eligible rows can still overflow to inf / NaN, or divide by zero when eps == 0; ``score_table`` catches that.
    """
    if not (np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    sq_early, sq_late = np.asarray(sq_early, dtype=np.float64), np.asarray(sq_late, dtype=np.float64)
    n_response_tokens = np.asarray(n_response_tokens)
    _check_norms(sq_early, sq_late, n_response_tokens)
    ok = np.equal(_reasons(sq_early, sq_late, n_response_tokens), None)
    # Neutral stand-ins on ineligible rows keep the arithmetic warning-free; those rows are NaN-ed below.
    early = np.where(ok[:, None], sq_early, 1.0)
    late = np.where(ok[:, None], sq_late, 1.0)
    with np.errstate(all="ignore"):
        g_early = early.mean(axis=1)
        g_late = late.mean(axis=1)
        drop_abs = g_early - g_late
        drop_rel = drop_abs / g_early
        noise = late.var(axis=1)
        gsnr = drop_rel / (noise + eps)
        drop_over_var = drop_abs / (noise + eps)
        g_late_sq = g_late * g_late
        rel_noise = np.divide(noise, g_late_sq, out=np.zeros_like(noise), where=g_late_sq > 0)
        scale_free = drop_rel / (rel_noise + eps)
    cols = {
        "g_early": g_early,
        "g_late": g_late,
        "drop_abs": drop_abs,
        "drop_rel": drop_rel,
        "noise": noise,
        "gsnr": gsnr,
        "drop_over_var": drop_over_var,
        "scale_free": scale_free,
    }
    return {name: np.where(ok, col, np.nan) for name, col in cols.items()}


def score_table(
    sq_early: np.ndarray,
    sq_late: np.ndarray,
    loss_early: np.ndarray,
    loss_late: np.ndarray,
    n_response_tokens: np.ndarray,
    eps: float,
) -> dict[str, np.ndarray]:
    """All ``components`` columns plus ``eligible`` (bool [N]) and ``reason`` (object [N], None where eligible).

    Eligibility is shared by every column, so every scorer ranks the same pool of rows: a row with any non-finite
    column (overflow, or eps == 0 with zero noise) is ineligible for all scorers with reason ``"non_finite_score"``.
    Every column is NaN on every ineligible row and finite on every eligible row.
    """
    eligible, reason = eligibility(sq_early, sq_late, loss_early, loss_late, n_response_tokens)
    cols = components(sq_early, sq_late, n_response_tokens, eps)
    finite = np.ones_like(eligible)
    for col in cols.values():
        finite &= np.isfinite(col)
    reason = reason.copy()
    reason[eligible & ~finite] = NON_FINITE_SCORE
    eligible = eligible & finite
    table = {name: np.where(eligible, col, np.nan) for name, col in cols.items()}
    table["eligible"] = eligible
    table["reason"] = reason
    return table
