"""Which rows share a batch in one member's epoch (pure numpy: no torch, no Ray).

A member's epoch is a function of (member seed, epoch) alone, so a resumed member replays exactly the batches an
uninterrupted one would. `random` cuts the epoch's permutation into consecutive batches. `length_grouped` cuts the
same permutation into windows of `length_group_batches` batches, sorts each window by length so that rows of similar
length share a batch (a batch is padded to its longest row: on Alpaca uniformly random batches spend about half of
their compute on padding), and shuffles the order of the batches so that lengths do not drift across the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradfilter_ray.config import EnsembleConfig

# Distinguishes the batch-order stream from the permutation's, which is seeded from the same (member seed, epoch).
_BATCH_ORDER_STREAM = 1


def epoch_seed(member_seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([member_seed, epoch]).generate_state(1)[0])


def epoch_order(n: int, member_seed: int, epoch: int) -> np.ndarray:
    """This member's permutation of the rows for this epoch (the same on every resume)."""
    return np.random.default_rng(epoch_seed(member_seed, epoch)).permutation(n)


def random_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive slices of the permutation: every batch a uniformly random draw of rows."""
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def length_grouped_batches(
    order: np.ndarray, lengths: np.ndarray, batch_size: int, window_batches: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Windows of `window_batches * batch_size` rows of `order`, each sorted by length (stable, so ties keep the
    permutation's order) and cut into batches; then the batches of all windows in an order drawn from `rng`.
    A window is a whole number of batches, so only the epoch's very last batch can be short."""
    window = window_batches * batch_size
    batches = []
    for start in range(0, len(order), window):
        rows = order[start : start + window]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batches.extend(random_batches(rows, batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def epoch_batches(lengths: np.ndarray, cfg: EnsembleConfig, member_seed: int, epoch: int) -> list[np.ndarray]:
    """The row indices of every batch of this member's epoch, in training order: every row exactly once."""
    lengths = np.asarray(lengths)
    order = epoch_order(len(lengths), member_seed, epoch)
    if cfg.batching == "random":
        return random_batches(order, cfg.batch_size)
    rng = np.random.default_rng([member_seed, epoch, _BATCH_ORDER_STREAM])
    return length_grouped_batches(order, lengths, cfg.batch_size, window_batches(len(lengths), cfg), rng)


def window_batches(rows: int, cfg: EnsembleConfig) -> int:
    """`length_group_batches`, but at most a quarter of the epoch: a window that held the whole epoch would give
    every member (and every epoch) the same batches up to ties, and the ensemble's spread is what G-SNR measures."""
    batches = -(-rows // cfg.batch_size)
    return max(1, min(cfg.length_group_batches, batches // 4))


@dataclass(frozen=True)
class PaddingStats:
    """Tokens of one epoch: real ones (the rows' own) and computed ones (every row padded to its batch's longest)."""

    real_tokens: int
    computed_tokens: int

    @property
    def efficiency(self) -> float:
        """Share of the computed tokens that are real: 1.0 means no compute went to padding."""
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 1.0


def padding_stats(lengths: np.ndarray, batches: list[np.ndarray]) -> PaddingStats:
    lengths = np.asarray(lengths, dtype=np.int64)
    real = sum(int(lengths[b].sum()) for b in batches)
    computed = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return PaddingStats(real_tokens=real, computed_tokens=computed)


def packed_padding_stats(lengths: np.ndarray, packed_batches: list[list[np.ndarray]]) -> PaddingStats:
    """Tokens of one epoch whose batches are packed padding-free (`ensemble.packing`): per batch, its bins (arrays of
    row indices, one per packed sequence); computed tokens = every packed sequence padded to its batch's fullest."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = sum(int(lengths[rows].sum()) for bins in packed_batches for rows in bins)
    computed = sum(len(bins) * max(int(lengths[rows].sum()) for rows in bins) for bins in packed_batches if bins)
    return PaddingStats(real_tokens=real, computed_tokens=computed)
