"""Selection report: `report/index.html` with PNG plots, built only from the run directory's outputs.

Everything that computes or renders is pure and does no I/O: `summarize_run` (the run's summary from its manifest),
`summary_lines` (the same summary as plain text, for the CLI), `render_plots` (PNG bytes by file name),
`scorer_agreement`, `pick_examples`, `stage_accounting`, `stage_timings` and `render_page` (the HTML). Only
`build_report` and `run`, at the bottom, read and write files.

The page opens with what a reader decides on: how many rows each subset keeps, how the scorers' subsets agree, and
the top and bottom examples. Then the planted-noise audit, the selections' stability, the plots (sized to fit a
1280 px wide window), the row accounting (each stage once), the timings and the provenance. Plots sample at most
`MAX_POINTS` rows so a million-row run renders in seconds; tables are computed on all rows. The page uses relative
links only, so it opens as a plain file in a browser.
"""

from __future__ import annotations

import html
import io
import json
import shlex
from collections.abc import Iterable
from datetime import datetime
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
SHOWN_EXAMPLES = 5
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
    "td.n{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}th.n{text-align:right}td.t{overflow-wrap:anywhere}"
    ".figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(460px,100%),1fr));gap:1em}"
    "figure{margin:0;min-width:0}figure.wide{grid-column:1/-1}figcaption{font-weight:bold;margin-bottom:.3em}"
    "h2{margin-top:1.6em;border-bottom:1px solid #ccc}.note,small{color:#555}.note{max-width:46em;margin:.3em 0}"
    ".pair{display:flex;flex-wrap:wrap;gap:0 3em;align-items:flex-start}.pair>div{flex:1 1 24em;min-width:0}"
    "table.summary th,table.provenance th{white-space:nowrap}"
    "table.examples{width:100%;table-layout:fixed}col.id{width:3.5em}col.score{width:5.2em}col.instruction{width:28%}"
    "tr.group th{background:#eee}tr.chance td,tr.total td{font-style:italic;color:#555}"
    ".tag{font-size:80%;background:#e8eef6;border-radius:3px;padding:0 3px;white-space:nowrap}"
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


def _table(head: Iterable[str], rows: Iterable[str], css: str = "") -> str:
    """A table from header cells (HTML) and finished <tr> rows; `css`: its class."""
    cls = f" class='{css}'" if css else ""
    return f"<table{cls}><tr>{''.join(head)}</tr>{''.join(rows)}</table>"


def preview(text: Any, limit: int) -> str:
    """`text` on one line (every run of whitespace one space), cut to `limit` characters with an ellipsis. Unescaped:
    escape after cutting, so a cut never splits an entity."""
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _overview(s: dict[str, Any], sections: set[str]) -> str:
    """Where the run, its subsets, the audit's verdict and the comparison are, and the rows' path in one line."""
    rows: list[tuple[str, str]] = [("run directory", _esc(s["location"] or "."))]
    flow = []
    if s["rows_in"] is not None:
        flow.append(f"{_num(s['rows_in'])} in, {_num(s['rows_kept'])} kept, {_num(s['rows_rejected'])} rejected")
    if s["rows_scored"] is not None:
        flow.append(f"{_num(s['rows_eligible'])} of {_num(s['rows_scored'])} scored eligible for G-SNR")
    if flow:
        more = " <a href='#accounting'>(every stage)</a>" if "accounting" in sections else ""
        rows.append(("rows", "; ".join(flow) + more))
    if s["selection_dir"]:
        rows.append(
            ("subsets", "<a href='../selection/'>selection/</a> (&lt;scorer&gt;_&lt;ratio&gt;.jsonl and .parquet)")
        )
    if s.get("audit"):
        more = " <a href='#audit'>(details)</a>" if "audit" in sections else ""
        rows.append(("planted-noise audit", _esc(_sentence(s["audit"])) + more))
    compare = f"<a href='../{COMPARE_TABLE}'>{COMPARE_TABLE}</a>"
    rows.append(("comparison", compare if s["compare"] else f"{compare} (written by the evaluation stage)"))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='summary'>{body}</table>"


def grid_place(name: str) -> tuple[str, str]:
    """(scorer, ratio label) of a selection name in a scorer x ratio grid, as `selection_grid` places it."""
    try:
        selection = Selection.parse(name)
    except ValueError:
        return name, "all"
    return selection.scorer, "all" if selection.scorer == FULL else f"{selection.ratio:g}"


def _in_order(rows: dict[str, Any], order: list[str]) -> list[tuple[str, Any]]:
    """`rows`' items with the keys in `order` first, in that order; the rest after them as they come."""
    rank = {key: i for i, key in enumerate(order)}
    return sorted(rows.items(), key=lambda item: rank.get(item[0], len(rank)))


def _subset_grid(s: dict[str, Any], order: list[str]) -> str:
    """Rows kept per subset (scorer x ratio, each with its share of the rows with a response; scorers in `order`),
    and how many rows each scorer could rank."""
    labels, grid = selection_grid(s["selections"])
    base = s["rows_with_response"]
    eligible = {grid_place(name)[0]: c.get("n_eligible") for name, c in s["selections"].items()}
    head = ["<th>scorer \\ ratio</th>", *(f"<th class='n'>{_esc(label)}</th>" for label in labels)]
    head.append("<th class='n'>eligible</th>")
    rows = [
        f"<tr><td>{_esc(scorer)}</td>"
        + "".join(
            f"<td class='n'>{_num(row.get(label))}"
            + (f" <small>{_share(row[label], base)}</small>" if row.get(label) is not None else "")
            + "</td>"
            for label in labels
        )
        + f"<td class='n'>{_num(eligible.get(scorer))}</td></tr>"
        for scorer, row in _in_order(grid, order)
    ]
    note = (
        f"<p class='note'>Rows each subset keeps, and their share of the {_num(base)} rows with a response "
        "(k = ratio x those rows; a scorer keeps fewer when fewer rows are eligible for it).</p>"
    )
    return note + _table(head, rows, "grid")


def chance_jaccard(ratio: float) -> float:
    """The expected Jaccard overlap of two independent random subsets that each keep `ratio` of the same rows."""
    return ratio / (2 - ratio)


def _shade(value: float) -> str:
    return f" style='background:rgba(68,119,170,{0.45 * max(0.0, min(1.0, value)):.2f})'"


def _agreement_table(agreement: dict[str, Any]) -> str:
    reference, ratios = agreement["reference"], agreement["ratios"]
    labels = [f"{ratio:g}" for ratio in ratios]
    head = ["<th>scorer \\ ratio</th>", *(f"<th class='n'>{_esc(label)}</th>" for label in labels)]
    rows = []
    for scorer, row in agreement["jaccard"].items():
        cells = "".join(
            "<td class='n'>-</td>" if row.get(label) is None else f"<td class='n'{_shade(j)}>{j:.2f}</td>"
            for label in labels
            for j in [row.get(label)]
        )
        rows.append(f"<tr><td>{_esc(scorer)}</td>{cells}</tr>")
    chance = "".join(f"<td class='n'>{chance_jaccard(ratio):.2f}</td>" for ratio in ratios)
    rows.append(f"<tr class='chance'><td>by chance</td>{chance}</tr>")
    note = (
        f"<p class='note'>Jaccard overlap of each scorer's subset with {_esc(reference)}'s at the same ratio "
        "(1: the same rows). Two random subsets overlap about as much as the last row; every pair of scorers is in "
        "the overlap plot.</p>"
    )
    return note + _table(head, rows, "agreement")


EXAMPLE_SCORES = (("gsnr", "G-SNR"), ("drop_rel", "rel. drop"), ("noise", "noise"), ("g_early", "G_early"),
                  ("g_late", "G_late"))  # fmt: skip
PREVIEW_CHARS = 180  # an example's instruction or response, in its cell
TOOLTIP_CHARS = 1500  # the same, when the pointer rests on the cell


def _text_cell(text: Any, tag: str = "") -> str:
    shown, hover = preview(text, PREVIEW_CHARS), preview(text, TOOLTIP_CHARS)
    title = f" title='{_esc(hover)}'" if hover != shown else ""
    return f"<td class='t'{title}>{tag}{_esc(shown)}</td>"


def _conversation_turns(conversation: Any) -> int | None:
    if not conversation:
        return None
    try:
        turns = json.loads(conversation)
    except (TypeError, ValueError):
        return None
    return len(turns) if isinstance(turns, list) else None


def _examples_table(examples: list[dict[str, Any]], texts: dict[int, dict[str, Any]]) -> str:
    """The examples in two groups (highest and lowest G-SNR), each row its scores and its instruction and response
    cut to PREVIEW_CHARS (a conversation: its first question and last answer, with its number of turns)."""
    if not examples:
        return "<p>No eligible rows.</p>"
    cols = "<col class='id'>" + "<col class='score'>" * len(EXAMPLE_SCORES) + "<col class='instruction'><col>"
    head = "".join(
        f"<th class='n'>{h}</th>" if h not in ("instruction", "response") else f"<th>{h}</th>"
        for h in ("id", *(label for _, label in EXAMPLE_SCORES), "instruction", "response")
    )
    width = 3 + len(EXAMPLE_SCORES)
    rows = []
    for rank, title in (("top", "highest G-SNR"), ("bottom", "lowest G-SNR")):
        group = [row for row in examples if row["rank"] == rank]
        if not group:
            continue
        rows.append(f"<tr class='group'><th colspan='{width}'>{title}</th></tr>")
        for row in group:
            text = texts.get(row["id"], {})
            instruction = str(text.get("instruction") or "")
            if text.get("input"):
                instruction += f" | input: {text['input']}"
            turns = _conversation_turns(text.get("conversation"))
            asked = f"<span class='tag'>{turns}-turn conversation, first question</span> " if turns else ""
            answered = "<span class='tag'>last answer</span> " if turns else ""
            rows.append(
                f"<tr><td class='n'>{_esc(row['id'])}</td>"
                + "".join(f"<td class='n'>{_score(row.get(column))}</td>" for column, _ in EXAMPLE_SCORES)
                + _text_cell(instruction, asked)
                + _text_cell(text.get("output", ""), answered)
                + "</tr>"
            )
    return f"<table class='examples'><colgroup>{cols}</colgroup><tr>{head}</tr>{''.join(rows)}</table>"


def _score(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


# The stages that count rows, in the order they run, and what the rows each keeps are.
KEPT_MEANS = {
    "data": "rows in data/ (rejects.parquet holds the rejected ones)",
    "tokens": "rows with a response token to train on",
    "ensemble": "rows the ensemble trained on",
    "gradients": "rows with response-token gradient norms",
    "scoring": "rows eligible for G-SNR",
    "selection": "k = ratio x rows in; the subsets' rows are in the Summary",
}


def _minus(whole: int | None, part: int | None) -> int | None:
    return None if whole is None or part is None else whole - part


def stage_counts(stage: str, record: dict) -> tuple[int | None, int | None, int | None, dict[str, int]]:
    """(rows in, kept, rejected, rejected by reason) from a stage's record. The stages after ingest keep every row
    in the corpus and set aside (here: reject) the rows without a response token, which no model trains on."""
    unanswered = record.get("rows_no_response_tokens")
    if stage == "data":
        return (
            record.get("rows_in"),
            record.get("rows_kept"),
            record.get("rows_rejected"),
            record.get("rejects_by_reason") or {},
        )
    if stage == "tokens":
        skipped = dict(record.get("skipped_by_reason") or {})
        # a skipped row has no response token either; the others lost theirs to truncation or an empty answer
        rest = (unanswered or 0) - sum(skipped.values())
        rows = record.get("rows")
        return rows, _minus(rows, unanswered), unanswered, skipped | {"no_response_tokens": rest}
    if stage == "ensemble":
        rows, kept = record.get("rows_in"), record.get("rows_trained")
        return rows, kept, _minus(rows, kept), {"no_response_tokens": unanswered or 0}
    if stage == "gradients":
        rows = record.get("rows")
        return rows, _minus(rows, unanswered), unanswered, {"no_response_tokens": unanswered or 0}
    if stage == "scoring":
        return (
            record.get("rows"),
            record.get("rows_eligible"),
            record.get("rows_ineligible"),
            record.get("ineligible_by_reason") or {},
        )
    if stage == "selection":
        return record.get("rows_with_response"), None, None, {}
    raise ValueError(f"the {stage} stage does not count rows")


def stage_accounting(manifest: dict) -> list[dict[str, Any]]:
    """One row per stage that counts rows (`KEPT_MEANS`; done records only, in the order they run): rows in, kept,
    rejected, the rejections by reason (zero counts left out) and what its kept rows are. The selection stage's
    subsets are not rows of this table: the Summary's subset grid has them."""
    stages = manifest.get("stages") or {}
    rows = []
    for stage, kept_means in KEPT_MEANS.items():
        record = stages.get(stage) or {}
        if record.get("status") != "done":
            continue
        rows_in, kept, rejected, by_reason = stage_counts(stage, record)
        reasons = {reason: n for reason, n in by_reason.items() if n}
        rows.append(
            {
                "stage": stage,
                "rows_in": rows_in,
                "kept": kept,
                "rejected": rejected,
                "reasons": reasons,
                "kept_means": kept_means,
            }
        )
    return rows


def _accounting_table(manifest: dict) -> str:
    rows = stage_accounting(manifest)
    if not rows:
        return "<p>No stage has recorded its row counts.</p>"
    numeric = ("rows in", "kept", "rejected")
    head = [
        f"<th class='n'>{h}</th>" if h in numeric else f"<th>{h}</th>"
        for h in ("stage", *numeric, "reasons", "what is kept")
    ]
    body = [
        f"<tr><td>{_esc(r['stage'])}</td><td class='n'>{_num(r['rows_in'])}</td><td class='n'>{_num(r['kept'])}</td>"
        f"<td class='n'>{_num(r['rejected'])}</td><td>{_esc(_reasons(r['reasons']))}</td>"
        f"<td>{_esc(r['kept_means'])}</td></tr>"
        for r in rows
    ]
    note = "<p class='note'>Rows in = kept + rejected at every stage that counts rows, in the order they run.</p>"
    return note + _table(head, body, "accounting")


def stage_timings(manifest: dict) -> list[dict[str, Any]]:
    """Every done stage's seconds and start (UTC, as recorded), in the order the stages started."""
    rows = [
        {
            "stage": name,
            "seconds": r.get("seconds"),
            "started": r.get("started"),
            "finished": r.get("finished"),
            "parts": r.get("seconds_by_stage") or {},
        }
        for name, r in (manifest.get("stages") or {}).items()
        if (r or {}).get("status") == "done"
    ]
    return sorted(rows, key=lambda r: (r["started"] or "", r["stage"]))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _utc(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))  # Python 3.10 reads no "Z"


def _wall_seconds(timings: list[dict[str, Any]]) -> float | None:
    starts = [_utc(r["started"]) for r in timings if r["started"]]
    ends = [_utc(r["finished"]) for r in timings if r["finished"]]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else None


def _timings_table(manifest: dict) -> str:
    timings = stage_timings(manifest)
    if not timings:
        return "<p>No stage has finished.</p>"
    total = sum(r["seconds"] or 0 for r in timings)
    head = ["<th>stage</th>", "<th>started (UTC)</th>", "<th class='n'>seconds</th>", "<th class='n'>share</th>"]
    head.append("<th>of which</th>")
    body = [
        f"<tr><td>{_esc(r['stage'])}</td><td>{_esc((r['started'] or '-').replace('T', ' ').rstrip('Z'))}</td>"
        f"<td class='n'>{_seconds(r['seconds'])}</td><td class='n'>{_share(r['seconds'], total)}</td>"
        f"<td>{_esc(', '.join(f'{part} {_seconds(s)} s' for part, s in r['parts'].items()))}</td></tr>"
        for r in timings
    ]
    wall = _wall_seconds(timings)
    body.append(
        f"<tr class='total'><td>all stages</td><td></td><td class='n'>{_seconds(total)}</td><td></td>"
        f"<td>{'' if wall is None else f'{_seconds(wall)} s from the first start to the last finish'}</td></tr>"
    )
    return _table(head, body, "timings")


def _provenance_table(manifest: dict) -> str:
    """What made this run: the command, code commit, config hash, seed, input files, versions and stage keys."""
    rows: list[tuple[str, str]] = []
    if manifest.get("command"):
        rows.append(("command", f"<code>{_esc(shlex.join(['gradfilter-ray', *manifest['command']]))}</code>"))
    for key, label in (("git_sha", "git commit"), ("config_hash", "config hash"), ("seed", "seed")):
        if manifest.get(key) is not None:
            rows.append((label, f"<code>{_esc(manifest[key])}</code>"))
    inputs = manifest.get("inputs") or []
    if inputs:
        rows.append(
            (
                "inputs",
                "<br>".join(
                    f"<code>{_esc(i.get('path'))}</code> <small>{_num(i.get('bytes'))} bytes, sha256 "
                    f"{_esc(str(i.get('sha256') or '-')[:16])}…</small>"
                    for i in inputs
                ),
            )
        )
    if manifest.get("versions"):
        rows.append(("versions", _esc(", ".join(f"{k} {v}" for k, v in manifest["versions"].items()))))
    records = manifest.get("stages") or {}
    ran = [r["stage"] for r in stage_timings(manifest)]
    keys = {stage: records[stage]["key"] for stage in ran if records[stage].get("key")}
    if keys:
        rows.append(("stage keys", " ".join(f"{_esc(n)}&nbsp;<code>{_esc(k)}</code>" for n, k in keys.items())))
    if not rows:
        return "<p>The manifest records no provenance.</p>"
    return "<table class='provenance'>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


STABILITY_NOTE = (
    "Each ensemble-based selection is made again M times, each time with one ensemble member's gradient norms left "
    "out: mean Jaccard is its overlap with the full selection, averaged over the M; in every is the share of the "
    "selected rows that every leave-one-out selection keeps. Low overlap means the selection depends on single "
    "members: the ensemble needs more members."
)


def _stability_table(stability: dict[str, dict], order: list[str]) -> str:
    """selection/stability.json (name -> record) as a scorer x ratio grid (scorers in `order`): per ratio the mean
    Jaccard and the share of the selection in every leave-one-out selection."""
    grid: dict[str, dict[str, dict]] = {}
    for name, record in stability.items():
        scorer, label = grid_place(name)
        grid.setdefault(scorer, {})[label] = record
    labels = sorted({label for row in grid.values() for label in row} - {"all"}, key=float)
    labels += ["all"] if any("all" in row for row in grid.values()) else []
    head = (
        "<tr><th rowspan='2'>scorer</th><th rowspan='2' class='n'>members</th>"
        + "".join(f"<th colspan='2'>ratio {_esc(label)}</th>" for label in labels)
        + "</tr><tr>"
        + "<th class='n'>mean Jaccard</th><th class='n'>in every</th>" * len(labels)
        + "</tr>"
    )
    rows = []
    for scorer, row in _in_order(grid, order):
        members = next((r.get("members") for r in row.values() if r.get("members") is not None), None)
        cells = []
        for label in labels:
            r = row.get(label)
            if r is None:
                cells.append("<td class='n'>-</td><td class='n'>-</td>")
            elif r.get("mean_jaccard") is None:
                cells.append(f"<td colspan='2'>{_esc(r.get('reason') or 'undefined')}</td>")
            else:
                share, rows_in_all = r.get("share_in_all_loo"), _num(r.get("rows_in_all_loo"))
                in_all = "-" if share is None else f"{100 * share:.1f} % <small>({rows_in_all})</small>"
                cells.append(f"<td class='n'>{r['mean_jaccard']:.3f}</td><td class='n'>{in_all}</td>")
        rows.append(f"<tr><td>{_esc(scorer)}</td><td class='n'>{_num(members)}</td>{''.join(cells)}</tr>")
    return f"<p class='note'>{STABILITY_NOTE}</p><table class='stability'>{head}{''.join(rows)}</table>"


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
    head = "<tr><th>scorer</th>" + "".join(f"<th class='n'>{ratio:g}</th>" for ratio in ratios)
    head += "<th class='n'>AUROC</th></tr>"
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


def scorer_order(agreement: dict[str, Any] | None, manifest: dict | None) -> list[str]:
    """The order the page lists scorers in: the agreement table's (its reference first), else the run's config's."""
    if agreement:
        return [agreement["reference"], *agreement["jaccard"]]
    return list((((manifest or {}).get("config") or {}).get("scoring") or {}).get("scorers") or [])


def _section(section_id: str, title: str, *body: str) -> str:
    return f"<section id='{section_id}'><h2>{_esc(title)}</h2>{''.join(body)}</section>"


def _figure(name: str) -> str:
    caption, wide = FIGURES.get(name, (name, True))
    css = " class='wide'" if wide else ""
    return (
        f"<figure{css}><figcaption>{_esc(caption)}</figcaption><img src='{_esc(name)}' alt='{_esc(caption)}'></figure>"
    )


def render_page(
    summary: dict[str, Any],
    figures: Iterable[str],
    examples: list[dict[str, Any]],
    texts: dict[int, dict[str, Any]],
    stability: dict[str, dict] | None = None,
    audit: dict | None = None,
    manifest: dict | None = None,
    agreement: dict[str, Any] | None = None,
) -> str:
    """The report page. It opens with what a reader decides on (section `summary`): where the run and its subsets
    are, the audit's verdict, how many rows each subset keeps (scorer x ratio), how the scorers' subsets agree with
    the reference scorer's (`agreement`: `scorer_agreement`), and the top and bottom examples by G-SNR
    (`pick_examples`, with `texts`: id -> {instruction, input, output, conversation}). Then the planted-noise audit
    (`audit`: audit/recovery.json, with its figure), selection stability (`stability`: selection/stability.json),
    the plots (`figures`: file names relative to the page, see `FIGURES`), and from `manifest` the row accounting
    (each stage once), the timings and the provenance. Without its input (None or empty) the audit or stability
    section is left out; without a manifest, the last three."""
    figures = list(figures)
    order = scorer_order(agreement, manifest)
    audit_figures = [name for name in figures if name == AUDIT_FIGURE] if audit else []
    shown = {"audit"} if audit else set()
    if manifest is not None:
        shown.add("accounting")
    opening = [_overview(summary, shown)]
    if summary["selections"]:
        opening.append(f"<div class='pair'><div><h3>Rows kept per subset</h3>{_subset_grid(summary, order)}</div>")
        if agreement and agreement["jaccard"]:
            opening.append(f"<div><h3>Agreement with {_esc(agreement['reference'])}</h3>")
            opening.append(_agreement_table(agreement) + "</div>")
        opening.append("</div>")
    opening += ["<h3>Top and bottom examples by G-SNR</h3>", _examples_table(examples, texts)]
    parts = ["<h1>gradfilter-ray selection report</h1>", _section("summary", "Summary", *opening)]
    if audit:
        parts.append(_section("audit", "Planted-noise audit", _audit_table(audit), *map(_figure, audit_figures)))
    if stability:
        parts.append(_section("stability", "Selection stability", _stability_table(stability, order)))
    plots = [_figure(name) for name in figures if name not in audit_figures]
    parts.append(_section("plots", "Plots", f"<div class='figures'>{''.join(plots)}</div>"))
    if manifest is not None:
        parts += [
            _section("accounting", "Row accounting", _accounting_table(manifest)),
            _section("timings", "Timings", _timings_table(manifest)),
            _section("provenance", "Provenance", _provenance_table(manifest)),
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


def scorer_agreement(selected: dict[str, np.ndarray], scorers: list[str], ratios: list[float]) -> dict[str, Any]:
    """How far each scorer's subset agrees with the reference scorer's (gsnr when the run has it, else its first
    scorer) at each ratio: {"reference", "ratios" (ascending), "jaccard": scorer -> {ratio label: Jaccard overlap, or
    None where either subset is missing}}. `selected`: selection name -> selected ids."""
    reference = "gsnr" if "gsnr" in scorers else (scorers[0] if scorers else None)
    ordered = sorted(ratios)
    table: dict[str, dict[str, float | None]] = {}
    for scorer in scorers:
        if scorer == reference:
            continue
        row: dict[str, float | None] = {}
        for ratio in ordered:
            ours, theirs = selected.get(Selection(reference, ratio).name), selected.get(Selection(scorer, ratio).name)
            row[f"{ratio:g}"] = None if ours is None or theirs is None else jaccard(ours, theirs)
        table[scorer] = row
    return {"reference": reference, "ratios": ordered, "jaccard": table}


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

    def ink(value: float) -> str:  # viridis is light above ~0.6: dark text there
        return "k" if value > 0.6 else "w"

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
        fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 4 * nrows), squeeze=False)
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
                    value = matrix[i, j]
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6.5, color=ink(value))
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


def audit_stage_done(manifest: dict, audit_key: str | None = None) -> bool:
    """The audit's results belong on the page only when its stage is done (a half-written audit/ is not shown) and,
    given `audit_key` (this config's audit key), done under it: `audit/` holds the last audit run in the run
    directory, which may be another config's."""
    record = (manifest.get("stages") or {}).get("audit") or {}
    return record.get("status") == "done" and (audit_key is None or record.get("key") == audit_key)


def build_report(
    run: RunDir,
    scorers: list[str],
    ratios: list[float],
    manifest: dict,
    audited: bool = False,
    audit_key: str | None = None,
) -> dict:
    """Read scores, selections and a few example rows; write `report/` (PNGs and index.html); return counts. The
    audit's results are shown when the config audits (`audited`) and its audit is done (under `audit_key`)."""
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
    data = pads.dataset(run.data.path, format="parquet", filesystem=run.data.filesystem)
    texts = data.to_table(
        columns=[c for c in ("id", "instruction", "input", "output", "conversation") if c in data.schema.names],
        filter=pc.is_in(pc.field("id"), value_set=pa.array([e["id"] for e in examples], pa.int64())),
    )
    audit_file = run.audit / RECOVERY_JSON
    ours = audit_stage_done(manifest, audit_key)
    shown = audited and ours and audit_file.exists()
    if not ours:  # nor another config's headline in the summary, which reads the audit's record
        manifest = {**manifest, "stages": {k: v for k, v in (manifest.get("stages") or {}).items() if k != "audit"}}
    summary = summarize_run(manifest, str(run.root))
    stability_file = run.selection / STABILITY_FILE
    stability = json.loads(stability_file.read_text()) if stability_file.exists() else None
    audit = json.loads(audit_file.read_text()) if shown else None
    if audit:
        pngs[AUDIT_FIGURE] = audit_plot(audit)
        (out / AUDIT_FIGURE).write_bytes(pngs[AUDIT_FIGURE])
    texts_by_id = {r["id"]: r for r in texts.to_pylist()}
    agreement = scorer_agreement(selected, scorers, ratios)
    page = render_page(summary, pngs, examples, texts_by_id, stability, audit, manifest, agreement)
    (out / "index.html").write_text(page)
    return {"figures": len(pngs), "selections": len(selected)}


def run(cfg: Config, run: RunDir, key: str, audit_key: str | None = None) -> dict:
    """A Ray task builds the report next to the data: the driver reads no table. `audit_key`: this config's audit
    stage key, which the runner computes (a stage shell does not import the pipeline): only an audit done under it
    is shown (None: any audit done)."""
    scorers, ratios = list(cfg.scoring.scorers), list(cfg.selection.ratios)
    return run_as_task(build_report, run, scorers, ratios, run.read_manifest(), cfg.audit.enabled, audit_key)
