"""Baseline scorers: random, response length and Superfiltering's IFD.

Every scorer returns float64 [N] scores ranked descending by ``selection.top_k_mask`` (ties: smaller id first).
"""

from __future__ import annotations

import numpy as np

from gradfilter_ray.scoring.gsnr import NO_RESPONSE_TOKENS, NON_FINITE

__all__ = ["IFD_GE_1", "ifd_scores", "length_scores", "random_scores"]

IFD_GE_1 = "ifd_ge_1"

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrap-around arithmetic is intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix64_int(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def random_scores(ids: np.ndarray, seed: int) -> np.ndarray:
    """Pseudo-random scores in [0, 1), float64 [N], a keyed hash of (id, seed) only.

    A row's score does not depend on row order, chunking, or which other rows exist, so the random baseline is
    reproducible across re-sharded or filtered datasets. ``ids`` int [N] (any int64, negatives included); ``seed``
    any Python int. Hash: splitmix64(splitmix64(id + gamma) xor splitmix64(seed + gamma)); the outer mix keeps
    different seeds from being a mere xor-relabelling of ids. The top 53 bits give a uniform double in [0, 1).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    key = np.uint64(_mix64_int((int(seed) + _GAMMA) & _MASK64))
    x = ids.astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        z = _mix64(_mix64(x + np.uint64(_GAMMA)) ^ key)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def length_scores(n_response_tokens: np.ndarray) -> np.ndarray:
    """Response length in tokens as float64 [N]: ranking descending keeps the longest responses first."""
    n = np.asarray(n_response_tokens)
    if n.ndim != 1:
        raise ValueError(f"n_response_tokens must be 1-D, got shape {n.shape}")
    return n.astype(np.float64)


def ifd_scores(
    loss_conditioned: np.ndarray, loss_unconditioned: np.ndarray, n_response_tokens: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Superfiltering's Instruction-Following Difficulty, float64 [N], with eligibility.

    Args: ``loss_conditioned`` float [N]: per-example mean cross-entropy (nats) over response tokens given the
    instruction; ``loss_unconditioned`` float [N]: the same over the response alone; ``n_response_tokens`` int [N],
    optional: rows with n <= 0 have no response loss at all (the caller may instead exclude them beforehand).
    IFD = PPL(response | instruction) / PPL(response) = exp(loss_cond) / exp(loss_uncond)
    = exp(loss_cond - loss_uncond) (the exp of the difference, so large losses alone do not overflow).
    Higher = harder to follow; ranked descending.
    Returns ``(ifd, eligible bool [N], reason object [N])``, reason None where eligible, else the first of
    ``"no_response_tokens"``, ``"non_finite"`` (NaN/inf loss), ``"ifd_ge_1"`` (IFD >= 1, incl. exactly 1 and
    overflow: the instruction does not help, and Superfiltering drops such rows). ``ifd`` is NaN on ineligible rows.
    """
    cond = np.asarray(loss_conditioned, dtype=np.float64)
    uncond = np.asarray(loss_unconditioned, dtype=np.float64)
    if cond.ndim != 1 or cond.shape != uncond.shape:
        raise ValueError(f"losses must both be [N], got {cond.shape} and {uncond.shape}")
    reason = np.full(cond.shape[0], None, dtype=object)
    if n_response_tokens is not None:
        n = np.asarray(n_response_tokens)
        if n.shape != cond.shape:
            raise ValueError(f"n_response_tokens must be {cond.shape}, got {n.shape}")
        reason[n <= 0] = NO_RESPONSE_TOKENS
    finite = np.isfinite(cond) & np.isfinite(uncond)
    reason[~finite & np.equal(reason, None)] = NON_FINITE
    with np.errstate(all="ignore"):
        ifd = np.exp(np.where(finite, cond - uncond, 0.0))
    # Tested on the IFD value itself, so a difference that rounds to exp(d) == 1.0 is excluded too.
    reason[(ifd >= 1.0) & np.equal(reason, None)] = IFD_GE_1
    eligible = np.equal(reason, None)
    return np.where(eligible, ifd, np.nan), eligible, reason
