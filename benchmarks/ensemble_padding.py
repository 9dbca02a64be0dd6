"""Ensemble padding benchmark: one member, one epoch, `random` vs `length_grouped` batches, side by side in one run.

Two corpora, each tokenised with the project's own code (`data.tokenized.tokenize_table`, rows without a response
token dropped as the ensemble stage drops them):
  demo:  the demo config (jobs/configs/demo.yaml) as is: the bundled stories260K proxy, the first data.limit (400)
         bundled Alpaca rows, proxy.max_length 256, its ensemble settings (batch 16, LoRA r=8).
  gpt2:  1,000 bundled Alpaca rows, the real GPT-2 tokenizer (bundled:gpt2) at max_length 512, a GPT-2 built from
         config (2 layers, d=64, vocab 50257), the demo's ensemble settings.

For each corpus and batching the member trains one epoch (`loop.train_member` with the same seeds, from the same
initial adapter), after a warm-up epoch per contender; then --repeats rounds interleaved across the two contenders
(the machine is shared: a burst of load hits both alike), median wall and CPU seconds. Reported per corpus:
  padding_efficiency = real tokens / computed tokens (rows x their batch's longest row), from the loop's own
                       callback (target >= 0.9 with length_grouped on the demo corpus)
  wall_ratio         = random wall / length_grouped wall (> 1: grouping is faster), and the same in CPU time.
  lm_head_positions  = rows x scored window summed over the epoch's batches: with vocab 50257 the LM head dominates,
                       and its window also covers padding and other rows' prompt tails.
Correctness gate: every contender trains every row exactly once per epoch; otherwise exit 2 and no speeds.

Not a `bench_*` file: `run_all.py` does not run it. Usage: python benchmarks/ensemble_padding.py [--quick]
[--repeats N] [--threads N]. Writes benchmarks/results/ensemble_padding.json (ensemble_padding.quick.json with
--quick).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without `pip install -e .`

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from extraction.common import ALPACA, RESULTS, interleaved, log  # noqa: E402
from extraction.report import machine_info  # noqa: E402

from gradfilter_ray.config import EnsembleConfig, ModelSpec, ProxyConfig, load  # noqa: E402
from gradfilter_ray.data.formats import Rejected, normalize_record  # noqa: E402
from gradfilter_ray.data.tokenized import tokenize_table  # noqa: E402
from gradfilter_ray.ensemble.batching import epoch_batches  # noqa: E402
from gradfilter_ray.ensemble.loop import TokenRows, train_member  # noqa: E402
from gradfilter_ray.lora import attach_lora  # noqa: E402
from gradfilter_ray.models import load_causal_lm, load_tokenizer  # noqa: E402

DEMO = REPO / "jobs" / "configs" / "demo.yaml"
GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 512, "vocab_size": 50257}
GPT2_ROWS, GPT2_MAX_LENGTH = 1000, 512
TARGET_DEMO_EFFICIENCY = 0.9
MEMBER_SEED = 42
MAX_CHARS = 1_000_000  # no record of the sample comes near it; only normalisation matters here


def alpaca_rows(limit: int) -> pa.Table:
    """The first `limit` bundled Alpaca records as canonical rows (id, instruction, input, output), less those the
    `data` stage rejects (an empty output, an exact duplicate, ...), as its `data.limit` does."""
    records, seen = [], set()
    for raw in json.loads(ALPACA.read_text())[:limit]:
        try:
            record = normalize_record(raw, MAX_CHARS)
        except Rejected:
            continue
        if record["content_hash"] not in seen:
            seen.add(record["content_hash"])
            records.append(record)
    return pa.table(
        {
            "id": pa.array(range(len(records)), pa.int64()),
            **{k: [r[k] for r in records] for k in ("instruction", "input", "output")},
        }
    )


def token_rows(table: pa.Table, proxy: ProxyConfig) -> TokenRows:
    """Tokenised as the `tokens` stage does; only rows with a response token, as the ensemble stage trains."""
    tokens = tokenize_table(table, load_tokenizer(proxy.model), proxy).to_pydict()
    keep = [i for i, n in enumerate(tokens["n_response_tokens"]) if n > 0]
    return TokenRows.from_columns(
        [tokens["id"][i] for i in keep],
        [tokens["input_ids"][i] for i in keep],
        [tokens["label_start"][i] for i in keep],
    )


def corpora(quick: bool) -> dict[str, tuple[ProxyConfig, EnsembleConfig, TokenRows]]:
    demo = load(DEMO)
    demo_limit = 96 if quick else demo.data.limit
    gpt2_proxy = ProxyConfig(
        model=ModelSpec(build_from_config=GPT2, tokenizer="bundled:gpt2", init_seed=0), max_length=GPT2_MAX_LENGTH
    )
    return {
        "demo": (demo.proxy, demo.ensemble, token_rows(alpaca_rows(demo_limit), demo.proxy)),
        "gpt2": (gpt2_proxy, demo.ensemble, token_rows(alpaca_rows(200 if quick else GPT2_ROWS), gpt2_proxy)),
    }


def lm_head_positions(rows: TokenRows, cfg: EnsembleConfig) -> int:
    """Positions the LM head computes in epoch 1: per batch, rows x `losses.scored_window` (from the batch's earliest
    response token to its padded end), where a 50k-vocabulary model spends most of its time."""
    lengths, starts = rows.lengths(), rows.labels_at
    batches = epoch_batches(lengths, cfg, MEMBER_SEED, 1)
    return sum(len(b) * int(lengths[b].max() - starts[b].min() + 1) for b in batches)


def one_epoch(proxy: ProxyConfig, ens: EnsembleConfig, rows: TokenRows, pad_id: int) -> dict:
    """A fresh member (same initial adapter every time) trained for epoch 1 only; what the loop reported."""
    model = attach_lora(load_causal_lm(proxy.model), ens, seed=MEMBER_SEED)
    planned, rows_done, losses = {}, [], []
    train_member(
        model,
        rows,
        ens,
        MEMBER_SEED,
        torch.device("cpu"),
        pad_id,
        lambda epoch, m, o, step_losses: losses.extend(step_losses),
        stop_after_epoch=1,
        on_epoch_planned=planned.__setitem__,
        on_rows_done=rows_done.append,
    )
    return {"padding": planned[1], "rows_done": sum(rows_done), "mean_loss": float(np.mean(losses))}


def measure(name: str, proxy: ProxyConfig, ens: EnsembleConfig, rows: TokenRows, repeats: int) -> dict:
    pad_id = load_tokenizer(proxy.model).pad_token_id
    contenders = {b: replace(ens, batching=b) for b in ("random", "length_grouped")}
    lengths = rows.lengths()
    log(
        f"[{name}] {len(rows)} rows, tokens p50 {np.median(lengths):.0f} p90 {np.percentile(lengths, 90):.0f} "
        f"max {lengths.max()}, batch {ens.batch_size}, window {ens.length_group_batches} batches"
    )
    warm = {}
    for batching, cfg in contenders.items():  # warm-up, and what each contender's epoch looks like
        warm[batching] = one_epoch(proxy, cfg, rows, pad_id)
        if warm[batching]["rows_done"] != len(rows):
            log(f"CORRECTNESS FAILURE: {name}/{batching} trained {warm[batching]['rows_done']} of {len(rows)} rows")
            sys.exit(2)
    times = interleaved(
        {b: lambda cfg=cfg: one_epoch(proxy, cfg, rows, pad_id) for b, cfg in contenders.items()}, repeats
    )
    out = {
        "rows": len(rows),
        "tokens_p50": float(np.median(lengths)),
        "tokens_p90": float(np.percentile(lengths, 90)),
        "tokens_max": int(lengths.max()),
        "batch_size": ens.batch_size,
        "length_group_batches": ens.length_group_batches,
    }
    for batching in contenders:
        padding = warm[batching]["padding"]
        out[batching] = {
            "padding_efficiency": round(padding.efficiency, 4),
            "real_tokens": padding.real_tokens,
            "computed_tokens": padding.computed_tokens,
            "lm_head_positions": lm_head_positions(rows, contenders[batching]),
            "epoch_mean_loss": round(warm[batching]["mean_loss"], 4),
            **times[batching],
        }
    out["wall_ratio"] = round(times["random"]["wall_s"] / times["length_grouped"]["wall_s"], 3)
    out["cpu_ratio"] = round(times["random"]["cpu_s"] / times["length_grouped"]["cpu_s"], 3)
    out["lm_head_positions_ratio"] = round(
        out["random"]["lm_head_positions"] / out["length_grouped"]["lm_head_positions"], 3
    )
    out["computed_tokens_ratio"] = round(
        out["random"]["computed_tokens"] / out["length_grouped"]["computed_tokens"], 3
    )
    log(
        f"[{name}] padding efficiency random {out['random']['padding_efficiency']:.3f} / length_grouped "
        f"{out['length_grouped']['padding_efficiency']:.3f}; epoch wall {times['random']['wall_s']:.1f} / "
        f"{times['length_grouped']['wall_s']:.1f} s (ratio {out['wall_ratio']:.2f}), CPU ratio {out['cpu_ratio']:.2f}"
    )
    return out


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per fresh member would bury the results
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke version: fewer rows, one repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per corpus (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a demo member gets 1)")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {"machine": machine_info(args.threads), "repeats": repeats, "quick": args.quick}
    for name, (proxy, ens, rows) in corpora(args.quick).items():
        results[name] = measure(name, proxy, ens, rows, repeats)
    demo_efficiency = results["demo"]["length_grouped"]["padding_efficiency"]
    results["targets"] = {
        "demo_length_grouped_efficiency": TARGET_DEMO_EFFICIENCY,
        "met": demo_efficiency >= TARGET_DEMO_EFFICIENCY,
    }
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    out_file = RESULTS / ("ensemble_padding.quick.json" if args.quick else "ensemble_padding.json")
    out_file.write_text(json.dumps(results, indent=2, default=str))
    log(f"wrote {out_file.relative_to(REPO)} ({results['elapsed_s']} s)")


if __name__ == "__main__":
    main()
