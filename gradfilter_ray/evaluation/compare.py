"""The comparison of fine-tuned runs: a table (CSV + Markdown) and plots, built only from small files on disk.

This config's view of the evaluation: reads the evaluation stage's ``runs.json`` and ``judge.json`` and each run's
``train_loss.csv`` in its fine-tuned subset's folder (``runs.json`` names it: ``finetune/{run}-{key}/``); writes
``compare.csv`` (one row per run: run, scorer, ratio, n_train, heldout_loss, final train loss, and
``pws_<testset>`` / ``pws_all`` when a judge ran), ``compare.md``, ``train_loss.png`` (every run's training-loss
curve on one plot, the paper's Figure 3) and ``heldout_loss.png``. `rebuild_comparison` rebuilds them in a run
directory from its view files alone (`gradfilter-ray compare`): no answer file or model is read.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from pathlib import Path

from gradfilter_ray.storage import Location

VIEW_INPUTS = ("runs.json", "judge.json")  # what the evaluation stage writes for this config
COMPARISON = ("compare.csv", "compare.md", "train_loss.png", "heldout_loss.png")  # built from them here
BASE_COLUMNS = ["run", "scorer", "ratio", "n_train", "heldout_loss", "final_train_loss", "judged_against"]


def read_loss_curve(path: Path | Location) -> tuple[list[int], list[float]]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def loss_curve_of(root: Path | Location, name: str, info: dict) -> Path | Location:
    """A run's training-loss file: in the subset folder `runs.json` names (`finetune/{name}` in older run
    directories, whose runs.json names none)."""
    return root / info.get("finetune", f"finetune/{name}") / "train_loss.csv"


def comparison_rows(
    runs: dict[str, dict], judge: dict, curves: dict[str, tuple[list[int], list[float]]]
) -> tuple[list[str], list[dict]]:
    """The table's columns and rows: one row per run, by ratio then scorer (`curves`: each run's loss curve)."""
    judged = judge.get("runs", {}) if judge.get("status") == "ran" else {}
    test_sets = sorted({s for r in judged.values() for s in r["per_set"]})
    columns = BASE_COLUMNS + [f"pws_{s}" for s in test_sets] + (["pws_all"] if judged else [])
    rows = []
    for name, info in sorted(runs.items(), key=lambda kv: (kv[1]["ratio"], kv[1]["scorer"])):
        _, losses = curves[name]
        row = {
            "run": name,
            "scorer": info["scorer"],
            "ratio": info["ratio"],
            "n_train": info["n_train"],
            "heldout_loss": info.get("heldout_loss"),
            "final_train_loss": losses[-1] if losses else None,
            "judged_against": judged.get(name, {}).get("reference", ""),
        }
        for s in test_sets:
            row[f"pws_{s}"] = judged.get(name, {}).get("per_set", {}).get(s, {}).get("pws")
        if judged:
            row["pws_all"] = judged.get(name, {}).get("overall", {}).get("pws")
        rows.append(row)
    return columns, rows


def _fmt(value, digits: int | None = None) -> str:
    """'' for a missing value; floats at full precision in the CSV, `digits` significant ones in the Markdown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}g}"
    return repr(value) if isinstance(value, float) else str(value)


def write_comparison(eval_dir: Path, root: Path | Location) -> list[dict]:
    """The comparison files in the local folder `eval_dir`, from its runs.json and judge.json and the loss curves
    under the run directory `root`; the table's rows."""
    runs = json.loads((eval_dir / "runs.json").read_text())
    judge = json.loads((eval_dir / "judge.json").read_text())
    curves = {name: read_loss_curve(loss_curve_of(root, name, info)) for name, info in runs.items()}
    columns, rows = comparison_rows(runs, judge, curves)
    with (eval_dir / "compare.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: _fmt(r.get(c)) for c in columns} for r in rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c), digits=4) for c in columns) + " |" for r in rows]
    note = (
        "PWS = (wins - losses) / all + 1 against the run named in `judged_against`, both answer orders per prompt."
        if judge.get("status") == "ran"
        else f"Judge: {judge.get('status', 'not run')} ({judge.get('reason', '')})."
    )
    (eval_dir / "compare.md").write_text(
        "# Fine-tuned runs compared\n\n" + "\n".join(lines) + "\n\nheldout_loss: mean response-token loss on the "
        "AlpacaEval reference answers (lower is better).\n" + note + "\n"
    )
    _plots(eval_dir, rows, curves)
    return rows


def publish(local: Path, evaluation: Path | Location, names: tuple[str, ...]) -> None:
    """Each named file of `local` written to `evaluation/` on its own (the folder also holds every config's evaluated
    runs and judged pairs: it is never replaced whole)."""
    for name in names:
        if (local / name).exists():
            (evaluation / name).write_bytes((local / name).read_bytes())


def rebuild_comparison(evaluation: Path | Location, root: Path | Location) -> tuple[list[dict], str]:
    """Rebuild the comparison files in a run directory's `evaluation/` from its runs.json and judge.json (the view
    of the config that ran the stage last); the table's rows and compare.md's text."""
    with tempfile.TemporaryDirectory(prefix="gfr-compare-") as tmp:
        local = Path(tmp)
        for name in VIEW_INPUTS:
            (local / name).write_bytes((evaluation / name).read_bytes())
        rows = write_comparison(local, root)
        publish(local, evaluation, COMPARISON)
        return rows, (local / "compare.md").read_text()


def _plots(eval_dir: Path, rows: list[dict], curves: dict[str, tuple[list[int], list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        steps, losses = curves[row["run"]]
        ax.plot(steps, losses, label=row["run"], linewidth=1.2)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss per subset")
    if rows:  # with no run there is nothing to label, and matplotlib warns about an empty legend
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(eval_dir / "train_loss.png", dpi=90)

    scored = [r for r in rows if r["heldout_loss"] is not None]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r["run"] for r in scored], [r["heldout_loss"] for r in scored])
    ax.set_ylabel("held-out loss")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(eval_dir / "heldout_loss.png", dpi=90)
    plt.close("all")
