"""Score and select stages (shells): each runs its streaming pass (passes.py) as one Ray task, next to the data."""

from __future__ import annotations

from gradfilter_ray.config import Config
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import run_as_task
from gradfilter_ray.scoring.passes import score_gradients, select_and_write


def run_score(cfg: Config, run: RunDir, key: str) -> dict:
    """Every scorer's columns (leave-one-out ones included), whichever `scoring.scorers` names: they cost a pass over
    numbers already read, and a new scorer in the list then re-runs selection, not scoring."""
    s = cfg.scoring
    return run_as_task(score_gradients, run.gradients, run.scores, s.eps, s.random_seed, None)


def run_select(cfg: Config, run: RunDir, key: str) -> dict:
    args = (run.scores, run.data, run.selection, list(cfg.scoring.scorers), list(cfg.selection.ratios))
    return run_as_task(select_and_write, *args)
