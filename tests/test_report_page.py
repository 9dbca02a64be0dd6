"""The report's pure parts (no Ray, no files): the run summary from a hand-built manifest, its text lines for the
CLI, the page's order (summary and row accounting first, then plots) and plots that fit a 1280 px wide window."""

from __future__ import annotations

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


class Outline(HTMLParser):
    """Sections in page order (id, text, tags), the accounting table's rows, and every <img>'s src."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[dict] = []
        self.images: list[str] = []
        self.accounting: list[list[str]] = []
        self.tags_before_first_section: list[str] = []
        self.style = ""
        self._table_class: list[str] = []
        self._cell: list[str] | None = None
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append({"id": attrs.get("id"), "text": "", "tags": []})
        elif self.sections:
            self.sections[-1]["tags"].append(tag)
        else:
            self.tags_before_first_section.append(tag)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "table":
            self._table_class.append(attrs.get("class", ""))
        if tag == "tr" and self._table_class[-1:] == ["accounting"]:
            self.accounting.append([])
        if tag in ("td", "th") and self._table_class[-1:] == ["accounting"]:
            self._cell = []
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "table":
            self._table_class.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.accounting[-1].append("".join(self._cell).strip())
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
    {"id": 9, "rank": "bottom", "gsnr": 0.1, "drop_rel": 0.1, "noise": 0.5, "g_early": 1.0, "g_late": 0.9},
]


def make_page(manifest: dict | None = None) -> str:
    summary = report.summarize_run(manifest or make_manifest())
    texts = {7: {"instruction": "Say <hi>", "output": "hello & bye"}}
    return report.render_page(summary, list(report.FIGURES), EXAMPLES, texts)


def test_page_opens_with_the_summary_holding_the_row_accounting():
    parsed = outline(make_page())
    assert [s["id"] for s in parsed.sections] == ["summary", "plots", "examples"]
    assert "img" not in parsed.tags_before_first_section and "table" not in parsed.tags_before_first_section
    summary = parsed.sections[0]
    assert summary["text"].startswith("Summary") and "img" not in summary["tags"]
    assert "runs/unit" in summary["text"] and "this page" in summary["text"]
    rows = {(r[0], r[1]): r[2] for r in parsed.accounting[1:]}
    assert parsed.accounting[0][:3] == ["stage", "rows", "count"]
    assert rows[("data", "rows in")] == "1035" and rows[("data", "kept")] == "1000"
    assert rows[("data", "rejected")] == "35"
    for reason, n in REJECTS.items():
        assert rows[("data", f"rejected: {reason}")] == str(n)
    for reason, n in INELIGIBLE.items():
        assert rows[("scoring", f"ineligible: {reason}")] == str(n)
    assert rows[("scoring", "eligible for G-SNR")] == "989"
    for name, counts in SELECTIONS.items():
        assert rows[("selection", f"selected: {name}")] == str(counts["selected"])


def test_page_shows_every_figure_after_the_accounting_and_escapes_text():
    page = make_page()
    parsed = outline(page)
    assert parsed.images == list(report.FIGURES)
    plots = parsed.sections[1]
    assert plots["tags"].count("img") == len(report.FIGURES)
    assert page.index("class='accounting'") < page.index("<img")
    assert "Say &lt;hi&gt;" in page and "hello &amp; bye" in page and "<hi>" not in page
    assert "file://" not in page and "href='/" not in page  # relative links only


def test_page_without_a_comparison_yet_links_where_it_will_be():
    page = make_page()
    assert "<a href='../evaluation/compare.md'>evaluation/compare.md</a> (written by the evaluation stage)" in page
    page = make_page(make_manifest(done=ALL_DONE))
    assert "<a href='../evaluation/compare.md'>evaluation/compare.md</a></td>" in page


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
