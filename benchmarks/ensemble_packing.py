"""Ensemble packing benchmark: one member, one epoch, padded vs padding-free packed batches (`ensemble.packing`),
side by side in one run.

The same batches either way (uniformly shuffled, `ensemble.batching: random`): packing only changes how a batch is
laid out (its rows bin-packed into a few sequences no longer than its longest row, `ensemble/packing.py`). The
corpora and models are `ensemble_padding.py`'s, imported from it:
  demo:  the demo config (jobs/configs/demo.yaml): the bundled stories260K proxy, the first data.limit (400) bundled
         Alpaca rows, proxy.max_length 256, its ensemble settings (batch 16, LoRA r=8).
  gpt2:  1,000 bundled Alpaca rows, the real GPT-2 tokenizer at max_length 512, a GPT-2 built from config (2 layers,
         d=64, vocab 50257), the demo's ensemble settings.
Dropout is off in both (lora_dropout 0, and the GPT-2's own resid/embd/attn dropout 0), so the two layouts train the
same adapter up to float rounding and their epoch mean losses must agree (gate: relative difference <= 1e-4,
otherwise exit 2 and no speeds).

For each corpus and layout the member trains epoch 1 (`loop.train_member`, same seeds, same initial adapter), after
a warm-up epoch per contender; then --repeats rounds interleaved (padded, packed, padded, packed, ...: the machine
is shared, a burst of load hits both alike), median wall and CPU seconds. Reported per corpus:
  computed_tokens    = padded: rows x their batch's longest row; packed: packed sequences x their padded length
                       (what the loop reports to `on_epoch_planned`)
  attention_pairs    = sequences x length^2 summed over the epoch's batches (attention is O(L^2) per sequence)
  lm_head_positions  = padded: rows x the batch's scored window; packed: only the positions that predict a labelled
                       token (HF's boolean `logits_to_keep`)
  wall_ratio         = padded wall / packed wall (> 1: packing is faster), and the same in CPU time.

Not a `bench_*` file: `run_all.py` does not run it. Usage: python benchmarks/ensemble_packing.py [--quick]
[--repeats N] [--threads N]. Writes benchmarks/results/ensemble_packing.json either way (its "quick" key says which
mode: a full run takes ~17 min on 2 cores, so the recorded one is quick).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ensemble_padding, extraction/

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ensemble_padding import MEMBER_SEED, REPO, corpora, lm_head_positions, one_epoch  # noqa: E402
from extraction.common import RESULTS, interleaved, log  # noqa: E402
from extraction.report import machine_info  # noqa: E402

from gradfilter_ray.config import EnsembleConfig, ProxyConfig  # noqa: E402
from gradfilter_ray.ensemble.batching import epoch_batches  # noqa: E402
from gradfilter_ray.ensemble.loop import TokenRows  # noqa: E402
from gradfilter_ray.ensemble.packing import pack_batch  # noqa: E402
from gradfilter_ray.models import load_tokenizer  # noqa: E402

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
LOSS_RTOL = 1e-4  # epoch mean loss, packed vs padded, fp32 with dropout off


def without_dropout(proxy: ProxyConfig, ens: EnsembleConfig) -> tuple[ProxyConfig, EnsembleConfig]:
    """The corpus's proxy and ensemble settings with every dropout off (a GPT-2 built from config has 0.1 on by
    default, active in the loop's train mode) and uniformly shuffled batches."""
    spec = proxy.model
    if spec.build_from_config is not None and spec.build_from_config.get("model_type") == "gpt2":
        spec = replace(spec, build_from_config={**spec.build_from_config, **NO_DROPOUT})
    return replace(proxy, model=spec), replace(ens, lora_dropout=0.0, batching="random")


def layout_counts(rows: TokenRows, cfg: EnsembleConfig, pad_id: int) -> dict:
    """Sequences, attention pairs and LM-head positions of epoch 1, padded and packed (same batches)."""
    lengths = rows.lengths()
    batches = epoch_batches(lengths, cfg, MEMBER_SEED, 1)
    packed = [pack_batch([rows.input_ids[i] for i in b], rows.labels_at[b], pad_id) for b in batches]
    return {
        "padded": {
            "sequences": sum(len(b) for b in batches),
            "attention_pairs": sum(len(b) * int(lengths[b].max()) ** 2 for b in batches),
            "lm_head_positions": lm_head_positions(rows, cfg),
        },
        "packed": {
            "sequences": sum(p.shape[0] for p in packed),
            "attention_pairs": sum(p.shape[0] * p.shape[1] ** 2 for p in packed),
            "lm_head_positions": sum(int(p.keep().sum()) for p in packed),
        },
    }


def measure(name: str, proxy: ProxyConfig, ens: EnsembleConfig, rows: TokenRows, repeats: int) -> dict:
    proxy, ens = without_dropout(proxy, ens)
    pad_id = load_tokenizer(proxy.model).pad_token_id
    contenders = {"padded": replace(ens, packing=False), "packed": replace(ens, packing=True)}
    lengths = rows.lengths()
    log(
        f"[{name}] {len(rows)} rows, tokens p50 {np.median(lengths):.0f} p90 {np.percentile(lengths, 90):.0f} "
        f"max {lengths.max()}, batch {ens.batch_size}, batching {ens.batching}, lora_dropout {ens.lora_dropout}"
    )
    warm = {}
    for layout, cfg in contenders.items():  # warm-up, and what each contender's epoch looks like
        warm[layout] = one_epoch(proxy, cfg, rows, pad_id)
        if warm[layout]["rows_done"] != len(rows):
            log(f"CORRECTNESS FAILURE: {name}/{layout} trained {warm[layout]['rows_done']} of {len(rows)} rows")
            sys.exit(2)
    loss_padded, loss_packed = warm["padded"]["mean_loss"], warm["packed"]["mean_loss"]
    loss_rel = abs(loss_packed - loss_padded) / abs(loss_padded)
    if not loss_rel <= LOSS_RTOL:
        log(f"CORRECTNESS FAILURE: {name} epoch mean loss padded {loss_padded} vs packed {loss_packed}")
        sys.exit(2)
    times = interleaved(
        {layout: lambda cfg=cfg: one_epoch(proxy, cfg, rows, pad_id) for layout, cfg in contenders.items()}, repeats
    )
    counts = layout_counts(rows, ens, pad_id)
    out = {
        "rows": len(rows),
        "tokens_p50": float(np.median(lengths)),
        "tokens_p90": float(np.percentile(lengths, 90)),
        "tokens_max": int(lengths.max()),
        "batch_size": ens.batch_size,
        "batching": ens.batching,
        "lora_dropout": ens.lora_dropout,
    }
    for layout in contenders:
        padding = warm[layout]["padding"]
        out[layout] = {
            "real_tokens": padding.real_tokens,
            "computed_tokens": padding.computed_tokens,
            "padding_efficiency": round(padding.efficiency, 4),
            **counts[layout],
            "epoch_mean_loss": warm[layout]["mean_loss"],
            **times[layout],
        }
    out["epoch_mean_loss_abs_diff"] = abs(loss_packed - loss_padded)
    out["epoch_mean_loss_rel_diff"] = loss_rel
    for key in ("computed_tokens", "attention_pairs", "lm_head_positions"):
        out[f"{key}_ratio"] = round(out["padded"][key] / out["packed"][key], 3)
    out["wall_ratio"] = round(times["padded"]["wall_s"] / times["packed"]["wall_s"], 3)
    out["cpu_ratio"] = round(times["padded"]["cpu_s"] / times["packed"]["cpu_s"], 3)
    log(
        f"[{name}] computed tokens padded {out['padded']['computed_tokens']} / packed "
        f"{out['packed']['computed_tokens']} ({out['computed_tokens_ratio']:.2f}x); epoch wall "
        f"{times['padded']['wall_s']:.1f} / {times['packed']['wall_s']:.1f} s (ratio {out['wall_ratio']:.2f}), CPU "
        f"{times['padded']['cpu_s']:.1f} / {times['packed']['cpu_s']:.1f} s (ratio {out['cpu_ratio']:.2f}); "
        f"epoch mean loss {loss_padded:.6f} / {loss_packed:.6f} (rel diff {loss_rel:.1e})"
    )
    return out


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per fresh member would bury the results
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke version: fewer rows (demo 96, gpt2 200)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per corpus (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a demo member gets 1)")
    args = ap.parse_args()
    repeats = args.repeats or 3
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {"machine": machine_info(args.threads), "repeats": repeats, "quick": args.quick}
    for name, (proxy, ens, rows) in corpora(args.quick).items():
        results[name] = measure(name, proxy, ens, rows, repeats)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    out_file = RESULTS / "ensemble_packing.json"
    out_file.write_text(json.dumps(results, indent=2, default=str))
    log(f"wrote {out_file.relative_to(REPO)} ({results['elapsed_s']} s)")


if __name__ == "__main__":
    main()
