"""How the evaluation runs (pure, no Ray): which engine generates the answers, and how many actors each fine-tuned
run gets, in which waves.

Width: every actor holds one run's model, so the actors are shared out between runs. Runs are taken in waves of at
most `actors` runs, all runs of a wave evaluated at once: full waves give each run one actor, the last wave shares
all actors among its runs (9 runs on 8 GPUs: 8 runs side by side, then the 9th on all 8 GPUs, close to the ideal
9/8 of one run's time). A run never gets more actors than it has batches: an actor without a batch only idles.
"""

from __future__ import annotations

import math

ENGINES = ("vllm", "hf")
# On CPU every actor holds a whole copy of its model in host memory, and its threads already use cpus_per_actor
# cores: wider pools cost memory linearly for little gain. Set evaluation.num_actors to go wider on purpose.
MAX_CPU_ACTORS = 8


def choose_engine(requested: str, gpus_per_actor: float, vllm_installed: bool, models_local: bool) -> tuple[str, str]:
    """(engine, why) for evaluation.engine = `requested` (auto, vllm or hf). An explicit vllm that cannot run
    raises rather than silently becoming hf; auto says why it chose what it chose. The engine chosen keys every
    evaluated run (`keys.run_key`); `config.RESOLVED_VALUES` resolves `auto` from the config alone, for the stage's
    key, and cannot see whether vllm is installed or the models are local."""
    if requested == "hf":
        return "hf", "evaluation.engine is hf"
    if requested == "vllm":
        if not vllm_installed:
            raise RuntimeError(
                "evaluation.engine is vllm but vllm is not installed (pip install 'gradfilter-ray[vllm]')"
            )
        if not models_local:
            raise RuntimeError(
                "evaluation.engine is vllm but the fine-tuned models are in an object store: vLLM is given a local "
                "or shared-filesystem path here (use engine hf or auto)"
            )
        return "vllm", "evaluation.engine is vllm"
    if gpus_per_actor <= 0:
        return "hf", "auto: gpus_per_actor is 0 (vLLM needs a GPU)"
    if gpus_per_actor > 1 and not float(gpus_per_actor).is_integer():
        return "hf", f"auto: gpus_per_actor {gpus_per_actor} is neither a share of one GPU nor a whole number of GPUs"
    if not vllm_installed:
        return "hf", "auto: vllm is not installed in the driver's environment (pip install 'gradfilter-ray[vllm]')"
    if not models_local:
        return "hf", "auto: the fine-tuned models are in an object store (vLLM is given local or shared paths)"
    return "vllm", "auto: gpus_per_actor > 0 and vllm is installed"


def cluster_width(resources: dict, cpus_per_actor: float, gpus_per_actor: float) -> int:
    """How many actors of (cpus_per_actor, gpus_per_actor) the cluster's resources (ray.cluster_resources()) hold
    at once: the GPUs bound it on GPU, the CPUs (up to MAX_CPU_ACTORS) on CPU. At least 1, so that a cluster that
    has not scaled up yet still gets an actor to scale up for."""
    by_cpu = math.floor(resources.get("CPU", 0.0) / cpus_per_actor + 1e-9)
    if gpus_per_actor > 0:
        width = min(math.floor(resources.get("GPU", 0.0) / gpus_per_actor + 1e-9), by_cpu)
    else:
        width = min(by_cpu, MAX_CPU_ACTORS)
    return max(1, width)


def share(actors: int, caps: list[int]) -> list[int]:
    """`actors` shared among runs as evenly as possible, each at least 1 and at most its cap (its batches);
    earlier runs take the odd ones. Assumes len(caps) <= actors."""
    widths = [1] * len(caps)
    left = actors - len(caps)
    while left > 0:
        open_runs = [i for i, (w, c) in enumerate(zip(widths, caps)) if w < c]
        if not open_runs:
            break
        for i in open_runs[:left]:
            widths[i] += 1
        left -= min(left, len(open_runs))
    return widths


def plan_waves(batches: dict[str, int], actors: int) -> list[dict[str, int]]:
    """Waves of {run: actors}, in run order: runs in one wave are evaluated together, the waves one after another.
    `batches` holds each run's number of batches (its width cap); no wave uses more than `actors` actors."""
    if actors < 1:
        raise ValueError("actors must be >= 1")
    runs = list(batches)
    waves = []
    for start in range(0, len(runs), actors):
        wave = runs[start : start + actors]
        waves.append(dict(zip(wave, share(actors, [max(1, batches[r]) for r in wave]))))
    return waves
