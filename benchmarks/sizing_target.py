"""Target fine-tuning and evaluation in the sizing table: the GPU check's ~1B measurement scaled to the shipped
configs' LLaMA-2 7B / 13B targets (benchmarks/sizing.py prints it under the ensemble/extraction table), and the
corpus's token lengths that every estimate of the sizing table counts in.

The assumptions, printed with the table (ASSUMPTIONS):
- Training costs ~6·N FLOPs a token (8·N with activation recompute, the same factor at every size) and a GPU sustains
  the same FLOP rate at 7B/13B as at the measured size, so tokens/s per GPU scales as N_measured / N.
- A subset's GPUs add up linearly: the check runs one GPU (world size 1), so no ZeRO gather/reduce time is in it; the
  fine-tuning hours are a lower bound. The communication per step is estimated apart (docs/scale.md, the
  micro-batch and ZeRO stage table).
- Every token of a micro-batch padded to its longest row costs the same: a row costs E[longest of micro_batch_size
  rows drawn at random] tokens, from LENGTHS_NOTE.
- Generation costs ~2·N FLOPs a token and at these batch sizes is bound by reading the weights every step, so new
  tokens/s scales as N_measured / N too; every answer is taken to run to max_new_tokens (an upper bound), measured
  with transformers' generate (the `hf` engine; vLLM's continuous batching is not measured). The held-out loss
  pass (805 forwards a run) is left out.
- Checkpoint and model bytes scale with N at the measured bytes per parameter (a ZeRO-2 config at the bf16 ZeRO-2
  bytes of benchmarks/results/checkpoint_bytes.json when the check measured ZeRO-3).

Token lengths (benchmarks/results/alpaca_token_lengths.json) are measured, not assumed:
    pip install sentencepiece   # LLaMA-2's tokenizer.model needs it; GPT-2's BPE ships in the package
    python benchmarks/sizing_target.py --measure-lengths --llama2-tokenizer PATH/TO/tokenizer.model
tokenises the bundled Alpaca sample (5,000 real rows of the 52k, uniformly drawn) with the project's own
tokenisation (`data.tokenized.tokenize_table`, Alpaca template, EOS included) under GPT-2 at the proxy's max_length
512 and LLaMA-2 at the target's 1024, and records each row's token count.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIGS = REPO / "jobs" / "configs"
RESULTS = REPO / "benchmarks" / "results"
LENGTHS = RESULTS / "alpaca_token_lengths.json"
CHECKPOINT_BYTES = RESULTS / "checkpoint_bytes.json"
SHIPPED = {"alpaca_llama2_7b": 52_002, "alpaca_llama2_13b": 52_002, "million_template": 1_000_000}  # config: rows
# LLaMA-2's published shapes (no grouped-query attention at 7B/13B), keyed by the size in the hub name.
LLAMA2 = {
    "7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008},
    "13b": {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "intermediate_size": 13824},
}
# meta-llama/Llama-2-7b-hf's tokenizer settings: BOS added, EOS not (the Alpaca template appends it)
LLAMA2_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "legacy": True,
}
LENGTHS_NOTE = (
    "the token lengths of the bundled Alpaca sample (5,000 real rows of the 52k) under the project's tokenisation "
    "(benchmarks/results/alpaca_token_lengths.json)"
)
ASSUMPTIONS = [line.strip() for line in __doc__.split("(ASSUMPTIONS):")[1].split("\n\n")[0].split("\n- ")[1:]]


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
class TokenLengths:
    """How many tokens a corpus's rows have under one tokenizer at one max_length: a histogram length -> rows."""

    tokenizer: str
    max_length: int
    histogram: dict[int, int]

    @property
    def rows(self) -> int:
        return sum(self.histogram.values())

    @property
    def mean(self) -> float:
        return sum(n * c for n, c in self.histogram.items()) / self.rows

    def padded_per_row(self, batch: int) -> float:
        """Tokens a row costs in a batch of `batch` rows drawn at random and padded to its longest row:
        E[max of `batch` lengths] (rows drawn independently: the corpus is much larger than a batch)."""
        expected, below, rows = 0.0, 0, self.rows
        for length in sorted(self.histogram):
            at_most = below + self.histogram[length]
            expected += length * ((at_most / rows) ** batch - (below / rows) ** batch)
            below = at_most
        return expected

    def padding_efficiency(self, batch: int) -> float:
        return self.mean / self.padded_per_row(batch)


def load_lengths(name: str, path: Path = LENGTHS) -> TokenLengths:
    """`name`: gpt2 (the proxy) or llama2 (the target) in the measured lengths file."""
    entry = json.loads(Path(path).read_text())["tokenizers"][name]
    return TokenLengths(name, entry["max_length"], {int(k): v for k, v in entry["histogram"].items()})


def checkpoint_bytes_per_param(stage: int, path: Path = CHECKPOINT_BYTES) -> float:
    """Bytes a parameter of one bf16 ZeRO checkpoint, as bench_checkpoint_bytes.py measured it."""
    return float(json.loads(Path(path).read_text())["measured"]["bytes_per_param"][f"zero{stage}_bf16"])


@dataclass(frozen=True)
class TargetMeasured:
    device: str
    params: int
    tokens_per_s: float  # fine-tuning, one GPU, all positions of the forward (no padding)
    zero_stage: int
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
            zero_stage=int(t["train"].get("zero_stage", 3)),
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

    def bytes_per_param(self, stage: int) -> float:
        return self.checkpoint_bytes_per_param if stage == self.zero_stage else checkpoint_bytes_per_param(stage)


@dataclass(frozen=True)
class SubsetEstimate:
    config: str
    target: str
    params: int
    gpus: int  # per subset
    ratio: float  # 1.0 for the run on the whole dataset (finetune.full)
    runs: int  # subsets at this ratio: one per scorer
    rows: int
    train_tokens: float  # padded: what the GPUs compute
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


def subset_runs(cfg) -> list[tuple[float, int]]:
    """(selection ratio, subsets at it) for every subset a config fine-tunes; 1.0 for `full`."""
    ft = cfg.finetune
    ratios = ft.ratios if ft.ratios is not None else cfg.selection.ratios
    return [(r, len(ft.scorers)) for r in ratios] + ([(1.0, 1)] if ft.full else [])


def estimate(measured: TargetMeasured, name: str, rows_total: int, lengths: TokenLengths) -> list[SubsetEstimate]:
    """One estimate per selection ratio of a shipped config (every scorer at a ratio costs the same)."""
    from gradfilter_ray.config import load
    from gradfilter_ray.finetune.ds_config import checkpoint_steps, plan_training

    cfg = load(CONFIGS / f"{name}.yaml")
    ft, ev = cfg.finetune, cfg.evaluation
    key = size_key(ft.model.name_or_path or "")
    n = llama_params(LLAMA2[key])
    gpus = int(ft.num_workers * max(1, ft.gpus_per_worker))
    tokens_per_s_gpu = measured.tokens_per_s * measured.params / n
    per_row = lengths.padded_per_row(ft.micro_batch_size)
    prompts = prompt_count(ev.test_sets, ev.max_prompts_per_set)
    used, gen_rate = measured.gen_rate(ev.batch_size)
    eval_s = prompts * ev.max_new_tokens / (gen_rate * measured.params / n)
    out = []
    for ratio, count in subset_runs(cfg):
        rows = int(rows_total * ratio)
        tokens = rows * ft.epochs * per_row
        plan = plan_training(rows, ft, ft.num_workers)
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
                checkpoint_bytes=measured.bytes_per_param(ft.zero_stage) * n,
                saves=len(checkpoint_steps(plan, ft.checkpoint, ft.checkpoint_every_steps)),
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


def markdown(measured: TargetMeasured | None, estimates: list[SubsetEstimate], lengths: TokenLengths) -> str:
    if measured is None:
        return "Target fine-tuning and evaluation: not in the check (no `target` step, or it failed): not estimated.\n"
    gen = ", ".join(f"{r:,.0f} at batch {b}" for b, r in sorted(measured.gen_tokens_per_s.items()))
    note = (
        f"{LENGTHS_NOTE}: {lengths.mean:.1f} tokens a row under {lengths.tokenizer} at max_length {lengths.max_length}"
    )
    lines = [
        f"Target measured on {measured.device} with a {measured.params:,}-parameter LLaMA-shaped model (ZeRO-"
        f"{measured.zero_stage}, world size 1): fine-tuning {measured.tokens_per_s:,.0f} tokens/s, checkpoint "
        f"{measured.checkpoint_bytes_per_param:.1f} bytes/param written at "
        f"{measured.checkpoint_write_bytes_per_s / 1e9:.2f} GB/s, generation {gen} new tokens/s.",
        "Scaled to the shipped configs under these assumptions:",
        *(f"- {a.replace('LENGTHS_NOTE', note)}" for a in ASSUMPTIONS),
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


def measure_lengths_of(rows: list[dict], spec, max_length: int) -> dict[int, int]:
    """Token count of every Alpaca row under `spec`'s tokenizer, as the tokens stage and the finetune stage tokenise
    them (Alpaca template, EOS included, cut at max_length): a histogram length -> rows."""
    import pyarrow as pa

    from gradfilter_ray.config import ProxyConfig
    from gradfilter_ray.data.tokenized import tokenize_table
    from gradfilter_ray.models import load_tokenizer

    table = pa.table(
        {
            "id": list(range(len(rows))),
            "instruction": [r["instruction"] for r in rows],
            "input": [r.get("input", "") for r in rows],
            "output": [r["output"] for r in rows],
        }
    )
    tokens = tokenize_table(table, load_tokenizer(spec), ProxyConfig(model=spec, max_length=max_length))
    histogram: dict[int, int] = {}
    for ids in tokens["input_ids"].to_pylist():
        histogram[len(ids)] = histogram.get(len(ids), 0) + 1
    return dict(sorted(histogram.items()))


def measure_lengths(data: str, spec, max_length: int) -> dict[int, int]:
    """`measure_lengths_of` the rows of `data` (a JSON list of Alpaca rows; `bundled:` names resolve)."""
    from gradfilter_ray.bundled import resolve

    return measure_lengths_of(json.loads(Path(resolve(data)).read_text()), spec, max_length)


def main() -> int:
    from gradfilter_ray.config import ModelSpec

    ap = argparse.ArgumentParser(description="Measure the bundled Alpaca sample's token lengths (sizing table).")
    ap.add_argument("--measure-lengths", action="store_true", required=True)
    ap.add_argument("--llama2-tokenizer", required=True, help="LLaMA-2's tokenizer.model (SentencePiece)")
    ap.add_argument("--data", default="bundled:alpaca_5k.json")
    ap.add_argument("--out", default=str(LENGTHS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "tokenizer.model").write_bytes(Path(args.llama2_tokenizer).read_bytes())
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps(LLAMA2_TOKENIZER_CONFIG))
        measured = {
            "gpt2": {"max_length": 512, "histogram": measure_lengths(args.data, ModelSpec("bundled:gpt2"), 512)},
            "llama2": {"max_length": 1024, "histogram": measure_lengths(args.data, ModelSpec(folder), 1024)},
        }
    entries = []
    for name, entry in measured.items():
        lengths = TokenLengths(name, entry["max_length"], entry["histogram"])
        print(f"{name} at {entry['max_length']}: {lengths.rows} rows, mean {lengths.mean:.2f} tokens")
        summary = {"max_length": lengths.max_length, "rows": lengths.rows, "mean": round(lengths.mean, 3)}
        # one line a tokenizer: the histogram (length -> rows) is long and only read by load_lengths
        entries.append(f'  "{name}": ' + json.dumps({**summary, "histogram": entry["histogram"]}))
    head = json.dumps({"data": args.data, "template": "alpaca"})[:-1]
    Path(args.out).write_text(head + ', "tokenizers": {\n' + ",\n".join(entries) + "\n}}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
