"""What every section of bench_extract shares: constants and targets, timing (wall and CPU, this process or its
whole process tree), and the proxies, adapters, rows and run directories the sections measure on."""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gradfilter_ray.config import Config, EnsembleConfig, GradientsConfig, ModelSpec, ProxyConfig, RayConfig

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
ALPACA = REPO / "gradfilter_ray" / "assets" / "data" / "alpaca_sample_1k.json"
MAX_LENGTH = 128
TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256}
MEMBERS, EARLY, LATE = 5, 1, 2
TARGETS = {"speedup": 5.0, "overhead": 1.15, "ray": 1.3, "scaling_tol": 0.15, "rss_tol": 0.15}
NORM_RTOL = 1e-5  # batched vs batch-size-1, fp32 (field notes: ~1.5e-7 seen)
RAY_RTOL = 1e-6  # Ray stage vs bare loop: the same code on the same batches
SOURCE_SCHEMA = pa.schema(
    [("id", pa.int64()), ("instruction", pa.string()), ("input", pa.string()), ("output", pa.string())]
)
WORDS = (
    "alpha beta gamma delta river stone light cloud green house apple table paper music water fire quick brown "
    "lazy dog write list three short story about summer winter city road blue small large happy poem explain why"
).split()


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Timing


def cpu_ticks() -> float:
    return time.process_time()


class TreeCPU:
    """CPU seconds of this process and all its descendants (Ray's GCS, raylet, workers, actors) over an interval.

    Ray's actors are grandchildren that exit on their own, so neither process_time nor RUSAGE_CHILDREN sees them;
    /proc is sampled every `period` seconds instead (a scan costs ~3 ms of this process's CPU). Own utime+stime
    only (cutime would count a reaped child twice); the last < `period` s of a process that exits between samples
    is lost.
    """

    def __init__(self, period: float = 0.25) -> None:
        self.period = period
        self.tick = os.sysconf("SC_CLK_TCK")
        self.root = os.getpid()
        self.names: dict[tuple[int, int], str] = {}
        self.first: dict[tuple[int, int], int] = {}
        self.last: dict[tuple[int, int], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.seconds = 0.0
        self.by_process: dict[str, dict] = {}

    def _scan(self) -> dict[tuple[int, int], int]:
        parent, ticks = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry)
            parent[pid] = int(fields[1])
            ticks[pid] = (int(fields[19]), int(fields[11]) + int(fields[12]))  # starttime, utime + stime
        tree, frontier = {self.root}, [self.root]
        children: dict[int, list[int]] = {}
        for pid, ppid in parent.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in tree:
                    tree.add(child)
                    frontier.append(child)
        found = {(pid, ticks[pid][0]): ticks[pid][1] for pid in tree if pid in ticks}
        for key in found:
            # Ray renames a worker when it takes a task (ray::IDLE -> ray::MapWorker...): keep the most telling name.
            if self.names.get(key, "").startswith("ray::") and not self.names[key].startswith("ray::IDLE"):
                continue
            try:
                cmd = Path(f"/proc/{key[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            self.names[key] = cmd.strip()[:80] or self.names.get(key, "?")
        return found

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.last.update(self._scan())

    def __enter__(self) -> TreeCPU:
        self.first = self._scan()
        self.last = dict(self.first)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.last.update(self._scan())
        used = {k: (v - self.first.get(k, 0)) / self.tick for k, v in self.last.items()}
        self.seconds = sum(used.values())
        by_name: dict[str, list] = {}
        for k, sec in used.items():
            name = self.names.get(k, "?")
            if k[0] == self.root:
                name = "this process"
            elif "default_worker.py" in name:
                name = "ray worker (starting)"
            else:
                name = name.split(" ")[0].rsplit("/", 1)[-1]
            entry = by_name.setdefault(name, [0.0, 0])
            entry[0] += sec
            entry[1] += k not in self.first  # processes started during the interval
        self.by_process = {
            k: {"cpu_s": round(v[0], 2), "new_processes": v[1]}
            for k, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])
            if v[0] >= 0.05
        }


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict]:
    """`repeats` rounds of all (already warmed-up) fns in turn, so that a burst of load from other tenants hits
    every contender alike. Median wall and CPU seconds per fn."""
    runs: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, w0 = cpu_ticks(), time.perf_counter()
            fn()
            runs[name]["wall"].append(time.perf_counter() - w0)
            runs[name]["cpu"].append(cpu_ticks() - c0)
    return {name: summarize(r["wall"], r["cpu"]) for name, r in runs.items()}


def summarize(walls: list[float], cpus: list[float]) -> dict:
    return {
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "wall_runs_s": [round(w, 3) for w in walls],
        "cpu_runs_s": [round(c, 3) for c in cpus],
    }


# ---------------------------------------------------------------------------------------------------------------
# Models, adapters, rows


def real_spec() -> ModelSpec:
    return ModelSpec(build_from_config={**TINY, "vocab_size": 50257}, tokenizer="bundled:gpt2")


def synthetic_rows(n: int, seed: int, start_id: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append(
            {
                "id": start_id + i,
                "instruction": " ".join(rng.choices(WORDS, k=rng.randint(1, 4))),
                "input": " ".join(rng.choices(WORDS, k=rng.randint(1, 3))) if rng.random() < 0.3 else "",
                "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 8))),
            }
        )
    return rows


def train_small_tokenizer(folder: Path) -> int:
    """A 512-entry byte-level BPE whose merges may cross spaces (no pre-splitting), trained on the Alpaca template
    and the synthetic rows: the template becomes a few tokens, so rows are short and the LM head is small."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gradfilter_ray.data.prompt import alpaca_prompt

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [alpaca_prompt(r["instruction"], r["input"]) for r in synthetic_rows(400, seed=12345)]
    corpus += [r["output"] for r in synthetic_rows(400, seed=54321)]
    tok.train_from_iterator(corpus, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(folder))
    return tok.get_vocab_size()


def small_spec(tokenizer_dir: Path, vocab: int) -> ModelSpec:
    # bos/eos ids inside the small vocabulary (GPT-2's 50256 would not be); id 0 is <|endoftext|>.
    cfg = {**TINY, "vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0}
    return ModelSpec(build_from_config=cfg, tokenizer=str(tokenizer_dir))


def ensemble_cfg() -> EnsembleConfig:
    return EnsembleConfig(
        members=MEMBERS,
        epochs=LATE,
        early_epoch=EARLY,
        late_epoch=LATE,
        lora_rank=8,
        lora_alpha=16.0,
        lora_dropout=0.0,
        target_modules=["c_attn", "c_proj"],
    )


def random_lora(spec: ModelSpec, seed: int):
    """A fresh LoRA model whose lora_B is random: at B = 0 every lora_A gradient is 0 and norms are degenerate."""
    import torch

    from gradfilter_ray.lora import attach_lora
    from gradfilter_ray.models import load_causal_lm

    model = attach_lora(load_causal_lm(spec), ensemble_cfg(), seed=seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def write_run_dir(root: Path, spec: ModelSpec, rows: list[dict], rows_per_file: int) -> None:
    """A run directory as the stages before extraction leave it: `data/` (canonical rows), `tokens/` (those rows
    tokenised as the `tokens` stage does), every member's early and late adapter in its folder under `ensemble/`, and
    the `ensemble` record that maps the members to their folders (`units`), which the extraction reads them through."""
    from gradfilter_ray.data.formats import CANONICAL_COLUMNS
    from gradfilter_ray.lora import save_adapter
    from gradfilter_ray.rundir import RunDir
    from gradfilter_ray.units import MEMBER_DONE, ensemble_members

    rundir = RunDir(str(root))
    members = ensemble_members(make_config(root, spec, batch_size=1, bucket_rows=1), tokens_key="synthetic")
    units = {m.unit: f"{rundir.ensemble.name}/{m.folder}" for m in members}
    rundir.record_stage("ensemble", {"status": "done", "key": "synthetic", "units": units})
    for m in range(MEMBERS):
        for e in (EARLY, LATE):
            save_adapter(random_lora(spec, seed=100 * m + e), Path(rundir.member_epoch(m, e)))
        (rundir.member_folders()[m] / MEMBER_DONE).write_text(json.dumps({"trained": f"synthetic-{m}"}))
    write_rows(Path(rundir.data), rows, rows_per_file)
    assert set(pq.read_schema(next(Path(rundir.data).glob("*.parquet"))).names) == set(CANONICAL_COLUMNS)
    tokenizer, proxy = load_tokenizer_for(spec), ProxyConfig(model=spec, max_length=MAX_LENGTH)
    Path(rundir.tokens).mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(sorted(Path(rundir.data).glob("*.parquet"))):
        pq.write_table(tokenize(pq.read_table(part), tokenizer, proxy), Path(rundir.tokens) / f"part-{k:05d}.parquet")


def load_tokenizer_for(spec: ModelSpec):
    from gradfilter_ray.models import load_tokenizer

    return load_tokenizer(spec)


def tokenize(rows: pa.Table, tokenizer, proxy: ProxyConfig) -> pa.Table:
    """Canonical rows -> `tokens/` rows (data.tokenized.TOKEN_SCHEMA), as the `tokens` stage writes them."""
    from gradfilter_ray.data.tokenized import tokenize_table

    return tokenize_table(rows, tokenizer, proxy)


def write_rows(folder: Path, rows: list[dict], rows_per_file: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, begin in enumerate(range(0, len(rows), rows_per_file)):
        chunk = rows[begin : begin + rows_per_file]
        table = pa.table(
            {
                "id": pa.array([r["id"] for r in chunk], pa.int64()),
                "instruction": [r["instruction"] for r in chunk],
                "input": [r["input"] for r in chunk],
                "output": [r["output"] for r in chunk],
                "conversation": pa.nulls(len(chunk), pa.string()),  # Alpaca rows: no conversation, no tools
                "tools": pa.nulls(len(chunk), pa.string()),
                "extra": ["{}"] * len(chunk),
                "source_format": ["alpaca"] * len(chunk),
                "source_file": ["synthetic"] * len(chunk),
                "source_row": pa.array([r["id"] for r in chunk], pa.int64()),
            }
        )
        pq.write_table(table, folder / f"part-{k:05d}.parquet")


def make_config(root: Path, spec: ModelSpec, batch_size: int, bucket_rows: int) -> Config:
    return Config(
        output_dir=str(root),
        proxy=ProxyConfig(model=spec, max_length=MAX_LENGTH),
        ensemble=ensemble_cfg(),
        gradients=GradientsConfig(
            batch_size=batch_size, num_actors=1, cpus_per_actor=1.0, torch_threads=1, shard_rows=bucket_rows
        ),
        ray=RayConfig(num_cpus=2, progress_bars=False, log_level="WARNING"),
    )
