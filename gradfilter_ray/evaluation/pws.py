"""Pairwise comparison outcomes and the Pairwise Winning Score (PWS) of Cherry_LLM / Superfiltering.

LLM judges favour whichever answer they read first, so every pair is judged twice with the answers swapped and only
a consistent preference counts as a win or a loss.
"""

from __future__ import annotations

from collections.abc import Iterable

OUTCOMES = ("win", "tie", "lose", "invalid")
Scores = tuple[float, float]


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def outcome(score_a_first: Scores | None, score_a_second: Scores | None) -> str:
    """The both-orders rule: "win", "lose", "tie" or "invalid" for model A against model B.

    The judge returns (assistant 1 score, assistant 2 score) on a 1-10 scale.
    - `score_a_first`: the judge's scores with A as assistant 1, i.e. (A, B).
    - `score_a_second`: the judge's scores with A as assistant 2, i.e. (B, A), exactly as the judge returned them.

    A **wins** if it scores higher than B in both orders, or higher in one and equal in the other. A **loses**
    symmetrically (lower in both, or lower in one and equal in the other). Everything else is a **tie**: equal in both
    orders, or higher in one order and lower in the other (the judge followed position, not quality).
    If either reply could not be parsed (None), the pair is "invalid": it is counted apart and left out of PWS.
    """
    if score_a_first is None or score_a_second is None:
        return "invalid"
    first = _sign(score_a_first[0] - score_a_first[1])
    second = _sign(score_a_second[1] - score_a_second[0])  # A is assistant 2 here: its scores come back swapped
    if first >= 0 and second >= 0 and first + second > 0:
        return "win"
    if first <= 0 and second <= 0 and first + second < 0:
        return "lose"
    return "tie"


def pairwise_winning_score(wins: int, ties: int, losses: int) -> float:
    """PWS = (wins - losses) / (wins + ties + losses) + 1, in [0, 2]; 1 means as good as the baseline."""
    total = wins + ties + losses
    if total == 0:
        raise ValueError("pairwise_winning_score needs at least one valid comparison (wins + ties + losses > 0)")
    return (wins - losses) / total + 1


def summarise(outcomes: Iterable[str]) -> dict[str, int | float | None]:
    """Counts `win`, `tie`, `lose`, `invalid` and `pws` (None when every comparison was invalid, or none given)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for o in outcomes:
        if o not in counts:
            raise ValueError(f"unknown outcome {o!r}; expected one of {OUTCOMES}")
        counts[o] += 1
    valid = counts["win"] + counts["tie"] + counts["lose"]
    pws = pairwise_winning_score(counts["win"], counts["tie"], counts["lose"]) if valid else None
    return {**counts, "pws": pws}
