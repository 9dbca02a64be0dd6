"""The scorers and the selections they make: one table of names, one eligibility rule, one selection name.

Every scorer's name is also its column in ``scoring/scores.parquet``; every scorer ranks descending; a row whose
score is NaN is not eligible for that scorer (the rule that every score column obeys: G-SNR and its ablations are
NaN on rows with a reason in ``reason``, IFD on rows with a reason in ``ifd_reason``, and every scorer on rows with
no response token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# G-SNR and its ablations (gsnr.py defines each column), then the baselines (baselines.py).
GSNR_SCORERS = ("gsnr", "g_early", "g_late", "drop_abs", "drop_rel", "drop_over_var", "scale_free")
BASELINE_SCORERS = ("random", "ifd", "length")
SCORERS = GSNR_SCORERS + BASELINE_SCORERS

FULL = "full"  # the name of the run fine-tuned on the whole dataset (finetune.full), not a scorer


def eligible(scores: np.ndarray) -> np.ndarray:
    """The one eligibility rule: a row may be ranked by a scorer where its score is not NaN."""
    return ~np.isnan(np.asarray(scores, dtype=np.float64))


def check_scorer(name: str) -> str:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; valid: {', '.join(SCORERS)}")
    return name


@dataclass(frozen=True)
class Selection:
    """The top `ratio` of the rows with a response token, ranked by `scorer`: `selection/{name}.jsonl`, the run
    fine-tuned on it `finetune/{name}-{key}/`, and its evaluation `evaluation/runs/{name}-{key}/` (each under its own
    unit key). The whole dataset is `Selection.full()`, named `full`."""

    scorer: str
    ratio: float

    @property
    def name(self) -> str:
        return FULL if self.scorer == FULL else f"{self.scorer}_{self.ratio:g}"

    @classmethod
    def full(cls) -> Selection:
        return cls(FULL, 1.0)

    @classmethod
    def parse(cls, name: str) -> Selection:
        if name == FULL:
            return cls.full()
        scorer, sep, ratio = name.rpartition("_")
        try:
            parsed = cls(check_scorer(scorer), float(ratio)) if sep else None
        except ValueError:
            parsed = None
        if parsed is None or parsed.name != name:
            raise ValueError(f"{name!r} is not a selection name ({{scorer}}_{{ratio}} or {FULL!r})")
        return parsed
