"""Selection report: `report/index.html` with PNG plots, built only from the run directory's Parquet outputs.

Plots sample at most `MAX_POINTS` rows so a million-row run renders in seconds; tables are computed on all rows.
The page uses relative links only, so it opens as a plain file in a browser.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from gradfilter_ray.config import Config
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.scoring.stage import selection_name

MAX_POINTS = 50_000
SHOWN_EXAMPLES = 8
STYLE = "body{font-family:sans-serif;max-width:1400px;margin:2em} td,th{border:1px solid #ccc;padding:3px}"
PLOT_COLUMNS = ["id", "eligible", "gsnr", "drop_rel", "noise", "g_early", "g_late", "ifd", "n_response_tokens"]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.union1d(a, b).size
    return float(np.intersect1d(a, b).size / union) if union else 1.0


def overlap_matrix(selected: dict[str, np.ndarray], scorers: list[str]) -> np.ndarray:
    return np.array([[jaccard(selected[a], selected[b]) for b in scorers] for a in scorers])


def _sample(table: pa.Table, seed: int = 0) -> pa.Table:
    if table.num_rows <= MAX_POINTS:
        return table
    picks = np.sort(np.random.default_rng(seed).choice(table.num_rows, MAX_POINTS, replace=False))
    return table.take(pa.array(picks))


def _plots(out: Path, scores: pa.Table, selected: dict[str, np.ndarray], cfg: Config, scorers: list[str]) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    eligible = scores.filter(scores["eligible"])
    sample = _sample(eligible)

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, column, log in zip(axes, ["gsnr", "drop_rel", "noise", "ifd"], [True, False, True, False]):
        values = scores[column].to_numpy(zero_copy_only=False)
        values = values[np.isfinite(values)]
        if log:
            values = np.sign(values) * np.log10(1 + np.abs(values))
        ax.hist(values, bins=60, color="#4477aa")
        ax.set_title(f"{column}{' (signed log10(1+|x|))' if log else ''}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "score_histograms.png", dpi=90)
    figures.append(("Score distributions (eligible rows)", "score_histograms.png"))

    largest = max(cfg.selection.ratios)
    chosen = selected.get(selection_name("gsnr", largest), np.empty(0, np.int64))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ids = sample["id"].to_numpy()
    hit = np.isin(ids, chosen)
    noise, drop = sample["noise"].to_numpy(), sample["drop_rel"].to_numpy()
    ax.scatter(noise[~hit], drop[~hit], s=4, alpha=0.4, color="#bbbbbb", label="not selected")
    ax.scatter(noise[hit], drop[hit], s=6, alpha=0.8, color="#cc3311", label=f"G-SNR top {largest:g}")
    ax.set_xscale("symlog", linthresh=max(float(np.percentile(noise, 5)) if len(noise) else 1e-6, 1e-12))
    ax.set_xlabel("late-checkpoint variance over members (noise)")
    ax.set_ylabel("relative drop (G_early - G_late) / G_early")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "drop_vs_noise.png", dpi=90)
    figures.append(("Relative drop vs late variance, G-SNR selection highlighted", "drop_vs_noise.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    lengths = scores["n_response_tokens"].to_numpy()
    all_ids = scores["id"].to_numpy()
    bins = np.linspace(0, max(1, lengths.max()), 40)
    ax.hist(lengths, bins=bins, density=True, alpha=0.5, label="all rows")
    for scorer in [s for s in ("gsnr", "ifd", "random") if s in scorers]:
        name = selection_name(scorer, largest)
        ax.hist(lengths[np.isin(all_ids, selected[name])], bins=bins, density=True, histtype="step", label=name)
    ax.set_xlabel("response tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "response_lengths.png", dpi=90)
    figures.append(("Response length: selected vs all", "response_lengths.png"))

    ranked = [s for s in scorers if s != "full"]
    ratios = list(cfg.selection.ratios)
    fig, axes = plt.subplots(1, len(ratios), figsize=(4.2 * len(ratios), 4), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        matrix = overlap_matrix({s: selected[selection_name(s, ratio)] for s in ranked}, ranked)
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(ranked)), ranked, rotation=70, fontsize=7)
        ax.set_yticks(range(len(ranked)), ranked, fontsize=7)
        for i in range(len(ranked)):
            for j in range(len(ranked)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
        ax.set_title(f"Jaccard overlap at ratio {ratio:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "overlap.png", dpi=90)
    figures.append(("Overlap between scorers' selections", "overlap.png"))
    plt.close("all")
    return figures


def _examples_table(rundir: RunDir, scores: pa.Table) -> str:
    eligible = scores.filter(scores["eligible"])
    if eligible.num_rows == 0:
        return "<p>No eligible rows.</p>"
    order = pc.sort_indices(eligible, sort_keys=[("gsnr", "descending"), ("id", "ascending")]).to_numpy()
    picks = np.concatenate([order[:SHOWN_EXAMPLES], order[-SHOWN_EXAMPLES:]])
    shown = eligible.take(pa.array(picks))
    texts = pads.dataset(rundir.data, format="parquet").to_table(
        columns=["id", "instruction", "output"], filter=pc.is_in(pc.field("id"), value_set=shown["id"])
    )
    text_by_id = {r["id"]: r for r in texts.to_pylist()}
    rows = []
    for rank, row in enumerate(shown.to_pylist()):
        label = "top" if rank < SHOWN_EXAMPLES else "bottom"
        text = text_by_id.get(row["id"], {})
        rows.append(
            "<tr>"
            + f"<td>{label}</td><td>{row['id']}</td>"
            + "".join(f"<td>{row[c]:.4g}</td>" for c in ("gsnr", "drop_rel", "noise", "g_early", "g_late"))
            + f"<td>{html.escape(str(text.get('instruction', ''))[:160])}</td>"
            + f"<td>{html.escape(str(text.get('output', ''))[:160])}</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("", "id", "G-SNR", "rel. drop", "noise", "G_early", "G_late", "instruction", "output")
    )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _accounting(manifest: dict) -> str:
    stages = manifest.get("stages", {})
    lines = []
    if "ingest" in stages:
        s = stages["ingest"]
        lines.append(
            f"ingest: {s['rows_in']} rows in = {s['rows_kept']} kept + {s['rows_rejected']} rejected "
            f"{json.dumps(s.get('rejects_by_reason', {}))}"
        )
    if "score" in stages:
        s = stages["score"]
        lines.append(
            f"score: {s['rows']} rows = {s['rows_eligible']} eligible for G-SNR + {s['rows_ineligible']} not "
            f"{json.dumps(s.get('ineligible_by_reason', {}))}"
        )
    if "select" in stages:
        for name, c in stages["select"].get("selections", {}).items():
            lines.append(f"select {name}: {c['selected']} of k={c['k']} ({c['n_eligible']} eligible)")
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"


def run(cfg: Config, rundir: RunDir, staged: Path) -> tuple[list[str], dict]:
    out = staged / "report"
    out.mkdir()
    scores = pq.read_table(rundir.root / "scores.parquet", columns=PLOT_COLUMNS)
    scorers = list(cfg.scoring.scorers)
    selected_dir = rundir.root / "selected"
    selected = {
        path.stem: pq.read_table(path, columns=["id"])["id"].to_numpy() for path in selected_dir.glob("*.parquet")
    }
    figures = _plots(out, scores, selected, cfg, scorers)
    body = [
        "<h1>gradfilter-ray selection report</h1>",
        f"<p>run: {html.escape(rundir.location)}</p>",
        "<h2>Row accounting</h2>",
        _accounting(rundir.read_manifest()),
    ]
    for title, png in figures:
        body.append(f"<h2>{html.escape(title)}</h2><img src='{png}' alt='{html.escape(title)}'>")
    body.append("<h2>Top and bottom examples by G-SNR</h2>")
    body.append(_examples_table(rundir, scores))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>gradfilter-ray report</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )
    (out / "index.html").write_text(page, encoding="utf-8")
    return ["report"], {"figures": len(figures), "selections": len(selected)}
