"""Selection report: `report/index.html` with PNG plots, built only from the run directory's outputs.

Everything that computes or renders is pure and does no I/O: `summarize_run` (the run's summary from its manifest),
`summary_lines` (the same summary as plain text, for the CLI), `render_plots` (PNG bytes by file name),
`pick_examples` and `render_page` (the HTML). Only `run`, at the bottom, reads and writes files.

The page opens with the summary, the row accounting and the selections' stability, then the plots (sized to fit a
1280 px wide window), then the top and bottom examples. Plots sample at most `MAX_POINTS` rows so a million-row run
renders in seconds; tables are computed on all rows. The page uses relative links only, so it opens as a plain file in
a browser.
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from gradfilter_ray.audit.stage import RECOVERY_JSON, RECOVERY_TABLE
from gradfilter_ray.config import Config
from gradfilter_ray.parquet_stream import read_columns
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import run_as_task
from gradfilter_ray.scoring.passes import STABILITY_FILE
from gradfilter_ray.scoring.scorers import FULL, Selection, eligible

MAX_POINTS = 50_000
SHOWN_EXAMPLES = 8
PLOT_COLUMNS = ["id", "gsnr", "drop_rel", "noise", "g_early", "g_late", "ifd", "n_response_tokens"]
REPORT_PAGE = "report/index.html"  # relative to the run directory
AUDIT_FIGURE = "audit_recovery.png"
COMPARE_TABLE = "evaluation/compare.md"
DPI = 100
PAGE_WIDTH_PX = 1200  # the body's widest box; every figure is at most this wide at DPI (and CSS scales it down)
STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em}"
    "img{max-width:100%;height:auto}"
    "table{border-collapse:collapse;margin-bottom:1em}"
    "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
    "td.n{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}td.t{overflow-wrap:anywhere}"
    ".figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(460px,100%),1fr));gap:1em}"
    "figure{margin:0;min-width:0}figure.wide{grid-column:1/-1}figcaption{font-weight:bold;margin-bottom:.3em}"
)
# file name -> (caption, spans the page's full width)
FIGURES = {
    "score_histograms.png": ("Score distributions (eligible rows)", True),
    "drop_vs_noise.png": ("Relative drop vs late variance, G-SNR selection highlighted", False),
    "response_lengths.png": ("Response length: selected vs all", False),
    "overlap.png": ("Overlap between scorers' selections", True),
    AUDIT_FIGURE: (
        "Planted-noise audit: planted share of each selection (95% interval); dashed: what random keeps",
        True,
    ),
}


# ----- summary (pure) -----


def _join(location: str, rel: str) -> str:
    return f"{location.rstrip('/')}/{rel}" if location else rel


def summarize_run(manifest: dict, location: str | None = None, keys: dict[str, str] | None = None) -> dict[str, Any]:
    """The run's summary from its manifest: rows in / kept / rejected (by reason) from the data record, rows
    eligible for G-SNR (and ineligible by reason) from the scoring record, rows selected per selection from the
    selection record, and where the report and the comparison are (None while their stage has not run).

    `location` is the run directory as the user named it (default: the manifest's `config.output_dir`). Only done
    records count, and with `keys` (stage -> key of the config at hand) only those done for that config, so the
    summary never mixes configs. A count is None when its stage has no such record."""
    stages = {
        name: record
        for name, record in (manifest.get("stages", {}) or {}).items()
        if (record or {}).get("status") == "done" and (keys is None or record.get("key") == keys.get(name))
    }
    if location is None:
        location = str((manifest.get("config") or {}).get("output_dir") or "")
    ingest, score, select = stages.get("data") or {}, stages.get("scoring") or {}, stages.get("selection") or {}

    def done(name: str) -> bool:
        return (stages.get(name) or {}).get("status") == "done"

    return {
        "location": location,
        "rows_in": ingest.get("rows_in"),
        "rows_kept": ingest.get("rows_kept"),
        "rows_rejected": ingest.get("rows_rejected"),
        "rejects_by_reason": dict(ingest.get("rejects_by_reason") or {}),
        "rows_scored": score.get("rows"),
        "rows_eligible": score.get("rows_eligible"),
        "rows_ineligible": score.get("rows_ineligible"),
        "ineligible_by_reason": dict(score.get("ineligible_by_reason") or {}),
        "rows_with_response": select.get("rows_with_response"),
        "selections": {
            name: {"selected": c.get("selected"), "k": c.get("k"), "n_eligible": c.get("n_eligible")}
            for name, c in (select.get("selections") or {}).items()
        },
        "selection_dir": _join(location, "selection") if done("selection") else None,
        "report": _join(location, REPORT_PAGE) if done("report") else None,
        "compare": _join(location, COMPARE_TABLE) if done("evaluation") else None,
        "audit": (stages.get("audit") or {}).get("headline"),
        "audit_table": _join(location, f"audit/{RECOVERY_TABLE}") if done("audit") else None,
    }


def _reasons(by_reason: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in by_reason.items())


def _share(part: int | None, whole: int | None) -> str:
    return f"{100 * part / whole:.1f} %" if part is not None and whole else "-"


def selection_grid(selections: dict[str, dict]) -> tuple[list[str], dict[str, dict[str, int | None]]]:
    """Selection name -> counts, as ratio labels (ascending, "all" last) and scorer -> {ratio label: selected}.
    A name `<scorer>_<ratio>` goes to its scorer's row and ratio's column; any other name (`full`) to "all"."""
    grid: dict[str, dict[str, int | None]] = {}
    labels: set[str] = set()
    for name, counts in selections.items():
        try:
            selection = Selection.parse(name)
            scorer, label = selection.scorer, "all" if selection.scorer == FULL else f"{selection.ratio:g}"
        except ValueError:
            scorer, label = name, "all"
        labels.add(label)
        grid.setdefault(scorer, {})[label] = counts.get("selected")
    ordered = sorted(labels - {"all"}, key=float) + (["all"] if "all" in labels else [])
    return ordered, grid


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as plain text lines (what the CLI prints at the end of a run)."""
    s = summary
    lines = [f"run directory: {s['location'] or '.'}"]
    if s["rows_in"] is None:
        lines.append("rows: the data stage has not run")
    else:
        rejected = f"{s['rows_rejected']} rejected" + (
            f" ({_reasons(s['rejects_by_reason'])})" if s["rejects_by_reason"] else ""
        )
        lines.append(f"rows in: {s['rows_in']} = {s['rows_kept']} kept + {rejected}")
    if s["rows_scored"] is not None:
        ineligible = f"{s['rows_ineligible']} not" + (
            f" ({_reasons(s['ineligible_by_reason'])})" if s["ineligible_by_reason"] else ""
        )
        lines.append(f"eligible for G-SNR: {s['rows_eligible']} of {s['rows_scored']} scored, {ineligible}")
    if s["selections"]:
        labels, grid = selection_grid(s["selections"])
        lines.append(
            f"selected rows by scorer and ratio (of {_num_text(s['rows_with_response'])} rows with a response; "
            "subset <scorer>_<ratio>):"
        )
        width = max(len("scorer"), *(len(scorer) for scorer in grid))
        cells = [max(6, len(label)) for label in labels]
        lines.append(f"  {'scorer':<{width}}" + "".join(f" {label:>{w}}" for label, w in zip(labels, cells)))
        for scorer, row in grid.items():
            counts = "".join(f" {_num_text(row.get(label)):>{w}}" for label, w in zip(labels, cells))
            lines.append(f"  {scorer:<{width}}{counts}")
        if s["selection_dir"]:
            lines.append(f"subsets: {s['selection_dir']}/<scorer>_<ratio>.jsonl (and .parquet)")
    else:
        lines.append("selected: the selection stage has not run")
    if s.get("audit"):
        lines.append(f"audit: {s['audit']} ({s['audit_table']})")
    lines.append(f"report: {s['report'] or 'not built yet (gradfilter-ray report)'}")
    lines.append(f"comparison: {s['compare'] or 'not built yet (gradfilter-ray evaluation)'}")
    return lines


def _num_text(value: Any) -> str:
    return "-" if value is None else str(value)


# ----- HTML (pure) -----


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    return "-" if value is None else _esc(value)


def _summary_table(s: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = [("run directory", _esc(s["location"] or "."))]
    if s["rows_in"] is not None:
        rows += [
            ("rows in", _num(s["rows_in"])),
            ("kept", _num(s["rows_kept"])),
            ("rejected", _num(s["rows_rejected"])),
        ]
    if s["rows_scored"] is not None:
        rows.append(("eligible for G-SNR", f"{_num(s['rows_eligible'])} of {_num(s['rows_scored'])} scored"))
    if s["selections"]:
        rows.append(("selected", _selection_grid_table(s)))
    if s["selection_dir"]:
        rows.append(
            ("subsets", "<a href='../selection/'>selection/</a> (&lt;scorer&gt;_&lt;ratio&gt;.jsonl and .parquet)")
        )
    rows.append(("report", "this page"))
    compare = f"<a href='../{COMPARE_TABLE}'>{COMPARE_TABLE}</a>"
    rows.append(("comparison", compare if s["compare"] else f"{compare} (written by the evaluation stage)"))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='summary'>{body}</table>"


def _selection_grid_table(s: dict[str, Any]) -> str:
    labels, grid = selection_grid(s["selections"])
    base = s["rows_with_response"]
    head = "<tr><th>scorer \\ ratio</th>" + "".join(f"<th class='n'>{_esc(label)}</th>" for label in labels) + "</tr>"
    body = "".join(
        f"<tr><td>{_esc(scorer)}</td>"
        + "".join(
            f"<td class='n'>{_num(row.get(label))}"
            + (f" <small>({_share(row[label], base)})</small>" if row.get(label) is not None else "")
            + "</td>"
            for label in labels
        )
        + "</tr>"
        for scorer, row in grid.items()
    )
    caption = f"<caption>rows selected, of {_num(base)} with a response</caption>"
    return f"<table class='grid'>{caption}{head}{body}</table>"


def accounting_rows(s: dict[str, Any]) -> list[tuple[str, str, int | None, str]]:
    """(stage, what, rows, note) for every line of the row accounting."""
    rows: list[tuple[str, str, int | None, str]] = []
    if s["rows_in"] is not None:
        rows.append(("data", "rows in", s["rows_in"], "= kept + rejected"))
        rows.append(("data", "kept", s["rows_kept"], _share(s["rows_kept"], s["rows_in"]) + " of rows in"))
        rows.append(("data", "rejected", s["rows_rejected"], _share(s["rows_rejected"], s["rows_in"])))
        for reason, n in s["rejects_by_reason"].items():
            rows.append(("data", f"rejected: {reason}", n, ""))
    if s["rows_scored"] is not None:
        rows.append(("scoring", "scored", s["rows_scored"], "= eligible + ineligible"))
        rows.append(
            ("scoring", "eligible for G-SNR", s["rows_eligible"], _share(s["rows_eligible"], s["rows_scored"]))
        )
        rows.append(("scoring", "ineligible for G-SNR", s["rows_ineligible"], ""))
        for reason, n in s["ineligible_by_reason"].items():
            rows.append(("scoring", f"ineligible: {reason}", n, ""))
    if s["rows_with_response"] is not None:
        rows.append(("selection", "rows with a response", s["rows_with_response"], "k = ratio x these rows"))
    for name, c in s["selections"].items():
        note = f"k={_num(c['k'])}, {_num(c['n_eligible'])} eligible for this scorer"
        rows.append(("selection", f"selected: {name}", c["selected"], note))
    return rows


def _accounting_table(s: dict[str, Any]) -> str:
    rows = accounting_rows(s)
    if not rows:
        return "<p>No stage has recorded its row counts.</p>"
    head = "<tr><th>stage</th><th>rows</th><th class='n'>count</th><th>note</th></tr>"
    body = "".join(
        f"<tr><td>{_esc(stage)}</td><td>{_esc(what)}</td><td class='n'>{_num(n)}</td><td>{_esc(note)}</td></tr>"
        for stage, what, n, note in rows
    )
    return f"<table class='accounting'>{head}{body}</table>"


STABILITY_NOTE = (
    "Each ensemble-based selection is made again M times, each time with one ensemble member's gradient norms left "
    "out: mean Jaccard is its overlap with the full selection, averaged over the M; the share is of the selected "
    "rows that every leave-one-out selection keeps. Low overlap means the selection depends on single members: the "
    "ensemble needs more members."
)


def _stability_table(stability: dict[str, dict]) -> str:
    """selection/stability.json (name -> record) as a table: mean Jaccard, share in every leave-one-out selection."""
    head = (
        "<tr><th>selection</th><th class='n'>members</th><th class='n'>mean Jaccard</th>"
        "<th class='n'>in every leave-one-out selection</th></tr>"
    )
    rows = []
    for name, r in stability.items():
        if r.get("mean_jaccard") is None:
            cells = f"<td colspan='2'>{_esc(r.get('reason') or 'undefined')}</td>"
        else:
            share = r.get("share_in_all_loo")
            in_all = "-" if share is None else f"{100 * share:.1f} % <small>({_num(r.get('rows_in_all_loo'))})</small>"
            cells = f"<td class='n'>{r['mean_jaccard']:.3f}</td><td class='n'>{in_all}</td>"
        rows.append(f"<tr><td>{_esc(name)}</td><td class='n'>{_num(r.get('members'))}</td>{cells}</tr>")
    return f"<p>{STABILITY_NOTE}</p><table class='stability'>{head}{''.join(rows)}</table>"


def _sentence(text: str | None) -> str:
    return (text[:1].upper() + text[1:]) if text else ""


def _audit_table(audit: dict) -> str:
    """audit/recovery.json as a paragraph (the headline and how wide its intervals are) and a table of every
    scorer's planted share per ratio with its 95% interval, plus the clean-vs-planted AUROC."""
    rows = [r for r in audit["recovery"] if r["kind"] == "all"]
    ratios = sorted({r["ratio"] for r in rows})
    scorers = list(dict.fromkeys(r["scorer"] for r in rows))
    at = {(r["scorer"], r["ratio"]): r for r in rows}
    widest = max(((r["ci_high"] or 0) - (r["ci_low"] or 0)) for r in rows) if rows else 0.0
    smallest_k = min((r["k"] for r in rows), default=0)
    invisible = audit.get("planted_invisible") or 0
    hidden = f" ({invisible} more were corrupted only past proxy.max_length and count as clean)" if invisible else ""
    text = (
        f"{audit['planted']} of the audit's {audit['rows']} sampled rows are planted (answers swapped, cut short or "
        f"shuffled){hidden}, and the audit trains its own ensemble on them. {_esc(_sentence(audit.get('headline')))}. "
        "Lower is "
        f"better; random selection keeps the pool's share. With {smallest_k} rows in the smallest selection the "
        f"intervals are up to {widest:.0%} wide"
        + (": too few rows to tell scorers apart by less than that (raise audit.rows)." if widest > 0.15 else ".")
    )
    head = "<tr><th>scorer</th>" + "".join(f"<th>{ratio:g}</th>" for ratio in ratios) + "<th>AUROC</th></tr>"
    body = []
    for scorer in scorers:
        cells = []
        for ratio in ratios:
            r = at.get((scorer, ratio))
            share = r and r["planted_share"]
            cells.append(
                "<td class='n'>-</td>"
                if share is None
                else f"<td class='n'>{share:.1%} ({r['ci_low']:.0%}-{r['ci_high']:.0%})</td>"
            )
        auroc = at[(scorer, ratios[0])]["auroc"]
        cells.append(f"<td class='n'>{'-' if auroc is None else f'{auroc:.3f}'}</td>")
        body.append(f"<tr><td>{_esc(scorer)}</td>{''.join(cells)}</tr>")
    return f"<p>{text}</p><table>{head}{''.join(body)}</table>"


def gsnr_eligible(scores: pa.Table) -> np.ndarray:
    return eligible(scores["gsnr"].to_numpy(zero_copy_only=False))


def pick_examples(scores: pa.Table, n: int = SHOWN_EXAMPLES) -> list[dict[str, Any]]:
    """The `n` eligible rows with the highest G-SNR and the `n` with the lowest (ties -> smaller id), each a dict
    of `scores`' columns plus "rank": "top" or "bottom"."""
    eligible = scores.filter(pa.array(gsnr_eligible(scores)))
    if eligible.num_rows == 0:
        return []
    order = pc.sort_indices(eligible, sort_keys=[("gsnr", "descending"), ("id", "ascending")]).to_numpy()
    top = order[:n]
    bottom = order[max(n, len(order) - n) :]  # a small table shows each row once
    shown = eligible.take(pa.array(np.concatenate([top, bottom])))
    return [{**row, "rank": "top" if i < len(top) else "bottom"} for i, row in enumerate(shown.to_pylist())]


def _examples_table(examples: list[dict[str, Any]], texts: dict[int, dict[str, Any]]) -> str:
    if not examples:
        return "<p>No eligible rows.</p>"
    head = "".join(
        f"<th>{h}</th>"
        for h in ("", "id", "G-SNR", "rel. drop", "noise", "G_early", "G_late", "instruction", "output")
    )
    rows = []
    for row in examples:
        text = texts.get(row["id"], {})
        rows.append(
            f"<tr><td>{row['rank']}</td><td>{row['id']}</td>"
            + "".join(f"<td class='n'>{row[c]:.4g}</td>" for c in ("gsnr", "drop_rel", "noise", "g_early", "g_late"))
            + f"<td class='t'>{_esc(str(text.get('instruction', ''))[:160])}</td>"
            + f"<td class='t'>{_esc(str(text.get('output', ''))[:160])}</td></tr>"
        )
    return f"<table class='examples'><tr>{head}</tr>{''.join(rows)}</table>"


def render_page(
    summary: dict[str, Any],
    figures: Iterable[str],
    examples: list[dict[str, Any]],
    texts: dict[int, dict[str, Any]],
    stability: dict[str, dict] | None = None,
    audit: dict | None = None,
) -> str:
    """The report page: summary, row accounting and selection stability (`stability`: selection/stability.json, the
    table left out when None or empty) first, then the figures (file names, relative to the page; see `FIGURES`),
    then the top and bottom examples (`pick_examples`) with their texts (id -> {instruction, output})."""
    parts = [
        "<h1>gradfilter-ray selection report</h1>",
        "<section id='summary'><h2>Summary</h2>",
        _summary_table(summary),
        "<h3>Row accounting</h3>",
        _accounting_table(summary),
    ]
    if stability:
        parts += ["<h3>Selection stability</h3>", _stability_table(stability)]
    if audit:
        parts += ["<h3>Planted-noise audit</h3>", _audit_table(audit)]
    parts += [
        "</section>",
        "<section id='plots'><h2>Plots</h2><div class='figures'>",
    ]
    for name in figures:
        caption, wide = FIGURES.get(name, (name, True))
        css = " class='wide'" if wide else ""
        parts.append(
            f"<figure{css}><figcaption>{_esc(caption)}</figcaption>"
            f"<img src='{_esc(name)}' alt='{_esc(caption)}'></figure>"
        )
    parts += [
        "</div></section>",
        "<section id='examples'><h2>Top and bottom examples by G-SNR</h2>",
        _examples_table(examples, texts),
        "</section>",
    ]
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>gradfilter-ray report</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )


# ----- plots (pure: PNG bytes) -----


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


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def render_plots(
    scores: pa.Table, selected: dict[str, np.ndarray], scorers: list[str], ratios: list[float]
) -> dict[str, bytes]:
    """PNG bytes by file name (the keys of `FIGURES`, in page order), each at most PAGE_WIDTH_PX wide at DPI.

    `scores`: the score table's PLOT_COLUMNS; `selected`: selection name -> selected ids; `scorers`, `ratios`: the
    run's scoring.scorers and selection.ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs: dict[str, bytes] = {}
    sample = _sample(scores.filter(pa.array(gsnr_eligible(scores))))
    largest = max(ratios)
    try:
        fig, axes = plt.subplots(2, 2, figsize=(10, 6))
        for ax, column, log in zip(axes.flat, ["gsnr", "drop_rel", "noise", "ifd"], [True, False, True, False]):
            values = scores[column].to_numpy(zero_copy_only=False)
            values = values[np.isfinite(values)]
            if log:
                values = np.sign(values) * np.log10(1 + np.abs(values))
            ax.hist(values, bins=60, color="#4477aa")
            ax.set_title(f"{column}{' (signed log10(1+|x|))' if log else ''}", fontsize=9)
        fig.tight_layout()
        pngs["score_histograms.png"] = _png(fig)

        chosen = selected.get(Selection("gsnr", largest).name, np.empty(0, np.int64))
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        hit = np.isin(sample["id"].to_numpy(), chosen)
        noise = sample["noise"].to_numpy(zero_copy_only=False)
        drop = sample["drop_rel"].to_numpy(zero_copy_only=False)
        ax.scatter(noise[~hit], drop[~hit], s=4, alpha=0.4, color="#bbbbbb", label="not selected")
        ax.scatter(noise[hit], drop[hit], s=6, alpha=0.8, color="#cc3311", label=f"G-SNR top {largest:g}")
        ax.set_xscale("symlog", linthresh=max(float(np.percentile(noise, 5)) if len(noise) else 1e-6, 1e-12))
        ax.set_xlabel("late-checkpoint variance over members (noise)")
        ax.set_ylabel("relative drop (G_early - G_late) / G_early")
        ax.legend(fontsize=8)
        fig.tight_layout()
        pngs["drop_vs_noise.png"] = _png(fig)

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        lengths = scores["n_response_tokens"].to_numpy(zero_copy_only=False)
        all_ids = scores["id"].to_numpy()
        bins = np.linspace(0, max(1, int(lengths.max()) if len(lengths) else 1), 40)
        ax.hist(lengths, bins=bins, density=True, alpha=0.5, label="all rows")
        for scorer in [s for s in ("gsnr", "ifd", "random") if s in scorers]:
            name = Selection(scorer, largest).name
            picked = lengths[np.isin(all_ids, selected.get(name, np.empty(0, np.int64)))]
            if len(picked):
                ax.hist(picked, bins=bins, density=True, histtype="step", label=name)
        ax.set_xlabel("response tokens")
        ax.legend(fontsize=8)
        fig.tight_layout()
        pngs["response_lengths.png"] = _png(fig)

        ranked = list(scorers)
        ncols = min(3, len(ratios))
        nrows = -(-len(ratios) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 3.8 * nrows), squeeze=False)
        for ax in axes.flat[len(ratios) :]:
            ax.set_axis_off()
        for ax, ratio in zip(axes.flat, ratios):
            empty = np.empty(0, np.int64)
            matrix = overlap_matrix({s: selected.get(Selection(s, ratio).name, empty) for s in ranked}, ranked)
            ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(ranked)), ranked, rotation=70, fontsize=7)
            ax.set_yticks(range(len(ranked)), ranked, fontsize=7)
            for i in range(len(ranked)):
                for j in range(len(ranked)):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
            ax.set_title(f"Jaccard overlap at ratio {ratio:g}", fontsize=9)
        fig.tight_layout()
        pngs["overlap.png"] = _png(fig)
    finally:
        plt.close("all")
    return pngs


def audit_plot(audit: dict) -> bytes:
    """Planted share of every scorer's selection at each ratio, with its 95% interval; a dashed line at the pool's
    planted share (what random selection keeps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in audit["recovery"] if r["kind"] == "all" and r["planted_share"] is not None]
    ratios = sorted({r["ratio"] for r in rows})
    scorers = list(dict.fromkeys(r["scorer"] for r in rows))
    width = 0.8 / max(1, len(ratios))
    try:
        fig, ax = plt.subplots(figsize=(10, 3.6))
        for i, ratio in enumerate(ratios):
            at = {r["scorer"]: r for r in rows if r["ratio"] == ratio}
            x = np.arange(len(scorers)) + (i - (len(ratios) - 1) / 2) * width
            share = np.array([at[s]["planted_share"] if s in at else np.nan for s in scorers])
            low = np.array([at[s]["ci_low"] if s in at else np.nan for s in scorers])
            high = np.array([at[s]["ci_high"] if s in at else np.nan for s in scorers])
            ax.bar(x, share, width, label=f"ratio {ratio:g}", yerr=[share - low, high - share], capsize=2)
        pool = rows[0]["pool_planted_share"] if rows else None
        if pool is not None:
            ax.axhline(pool, color="k", linestyle="--", linewidth=1, label="random (pool share)")
        ax.set_xticks(range(len(scorers)), scorers, fontsize=8)
        ax.set_ylabel("planted share of selection")
        ax.legend(fontsize=8, ncols=len(ratios) + 1)
        fig.tight_layout()
        return _png(fig)
    finally:
        plt.close("all")


# ----- the stage (I/O) -----


def audit_stage_done(manifest: dict) -> bool:
    """The audit's results belong on the page only when its stage is done (a half-written audit/ is not shown) and
    the config audits (`run` then ran the audit, with this config's key, before the report)."""
    return ((manifest.get("stages") or {}).get("audit") or {}).get("status") == "done"


def build_report(run: RunDir, scorers: list[str], ratios: list[float], manifest: dict, audited: bool = False) -> dict:
    """Read scores, selections and a few example rows; write `report/` (PNGs and index.html); return counts."""
    out = run.at("report")
    scores = read_columns(run.scores, PLOT_COLUMNS)
    selected = {
        rel.removesuffix(".parquet"): read_columns(run.selection / rel, ["id"])["id"].to_numpy()
        for rel in run.selection.files()
        if rel.endswith(".parquet")
    }
    pngs = render_plots(scores, selected, scorers, ratios)
    for name, data in pngs.items():
        (out / name).write_bytes(data)
    examples = pick_examples(scores)
    texts = pads.dataset(run.data.path, format="parquet", filesystem=run.data.filesystem).to_table(
        columns=["id", "instruction", "output"],
        filter=pc.is_in(pc.field("id"), value_set=pa.array([e["id"] for e in examples], pa.int64())),
    )
    summary = summarize_run(manifest, str(run.root))
    stability_file = run.selection / STABILITY_FILE
    stability = json.loads(stability_file.read_text()) if stability_file.exists() else None
    audit_file = run.audit / RECOVERY_JSON
    shown = audited and audit_stage_done(manifest) and audit_file.exists()
    audit = json.loads(audit_file.read_text()) if shown else None
    if audit:
        pngs[AUDIT_FIGURE] = audit_plot(audit)
        (out / AUDIT_FIGURE).write_bytes(pngs[AUDIT_FIGURE])
    page = render_page(summary, pngs, examples, {r["id"]: r for r in texts.to_pylist()}, stability, audit)
    (out / "index.html").write_text(page)
    return {"figures": len(pngs), "selections": len(selected)}


def run(cfg: Config, run: RunDir, key: str) -> dict:
    """A Ray task builds the report next to the data: the driver reads no table."""
    scorers, ratios = list(cfg.scoring.scorers), list(cfg.selection.ratios)
    return run_as_task(build_report, run, scorers, ratios, run.read_manifest(), cfg.audit.enabled)
