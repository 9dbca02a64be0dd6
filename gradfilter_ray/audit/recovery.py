"""How well each scorer avoids planted rows (pure numpy: no Ray, no I/O).

For each scorer and ratio the audit selects exactly as the selection stage does (the top floor(ratio x n) of the n
rows with a response token, ties to the smaller id) and measures:

- ``planted_share``: the share of planted rows in the selection, with a 95% Wilson interval over the k selected rows
  (one seed: the interval covers the sampling of rows into the selection, not the variation between ensembles);
- ``pool_planted_share``: the share of planted rows among the rows that could be selected: what a random selection
  keeps on average, the line every scorer is compared with;
- ``auroc``: the probability that a clean row outscores a planted one (ties count half): 0.5 is chance, 1.0 ranks
  every clean row above every planted one. It needs no ratio.

Rows ``kind == "all"`` count every planted row; one row per corruption kind compares that kind's planted rows with
the clean rows (its share is of that kind alone).
"""

from __future__ import annotations

import math

import numpy as np

from gradfilter_ray.scoring.scorers import eligible
from gradfilter_ray.scoring.selection import k_for_ratio, top_k_mask

ALL = "all"
Z_95 = 1.959963984540054

COLUMNS = (
    "scorer", "ratio", "kind", "k", "selected", "planted_selected", "planted_share", "ci_low", "ci_high",
    "pool_rows", "pool_planted", "pool_planted_share", "auroc",
)  # fmt: skip


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (nan, nan) for zero trials."""
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # At 0 or k successes one bound is exactly 0 or 1; rounding must not move it inside.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def auroc(clean: np.ndarray, planted: np.ndarray) -> float:
    """P(a clean row's score > a planted row's) + P(equal) / 2, by average ranks (Mann-Whitney U); nan if either
    group is empty."""
    clean, planted = np.asarray(clean, np.float64), np.asarray(planted, np.float64)
    if not len(clean) or not len(planted):
        return math.nan
    both = np.concatenate([clean, planted])
    order = np.argsort(both, kind="stable")
    ranks = np.empty(len(both), dtype=np.float64)
    sorted_vals = both[order]
    # Average rank of each run of equal values (1-based).
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(both)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[: len(clean)].sum() - len(clean) * (len(clean) + 1) / 2.0
    return float(u / (len(clean) * len(planted)))


Z_ONE_SIDED_95 = 1.6448536269514722
Z_POWER_80 = 0.8416212335729143


def rows_for_effect(pool_share: float, effect: float, ratio: float, response_share: float = 1.0) -> int:
    """Audit rows needed for a scorer whose selection keeps `effect` fewer planted rows than random (a share of
    pool_share - effect) to be told from random: a one-sided 5% test with 80% power on the k = ratio x rows
    selected rows (normal approximation to the binomial), divided by the share of rows with a response token."""
    if not 0 < effect < pool_share < 1 or not 0 < ratio <= 1 or not 0 < response_share <= 1:
        raise ValueError("need 0 < effect < pool_share < 1, 0 < ratio <= 1 and 0 < response_share <= 1")
    p1 = pool_share - effect
    spread = Z_ONE_SIDED_95 * math.sqrt(pool_share * (1 - pool_share)) + Z_POWER_80 * math.sqrt(p1 * (1 - p1))
    k = math.ceil((spread / effect) ** 2)
    return math.ceil(k / ratio / response_share)


def recovery_table(
    scores: dict[str, np.ndarray],
    ids: np.ndarray,
    n_response_tokens: np.ndarray,
    planted_kind: np.ndarray,
    ratios: list[float],
    kinds: list[str],
) -> list[dict]:
    """One dict (COLUMNS) per scorer x ratio x kind (``"all"`` first, then each of `kinds`).

    ``scores``: scorer -> float64 [N] (NaN: the scorer may not rank that row); ``ids`` int64 [N] unique;
    ``planted_kind`` object [N], None on clean rows."""
    ids = np.asarray(ids, dtype=np.int64)
    kind_of = np.asarray(planted_kind, dtype=object)
    planted = ~np.equal(kind_of, None)
    base = np.asarray(n_response_tokens) > 0
    n_base = int(base.sum())
    out = []
    for scorer, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        ok = eligible(values) & base
        for ratio in ratios:
            k = k_for_ratio(ratio, n_base)
            chosen = top_k_mask(values, ids, ok, k)
            for kind in (ALL, *kinds):
                group = planted if kind == ALL else np.equal(kind_of, kind)
                # A kind's share is measured among its own planted rows and the clean rows.
                compared = group | ~planted
                hits = int((chosen & group).sum())
                selected = int(chosen.sum()) if kind == ALL else int((chosen & compared).sum())
                low, high = wilson_interval(hits, selected)
                pool = int((base & compared).sum())
                pool_planted = int((base & group).sum())
                out.append(
                    {
                        "scorer": scorer,
                        "ratio": ratio,
                        "kind": kind,
                        "k": k,
                        "selected": selected,
                        "planted_selected": hits,
                        "planted_share": hits / selected if selected else math.nan,
                        "ci_low": low,
                        "ci_high": high,
                        "pool_rows": pool,
                        "pool_planted": pool_planted,
                        "pool_planted_share": pool_planted / pool if pool else math.nan,
                        "auroc": auroc(values[ok & ~planted], values[ok & group]),
                    }
                )
    return out


def headline_ratio(ratios: list[float]) -> float:
    """The ratio the one-line summary speaks of: 10% when selected, else the middle ratio."""
    return 0.1 if 0.1 in ratios else sorted(ratios)[len(ratios) // 2]


def headline(rows: list[dict], ratio: float, scorers: tuple[str, ...] = ("gsnr", "random", "ifd")) -> str | None:
    """One line for the closing summary, e.g. 'at 10% gsnr kept 4.1% planted rows (95% CI 2.0-8.1%), random
    20.0%, ifd 13.0%; planted 20.0% of the pool'. None when no row matches."""
    at = {r["scorer"]: r for r in rows if r["kind"] == ALL and r["ratio"] == ratio and r["scorer"] in scorers}
    if not at:
        return None
    names = [s for s in scorers if s in at]
    first = at[names[0]]
    parts = [
        f"at {ratio:.0%} {names[0]} kept {first['planted_share']:.1%} planted rows "
        f"(95% CI {first['ci_low']:.1%}-{first['ci_high']:.1%})"
    ]
    parts += [f"{s} {at[s]['planted_share']:.1%}" for s in names[1:]]
    return ", ".join(parts) + f"; {first['pool_planted_share']:.1%} of the pool is planted"


def markdown(rows: list[dict], corrupt_fraction: float, invisible: int = 0) -> str:
    """The table as Markdown: one line per scorer and ratio (every planted row), then AUROC by kind. `invisible`:
    planted rows whose corruption the proxy never sees (cut off by max_length), counted as clean."""
    note = f"; {invisible} planted rows corrupted only past proxy.max_length count as clean" if invisible else ""
    lines = [
        f"Planted share of each selection (random keeps the pool's share; {corrupt_fraction:.0%} planted{note}).",
        "",
        "| scorer | ratio | k | planted share | 95% CI | pool planted share | AUROC clean vs planted |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] != ALL:
            continue
        lines.append(
            f"| {r['scorer']} | {r['ratio']:g} | {r['k']} | {_pct(r['planted_share'])} | "
            f"{_pct(r['ci_low'])}-{_pct(r['ci_high'])} | {_pct(r['pool_planted_share'])} | {_num(r['auroc'])} |"
        )
    kinds = sorted({r["kind"] for r in rows if r["kind"] != ALL})
    if kinds:
        first_ratio = headline_ratio(sorted({r["ratio"] for r in rows}))
        lines += ["", "AUROC clean vs each kind, and each kind's planted share at ratio " + f"{first_ratio:g}:", ""]
        lines.append("| scorer | " + " | ".join(kinds) + " |")
        lines.append("|---|" + "---|" * len(kinds))
        for scorer in dict.fromkeys(r["scorer"] for r in rows):
            cells = []
            for kind in kinds:
                r = next(x for x in rows if x["scorer"] == scorer and x["kind"] == kind and x["ratio"] == first_ratio)
                cells.append(f"{_num(r['auroc'])} ({_pct(r['planted_share'])})")
            lines.append(f"| {scorer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.1%}"


def _num(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"
