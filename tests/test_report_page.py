"""The report's pure parts (no Ray, no files): the run summary from a hand-built manifest, its text lines for the
CLI, the page (it opens with the subsets' counts, the scorers' agreement and the examples; the row accounting lists
each stage once), and plots that fit a 1280 px wide window."""

from __future__ import annotations

import html
import json
import re
import struct
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pytest

from gradfilter_ray import report

REJECTS = {"duplicate": 21, "empty_output": 9, "field_too_long": 5}
INELIGIBLE = {"no_response_tokens": 4, "zero_early_norm": 7}
# Distinct counts everywhere, so a count shown against the wrong selection is caught.
SELECTIONS = {
    "gsnr_0.05": {"k": 50, "selected": 51, "n_eligible": 989},
    "gsnr_0.1": {"k": 99, "selected": 102, "n_eligible": 989},
    "random_0.05": {"k": 50, "selected": 53, "n_eligible": 996},
    "random_0.1": {"k": 99, "selected": 97, "n_eligible": 996},
    "full": {"k": 996, "selected": 996, "n_eligible": 996},
}


ALL_DONE = ("data", "scoring", "selection", "report", "evaluation")


def make_manifest(done=("data", "scoring", "selection", "report")) -> dict:
    records = {
        "data": {"rows_in": 1035, "rows_kept": 1000, "rows_rejected": 35, "rejects_by_reason": dict(REJECTS)},
        "scoring": {
            "rows": 1000,
            "rows_eligible": 989,
            "rows_ineligible": 11,
            "ineligible_by_reason": dict(INELIGIBLE),
        },
        "selection": {"rows_with_response": 996, "selections": {k: dict(v) for k, v in SELECTIONS.items()}},
        "report": {"figures": 4},
        "evaluation": {"runs": 1},
    }
    stages = {name: {"status": "done", "key": "k", **records[name]} for name in done}
    return {"config": {"output_dir": "runs/unit"}, "seed": 0, "stages": stages}


# ----- summary -----


def test_summary_counts_come_from_the_stage_records():
    s = report.summarize_run(make_manifest())
    assert (s["rows_in"], s["rows_kept"], s["rows_rejected"]) == (1035, 1000, 35)
    assert s["rows_in"] == s["rows_kept"] + s["rows_rejected"]
    assert s["rejects_by_reason"] == REJECTS and sum(s["rejects_by_reason"].values()) == s["rows_rejected"]
    assert (s["rows_scored"], s["rows_eligible"], s["rows_ineligible"]) == (1000, 989, 11)
    assert s["ineligible_by_reason"] == INELIGIBLE
    assert s["rows_with_response"] == 996
    assert {name: c["selected"] for name, c in s["selections"].items()} == {
        name: c["selected"] for name, c in SELECTIONS.items()
    }
    assert list(s["selections"]) == list(SELECTIONS)  # the select stage's order


def test_summary_paths_follow_the_run_directory_and_the_stages_done():
    s = report.summarize_run(make_manifest())
    assert s["location"] == "runs/unit"
    assert s["report"] == "runs/unit/report/index.html"
    assert s["selection_dir"] == "runs/unit/selection"
    assert s["compare"] is None  # evaluation has not run
    s = report.summarize_run(make_manifest(done=ALL_DONE), "s3://b/run/")
    assert s["report"] == "s3://b/run/report/index.html" and s["compare"] == "s3://b/run/evaluation/compare.md"


def test_summary_of_a_run_that_only_ingested():
    s = report.summarize_run(make_manifest(done=("data",)))
    assert s["rows_kept"] == 1000
    assert s["rows_scored"] is None and s["selections"] == {} and s["report"] is None and s["selection_dir"] is None
    text = "\n".join(report.summary_lines(s))
    assert "the selection stage has not run" in text and "report: not built yet" in text
    assert "comparison: not built yet" in text


def test_summary_never_mixes_configs():
    manifest = make_manifest(done=ALL_DONE)
    manifest["stages"]["scoring"]["status"] = "running"
    keys = {name: "k" for name in ALL_DONE} | {"evaluation": "another config's key"}
    s = report.summarize_run(manifest, keys=keys)
    assert s["rows_in"] == 1035 and s["rows_scored"] is None  # a record that is not done does not count
    assert s["compare"] is None and s["report"] is not None  # nor one done for another config


# ----- summary lines (what the CLI prints) -----


def _grid(lines: list[str]) -> dict[tuple[str, str], str]:
    """(scorer, ratio label) -> the count printed in the selection grid of summary_lines."""
    start = next(i for i, line in enumerate(lines) if line.startswith("selected rows by scorer and ratio"))
    header = lines[start + 1].split()
    assert header[0] == "scorer"
    cells = {}
    for line in lines[start + 2 :]:
        if not line.startswith("  "):
            break
        scorer, *counts = line.split()
        assert len(counts) == len(header) - 1, line
        cells.update({(scorer, label): count for label, count in zip(header[1:], counts)})
    return cells


def test_summary_lines_show_rows_every_selection_and_where_the_outputs_are():
    lines = report.summary_lines(report.summarize_run(make_manifest(done=ALL_DONE)))
    text = "\n".join(lines)
    assert "rows in: 1035 = 1000 kept + 35 rejected" in text
    for reason, n in REJECTS.items():
        assert f"{reason} {n}" in text
    assert "eligible for G-SNR: 989 of 1000 scored, 11 not" in text
    cells = _grid(lines)
    for name, counts in SELECTIONS.items():
        scorer, _, ratio = name.rpartition("_")
        assert cells[(scorer or name, ratio if scorer else "all")] == str(counts["selected"]), name
    assert cells[("full", "0.05")] == "-"
    assert "report: runs/unit/report/index.html" in lines
    assert "comparison: runs/unit/evaluation/compare.md" in lines
    assert "subsets: runs/unit/selection/<scorer>_<ratio>.jsonl (and .parquet)" in lines


def test_selection_grid_orders_ratios_numerically_and_puts_odd_names_in_all():
    labels, grid = report.selection_grid(
        {"gsnr_0.15": {"selected": 3}, "gsnr_0.05": {"selected": 1}, "ifd_1": {"selected": 9}, "full": {"selected": 7}}
    )
    assert labels == ["0.05", "0.15", "1", "all"]
    assert grid == {"gsnr": {"0.15": 3, "0.05": 1}, "ifd": {"1": 9}, "full": {"all": 7}}


# ----- the page -----

PAGE_DONE = ("data", "tokens", "ensemble", "gradients", "scoring", "selection", "report", "evaluation")
# stage -> (started, finished, seconds), not in the order the stages ran: the timings must sort by start
TIMES = {"data": ("10:00:00", "10:00:02", 2.0), "scoring": ("10:05:00", "10:05:01", 0.5),
         "tokens": ("10:00:02", "10:00:05", 3.0), "ensemble": ("10:00:05", "10:03:25", 200.0),
         "gradients": ("10:03:25", "10:05:00", 95.0), "selection": ("10:05:01", "10:05:01", 0.25),
         "report": ("10:05:02", "10:05:03", 1.25), "evaluation": ("10:05:04", "10:05:12", 8.0)}  # fmt: skip
STAGE_RECORDS = {
    "tokens": {"rows": 1000, "rows_no_response_tokens": 4, "skipped_by_reason": {"multi_turn_needs_chat": 1}},
    "ensemble": {"rows_in": 1000, "rows_trained": 996, "rows_no_response_tokens": 4},
    "gradients": {"rows": 1000, "rows_computed": 1000, "rows_no_response_tokens": 4},
}


def make_page_manifest() -> dict:
    """Every stage of a run that counts rows done, with start times, keys and what made the run."""
    manifest = make_manifest(done=("data", "scoring", "selection", "report", "evaluation"))
    for name, record in STAGE_RECORDS.items():
        manifest["stages"][name] = {"status": "done", **record}
    for name, (started, finished, seconds) in TIMES.items():
        manifest["stages"][name] |= {
            "key": f"key-{name}",
            "started": f"2026-01-01T{started}Z",
            "finished": f"2026-01-01T{finished}Z",
            "seconds": seconds,
        }
    manifest |= {
        "command": ["run", "--config", "jobs/my run.yaml"],
        "git_sha": "0123abcd" * 5,
        "config_hash": "feedbeef00112233",
        "inputs": [{"path": "/data/in.jsonl", "bytes": 4096, "sha256": "ab" * 32}],
        "versions": {"ray": "2.60.0", "torch": "2.13.0"},
    }
    return manifest


class Outline(HTMLParser):
    """Sections in page order (id, text, tags, tables), every table's rows of cell texts by class, each <img>'s src."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[dict] = []
        self.images: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.tags_before_first_section: list[str] = []
        self.style = ""
        self._table_class: list[str] = []
        self._cell: list[str] | None = None
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append({"id": attrs.get("id"), "text": "", "tags": [], "tables": []})
        elif self.sections:
            self.sections[-1]["tags"].append(tag)
        else:
            self.tags_before_first_section.append(tag)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "table":
            css = attrs.get("class", "")
            self._table_class.append(css)
            self.tables.setdefault(css, [])
            if self.sections:
                self.sections[-1]["tables"].append(css)
        if tag == "tr":
            self.tables[self._table_class[-1]].append([])
        if tag in ("td", "th") and self._table_class:
            self._cell = []
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "table":
            self._table_class.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table_class[-1]][-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data
        if self.sections:
            self.sections[-1]["text"] += data
        if self._cell is not None:
            self._cell.append(data)


def outline(page: str) -> Outline:
    parsed = Outline()
    parsed.feed(page)
    return parsed


EXAMPLES = [
    {"id": 7, "rank": "top", "gsnr": 3.5, "drop_rel": 0.9, "noise": 0.01, "g_early": 2.0, "g_late": 0.2},
    {"id": 8, "rank": "top", "gsnr": 2.5, "drop_rel": 0.8, "noise": 0.02, "g_early": 2.5, "g_late": 0.5},
    {"id": 9, "rank": "bottom", "gsnr": 0.1, "drop_rel": 0.1, "noise": 0.5, "g_early": 1.0, "g_late": 0.9},
]
LONG_ANSWER = "<b>bold</b> " + "word\n " * 300
TEXTS = {
    7: {"instruction": "Say <hi>", "input": "", "output": "hello & bye"},
    8: {"instruction": "Plan a trip", "input": "to 'Rome'", "output": LONG_ANSWER},
    9: {
        "instruction": "What is 2+2?",
        "output": "4, as I said",
        "conversation": json.dumps([{"role": r, "content": "x"} for r in ("user", "assistant", "user", "assistant")]),
    },
}
RATIOS = [0.05, 0.1]
# gsnr and random keep disjoint ids at 0.05 and share 3 of 5 ids at 0.1 (Jaccard 3/7)
SELECTED = {
    "gsnr_0.05": np.array([1, 2]),
    "random_0.05": np.array([3, 4]),
    "gsnr_0.1": np.array([1, 2, 3, 4, 5]),
    "random_0.1": np.array([3, 4, 5, 6, 7]),
}
AUDIT = {
    "rows": 100,
    "planted": 18,
    "headline": "at 10% gsnr kept 5.0% planted rows",
    "recovery": [
        {"kind": "all", "scorer": s, "ratio": r, "k": 10, "planted_share": 0.1, "ci_low": 0.02, "ci_high": 0.4,
         "auroc": 0.6, "pool_planted_share": 0.18}
        for s in ("gsnr", "random") for r in RATIOS
    ],
}  # fmt: skip
STABILITY = {"gsnr_0.05": {"members": 4, "mean_jaccard": 0.8125, "rows_in_all_loo": 30, "share_in_all_loo": 0.6}}


def make_page(manifest: dict | None = None, full: bool = False) -> str:
    """The page of `manifest`; `full`: with the manifest's accounting, timings and provenance, the scorers'
    agreement and the selections' stability."""
    summary = report.summarize_run(manifest or (make_page_manifest() if full else make_manifest()))
    if not full:
        return report.render_page(summary, list(report.FIGURES), EXAMPLES, TEXTS)
    agreement = report.scorer_agreement(SELECTED, ["gsnr", "random"], RATIOS)
    return report.render_page(
        summary, list(report.FIGURES), EXAMPLES, TEXTS, STABILITY, None, make_page_manifest(), agreement
    )


def test_page_opens_with_subset_counts_agreement_and_examples():
    parsed = outline(make_page(full=True))
    ids = [s["id"] for s in parsed.sections]
    assert ids == ["summary", "stability", "plots", "accounting", "timings", "provenance"]
    assert "img" not in parsed.tags_before_first_section and "table" not in parsed.tags_before_first_section
    opening = parsed.sections[0]
    assert opening["text"].startswith("Summary") and "img" not in opening["tags"]
    assert opening["tables"] == ["summary", "grid", "agreement", "examples"]
    assert "runs/unit" in opening["text"]
    # counts: scorer x ratio, each with its share of the rows with a response, and each scorer's eligible rows
    grid = parsed.tables["grid"]
    assert grid[0] == ["scorer \\ ratio", "0.05", "0.1", "all", "eligible"]
    cells = {row[0]: row[1:] for row in grid[1:]}
    assert cells["gsnr"] == ["51 5.1 %", "102 10.2 %", "-", "989"]
    assert cells["random"] == ["53 5.3 %", "97 9.7 %", "-", "996"]
    assert cells["full"] == ["-", "-", "996 100.0 %", "996"]
    # agreement with gsnr per ratio, and what chance gives
    agreement = parsed.tables["agreement"]
    assert agreement[0] == ["scorer \\ ratio", "0.05", "0.1"]
    assert agreement[1:] == [["random", "0.00", "0.43"], ["by chance", "0.03", "0.05"]]
    # examples: highest first, then lowest, each with its scores and texts
    examples = parsed.tables["examples"]
    assert examples[0][:3] == ["id", "G-SNR", "rel. drop"] and examples[0][-2:] == ["instruction", "response"]
    assert [row[0] for row in examples[1:]] == ["highest G-SNR", "7", "8", "lowest G-SNR", "9"]
    assert examples[2][1:3] == ["3.5", "0.9"] and examples[2][-2:] == ["Say <hi>", "hello & bye"]
    assert examples[3][-2].startswith("Plan a trip | input: to 'Rome'")
    assert examples[5][-2:] == ["4-turn conversation, first question What is 2+2?", "last answer 4, as I said"]


def test_page_order_puts_the_audit_first_after_the_opening_and_its_figure_in_it():
    manifest = make_page_manifest()
    manifest["stages"]["audit"] = {"status": "done", "key": "key-audit", "headline": AUDIT["headline"]}
    summary = report.summarize_run(manifest)
    page = report.render_page(summary, list(report.FIGURES), EXAMPLES, TEXTS, STABILITY, AUDIT, manifest)
    parsed = outline(page)
    assert [s["id"] for s in parsed.sections][:4] == ["summary", "audit", "stability", "plots"]
    audit, plots = parsed.sections[1], parsed.sections[3]
    assert audit["tags"].count("img") == 1 and plots["tags"].count("img") == len(report.FIGURES) - 1
    assert page.index("id='audit'") < page.index(f"src='{report.AUDIT_FIGURE}'") < page.index("id='stability'")
    # the opening says the audit's verdict and links to the details
    assert "At 10% gsnr kept 5.0% planted rows" in parsed.sections[0]["text"]
    assert "href='#audit'" in page and "href='#accounting'" in page


def test_accounting_table_lists_each_stage_once():
    parsed = outline(make_page(full=True))
    head, *rows = parsed.tables["accounting"]
    assert head == ["stage", "rows in", "kept", "rejected", "reasons", "what is kept"]
    stages = [row[0] for row in rows]
    assert stages == ["data", "tokens", "ensemble", "gradients", "scoring", "selection"]  # the order they run
    counts = {row[0]: row[1:5] for row in rows}
    assert counts["data"] == ["1035", "1000", "35", "duplicate 21, empty_output 9, field_too_long 5"]
    assert counts["tokens"] == ["1000", "996", "4", "multi_turn_needs_chat 1, no_response_tokens 3"]
    assert counts["ensemble"] == ["1000", "996", "4", "no_response_tokens 4"]
    assert counts["gradients"] == ["1000", "996", "4", "no_response_tokens 4"]
    assert counts["scoring"] == ["1000", "989", "11", "no_response_tokens 4, zero_early_norm 7"]
    assert counts["selection"] == ["996", "-", "-", ""]
    for stage, (rows_in, kept, rejected, _) in counts.items():
        if stage != "selection":
            assert int(rows_in) == int(kept) + int(rejected), stage
    # the subsets' rows are in the opening's grid only
    text = " ".join(" ".join(row) for row in rows)
    assert not any(name in text for name in SELECTIONS)


def test_stage_accounting_leaves_out_stages_not_done():
    manifest = make_page_manifest()
    manifest["stages"]["gradients"]["status"] = "running"
    del manifest["stages"]["tokens"]
    assert [r["stage"] for r in report.stage_accounting(manifest)] == ["data", "ensemble", "scoring", "selection"]
    assert report.stage_accounting({"stages": {}}) == []


def test_timings_and_provenance():
    parsed = outline(make_page(full=True))
    head, *rows = parsed.tables["timings"]
    assert [row[0] for row in rows] == ["data", "tokens", "ensemble", "gradients", "scoring", "selection", "report",
                                        "evaluation", "all stages"]  # fmt: skip
    seconds = {row[0]: row[2] for row in rows}
    assert seconds["ensemble"] == "200.0" and seconds["all stages"] == "310.0"
    assert rows[-1][-1] == "312.0 s from the first start to the last finish"
    assert rows[0][1] == "2026-01-01 10:00:00"
    provenance = {row[0]: row[1] for row in parsed.tables["provenance"]}
    assert provenance["command"] == "gradfilter-ray run --config 'jobs/my run.yaml'"
    assert provenance["git commit"] == "0123abcd" * 5 and provenance["config hash"] == "feedbeef00112233"
    assert provenance["seed"] == "0" and provenance["versions"] == "ray 2.60.0, torch 2.13.0"
    assert provenance["inputs"].startswith("/data/in.jsonl 4096 bytes, sha256 abababab")
    assert provenance["stage keys"].split()[:4] == ["data", "key-data", "tokens", "key-tokens"]


def test_examples_are_escaped_and_cut_short():
    page = make_page(full=True)
    assert "Say &lt;hi&gt;" in page and "hello &amp; bye" in page and "<hi>" not in page
    assert "to &#x27;Rome&#x27;" in page and "<b>" not in page
    # the long answer: its cell cut to PREVIEW_CHARS with an ellipsis, the tooltip longer, both on one line
    cell = next(row[-1] for row in outline(page).tables["examples"] if row[0] == "8")
    assert len(cell) == report.PREVIEW_CHARS and cell.endswith("…") and "  " not in cell
    title = re.search(r"title='([^']*)'>&lt;b&gt;bold", page)
    assert title and len(html.unescape(title.group(1))) == report.TOOLTIP_CHARS
    assert report.preview("a\n\n b\t c", 10) == "a b c"
    assert report.preview("x" * 30, 10) == "x" * 9 + "…"
    assert report.preview("<&>" * 5, 6) == "<&><&…"  # cut before escaping: never half an entity


def test_page_shows_every_figure_and_links_relatively():
    page = make_page()
    parsed = outline(page)
    assert parsed.images == list(report.FIGURES)  # no audit: its figure stays with the plots
    plots = next(s for s in parsed.sections if s["id"] == "plots")
    assert plots["tags"].count("img") == len(report.FIGURES)
    assert "file://" not in page and "href='/" not in page  # relative links only


def test_page_without_a_comparison_yet_links_where_it_will_be():
    page = make_page()
    assert "<a href='../evaluation/compare.md'>evaluation/compare.md</a> (written by the evaluation stage)" in page
    page = make_page(make_manifest(done=ALL_DONE))
    assert "<a href='../evaluation/compare.md'>evaluation/compare.md</a></td>" in page


def test_scorer_agreement_compares_every_scorer_with_gsnr_at_each_ratio():
    agreement = report.scorer_agreement(SELECTED, ["random", "gsnr", "ifd"], [0.1, 0.05])
    assert agreement["reference"] == "gsnr" and agreement["ratios"] == [0.05, 0.1]
    assert agreement["jaccard"] == {"random": {"0.05": 0.0, "0.1": 3 / 7}, "ifd": {"0.05": None, "0.1": None}}
    assert report.scorer_agreement(SELECTED, ["random", "ifd"], [0.1])["reference"] == "random"
    assert report.chance_jaccard(0.1) == pytest.approx(0.1 / 1.9)


def test_images_scale_down_to_the_window():
    parsed = outline(make_page())
    rules = {m.group(1).strip(): m.group(2) for m in re.finditer(r"([^{}]+)\{([^}]*)\}", parsed.style)}
    assert "max-width:100%" in rules["img"] and "height:auto" in rules["img"]
    width = re.search(r"max-width:(\d+)px", rules["body"])
    assert width and int(width.group(1)) <= 1280 - 40


# ----- plots -----


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def pngs() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    n = 300
    ids = np.arange(n, dtype=np.int64) * 5 + 1
    eligible = rng.random(n) > 0.05
    early = rng.lognormal(0, 1, n)
    late = early * rng.uniform(0.1, 1.0, n)
    noise = rng.lognormal(-2, 1, n)
    drop = (early - late) / early

    def nan(a):
        return np.where(eligible, a, np.nan)

    scores = pa.table(
        {
            "id": ids,
            "gsnr": nan(drop / np.sqrt(noise)),
            "drop_rel": nan(drop),
            "noise": nan(noise),
            "g_early": nan(early),
            "g_late": nan(late),
            "ifd": rng.uniform(0.2, 0.99, n),
            "n_response_tokens": rng.integers(1, 200, n),
        }
    )
    scorers, ratios = ["gsnr", "random", "ifd", "length", "full"], [0.05, 0.1, 0.15]
    selected = {f"{s}_{r:g}": rng.choice(ids, int(r * n), replace=False) for s in scorers[:-1] for r in ratios}
    selected["full"] = ids
    return report.render_plots(scores, selected, scorers, ratios)


def test_plots_are_pngs_that_fit_a_1280_px_window(pngs):
    assert list(pngs) == [name for name in report.FIGURES if name != report.AUDIT_FIGURE]  # drawn when audited
    assert report.PAGE_WIDTH_PX <= 1280 - 40  # the body's margins
    for name, data in pngs.items():
        width, height = _png_size(data)
        assert 300 <= width <= report.PAGE_WIDTH_PX, (name, width)
        assert height <= 1200, (name, height)


def test_score_histograms_are_a_two_by_two_grid_at_the_page_dpi(pngs):
    width, height = _png_size(pngs["score_histograms.png"])
    assert width <= report.PAGE_WIDTH_PX
    assert width / height < 2  # four side by side would be ~5:1
    assert width == round(10 * report.DPI)  # figsize 10 in wide, saved at DPI


def test_pick_examples_takes_top_and_bottom_eligible_rows_once_each():
    scores = pa.table(
        {
            "id": [1, 2, 3, 4, 5],
            "gsnr": [0.5, 2.0, np.nan, 1.0, 0.1],
        }
    )
    picked = report.pick_examples(scores, n=2)
    assert [(e["id"], e["rank"]) for e in picked] == [(2, "top"), (4, "top"), (1, "bottom"), (5, "bottom")]
    assert [e["id"] for e in report.pick_examples(scores, n=3)] == [2, 4, 1, 5]  # no row twice
    assert report.pick_examples(scores.filter(pa.array([False] * 5))) == []
