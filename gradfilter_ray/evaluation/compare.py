"""The comparison of fine-tuned runs: a table (CSV + Markdown) and plots, built only from files on disk.

Reads ``finetune/{run}/train_loss.csv`` and ``train_summary.json`` plus the evaluation stage's ``runs.json`` and
``judge.json``; writes ``compare.csv`` (one row per run: run, scorer, ratio, n_train, heldout_loss, final
train loss, and ``pws_<testset>`` / ``pws_all`` when a judge ran), ``compare.md``, ``train_loss.png`` (every
run's training-loss curve on one plot, the paper's Figure 3) and ``heldout_loss.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from gradfilter_ray.storage import Location

BASE_COLUMNS = ["run", "scorer", "ratio", "n_train", "heldout_loss", "final_train_loss", "judged_against"]


def read_loss_curve(path: Path | Location) -> tuple[list[int], list[float]]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def comparison_rows(runs: dict[str, dict], judge: dict, finetune_dir: Path | Location) -> tuple[list[str], list[dict]]:
    judged = judge.get("runs", {}) if judge.get("status") == "ran" else {}
    test_sets = sorted({s for r in judged.values() for s in r["per_set"]})
    columns = BASE_COLUMNS + [f"pws_{s}" for s in test_sets] + (["pws_all"] if judged else [])
    rows = []
    for name, info in sorted(runs.items(), key=lambda kv: (kv[1]["ratio"], kv[1]["scorer"])):
        _, losses = read_loss_curve(finetune_dir / name / "train_loss.csv")
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


def write_comparison(eval_dir: Path, finetune_dir: Path | Location) -> list[dict]:
    runs = json.loads((eval_dir / "runs.json").read_text())
    judge = json.loads((eval_dir / "judge.json").read_text())
    columns, rows = comparison_rows(runs, judge, finetune_dir)
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
    _plots(eval_dir, finetune_dir, rows)
    return rows


def _plots(eval_dir: Path, finetune_dir: Path | Location, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        steps, losses = read_loss_curve(finetune_dir / row["run"] / "train_loss.csv")
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
