"""Run as a script by tests/test_evaluation_placement.py: a local Ray with 8 fake GPUs (`num_gpus=8` schedules like
real ones; torch.cuda stays unavailable, so the models run on CPU) and the evaluation stage's own actor pools
(`stage.evaluate_runs`) for a shipped config's evaluation section, shrunk to a few prompts and short answers.

The three fine-tuned runs are copies of the bundled tiny LLaMA (stories260K; fine-tuning them for real would cost
a Ray Train run): the first and the third are the same model, the second is perturbed, so answers can be compared
across pool widths and across runs. The evaluators are the real `ModelEvaluator`, subclassed only to record where
each actor was placed and which rows it answered when. Prints one JSON line: the records, the planned widths and
each run's output files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import ray
from placement_probe import GPUS, meet, set_meeting_deadline

from gradfilter_ray.config import load
from gradfilter_ray.evaluation import stage
from gradfilter_ray.evaluation.hf_engine import ModelEvaluator
from gradfilter_ray.storage import open_location

SEEN_ENV = "GFR_EVAL_PLACEMENT_DIR"
TINY = Path(__file__).resolve().parents[1] / "gradfilter_ray" / "assets" / "models" / "stories260K"
RUNS = {"gsnr_0.1": "base", "ifd_0.1": "perturbed", "random_0.1": "base"}
SHRUNK = [
    "evaluation.test_sets=[vicuna]",
    "evaluation.max_prompts_per_set=64",
    "evaluation.max_new_tokens=4",
    "evaluation.heldout_limit=32",
    "finetune.max_length=256",  # the tiny model's context, not the 7B's
]


class PlacedEvaluator(ModelEvaluator):
    """The stage's evaluator, recording its placement and, per batch, the rows' positions and when it ran."""

    def __init__(self, model, evaluation: dict, max_length: int, **prompt) -> None:
        # Placement is recorded first: an actor the pool no longer needs may be stopped while it loads its model.
        self.facts = {
            "run": Path(model.path).parent.name,
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "started": time.time(),
            "batches": [],
        }
        self.record = Path(os.environ[SEEN_ENV], f"actor-{uuid.uuid4().hex}.json")
        self.record.write_text(json.dumps(self.facts))
        super().__init__(model, evaluation, max_length, **prompt)
        self.facts["device"] = str(self.device)
        self.record.write_text(json.dumps(self.facts))

    def __call__(self, table):
        # every run's actors are up before any batch is answered: the first ones cannot answer every row while the
        # last are still starting
        meet(lambda: len(list(self.record.parent.glob("actor-*.json"))), GPUS)
        begun = time.time()
        out = super().__call__(table)
        positions = table[stage.POSITION].to_pylist()
        self.facts["batches"].append({"positions": positions, "start": begun, "end": time.time()})
        self.record.write_text(json.dumps(self.facts))
        return out


def make_models(root: Path) -> dict:
    """The runs' model folders: stories260K as is, or with its output layer scaled (other answers)."""
    from safetensors.torch import load_file, save_file

    models = {}
    for run, kind in RUNS.items():
        folder = root / run / "model"
        shutil.copytree(TINY, folder)
        if kind == "perturbed":
            weights = load_file(str(folder / "model.safetensors"))
            name = next(n for n in weights if "embed_tokens" in n)
            weights[name] = weights[name].flip(0).contiguous()  # every token embedded as another
            save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        models[run] = open_location(str(folder))
    return models


def evaluate(folder: Path, config_path: str, num_cpus: int) -> dict:
    """The shrunk evaluation in `folder`: what the actors recorded, the stage's log and each run's output files."""
    began = time.perf_counter()
    cfg = load(config_path, [f"output_dir={folder}/out", *SHRUNK])
    models = make_models(folder / "finetune")
    lines: list[str] = []
    os.environ[SEEN_ENV] = str(folder)  # the local Ray's workers inherit this process's environment
    set_meeting_deadline()
    ray.init(address="local", num_cpus=num_cpus, num_gpus=GPUS, include_dashboard=False, logging_level="ERROR")
    seconds = {"ray_init": time.perf_counter() - began}
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False  # as the CLI runs it (runtime.configure_data_context)
        rows = stage.evaluation_rows(cfg.evaluation)
        tables = stage.evaluate_runs(cfg, models, rows, log=lines.append, evaluator=PlacedEvaluator)
        seconds["evaluation"] = time.perf_counter() - began - seconds["ray_init"]
    finally:
        ray.shutdown()
    outputs = {}
    for run, table in tables.items():
        out = folder / "evaluation" / run
        stage.write_run(open_location(str(out)), table, "0123456789abcdef")
        outputs[run] = {name: (out / name).read_text() for name in ("generations.jsonl", "heldout.json")}
    placed = [json.loads(p.read_text()) for p in sorted(folder.glob("actor-*.json"))]
    rows_per_run = tables["gsnr_0.1"].num_rows
    return {"placed": placed, "log": lines, "rows": rows_per_run, "outputs": outputs, "seconds": seconds}


def main(config_path: str, num_cpus: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="eval-placement-"))
    try:
        print(json.dumps(evaluate(folder, config_path, num_cpus)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
