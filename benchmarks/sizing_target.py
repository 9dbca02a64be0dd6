"""Target fine-tuning and evaluation in the sizing table: the GPU check's ~1B measurement scaled to the shipped
configs' LLaMA-2 7B / 13B targets (benchmarks/sizing.py prints it under the ensemble/extraction table).

The assumptions, printed with the table (ASSUMPTIONS):
- Training costs ~6·N FLOPs a token (8·N with activation recompute, the same factor at every size) and a GPU sustains
  the same FLOP rate at 7B/13B as at the measured size, so tokens/s per GPU scales as N_measured / N.
- A subset's GPUs add up linearly: the check runs one GPU (world size 1), so no ZeRO-3 gather/reduce-scatter time is
  in it; on 8 GPUs of one node (NVLink) that costs some, over TCP much more. The fine-tuning hours are a lower bound.
- Generation costs ~2·N FLOPs a token and at these batch sizes is bound by reading the weights every step, so new
  tokens/s scales as N_measured / N too; every answer is taken to run to max_new_tokens (an upper bound), measured
  with transformers' generate (the `hf` engine; vLLM's continuous batching is not measured). The held-out loss
  pass (805 forwards a run) is left out.
- A row averages MEAN_TOKENS tokens (Alpaca template, GPT-2 BPE, the bundled 1k Alpaca sample: 112; LLaMA's
  SentencePiece gives somewhat more on English; pass --mean-tokens for another corpus).
- Checkpoint and model bytes scale with N at the measured bytes per parameter.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIGS = REPO / "jobs" / "configs"
SHIPPED = {"alpaca_llama2_7b": 52_002, "alpaca_llama2_13b": 52_002, "million_template": 1_000_000}  # config: rows
MEAN_TOKENS = 112.0
# LLaMA-2's published shapes (no grouped-query attention at 7B/13B), keyed by the size in the hub name.
LLAMA2 = {
    "7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008},
    "13b": {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "intermediate_size": 13824},
}
ASSUMPTIONS = [line.strip() for line in __doc__.split("(ASSUMPTIONS):")[1].split("\n- ")[1:]]


def llama_params(shape: dict) -> int:
    """Parameters of a LLaMA-shaped model: attention (q, o full; k, v by kv heads), the SwiGLU MLP, two RMSNorms a
    layer, the final norm, embedding and an untied LM head."""
    h, heads = shape["hidden_size"], shape["num_attention_heads"]
    kv = shape.get("num_key_value_heads") or heads
    attention = 2 * h * h + 2 * h * kv * (h // heads)
    layer = attention + 3 * h * shape["intermediate_size"] + 2 * h
    head = 1 if shape.get("tie_word_embeddings") else 2
    return shape["num_hidden_layers"] * layer + head * shape.get("vocab_size", 32000) * h + h


def size_key(name_or_path: str) -> str:
    low = name_or_path.lower()
    for key in LLAMA2:
        if f"-{key}" in low:
            return key
    raise ValueError(f"no LLaMA-2 shape known for {name_or_path!r} (known sizes: {sorted(LLAMA2)})")


@dataclass(frozen=True)
class TargetMeasured:
    device: str
    params: int
    tokens_per_s: float  # fine-tuning, one GPU, all positions of the forward
    checkpoint_bytes_per_param: float
    checkpoint_write_bytes_per_s: float
    final_bytes_per_param: float
    gen_tokens_per_s: dict[int, float]  # batch size -> new tokens/s

    @classmethod
    def from_check(cls, check: dict) -> TargetMeasured | None:
        t = check.get("target")
        if not t or "error" in t:
            return None
        env = check.get("environment", {})
        return cls(
            device=env.get("gpu") or env.get("device", "?"),
            params=int(t["model"]["params"]),
            tokens_per_s=float(t["train"]["tokens_per_s"]),
            checkpoint_bytes_per_param=float(t["checkpoint"]["bytes_per_param"]),
            checkpoint_write_bytes_per_s=float(t["checkpoint"]["write_bytes_per_s"]),
            final_bytes_per_param=float(t["final_save"]["bytes_per_param"]),
            gen_tokens_per_s={int(b): float(g["new_tokens_per_s"]) for b, g in t["generation"]["batches"].items()},
        )

    def gen_rate(self, batch: int) -> tuple[int, float]:
        """(measured batch used, its new tokens/s): the largest measured batch not above `batch` (a smaller batch
        is slower, so this errs long), else the smallest measured."""
        below = [b for b in self.gen_tokens_per_s if b <= batch]
        used = max(below) if below else min(self.gen_tokens_per_s)
        return used, self.gen_tokens_per_s[used]


@dataclass(frozen=True)
class SubsetEstimate:
    config: str
    target: str
    params: int
    gpus: int  # per subset
    ratio: float  # 1.0 for the run on the whole dataset (finetune.full)
    runs: int  # subsets at this ratio: one per scorer
    rows: int
    train_tokens: float
    finetune_hours: float  # wall-clock for one subset on its gpus
    checkpoint_bytes: float  # one resumable save (all ranks together)
    saves: int  # resumable saves per subset (the stage's checkpoint_due)
    model_bytes: float  # the final save
    eval_prompts: int
    eval_batch: int
    eval_batch_measured: int
    eval_hours: float  # one run, one evaluation actor (one GPU)


def prompt_count(test_sets: list[str], cap: int | None) -> int:
    from gradfilter_ray.evaluation.testsets import load_test_set

    return sum(min(len(load_test_set(name)), cap or math.inf) for name in test_sets)


def estimate(measured: TargetMeasured, name: str, rows_total: int, mean_tokens: float) -> list[SubsetEstimate]:
    """One estimate per selection ratio of a shipped config (every scorer at a ratio costs the same)."""
    from gradfilter_ray.config import load
    from gradfilter_ray.finetune.ds_config import checkpoint_due, plan_training

    cfg = load(CONFIGS / f"{name}.yaml")
    ft, ev = cfg.finetune, cfg.evaluation
    key = size_key(ft.model.name_or_path or "")
    n = llama_params(LLAMA2[key])
    gpus = int(ft.num_workers * max(1, ft.gpus_per_worker))
    tokens_per_s_gpu = measured.tokens_per_s * measured.params / n
    prompts = prompt_count(ev.test_sets, ev.max_prompts_per_set)
    used, gen_rate = measured.gen_rate(ev.batch_size)
    eval_s = prompts * ev.max_new_tokens / (gen_rate * measured.params / n)
    ratios = ft.ratios if ft.ratios is not None else cfg.selection.ratios
    runs = [(r, len(ft.scorers)) for r in ratios] + ([(1.0, 1)] if ft.full else [])
    out = []
    for ratio, count in runs:
        rows = int(rows_total * ratio)
        tokens = rows * ft.epochs * mean_tokens
        plan = plan_training(rows, ft, ft.num_workers)
        saves = sum(checkpoint_due(s, plan, ft.checkpoint_every_steps) for s in range(1, plan.total_steps + 1))
        out.append(
            SubsetEstimate(
                config=name,
                target=f"LLaMA-2 {key.upper()}",
                params=n,
                gpus=gpus,
                ratio=ratio,
                runs=count,
                rows=rows,
                train_tokens=tokens,
                finetune_hours=tokens / (tokens_per_s_gpu * gpus) / 3600,
                checkpoint_bytes=measured.checkpoint_bytes_per_param * n,
                saves=saves,
                model_bytes=measured.final_bytes_per_param * n,
                eval_prompts=prompts,
                eval_batch=ev.batch_size,
                eval_batch_measured=used,
                eval_hours=eval_s / 3600,
            )
        )
    return out


def totals(estimates: list[SubsetEstimate]) -> dict[str, dict[str, float]]:
    """Per config: GPU-hours of every fine-tuning subset and of every evaluation run together."""
    out: dict[str, dict[str, float]] = {}
    for e in estimates:
        t = out.setdefault(e.config, {"finetune_gpu_hours": 0.0, "eval_gpu_hours": 0.0, "runs": 0})
        t["finetune_gpu_hours"] += e.runs * e.finetune_hours * e.gpus
        t["eval_gpu_hours"] += e.runs * e.eval_hours
        t["runs"] += e.runs
    return out


def markdown(measured: TargetMeasured | None, estimates: list[SubsetEstimate], mean_tokens: float) -> str:
    if measured is None:
        return "Target fine-tuning and evaluation: not in the check (no `target` step, or it failed): not estimated.\n"
    gen = ", ".join(f"{r:,.0f} at batch {b}" for b, r in sorted(measured.gen_tokens_per_s.items()))
    lines = [
        f"Target measured on {measured.device} with a {measured.params:,}-parameter LLaMA-shaped model (ZeRO-3, "
        f"world size 1): fine-tuning {measured.tokens_per_s:,.0f} tokens/s, checkpoint "
        f"{measured.checkpoint_bytes_per_param:.1f} bytes/param written at "
        f"{measured.checkpoint_write_bytes_per_s / 1e9:.2f} GB/s, generation {gen} new tokens/s.",
        "Scaled to the shipped configs under these assumptions:",
        *(f"- {a.replace('MEAN_TOKENS', f'{mean_tokens:g}')}" for a in ASSUMPTIONS),
        "",
        "| config | target | ratio | subsets | rows | GPUs/subset | fine-tune h/subset | checkpoint GB/save | "
        "saves/subset | model GB | eval prompts (batch) | eval h/run (1 GPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in estimates:
        lines.append(
            f"| {e.config} | {e.target} | {e.ratio:g} | {e.runs} | {e.rows:,} | {e.gpus} | {e.finetune_hours:.2f} | "
            f"{e.checkpoint_bytes / 1e9:.0f} | {e.saves} | {e.model_bytes / 1e9:.1f} | "
            f"{e.eval_prompts:,} ({e.eval_batch}; rate of {e.eval_batch_measured}) | {e.eval_hours:.2f} |"
        )
    lines.append("")
    for name, t in totals(estimates).items():
        lines.append(
            f"{name}: {t['runs']} runs, fine-tuning {t['finetune_gpu_hours']:.1f} GPU-hours, evaluation "
            f"{t['eval_gpu_hours']:.1f} GPU-hours."
        )
    return "\n".join(lines) + "\n"
